"""Plans: constraint enforcement, reporting, serialisation, and refusing other models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _pruning_fixtures import fresh, groups_of, random_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph.errors import BudgetError, PlanError
from prunegraph.ir.groups import Constraints, Group, Member
from prunegraph.plan.plan import Plan

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def _heads(kv=3, q=3):
    return Group("attn:heads", "heads", kv * q,
                 [Member("q", 0, inner=4), Member("k", 0, inner=4, div=q),
                  Member("o", 1, inner=4, role="consumer")],
                 Constraints(kv_heads=kv, q_per_kv=q, head_dim=4), params_per_unit=10)


@_SETTINGS
@given(data=st.data(), kv=st.integers(1, 4), q=st.integers(1, 4))
def test_gqa_repair_gives_equal_heads_per_kept_kv_head(data, kv, q):
    group = _heads(kv, q)
    request = data.draw(st.lists(st.integers(0, kv * q - 1), min_size=1, unique=True))
    pg = Plan.from_keep([group], {group.name: request}).groups[0]
    kept = pg.keep.tolist()
    per_kv = {}
    for u in kept:
        per_kv.setdefault(u // q, []).append(u)
    assert len({len(v) for v in per_kv.values()}) == 1           # equal per kept kv head
    assert set(per_kv) == {u // q for u in request}                # kv heads with a request stay
    counts = {h: sum(u // q == h for u in request) for h in per_kv}
    if len(set(counts.values())) == 1:
        assert kept == sorted(request)                              # valid requests untouched
    else:
        with pytest.raises(PlanError, match="equal"):
            Plan.from_keep([group], {group.name: request}, repair=False)


@_SETTINGS
@given(k=st.integers(1, 96), multiple=st.sampled_from([2, 8, 32]), floor=st.integers(1, 40))
def test_round_to_and_min_units(k, multiple, floor):
    group = Group("mlp:channels", "channels", 96, [Member("up", 0), Member("down", 1, role="consumer")],
                  Constraints(min_units=floor, round_to=multiple), params_per_unit=2)
    request = list(range(96 - k, 96))  # priority: the request order
    if k < floor:
        with pytest.raises(BudgetError, match="floor"):
            Plan.from_keep([group], {group.name: request})
        return
    pg = Plan.from_keep([group], {group.name: request}).groups[0]
    options = [m for m in range(multiple, 97, multiple) if m >= floor]
    if options:  # the nearest allowed multiple
        assert pg.kept % multiple == 0 and pg.kept >= floor
        assert abs(pg.kept - k) == min(abs(m - k) for m in options)
    else:
        assert pg.kept == k
    if pg.kept <= k:
        assert set(pg.keep.tolist()) <= set(request)
        assert set(pg.keep.tolist()) == set(request[: pg.kept])    # highest priority stay
    else:
        assert set(request) <= set(pg.keep.tolist())


def test_pinned_and_experts_floor_are_budget_errors():
    groups = list(groups_of("qwen3-moe"))
    model = fresh("qwen3-moe")
    pinned = next(g for g in groups if not g.prunable)
    with pytest.raises(BudgetError, match="pinned"):
        Plan.from_keep(groups, {pinned.name: [0]}, model=model)
    experts = next(g for g in groups if g.kind == "experts")
    with pytest.raises(BudgetError, match="top-2|min_units"):
        Plan.from_keep(groups, {experts.name: [3]}, model=model)


def test_bad_requests_are_plan_errors():
    groups = list(groups_of("qwen3-moe"))
    ec = next(g for g in groups if g.kind == "expert_channels")
    ch = next(g for g in groups if g.kind == "heads")
    with pytest.raises(PlanError, match="out of range"):
        Plan.from_keep(groups, {ch.name: [0, 99]})
    with pytest.raises(PlanError, match="duplicates"):
        Plan.from_keep(groups, {ch.name: [1, 1]})
    with pytest.raises(PlanError, match=r"shape \[8, k\]"):
        Plan.from_keep(groups, {ec.name: [0, 1]})
    with pytest.raises(PlanError, match="no group"):
        Plan.from_keep(groups, {"nope": [0]})


def test_report_counts_parameters_exactly():
    from prunegraph.plan.slicing import apply_plan

    plan = random_plan("qwen2-moe", 11)
    model = fresh("qwen2-moe")
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    assert before - sum(p.numel() for p in model.parameters()) == plan.report["params_removed"] > 0
    assert plan.report["params_total"] == before
    assert "parameters removed" in plan.summary()


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), arch=st.sampled_from(["llama", "qwen3-moe"]))
def test_save_load_round_trip(tmp_path_factory, seed, arch):
    plan = random_plan(arch, seed)
    path = plan.save(tmp_path_factory.mktemp("plan") / "p")
    assert sorted(os.listdir(path)) == ["plan.json", "plan.safetensors"]
    back = Plan.load(path)
    assert back.to_dict() == plan.to_dict()
    for a, b in zip(plan.groups, back.groups):
        assert torch.equal(a.keep, b.keep)
        assert (a.scales is None and b.scales is None) or torch.equal(a.scales, b.scales)
    back.check_model(fresh(arch))


def test_corrupt_or_truncated_files_name_the_file(tmp_path):
    path = random_plan("llama", 1).save(tmp_path / "p")
    js, ts = path / "plan.json", path / "plan.safetensors"
    good_json, good_tensors = js.read_text(), ts.read_bytes()
    js.write_text(good_json[: len(good_json) // 2])
    with pytest.raises(PlanError, match="plan.json is corrupt or truncated"):
        Plan.load(path)
    js.write_text(good_json)
    ts.write_bytes(good_tensors[:-10])
    with pytest.raises(PlanError, match="plan.safetensors does not match"):
        Plan.load(path)
    data = json.loads(good_json)
    del data["tensors"]  # without the checksum the safetensors reader itself must catch it
    js.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="plan.safetensors is corrupt or truncated"):
        Plan.load(path)
    ts.unlink()
    with pytest.raises(PlanError, match="plan.safetensors is missing"):
        Plan.load(path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    plan = random_plan("llama", 2)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        plan.save(tmp_path / "p")
    assert os.listdir(tmp_path) == []


def test_check_model_names_the_differences():
    plan = random_plan("llama", 3)
    with pytest.raises(PlanError, match="model class: plan LlamaForCausalLM, model MistralForCausalLM"):
        plan.check_model(fresh("mistral"))
    from transformers import AutoModelForCausalLM

    from prunegraph.data.models import load_config

    config = load_config("random:llama")
    config.intermediate_size = 128
    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PlanError, match="intermediate_size: plan 96, model 128"):
        plan.check_model(other)


@pytest.mark.parametrize("key", ["num_experts_per_tok", "moe_topk", "moe_top_k", "top_k"])
def test_plan_and_allocator_read_the_same_routing_top_k(key):
    """Every spelling of the routed-experts count sets the experts floor for both the plan and
    the allocator (they once read different key lists: moe_top_k vs moe_topk)."""
    from types import SimpleNamespace

    import prunegraph.passes.allocate as allocate
    from prunegraph.plan.plan import routing_top_k

    model = SimpleNamespace(config=SimpleNamespace(**{key: 3}))
    assert routing_top_k(model) == 3
    assert allocate.routing_top_k is routing_top_k
    assert routing_top_k(SimpleNamespace(config=SimpleNamespace())) == 1
