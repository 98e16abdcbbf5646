"""Gates folded into consumers: exact at 1, differentiable, removable, expert masks on routers."""

from __future__ import annotations

import pytest
import torch
from _pruning_fixtures import fresh, groups_of, input_ids, logits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph.errors import PlanError, PrunegraphError
from prunegraph.ir.groups import Member
from prunegraph.plan.gating import apply_gates, gate_shape, remove_gates, unit_multiplier


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "phi3", "gpt2", "qwen2-moe"])
def test_all_ones_is_bit_identical(arch):
    ids = input_ids(arch)
    want = logits(fresh(arch), ids)
    model = fresh(arch)
    gates = apply_gates(model, list(groups_of(arch)))
    assert gates.values and all(bool((v == 1).all()) for v in gates.values.values())
    assert torch.equal(logits(model, ids), want)


def test_remove_restores_original_parameters():
    model = fresh("qwen3-moe")
    names = {n: p for n, p in model.named_parameters()}
    apply_gates(model, list(groups_of("qwen3-moe")))
    assert any("parametrizations" in n for n, _ in model.named_parameters())
    remove_gates(model)
    after = dict(model.named_parameters())
    assert after.keys() == names.keys() and all(after[n] is names[n] for n in names)
    apply_gates(model, list(groups_of("qwen3-moe")))  # can be applied again after removal


def test_gate_zero_on_channel_equals_zeroing_its_consumer_column():
    # 2.0: a power of two scales exactly whether it multiplies the weight or the activation
    groups = [g for g in groups_of("llama") if g.kind == "channels"]
    g = groups[0]
    values = torch.ones(g.size)
    values[[3, 50]] = 0.0
    values[7] = 2.0
    gated = fresh("llama")
    apply_gates(gated, groups, {g.name: values})
    manual = fresh("llama")
    with torch.no_grad():
        down = manual.get_parameter(g.gate_site[0].param)
        down[:, [3, 50]] = 0
        down[:, 7] *= 2.0
    ids = input_ids("llama")
    assert torch.equal(logits(gated, ids), logits(manual, ids))


def test_gradients_reach_gate_tensors():
    model = fresh("qwen3-moe")
    groups = list(groups_of("qwen3-moe"))
    values = {g.name: torch.nn.Parameter(torch.ones(gate_shape(g))) for g in groups if g.prunable}
    apply_gates(model, groups, values)
    model(input_ids=input_ids("qwen3-moe")).logits.square().mean().backward()
    kinds = {g.kind for g in groups if values.get(g.name) is not None
             and values[g.name].grad is not None and values[g.name].grad.abs().sum() > 0}
    assert {"heads", "experts", "expert_channels"} <= kinds


def test_expert_gate_zero_masks_router_logits():
    model = fresh("qwen3-moe")
    groups = list(groups_of("qwen3-moe"))
    experts = [g for g in groups if g.kind == "experts"][0]
    values = torch.ones(experts.size)
    values[[0, 1, 2, 5]] = 0
    apply_gates(model, groups, {experts.name: values})
    router = model.get_submodule(experts.router.rpartition(".")[0])
    seen = []
    router.register_forward_hook(lambda m, a, out: seen.append(out))
    model(input_ids=input_ids("qwen3-moe", length=20))
    logits_, _, indices = seen[0]
    assert set(indices.unique().tolist()).isdisjoint({0, 1, 2, 5})
    assert torch.isinf(logits_[:, [0, 1, 2, 5]]).all() and torch.isfinite(logits_[:, 3]).all()


def test_generate_with_gates():
    model = fresh("qwen3-moe")
    groups = list(groups_of("qwen3-moe"))
    values = {g.name: (torch.rand(gate_shape(g)) > 0.3).float() for g in groups if g.prunable}
    for g in groups:
        if g.kind == "experts":
            values[g.name][:2] = 1.0  # keep at least top-k experts alive
    apply_gates(model, groups, values)
    out = model.generate(input_ids("qwen3-moe", batch=1), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 10


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(size=st.integers(1, 6), inner=st.integers(1, 4), div=st.sampled_from([1, 2]),
       offset=st.integers(0, 5), seed=st.integers(0, 1000))
def test_unit_multiplier_matches_member_indices(size, inner, div, offset, seed):
    size *= div
    member = Member("w", dim=1, offset=offset, inner=inner, div=div)
    n = offset + member.extent(size) + 3
    values = torch.rand(size, generator=torch.Generator().manual_seed(seed)) + 0.1
    mult = unit_multiplier(member, values, (2, n))
    assert mult.shape == (1, n)
    for u in range(size):
        block = values[(u // div) * div:(u // div + 1) * div].max()
        assert torch.equal(mult[0, member.indices([u])], block.expand(inner))
    outside = torch.ones(n, dtype=torch.bool)
    outside[member.indices(range(size))] = False
    assert torch.equal(mult[0, outside], torch.ones(int(outside.sum())))


def test_bad_input_is_refused():
    model = fresh("llama")
    groups = list(groups_of("llama"))
    g = [g for g in groups if g.kind == "channels"][0]
    with pytest.raises(PlanError, match="shape"):
        apply_gates(model, groups, {g.name: torch.ones(g.size + 1)})
    with pytest.raises(PlanError, match="no group named"):
        apply_gates(model, groups, {g.name + "x": torch.ones(g.size)})
    apply_gates(model, groups)
    with pytest.raises(PrunegraphError, match="already has gates"):
        apply_gates(model, groups)
