"""2:4 export: eligibility and the compressed layout on the CPU; the conversion itself on a GPU.

What runs here: which linears can be converted and why not (dtype, tile shape, pattern, Conv1D),
the CUTLASS compressed form (values + metadata, computed by torch's Python reference) of every
2:4 weight decompressing to exactly the masked weight, a linear running on the decompressed
weight matching the masked dense one, and the clear error on a CPU model. What needs a CUDA GPU
(sm80+) and is skipped without one: ``to_sparse_semi_structured`` (it refuses CPU tensors),
cuSPARSELt compression and the sparse GEMMs; ``benchmarks/sparse24_gpu.py`` checks them on an
H200 (outputs vs the masked dense model, and speed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _pruning_fixtures import fresh

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.passes.sparse_prune import oneshot_masks
from prunegraph.targets.sparse24 import candidates, cutlass_roundtrip, resolve_backend, to_semi_structured


def _two_four(arch="llama", dtype=torch.bfloat16, method="magnitude"):
    """A tiny model pruned 2:4 in float32, then cast (zeros stay zeros)."""
    model = fresh(arch)
    blocks = torch.randint(4, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    masks, _ = oneshot_masks(model, method, 0.5, "2:4", blocks, batch_size=2)
    return model.to(dtype), masks


def test_eligibility_follows_torch_tile_tables():
    model, masks = _two_four()
    names = set(masks.masks)
    cslt = {c.name: c for c in candidates(model, "cusparselt", names)}
    assert len(cslt) == 14 and all(c.ok for c in cslt.values())     # 16 x 16 tiles
    cutlass = {c.name: c for c in candidates(model, "cutlass", names)}
    down = cutlass["model.layers.0.mlp.down_proj.weight"]            # [64, 96]: 96 % 64 != 0
    assert not down.ok and "not a multiple of 32 x 64" in down.reason
    assert cutlass["model.layers.0.mlp.up_proj.weight"].ok           # [96, 64]


def test_ineligible_weights_say_why():
    model = fresh("llama").to(torch.bfloat16)
    reasons = {c.name: c.reason for c in candidates(model, "cusparselt")}
    assert reasons["model.layers.0.self_attn.q_proj.weight"] == (
        "weight is not 2:4 sparse along its inputs")
    model32, _ = _two_four(dtype=torch.float32)
    reason = {c.name: c.reason for c in candidates(model32, "cusparselt")}[
        "model.layers.0.self_attn.q_proj.weight"]
    assert reason.startswith("dtype float32") and "bfloat16" in reason
    assert {c.name: c.ok for c in candidates(model32, "cutlass")}[
        "model.layers.0.self_attn.q_proj.weight"]                   # CUTLASS runs fp32 too
    gpt2, _ = _two_four("gpt2")
    assert all("Conv1D" in c.reason for c in candidates(gpt2) if ".h." in c.name)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_compressed_layout_is_lossless_and_computes_the_masked_linear(method):
    model, masks = _two_four(method=method)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for name in masks.masks:
        mod = model.get_submodule(name.rpartition(".")[0])
        values, meta, dense = cutlass_roundtrip(mod.weight)
        assert values.shape == (mod.weight.shape[0], mod.weight.shape[1] // 2)
        assert meta.dtype == torch.int16
        assert torch.equal(dense, mod.weight.detach())
        if mod.weight.shape[1] == 64:
            assert torch.equal(F.linear(x, dense), F.linear(x, mod.weight))


def test_cpu_model_is_refused_before_anything_changes():
    model, _ = _two_four()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(PrunegraphError, match="CUDA GPU"):
        to_semi_structured(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(SpecError, match="backend"):
        resolve_backend("cublas")


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability()[0] < 8, reason="needs a sm80+ GPU")
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_converted_model_matches_the_masked_one_on_gpu(backend):
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("torch's CUTLASS 2:4 kernels run on sm8x only")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    oneshot_masks(model, "magnitude", 0.5, "2:4")
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        want = model(ids).logits.float()
        report = to_semi_structured(model, backend)
        got = model(ids).logits.float()
    assert len(report["converted"]) == 14
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_converted_linears_hand_attention_row_major_outputs():
    """The hook every converted linear gets: a transposed GEMM result comes back row-major
    with the same values (scaled_dot_product_attention's fast kernels need the heads' last dim
    contiguous); an output that already is passes through untouched."""
    from prunegraph.targets.sparse24 import contiguous_output

    y = torch.arange(12.0).reshape(4, 3)
    lin = torch.nn.Linear(3, 4)
    assert contiguous_output(lin, (), y) is None
    fixed = contiguous_output(lin, (), y.t())
    assert fixed.is_contiguous() and torch.equal(fixed, y.t())
    lin.register_forward_hook(contiguous_output)
    lin.forward = lambda x: torch.nn.functional.linear(x, lin.weight).t().contiguous().t()
    out = lin(torch.randn(5, 3))
    assert out.is_contiguous()
