"""Training settings for large models in one process: activation checkpointing trains the same
gates, CPU offload asks for a launch, and whole experts can be gated on request."""

from __future__ import annotations

import pytest
import torch
from _gate_fixtures import corpus, gated_state, one_thread  # noqa: F401

from prunegraph.errors import PassError, SpecError
from prunegraph.passes.train import Train


def _train(state, corpus, **kw):
    return Train(**{"steps": 4, "batch_size": 2, "block_len": 32, "warmup": 1,
                    "source": corpus, "plots": False, **kw})(state)


def test_activation_checkpointing_trains_the_same_gates(corpus):
    plain, ckpt = gated_state("llama"), gated_state("llama")
    _train(plain, corpus)
    _train(ckpt, corpus, activation_checkpointing=True)
    for name, value in plain.trained_gates.items():
        assert torch.equal(ckpt.trained_gates[name], value), name
    # the per-layer recompute is taken off again
    assert not any("forward" in vars(m) for m in ckpt.model.modules())


def test_cpu_offload_needs_a_torchrun_launch(corpus):
    with pytest.raises((SpecError, PassError), match="cpu_offload"):
        _train(gated_state("llama"), corpus, cpu_offload=True)


def test_whole_experts_are_gated_when_asked(corpus):
    state = gated_state("qwen3-moe", kinds=("heads", "experts", "expert_channels"), lr=0.1)
    kinds = {g.kind for g in state.gate_family.groups}
    assert kinds == {"heads", "experts", "expert_channels"}
    before = {n: v.detach().clone() for n, v in state.gate_family.final_values().items()}
    _train(state, corpus)
    experts = [g.name for g in state.gate_family.groups if g.kind == "experts"]
    assert all(not torch.equal(state.trained_gates[n], before[n]) for n in experts)
    # the default kinds leave whole experts alone, as DDP does
    assert "experts" not in {g.kind for g in gated_state("qwen3-moe").gate_family.groups}
