"""DDP gates: exact dense start, the retention score / mu schedule / Lagrangian against hand
computations, dual ascent directions, straight-through gradients, per-expert shapes, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _gate_fixtures import gated_state, ids, one_thread  # noqa: F401
from _pruning_fixtures import fresh, groups_of
from hypothesis import given, settings
from hypothesis import strategies as st

from prunegraph.errors import BudgetError, SpecError
from prunegraph.passes.gates import make_family
from prunegraph.passes.gates.ddp import mu_schedule, retention_score, ste_relu
from prunegraph.passes.gates.insert import Gate


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_gates_at_init_reproduce_dense_exactly():
    x = ids()
    with torch.no_grad():
        dense = fresh("llama")(x).logits
    state = gated_state("llama", options={"init_std": 0.0})
    assert all(bool((v == 1).all()) for v in state.gates.values.values())
    with torch.no_grad():
        assert torch.equal(state.model(x).logits, dense)


def test_default_init_is_noisy_around_one():
    fam = make_family("ddp", groups_of("llama"), 0.2, fresh("llama"), seed=3)
    z = torch.cat([p.detach().reshape(-1) for p in fam.gates.values()])
    assert z.std() == pytest.approx(0.01, rel=0.5) and z.mean() == pytest.approx(1.0, abs=0.01)


def test_retention_score_hand_values():
    mu = 0.5
    z = torch.tensor([-0.1, 0.0, 0.25, 0.5, 1.0])
    s = retention_score(z, mu)
    want = [min(max(1.2 * _sigmoid((max(v, 0.0) - mu) * 2.4 / mu) - 0.1, 0.0), 1.0)
            for v in z.tolist()]
    assert s.tolist() == pytest.approx(want, abs=1e-6)
    assert s[0] == 0 and s[1] == 0 and s[3] == pytest.approx(0.5) and s[4] == 1
    assert s[2] == pytest.approx(1.2 * _sigmoid(-1.2) - 0.1, abs=1e-6)   # 0.17778


def test_mu_schedule_square_root():
    assert mu_schedule(0, 100) == 0.5
    assert mu_schedule(25, 100) == pytest.approx(0.5 - 0.4 * 0.5)
    assert mu_schedule(100, 100) == pytest.approx(0.1)
    assert mu_schedule(100, 100, 0.5, 0.05) == pytest.approx(0.05)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=8))
def test_ste_relu_forward_relu_gradient_identity(vals):
    z = torch.tensor(vals, requires_grad=True)
    m = ste_relu(z)
    assert torch.equal(m, torch.relu(z.detach()))
    m.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_lagrangian_terms_hand_computed():
    fam = make_family("ddp", groups_of("llama"), 0.25, fresh("llama"), budget="units")
    assert [c.name for c in fam.constraints] == ["channels", "heads"]
    with torch.no_grad():
        for p in fam.gates.values():
            p.fill_(0.5)                        # s = 0.5 exactly at mu = 0.5
        fam.l1.fill_(2.0)
        fam.l2.fill_(3.0)
        fam.l3.fill_(0.5)
    loss, stats = fam.penalty(0, 10)
    rho = 0.75                                  # channels: 1 - 0.25; heads: 1 - floor(1)/4
    per = 2.0 * (0.5 - rho) + 3.0 * (0.5 - rho) ** 2 + 0.5 * 0.25
    assert float(loss.detach()) == pytest.approx(2 * per)
    assert stats["expected_sparsity"] == pytest.approx(0.5)


def test_params_budget_target_formula():
    model = fresh("llama")
    fam = make_family("ddp", groups_of("llama"), 0.2, model)
    from prunegraph.passes._param_space import param_space

    pool = sum(g.params_per_unit * g.size for g in fam.groups)
    decoder = param_space(model, "decoder").total
    assert fam.target_keep() == pytest.approx(1 - 0.2 * decoder / pool)


def _one_step(fam, fill: float):
    with torch.no_grad():
        for p in fam.gates.values():
            p.fill_(fill)
    opt = torch.optim.AdamW(fam.param_groups())
    loss, _ = fam.penalty(0, 10)
    loss.backward()
    z_before = torch.cat([p.detach().clone().reshape(-1) for p in fam.gates.values()])
    opt.step()
    fam.post_step()
    z_after = torch.cat([p.detach().reshape(-1) for p in fam.gates.values()])
    return z_before, z_after


def test_duals_ascend_while_sparsity_under_target():
    fam = make_family("ddp", groups_of("llama"), 0.3, fresh("llama"))
    _one_step(fam, 1.0)                          # everything kept: sparsity under target
    assert float(fam.l1.detach()) > 0 and float(fam.l2.detach()) > 0
    assert float(fam.l3.detach()) == 0           # every s is exactly 1: s(1 - s) = 0
    before, after = _one_step(fam, 1.0)          # now l1 > 0 pulls the gates down
    assert bool((after < before).all())


def test_l1_descends_when_sparsity_over_target():
    fam = make_family("ddp", groups_of("llama"), 0.3, fresh("llama"))
    _one_step(fam, 0.2)                          # s(0.2) small: nearly everything removed
    assert float(fam.l1.detach()) < 0
    assert float(fam.l3.detach()) > 0            # undecided scores: the binarisation weight grows


def test_post_step_clamps_at_minus_point_one():
    fam = make_family("ddp", groups_of("llama"), 0.3, fresh("llama"))
    with torch.no_grad():
        for p in fam.gates.values():
            p.fill_(-5.0)
    fam.post_step()
    assert all(bool((p == -0.1).all()) for p in fam.gates.values())
    assert all(bool((v == 0).all()) for v in fam.final_values().values())


def test_per_expert_channel_gates_have_expert_shape():
    state = gated_state("qwen3-moe")
    fam = state.gate_family
    experts = [g for g in fam.groups if g.kind == "expert_channels"]
    assert experts, "tiny qwen3-moe has per-expert channel groups"
    for g in experts:
        assert tuple(fam.tensor(g.name).shape) == (g.constraints.experts, g.size)
    x = ids()
    loss, _ = fam.penalty(0, 10)
    state.gates.values.update(fam.forward_values(0, 10))
    (state.model(x).logits.float().pow(2).mean() + loss).backward()
    assert all(fam.tensor(g.name).grad is not None for g in experts)


@pytest.mark.parametrize("kw, err", [
    (dict(sparsity=0.0), BudgetError), (dict(sparsity=1.0), BudgetError),
    (dict(sparsity=-0.2), BudgetError), (dict(family="ddpp"), SpecError),
    (dict(options={"mu_t": 0.1}), SpecError), (dict(budget="flops"), SpecError),
])
def test_bad_input_fails_at_construction(kw, err):
    with pytest.raises(err) as info:
        Gate(**kw)
    assert "ddp" in str(info.value) or "(0, 1)" in str(info.value) or "budget" in str(info.value)


def test_budget_beyond_pool_fails_before_gating():
    model = fresh("llama")
    with pytest.raises(BudgetError, match="maximum"):
        make_family("ddp", groups_of("llama"), 0.999, model)
