"""Generated per-layer modules import on their own and match PyTorch; the runner swaps them into
a Hugging Face Llama with non-uniform MLP widths and back.

Tolerances as in test_swiglu.py: fp32 ``1e-5 * max(1, max|ref|)``, bf16 ``2e-2 * ...``;
logits of the fp32 model within ``1e-4`` absolute.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunegraph.errors import PreconditionError
from prunegraph.targets.triton.codegen import (
    MLPShape,
    generate_source,
    layer_identifier,
    load_module,
    write_module,
)
from prunegraph.targets.triton.runner import install_triton_mlps, mlp_shapes, uninstall
from prunegraph.targets.triton.swiglu import swiglu_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _weights(shape: MLPShape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    H, I = shape.hidden, shape.intermediate
    ts = (torch.randn(3, H, generator=g), torch.randn(I, H, generator=g) / H**0.5,
          torch.randn(I, H, generator=g) / H**0.5, torch.randn(H, I, generator=g) / I**0.5)
    return [t.to(device=device, dtype=dtype) for t in ts]


shape_st = st.builds(
    MLPShape,
    name=st.sampled_from(["model.layers.0.mlp", "model.layers.1.mlp", "blocks.7.ffn", "0.mlp"]),
    hidden=st.integers(1, 96), intermediate=st.integers(1, 96),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, "float32"]))


@settings(max_examples=8, deadline=None)
@given(shapes=st.lists(shape_st, min_size=1, max_size=3, unique_by=lambda s: s.name),
       T=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_generated_module_matches_reference(tmp_path_factory, device, shapes, T, seed):
    path = write_module(shapes, tmp_path_factory.mktemp("gen") / "mlps.py")
    mod = load_module(path)
    assert list(mod.LAYERS) == [s.name for s in shapes]
    for i, s in enumerate(shapes):
        dtype = getattr(torch, s.dtype_name)
        x, wg, wu, wd = _weights(s, dtype, device, seed + i)
        x = x[:T]
        run = getattr(mod, f"run_{layer_identifier(s.name)}")
        assert mod.LAYERS[s.name]["run"] is run
        y = run(x, wg, wu, wd)
        ref = swiglu_reference(*(t.double() for t in (x, wg, wu, wd)))
        err = (y.double() - ref).abs().max().item()
        assert y.dtype == dtype and err <= TOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.slow
def test_source_is_standalone_and_readable(tmp_path, device):
    shapes = [MLPShape("model.layers.0.mlp", 64, 61, torch.float32),
              MLPShape("model.layers.1.mlp", 64, 37, torch.float32),
              MLPShape("model.layers.2.mlp", 64, 61, torch.float32)]
    src = generate_source(shapes)
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"os", "torch", "triton"}
    # one set of kernels per hidden width, one plan per distinct shape, layers named in comments
    assert src.count("def gemv_gate_up_h64(") == 1 and src.count("def down_h64(") == 1
    assert src.count("PLAN_h64_i61_f32 = (") == 1 and "PLAN_h64_i37_f32 = (" in src
    assert "# Used by: model.layers.0.mlp, model.layers.2.mlp" in src
    assert "H=64, I=61" in src and "Layer model.layers.1.mlp: H=64, I=37" in src
    assert "not timed" in src  # no GPU: the deterministic default plan, and it says so
    assert generate_source(shapes) == src
    # import it in a fresh interpreter that never loads prunegraph
    path = write_module(shapes, tmp_path / "gen_mlps.py")
    code = ("import importlib.util, sys, torch\n"
            f"spec = importlib.util.spec_from_file_location('gen_mlps', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['gen_mlps'] = m\n"
            "spec.loader.exec_module(m)\n"
            f"x, wg, wu, wd = (torch.randn(*s, device={device!r}) "
            "for s in ((2, 64), (37, 64), (37, 64), (64, 37)))\n"
            "y = m.run_model_layers_1_mlp(x, wg, wu, wd)\n"
            "r = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T\n"
            "assert (y - r).abs().max() < 1e-3 * r.abs().max(), (y - r).abs().max()\n"
            "assert not any(k.startswith('prunegraph') for k in sys.modules)\n"
            "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_bad_specs_are_errors():
    with pytest.raises(ValueError, match="same launcher"):
        generate_source([MLPShape("a.b", 8, 8), MLPShape("a_b", 8, 8)])
    with pytest.raises(ValueError, match="not supported"):
        generate_source([MLPShape("a", 8, 8, torch.int8)])
    with pytest.raises(ValueError, match="at least one"):
        generate_source([])


def test_generated_launcher_rejects_other_shapes(tmp_path, device):
    mod = load_module(write_module([MLPShape("m", 16, 24)], tmp_path / "g.py"))
    x, wg, wu, wd = _weights(MLPShape("m", 16, 20), torch.float32, device, 0)
    with pytest.raises(ValueError, match="regenerate"):
        mod.run_m(x, wg, wu, wd)


# ------------------------------------------------------------------------------------------
# Runner on a tiny Llama with non-uniform widths.
# ------------------------------------------------------------------------------------------

MLP_PATHS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def _slice_mlp(mlp: nn.Module, keep: torch.Tensor) -> None:
    """What a channel-pruning slice does: rows of gate/up, columns of down."""
    for lin in (mlp.gate_proj, mlp.up_proj):
        lin.weight = nn.Parameter(lin.weight.data.index_select(0, keep))
        lin.out_features = len(keep)
    mlp.down_proj.weight = nn.Parameter(mlp.down_proj.weight.data.index_select(1, keep))
    mlp.down_proj.in_features = len(keep)


@pytest.fixture
def pruned_llama(device):
    from prunegraph.data.models import load_model

    model, _ = load_model("random:llama")
    model.eval()
    g = torch.Generator().manual_seed(0)
    for path, width in zip(MLP_PATHS, (61, 37)):
        mlp = model.get_submodule(path)
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):  # large enough to matter
            lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.2
        _slice_mlp(mlp, torch.randperm(mlp.gate_proj.out_features, generator=g)[:width].sort()[0])
    return model.to(device)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device), use_cache=False).logits


@pytest.mark.slow
def test_install_matches_pytorch_and_uninstall_restores(tmp_path, pruned_llama):
    model = pruned_llama
    shapes = mlp_shapes(model, MLP_PATHS)
    assert [(s.hidden, s.intermediate) for s in shapes] == [(64, 61), (64, 37)]
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    want, want_1 = _logits(model, ids), _logits(model, ids[:1, :1])

    mod = load_module(write_module(shapes, tmp_path / "llama_mlps.py"))
    calls = {p: 0 for p in MLP_PATHS}
    for p in MLP_PATHS:  # count launches through the generated table
        run = mod.LAYERS[p]["run"]
        mod.LAYERS[p]["run"] = lambda *a, _run=run, _p=p: (calls.__setitem__(_p, calls[_p] + 1),
                                                           _run(*a))[1]
    install_triton_mlps(model, MLP_PATHS, mod)
    got, got_1 = _logits(model, ids), _logits(model, ids[:1, :1])  # GEMM path, decode path
    assert calls == {p: 2 for p in MLP_PATHS}
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_1, want_1, atol=1e-4, rtol=1e-4)
    with pytest.raises(PreconditionError, match="already"):
        install_triton_mlps(model, MLP_PATHS, mod)

    uninstall(model)
    assert all("forward" not in model.get_submodule(p).__dict__ for p in MLP_PATHS)
    assert torch.equal(_logits(model, ids), want)
    assert calls == {p: 2 for p in MLP_PATHS}


@pytest.mark.slow
def test_fallback_off_triton_devices_warns_once(tmp_path, pruned_llama, monkeypatch):
    model = pruned_llama.to("cpu")  # a device triton does not target once the interpreter is off
    ids = torch.randint(3, 256, (1, 4), generator=torch.Generator().manual_seed(2))
    want = _logits(model, ids)
    install_triton_mlps(model, MLP_PATHS, write_module(mlp_shapes(model, MLP_PATHS),
                                                       tmp_path / "m.py"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = _logits(model, ids), _logits(model, ids)
    msgs = [str(w.message) for w in caught if "fall back" in str(w.message)]
    assert len(msgs) == 1 and "cpu" in msgs[0]
    assert torch.equal(a, want) and torch.equal(b, want)


@pytest.mark.slow
def test_install_checks_every_path_before_changing_any(tmp_path, pruned_llama):
    model = pruned_llama
    good = write_module(mlp_shapes(model, MLP_PATHS), tmp_path / "good.py")
    with pytest.raises(PreconditionError, match="self_attn is not a gated MLP"):
        install_triton_mlps(model, ["model.layers.0.mlp", "model.layers.0.self_attn"], good)
    with pytest.raises(PreconditionError, match="no submodule"):
        install_triton_mlps(model, ["model.layers.9.mlp"], good)
    stale = write_module([MLPShape(p, 64, 96) for p in MLP_PATHS], tmp_path / "stale.py")
    with pytest.raises(PreconditionError, match="regenerate"):
        install_triton_mlps(model, MLP_PATHS, stale)
    model.model.layers[1].mlp.act_fn = nn.GELU()
    with pytest.raises(PreconditionError, match="not SiLU"):
        install_triton_mlps(model, MLP_PATHS, good)
    assert not any("forward" in m.__dict__ for m in model.modules())
