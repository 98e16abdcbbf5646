"""Reconstruct: SparseGPT's weight update under a given mask (after LEAP, Wanda, magnitude)."""

from __future__ import annotations

import pytest
import torch
from _gate_fixtures import corpus  # noqa: F401  (fixture)
from _pruning_fixtures import fresh
from _tiny_tokenizer import make_tokenizer

from prunegraph.errors import SpecError
from prunegraph.passes import Reconstruct, SparsePrune
from prunegraph.passes.sparse_prune import prunable_weights
from prunegraph.pipeline.contract import State
from prunegraph.plan.masks import MaskSet


def _calib(corpus, n=8, length=32):
    from prunegraph.data.blocks import text_blocks

    return text_blocks(make_tokenizer(), corpus, "calibration", length, n)


def _hidden_error(model, dense, blocks) -> float:
    with torch.no_grad():
        return float((model.model(blocks).last_hidden_state
                      - dense.model(blocks).last_hidden_state).pow(2).mean())


@pytest.fixture
def dense_dir(tmp_path):
    path = tmp_path / "dense"
    fresh("llama").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("magnitude", "2:4")])
def test_refits_kept_weights_and_keeps_the_mask(corpus, dense_dir, method, pattern):
    """Same mask, re-fitted kept weights (from the dense ones, reloaded): the removed weights
    stay exactly zero, the pattern holds, and the layer outputs on the calibration text move
    closer to the dense model's."""
    dense = fresh("llama").eval()
    model = fresh("llama").eval()
    kw = dict(source=corpus, calib_blocks=8, block_len=32, batch_size=4)
    sparsity = 0.6 if pattern == "unstructured" else None
    state = SparsePrune(method=method, sparsity=sparsity, pattern=pattern, **kw)(
        State(model=model, tokenizer=make_tokenizer())).state
    before = {n: w.detach().clone() for n, w in model.named_parameters()}
    masked_only = _hidden_error(model, dense, _calib(corpus))
    result = Reconstruct(blocksize=32, dense=dense_dir, **kw)(state)
    assert result.stats["forwards"] == 2 and result.stats["calib_tokens"] == 8 * 32
    params = dict(model.named_parameters())
    for n, keep in state.masks.masks.items():
        assert bool((params[n][~keep] == 0).all()), n
        assert not torch.equal(params[n], before[n]), n          # the kept weights moved
    for n, w in params.items():
        if n not in state.masks.masks:
            assert torch.equal(w, before[n]), n                  # nothing else did
    state.masks.check_pattern()
    after = _hidden_error(model, dense, _calib(corpus))
    assert after < 0.8 * masked_only


def test_without_a_dense_source_it_refuses_before_touching_weights(corpus):
    model = fresh("llama")
    state = SparsePrune(method="magnitude", sparsity=0.5)(
        State(model=model, tokenizer=make_tokenizer())).state
    before = {n: w.detach().clone() for n, w in model.named_parameters()}
    with pytest.raises(SpecError, match="Reconstruct.dense"):
        Reconstruct(source=corpus, calib_blocks=2, block_len=16)(state)
    with pytest.raises(SpecError, match="has no weight"):
        Reconstruct(source=corpus, calib_blocks=2, block_len=16, dense="random:gpt2")(state)
    assert all(torch.equal(w, before[n]) for n, w in model.named_parameters())


def test_without_masks_or_with_foreign_names_it_refuses(corpus):
    from prunegraph.pipeline import Pipeline

    with pytest.raises(SpecError, match="masks"):
        Pipeline([Reconstruct()], initial=("model", "tokenizer"))
    model = fresh("llama")
    name = next(iter(prunable_weights(model)))
    keep = torch.ones_like(model.get_parameter(name), dtype=torch.bool)
    masks = MaskSet({name: keep, "lm_head.weight": torch.ones(2, 2, dtype=torch.bool)})
    state = State(model=model, tokenizer=make_tokenizer(), masks=masks)
    with pytest.raises(SpecError, match="lm_head.weight"):
        Reconstruct(source=corpus, calib_blocks=2, block_len=16)(state)
    with pytest.raises(SpecError, match="percdamp"):
        Reconstruct(percdamp=1.5)
