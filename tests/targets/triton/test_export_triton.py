"""`prunegraph export triton`: standalone kernels for a pruned model's per-layer MLP widths."""

from __future__ import annotations

import json

import pytest
import torch
from _pruning_fixtures import fresh, random_plan

from prunegraph.cli.main import main
from prunegraph.errors import PreconditionError
from prunegraph.plan.checkpoint import save_pruned
from prunegraph.plan.slicing import apply_plan
from prunegraph.targets.triton.codegen import load_module
from prunegraph.targets.triton.export import export_triton, swiglu_mlp_paths
from prunegraph.targets.triton.runner import install_triton_mlps, uninstall


@pytest.mark.slow
def test_export_cli_writes_kernels_that_reproduce_the_pruned_model(tmp_path, capsys):
    plan = random_plan("llama", 3)
    model = fresh("llama")
    apply_plan(model, plan)
    folder = save_pruned(model, plan, tmp_path / "m")
    assert main(["export", "triton", str(folder), str(tmp_path / "k")]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = json.loads((tmp_path / "k" / "layers.json").read_text())["layers"]
    widths = {p: model.get_submodule(p).up_proj.out_features for p in layers}
    assert report["layers"] == len(layers) == model.config.num_hidden_layers
    assert all(layers[p]["intermediate"] == w for p, w in widths.items())
    module = load_module(tmp_path / "k" / "kernels.py")
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        install_triton_mlps(model, list(layers), module)
        got = model(input_ids=ids).logits
        uninstall(model)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, served", [
    ("phi3", ["model.layers.0.mlp", "model.layers.1.mlp"]),  # one fused gate_up_proj weight
    ("qwen2-moe", ["model.layers.0.mlp.shared_expert", "model.layers.1.mlp.shared_expert"]),
])
@pytest.mark.slow
def test_gated_mlps_found_in_the_graph_get_kernels(arch, served, tmp_path):
    """Not only modules named gate_proj/up_proj: the graph's gated MLPs run the kernels and
    reproduce the pruned model."""
    model = fresh(arch)
    apply_plan(model, random_plan(arch, 4))
    report = export_triton(model, tmp_path / "k")
    layers = json.loads((tmp_path / "k" / "layers.json").read_text())["layers"]
    assert list(layers) == served and report["layers"] == len(served)
    if arch == "phi3":
        gate, up = layers[served[0]]["gate"], layers[served[0]]["up"]
        assert gate["param"] == up["param"] and up["offset"] == gate["size"]
    else:  # the routed experts are reported, not lowered
        assert all("routed experts" in r for r in report["skipped"].values())
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        install_triton_mlps(model, served, load_module(tmp_path / "k" / "kernels.py"))
        got = model(input_ids=ids).logits
        uninstall(model)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_model_without_swiglu_mlps_is_refused_before_writing(tmp_path):
    paths, skipped = swiglu_mlp_paths(fresh("gpt2"))  # GELU MLP with c_fc / c_proj
    assert paths == []
    assert set(skipped) == {f"transformer.h.{i}.mlp:channels" for i in range(2)}
    assert all("not a gated MLP: one producer" in r for r in skipped.values())
    with pytest.raises(PreconditionError, match="SwiGLU"):
        export_triton(fresh("gpt2"), tmp_path / "k")
    assert not (tmp_path / "k").exists()
    paths, skipped = swiglu_mlp_paths(fresh("gemma3"))  # gated, but a gelu-tanh gate
    assert paths == [] and set(skipped) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all("gelu_tanh is not SiLU" in r for r in skipped.values())


@pytest.mark.slow
def test_export_triton_pass_writes_into_the_run_folder(tmp_path):
    from prunegraph.pipeline.contract import State
    from prunegraph.targets.triton.export import ExportTriton

    model = fresh("llama")
    apply_plan(model, random_plan("llama", 2))
    result = ExportTriton(dtype="bfloat16")(State(model=model, run_dir=tmp_path))
    layers = json.loads((tmp_path / "triton" / "layers.json").read_text())["layers"]
    assert result.state.triton_kernels == str(tmp_path / "triton")
    assert result.state.metrics["triton"]["layers"] == len(layers) == 2
    assert {v["dtype"] for v in layers.values()} == {"bfloat16"}
    assert next(model.parameters()).dtype == torch.float32  # the pipeline's model is not cast


def test_a_gated_model_is_refused(tmp_path):
    from _pruning_fixtures import groups_of

    from prunegraph.plan.gating import apply_gates

    model = fresh("llama")
    apply_gates(model, list(groups_of("llama")))
    with pytest.raises(PreconditionError, match="still has gates"):
        export_triton(model, tmp_path / "k")
    assert not (tmp_path / "k").exists()
