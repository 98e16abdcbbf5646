"""The benchmarks' static-cache greedy decoder gives HF's own greedy tokens, also on a model
pruned to different head counts per layer, and its step is capturable (no host reads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _gpu_timing import (  # noqa: E402
    GreedyDecoder,
    HostSyncError,
    cache_keyword,
    eager_greedy,
    no_host_sync,
    time_prefill,
    use_graph_attention,
)
from _pruning_fixtures import fresh, random_plan  # noqa: E402

from prunegraph.plan.slicing import apply_plan  # noqa: E402


def _model(pruned: bool, seed: int = 0):
    model = fresh("llama")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the init, so greedy tokens vary
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if pruned:
        apply_plan(model, random_plan("llama", 3))
    return model.eval()


@pytest.mark.parametrize("pruned", [False, True])
def test_decoder_tokens_equal_hf_greedy(pruned):
    model = _model(pruned)
    if pruned:
        heads = {layer.self_attn.k_proj.out_features for layer in model.model.layers}
        mlp = {layer.mlp.up_proj.out_features for layer in model.model.layers}
        assert len(heads) > 1 or len(mlp) > 1  # non-uniform: the cache allocates per layer
    prompt = torch.randint(3, 250, (3, 6), generator=torch.Generator().manual_seed(1))
    want = eager_greedy(model, prompt, 9)
    assert len(set(want[0, 6:].tolist())) > 2  # a sequence that can tell positions apart
    use_graph_attention(model)
    decoder = GreedyDecoder(model, 3, 6, 9)
    tokens, seconds = decoder.generate(prompt)
    assert torch.equal(tokens, want) and seconds > 0
    again, _ = decoder.generate(prompt)  # the cache resets between runs
    assert torch.equal(again, want)


def test_decode_step_reads_nothing_on_the_host():
    model = _model(True)
    use_graph_attention(model)
    decoder = GreedyDecoder(model, 2, 5, 3)
    with torch.no_grad():
        decoder.prefill(torch.randint(3, 250, (2, 5)))
        with no_host_sync():
            decoder.step()
            model(input_ids=torch.randint(3, 250, (2, 7)), use_cache=False, logits_to_keep=1)
    assert time_prefill(model, torch.randint(3, 250, (1, 4)), reps=1) > 0


def test_the_check_catches_host_reads():
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        with no_host_sync():
            bool(torch.tensor([1.0]).sum() > 0)
    model = _model(False)  # HF's own SDPA masks test `.all()` on a device tensor
    with torch.no_grad(), pytest.raises(HostSyncError):
        with no_host_sync():
            model(input_ids=torch.randint(3, 250, (2, 7)), use_cache=False)


def test_cache_keyword_is_a_forward_argument():
    import inspect

    model = _model(False)
    assert cache_keyword(model) in inspect.signature(model.forward).parameters


def test_compiled_decoder_tokens_equal_hf_greedy():
    """The step compiled by torch.compile (dynamo with the eager backend here) decodes the same
    tokens; the compilation happens once, before the timed steps."""
    model = _model(True)
    prompt = torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(2))
    want = eager_greedy(model, prompt, 6)
    use_graph_attention(model)
    decoder = GreedyDecoder(model, 2, 5, 6, compile="eager")
    try:
        tokens, _ = decoder.generate(prompt)
        assert torch.equal(tokens, want) and decoder.compile_seconds > 0
        first = decoder.compile_seconds
        assert torch.equal(decoder.generate(prompt)[0], want)
        assert decoder.compile_seconds == first  # not compiled again
    finally:
        decoder.close()
