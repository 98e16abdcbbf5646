"""The Finalize pass: exact parameter budget (top-k), threshold at zero, units budgets, and the
sliced model equal to the gated model with the finalized values, dense and MoE."""

from __future__ import annotations

import pytest
import torch
from _gate_fixtures import corpus, gated_state, ids, one_thread  # noqa: F401

from prunegraph.passes._param_space import param_space
from prunegraph.passes.finalize import Finalize
from prunegraph.passes.slice import Slice
from prunegraph.passes.train import Train


def _trained(arch, corpus, steps=12, **gate_kw):
    state = gated_state(arch, lr=0.1, **gate_kw)
    Train(steps=steps, batch_size=2, block_len=32, warmup=2, source=corpus, plots=False)(state)
    return state


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe"])
def test_sliced_equals_gated_after_training(arch, corpus):
    state = _trained(arch, corpus)
    total = param_space(state.model, "decoder").total
    Finalize()(state)
    removed = state.plan.report["params_removed"]
    assert removed >= 0.3 * total                      # exact budget, never under
    x = ids()
    with torch.no_grad():
        gated = state.model(x).logits
    Slice()(state)
    with torch.no_grad():
        sliced = state.model(x).logits
    torch.testing.assert_close(sliced, gated, atol=1e-5, rtol=1e-5)


def test_topk_budget_is_tight(corpus):
    state = _trained("llama", corpus)
    total = param_space(state.model, "decoder").total
    Finalize()(state)
    removed = state.plan.report["params_removed"]
    biggest_move = max(g.params_per_unit * (g.constraints.q_per_kv or 1)
                       for g in state.gate_family.groups)
    assert 0.3 * total <= removed < 0.3 * total + biggest_move


def test_threshold_keeps_exactly_the_positive_gates(corpus):
    state = _trained("llama", corpus, steps=30)
    values = state.trained_gates
    Finalize(mode="threshold", round_to=1)(state)
    for pg in state.plan.groups:
        v = values[pg.name]
        if pg.group.kind == "channels":
            assert set(pg.keep.tolist()) == set(torch.nonzero(v > 0).flatten().tolist())
            assert torch.allclose(pg.scales, v[pg.keep])


def test_threshold_under_auto_keeps_the_nearest_aligned_count_of_the_best_gates(corpus):
    from prunegraph.passes._widths import resolve_widths

    state = _trained("llama", corpus, steps=30)
    values = state.trained_gates
    widths = resolve_widths(state.groups, state.model, "auto")
    Finalize(mode="threshold")(state)
    for pg in state.plan.groups:
        v = values[pg.name]
        if pg.group.kind == "channels":
            r = widths.multiples[pg.name]
            positive = int((v > 0).sum())
            assert r > 1 and pg.kept % r == 0 and abs(pg.kept - positive) <= r / 2
            ranked = torch.argsort(v, descending=True, stable=True)[:pg.kept]
            assert set(pg.keep.tolist()) == set(ranked.tolist())


def test_units_budget_removes_the_fraction_per_kind(corpus):
    state = _trained("llama", corpus, budget="units", sparsity=0.25)
    Finalize()(state)
    channels = [pg for pg in state.plan.groups if pg.group.kind == "channels"]
    assert sum(pg.kept for pg in channels) == round(0.75 * sum(pg.group.size for pg in channels))


def test_without_scales_the_plan_is_binary(corpus):
    state = _trained("llama", corpus)
    Finalize(fold_scales=False)(state)
    assert all(pg.scales is None for pg in state.plan.groups)
    for v in state.gates.values.values():
        assert set(v.unique().tolist()) <= {0.0, 1.0}


def test_pipeline_order_is_validated_before_running():
    from prunegraph.errors import SpecError
    from prunegraph.passes.analyze import Analyze
    from prunegraph.passes.gates.insert import Gate
    from prunegraph.pipeline.pipeline import Pipeline

    Pipeline([Analyze(), Gate(), Train(), Finalize(), Slice()])            # the valid order
    with pytest.raises(SpecError, match="trained_gates"):
        Pipeline([Analyze(), Gate(), Finalize(), Slice()])                   # Train missing
    with pytest.raises(SpecError, match="gates"):
        Pipeline([Analyze(), Train(), Finalize()])                            # no Gate before Train
