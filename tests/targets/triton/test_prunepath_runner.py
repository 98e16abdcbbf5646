"""A PrunePath model's MLPs swapped for the Triton kernels inside ``generate`` (interpreter on
CPU): the greedy tokens stay those of the masked PyTorch path, with the prompt's prefill on the
grouped prefill kernels or on the module's own forward."""

from __future__ import annotations

import pytest
import torch
from _pruning_fixtures import fresh, groups_of, input_ids

from prunegraph.errors import PrunegraphError
from prunegraph.passes.prunepath import router as pp
from prunegraph.passes.prunepath.moefy import MoEfy
from prunegraph.passes.prunepath.training import PrunePath
from prunegraph.pipeline.contract import State
from prunegraph.targets.triton import runner
from prunegraph.targets.triton.prunepath import PrunePathFFN
from prunegraph.targets.triton.runner import install_prunepath_mlps, uninstall

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
    real = PrunePathFFN.__call__

    def spy(self, x, *args, **kwargs):
        calls.append(x.numel() // x.shape[-1])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(PrunePathFFN, "__call__", spy)
    return calls


@pytest.mark.parametrize("tau,prefill", [(0.6, "grouped"), (0.3, "grouped"), (0.6, "masked")])
@pytest.mark.slow
def test_greedy_tokens_equal_the_pytorch_path(routed_llama, monkeypatch, tau, prefill):
    model = routed_llama
    pp.set_tau(model, tau)
    prompt = input_ids("llama", batch=1, length=7)
    pp.reset_stats(model)
    want = _greedy(model, prompt)
    assert pp.active_fraction(model) < 0.9  # routing really drops experts
    calls = _count_kernel_calls(monkeypatch)
    install_prunepath_mlps(model, max_grid_tokens=4, prefill=prefill)
    try:
        got = _greedy(model, prompt)
    finally:
        uninstall(model)
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    # the 7-token prefill took the grouped kernels (or the PyTorch path), each later token the
    # decode kernels, in every layer
    prefill_calls = [7] * layers if prefill == "grouped" else []
    assert calls == prefill_calls + [1] * (NEW_TOKENS - 1) * layers


def test_uninstall_restores_and_double_install_is_refused(routed_llama):
    model = routed_llama
    mlps = [model.get_submodule(w["mlp"]) for w in pp.kernel_weights(model)]
    install_prunepath_mlps(model)
    with pytest.raises(PrunegraphError, match="already runs Triton"):
        install_prunepath_mlps(model)
    assert all("forward" in m.__dict__ for m in mlps)
    uninstall(model)
    assert not any("forward" in m.__dict__ for m in mlps)


def test_bad_options_are_refused(routed_llama):
    with pytest.raises(PrunegraphError, match="prefill"):
        install_prunepath_mlps(routed_llama, prefill="dense")
    with pytest.raises(PrunegraphError, match="power of two"):
        install_prunepath_mlps(routed_llama, channels_per_program=3)
    assert not any("forward" in m.__dict__ for m in routed_llama.modules())


def test_a_model_without_routers_is_refused():
    with pytest.raises(PrunegraphError, match="no PrunePath routers"):
        install_prunepath_mlps(fresh("llama"))
