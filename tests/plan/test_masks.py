"""Per-weight masks: which weights are masked, the N:M check, applying, the table, the file."""

from __future__ import annotations

import pytest
import torch
from _pruning_fixtures import fresh

from prunegraph.errors import CheckpointError, PrunegraphError, SpecError
from prunegraph.plan.masks import MaskSet, layer_index, nm_violations, parse_pattern, sparse_linears


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    for bad in ("4:2", "0:4", "2-4", "half"):
        with pytest.raises(SpecError, match="N:M"):
            parse_pattern(bad)


def test_nm_violations_hand_cases():
    keep = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0],     # second group keeps 3 of 4
                         [0, 0, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    assert nm_violations(keep, 2, 4, 1) == 1
    assert nm_violations(keep, 3, 4, 1) == 0
    # along dim 0 (Conv1D's input dim): the same matrix transposed
    assert nm_violations(keep.t(), 2, 4, 0) == 1
    with pytest.raises(SpecError, match="multiple of 4"):
        nm_violations(torch.ones(2, 6, dtype=torch.bool), 2, 4, 1)


def test_sparse_linears_leave_embeddings_head_and_routers_dense():
    llama = sparse_linears(fresh("llama"))
    assert len(llama) == 14 and all(d == 1 for _, d in llama.values())
    assert not any("lm_head" in n or "embed" in n for n in llama)
    gpt2 = sparse_linears(fresh("gpt2"))
    assert len(gpt2) == 8 and all(d == 0 for _, d in gpt2.values())  # Conv1D: [in, out]
    moe = sparse_linears(fresh("qwen2-moe"))
    assert not any("shared_expert_gate" in n for n in moe)
    assert any("shared_expert.up_proj" in n for n in moe)
    skipped = sparse_linears(fresh("llama"), skip=[r"\.k_proj\."])
    assert len(skipped) == 12


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("lm_head.weight") is None


def _masks(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = sparse_linears(model)
    return MaskSet({n: torch.rand(m.weight.shape, generator=gen) > 0.4
                    for n, (m, _) in lin.items()}, method="test", target_sparsity=0.4,
                   in_dims={n: d for n, (_, d) in lin.items()})


def test_apply_zeros_exactly_the_removed_weights():
    model = fresh("qwen3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(model)
    assert masks.apply_(model) == len(masks)
    for n, p in model.named_parameters():
        if n in masks.masks:
            keep = masks.masks[n]
            assert torch.equal(p[keep], before[n][keep]) and bool((p[~keep] == 0).all())
        else:
            assert torch.equal(p, before[n])


def test_table_counts_and_per_layer():
    model = fresh("llama")
    masks = _masks(model)
    rows = masks.table()
    assert len(rows) == 14
    row = next(r for r in rows if r["name"] == "model.layers.1.mlp.down_proj.weight")
    keep = masks.masks[row["name"]]
    assert (row["layer"], row["kind"], row["shape"], row["params"], row["kept"]) == (
        1, "down_proj", [64, 96], 64 * 96, int(keep.sum()))
    per_layer = masks.per_layer()
    kept1 = sum(int(m.sum()) for n, m in masks.masks.items() if ".1." in n)
    n1 = sum(m.numel() for n, m in masks.masks.items() if ".1." in n)
    assert per_layer[1] == pytest.approx(1 - kept1 / n1)
    assert masks.sparsity() == pytest.approx(1 - masks.kept() / masks.numel())


def test_file_round_trip(tmp_path):
    model = fresh("gpt2")
    masks = _masks(model)
    masks.pattern = "unstructured"
    path = masks.save(tmp_path / "m.safetensors")
    back = MaskSet.load(path)
    assert back.method == "test" and back.target_sparsity == pytest.approx(0.4)
    assert back.in_dims == masks.in_dims and back.pattern == "unstructured"
    assert all(torch.equal(back.masks[n], masks.masks[n]) for n in masks.masks)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="corrupt"):
        MaskSet.load(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no mask file"):
        MaskSet.load(tmp_path / "absent.safetensors")


def test_from_model_reads_the_zeros():
    model = fresh("llama")
    masks = _masks(model, seed=3)
    masks.apply_(model)
    back = MaskSet.from_model(model)
    assert all(torch.equal(back.masks[n], masks.masks[n]) for n in masks.masks)


def test_bad_masks_fail_clearly():
    model = fresh("llama")
    with pytest.raises(PrunegraphError, match="bool"):
        MaskSet({"model.layers.0.mlp.up_proj.weight": torch.ones(96, 64)})
    with pytest.raises(PrunegraphError, match="another model"):
        MaskSet({"model.layers.9.mlp.up_proj.weight": torch.ones(96, 64, dtype=torch.bool)}
                ).apply_(model)
    with pytest.raises(PrunegraphError, match="shape"):
        MaskSet({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 96, dtype=torch.bool)}
                ).apply_(model)
    dense = MaskSet({"model.layers.0.mlp.up_proj.weight": torch.ones(96, 64, dtype=torch.bool)},
                    pattern="2:4", in_dims={"model.layers.0.mlp.up_proj.weight": 1})
    with pytest.raises(PrunegraphError, match="2:4"):
        dense.check_pattern()
