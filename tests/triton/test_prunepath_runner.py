"""A PrunePath model's MLPs swapped for the Triton decode kernels inside ``generate``
(interpreter on CPU): the greedy tokens stay those of the masked PyTorch path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from prunegraph.errors import PrunegraphError
from prunegraph.passes.prunepath import router as pp
from prunegraph.passes.prunepath.moefy import MoEfy
from prunegraph.passes.prunepath.training import PrunePath
from prunegraph.pipeline.contract import State
from prunegraph.targets.triton import runner
from prunegraph.targets.triton.runner import install_prunepath_mlps, uninstall

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _pruning_fixtures import fresh, groups_of, input_ids  # noqa: E402

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def routed_llama():
    """Tiny llama, 8 experts of 12 channels per MLP, routers with random weights (peaky enough
    that tau < 1 drops experts)."""
    model = fresh("llama")
    state = MoEfy(group_size=12, iters=3)(State(model=model, groups=list(groups_of("llama"))))
    PrunePath(warmup_steps=0, train=dict(steps=0), tau=0.6)(state.state)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in pp.routers(model):
            r.weight.copy_(torch.randn(r.weight.shape, generator=gen) * 0.5)
    return model


def _greedy(model, prompt):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)


def _count_kernel_calls(monkeypatch) -> list[int]:
    calls = []
    real = runner.prunepath_ffn

    def spy(x, *args, **kwargs):
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(runner, "prunepath_ffn", spy)
    return calls


@pytest.mark.parametrize("tau", [0.6, 0.3])
def test_greedy_tokens_equal_the_pytorch_path(routed_llama, monkeypatch, tau):
    model = routed_llama
    pp.set_tau(model, tau)
    prompt = input_ids("llama", batch=1, length=7)
    pp.reset_stats(model)
    want = _greedy(model, prompt)
    assert pp.active_fraction(model) < 0.9  # routing really drops experts
    calls = _count_kernel_calls(monkeypatch)
    install_prunepath_mlps(model, max_grid_tokens=4)
    try:
        got = _greedy(model, prompt)
    finally:
        uninstall(model)
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    # the 7-token prefill took the PyTorch path, each later token the kernels, in every layer
    assert calls == [1] * (NEW_TOKENS - 1) * layers


def test_uninstall_restores_and_double_install_is_refused(routed_llama):
    model = routed_llama
    mlps = [model.get_submodule(w["mlp"]) for w in pp.kernel_weights(model)]
    install_prunepath_mlps(model)
    with pytest.raises(PrunegraphError, match="already runs Triton"):
        install_prunepath_mlps(model)
    assert all("forward" in m.__dict__ for m in mlps)
    uninstall(model)
    assert not any("forward" in m.__dict__ for m in mlps)


def test_a_model_without_routers_is_refused():
    with pytest.raises(PrunegraphError, match="no PrunePath routers"):
        install_prunepath_mlps(fresh("llama"))
