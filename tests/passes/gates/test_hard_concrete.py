"""Hard-concrete gates: exact dense start at evaluation, the L0 formulas by hand, stochastic in
training and deterministic at evaluation, seeded sampling, the shared Lagrangian machinery."""

from __future__ import annotations

import math

import pytest
import torch
from _gate_fixtures import gated_state, ids, one_thread  # noqa: F401
from _pruning_fixtures import fresh, groups_of

from prunegraph.errors import SpecError
from prunegraph.passes.gates import make_family
from prunegraph.passes.gates.hard_concrete import deterministic_gate, nonzero_probability
from prunegraph.passes.gates.insert import Gate


def test_eval_gates_at_init_reproduce_dense_exactly():
    x = ids()
    with torch.no_grad():
        dense = fresh("llama")(x).logits
    state = gated_state("llama", family="hard_concrete")
    assert all(bool((v == 1).all()) for v in state.gates.values.values())
    with torch.no_grad():
        assert torch.equal(state.model(x).logits, dense)


def test_deterministic_gate_and_l0_probability_by_hand():
    la = torch.tensor([-5.0, 0.0, 1.0, 5.0])
    sig = [1 / (1 + math.exp(-v)) for v in la.tolist()]
    want = [min(max(1.2 * s - 0.1, 0.0), 1.0) for s in sig]
    assert deterministic_gate(la).tolist() == pytest.approx(want, abs=1e-6)
    beta = 2 / 3
    p = nonzero_probability(la, beta)
    want_p = [1 / (1 + math.exp(-(v - beta * math.log(0.1 / 1.1)))) for v in la.tolist()]
    assert p.tolist() == pytest.approx(want_p, abs=1e-6)


def test_stochastic_in_training_deterministic_in_eval_and_seeded():
    a = make_family("hard_concrete", groups_of("llama"), 0.3, fresh("llama"), seed=7)
    b = make_family("hard_concrete", groups_of("llama"), 0.3, fresh("llama"), seed=7)
    with torch.no_grad():
        for fam in (a, b):
            for p in fam.gates.values():
                p.fill_(0.0)                   # undecided: samples spread over [0, 1]
    a.train(), b.train()
    s1, s2 = a.forward_values(0, 10), a.forward_values(0, 10)
    name = next(iter(s1))
    assert not torch.equal(s1[name], s2[name])
    assert torch.equal(b.forward_values(0, 10)[name], s1[name])          # same seed, same draws
    assert all(bool(((v >= 0) & (v <= 1)).all()) for v in s1.values())
    assert any(bool(((v == 0) | (v == 1)).any()) for v in s1.values())  # the stretch hits both ends
    a.eval()
    e1, e2 = a.forward_values(0, 10), a.forward_values(0, 10)
    assert torch.equal(e1[name], e2[name])
    assert torch.allclose(e1[name], torch.full_like(e1[name], 0.5))


def test_penalty_uses_expected_l0_and_duals_move():
    fam = make_family("hard_concrete", groups_of("llama"), 0.3, fresh("llama"))
    loss, stats = fam.penalty(0, 10)
    p = float(nonzero_probability(torch.tensor(math.log(0.95 / 0.05)), 2 / 3))
    assert stats["expected_sparsity"] == pytest.approx(1 - p, abs=1e-6)
    opt = torch.optim.AdamW(fam.param_groups())
    loss.backward()
    before = [t.detach().clone() for t in fam.gates.values()]
    opt.step()
    assert float(fam.l1.detach()) > 0                  # kept fraction above target
    loss, _ = fam.penalty(1, 10)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(bool((t.detach() < b).all()) for t, b in zip(fam.gates.values(), before))


def test_bad_options_fail_at_construction():
    with pytest.raises(SpecError, match="temperature"):
        Gate(family="hard_concrete", options={"temprature": 0.5})
    with pytest.raises(SpecError):
        make_family("hard_concrete", groups_of("llama"), 0.3, fresh("llama"), temperature=0.0)
