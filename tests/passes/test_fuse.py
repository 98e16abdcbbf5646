"""Fusion: sibling linears found from the graph become one matmul; the fused model equals the
unfused one (pruned and unpruned, several architectures), still generates, unfuses back exactly,
and folds gates still on the model."""

from __future__ import annotations

import functools

import pytest
import torch
from _pruning_fixtures import fresh, groups_of, input_ids, logits, random_keep, random_plan
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunegraph.ir.capture import capture
from prunegraph.passes.fuse import Fuse, FusedLinear, FusedPart, fuse, unfuse
from prunegraph.pipeline.contract import State
from prunegraph.plan.gating import apply_gates, gate_shape
from prunegraph.plan.slicing import apply_plan

#: architectures with separate sibling projections, and the sets the graph should yield per layer
EXPECTED = {
    "llama": [("self_attn", ["q_proj", "k_proj", "v_proj"]), ("mlp", ["gate_proj", "up_proj"])],
    "gemma3": [("self_attn", ["q_proj", "k_proj", "v_proj"]), ("mlp", ["gate_proj", "up_proj"])],
    "qwen2-moe": [("self_attn", ["q_proj", "k_proj", "v_proj"]),
                  ("mlp.shared_expert", ["gate_proj", "up_proj"])],
}


@functools.cache
def _graph(arch: str):
    """The captured graph of the *unpruned* model: fusion reads only its structure."""
    return capture(fresh(arch))


def _sets(report) -> list[tuple[str, list[str]]]:
    return sorted((r["module"].split("layers.", 1)[1], r["parts"]) for r in report["fused"])


@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_equals_unfused(arch, pruned):
    model = fresh(arch)
    if pruned:
        apply_plan(model, random_plan(arch, seed=5))
    ids = input_ids(arch, batch=2, length=9)
    ref = logits(model, ids)
    ref_gen = model.generate(ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]),
                             max_new_tokens=6, do_sample=False)
    n_params = sum(p.numel() for p in model.parameters())
    state = dict(model.state_dict())

    report = fuse(model, _graph(arch))
    layers = model.config.num_hidden_layers
    want = sorted((f"{layer}.{mod}", parts) for layer in range(layers)
                  for mod, parts in EXPECTED[arch])
    assert _sets(report) == want
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not any(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] == "q_proj"
                   for n, m in model.named_modules())
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    gen = model.generate(ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]),
                         max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, ref_gen)

    assert unfuse(model) == len(report["fused"])
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_already_fused_architectures_have_no_siblings(arch):
    model = fresh(arch)
    report = fuse(model)
    assert report["fused"] == [] and report["linears_fused"] == 0


def test_gates_are_folded_then_fused():
    arch = "llama"
    model = fresh(arch)
    groups = groups_of(arch)
    keep = random_keep(groups, seed=2)
    gen = torch.Generator().manual_seed(0)
    values = {n: torch.rand(gate_shape(g), generator=gen) + 0.25
              for n, g in ((n, next(g for g in groups if g.name == n)) for n in keep)}
    apply_gates(model, list(groups), values)
    ids = input_ids(arch)
    gated = logits(model, ids)
    report = fuse(model, _graph(arch))
    assert report["scales_folded"] > 0
    assert getattr(model, "_prunegraph_gates", None) is None
    torch.testing.assert_close(logits(model, ids), gated, atol=1e-5, rtol=1e-5)


def test_fuse_pass_uses_state_graph_and_checks():
    arch = "qwen2-moe"
    model = fresh(arch)
    apply_plan(model, random_plan(arch, seed=8))
    result = Fuse()(State(model=model, graph=_graph(arch)))
    assert result.modified
    assert result.stats["sets"] == 2 * len(EXPECTED[arch])
    assert result.state.metrics["fuse"]["check_max_abs_diff"] <= 1e-4
    assert isinstance(model.model.layers[0].self_attn.k_proj, FusedPart)


# ------------------------------------------------------------------- FusedLinear semantics


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       calls=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=12),
       bias=st.lists(st.booleans(), min_size=4, max_size=4))
def test_parts_equal_separate_linears_for_any_call_order(widths, calls, bias):
    """Whatever order parts are called in, with the same or new inputs, each part returns exactly
    its own linear's output (the shared product is reused only for the very same input)."""
    torch.manual_seed(0)
    linears = [nn.Linear(5, w, bias=bias[i]) for i, w in enumerate(widths)]
    fused = FusedLinear([f"p{i}" for i in range(len(widths))], linears)
    parts = [FusedPart(fused, i) for i in range(len(widths))]
    inputs = [torch.randn(2, 3, 5) for _ in range(3)]
    for part, which in calls:
        part %= len(widths)
        got = parts[part](inputs[which])
        torch.testing.assert_close(got, linears[part](inputs[which]), atol=1e-6, rtol=1e-6)
        assert parts[part].weight.shape == linears[part].weight.shape
        assert (parts[part].bias is None) == (linears[part].bias is None)
