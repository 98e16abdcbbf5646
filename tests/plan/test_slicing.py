"""Slicing: the sliced model computes what the gated model computes, for every architecture."""

from __future__ import annotations

import pytest
import torch
from _pruning_fixtures import ARCHS, fresh, groups_of, input_ids, logits, random_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph.errors import PlanError, PreconditionError
from prunegraph.passes._param_space import param_space, removed_params
from prunegraph.plan.gating import apply_gates
from prunegraph.plan.plan import Plan
from prunegraph.plan.slicing import apply_plan


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000))
def test_sliced_equals_gated(arch, seed):
    plan = random_plan(arch, seed)
    ids = input_ids(arch, seed)
    gated = fresh(arch)
    apply_gates(gated, list(groups_of(arch)), plan.gate_values())
    sliced = fresh(arch)
    stats = apply_plan(sliced, plan)
    torch.testing.assert_close(logits(sliced, ids), logits(gated, ids), atol=2e-5, rtol=1e-4)
    assert stats["params_before"] - stats["params_after"] == plan.report["params_removed"]
    assert stats["params_after"] == sum(p.numel() for p in sliced.parameters())
    # the allocator counts removed parameters with the same index map as the plan and slicing
    space = param_space(fresh(arch), scope="all")
    keep = {pg.name: pg.keep for pg in plan.groups}
    assert removed_params(groups_of(arch), keep, space) == plan.report["params_removed"]


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "phi3"])
def test_generate_after_slicing_non_uniform(arch):
    plan = random_plan(arch, 7)
    model = fresh(arch)
    apply_plan(model, plan)
    ids = input_ids(arch, batch=1)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    # incremental decoding with the KV cache must agree with a full forward on the same tokens
    full = logits(model, out[:, :-1])
    assert torch.equal(full[:, -1].argmax(-1), out[:, -1])


def _heads(arch):
    return [g for g in groups_of(arch) if g.kind == "heads"]


def test_layer_attributes_rewritten_per_layer():
    model = fresh("llama")
    heads = _heads("llama")
    # layer 0 keeps kv head 1 with both its query heads; layer 1 keeps one query head per kv head
    keep = {heads[0].name: [2, 3], heads[1].name: [0, 2]}
    plan = Plan.from_keep(groups_of("llama"), keep, model=model)
    apply_plan(model, plan)
    a0, a1 = (layer.self_attn for layer in model.model.layers)
    assert (a0.num_key_value_groups, a1.num_key_value_groups) == (2, 1)
    assert a0.k_proj.out_features == 16 and a1.k_proj.out_features == 32
    assert a1.q_proj.weight.shape == (32, 64) and a1.o_proj.in_features == 32


def test_phi3_fused_qkv_gets_per_module_config():
    model = fresh("phi3")
    heads = _heads("phi3")
    plan = Plan.from_keep(groups_of("phi3"), {heads[0].name: [0, 1]}, model=model)
    apply_plan(model, plan)
    attn0, attn1 = (layer.self_attn for layer in model.model.layers)
    assert attn0.config.num_attention_heads == 2 and attn0.num_key_value_heads == 1
    assert attn1.config.num_attention_heads == 4 and model.config.num_attention_heads == 4


def test_tied_embedding_stays_shared():
    model = fresh("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_plan(model, random_plan("llama", 3))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_plan_for_another_model_is_refused_before_any_change():
    plan = random_plan("llama", 1)
    model = fresh("mistral")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(PlanError, match="another model.*model class"):
        apply_plan(model, plan)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_gated_model_is_refused():
    model = fresh("llama")
    apply_gates(model, list(groups_of("llama")))
    with pytest.raises(PreconditionError, match="remove"):
        apply_plan(model, random_plan("llama", 2))


def test_slice_pass_removes_gates_and_slices():
    import prunegraph.passes.slice  # noqa: F401  (registers Slice)
    from prunegraph.pipeline.contract import State, get_pass_class

    model = fresh("qwen3-moe")
    plan = random_plan("qwen3-moe", 5)
    gates = apply_gates(model, list(groups_of("qwen3-moe")), plan.gate_values())
    ids = input_ids("qwen3-moe")
    want = logits(model, ids)
    result = get_pass_class("Slice")()(State(model=model, plan=plan, gates=gates))
    assert result.modified and result.stats["params_after"] < result.stats["params_before"]
    torch.testing.assert_close(logits(result.state.model, ids), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen2-moe"])
def test_sliced_moe_with_unaligned_experts_is_analysed_again(arch):
    """Slicing leaves unaligned expert modules on the eager loop (per-module config copies);
    capture switches them to a traceable path itself, so a pruned model can be pruned again."""
    from prunegraph.ir.analysis import analyze

    model = fresh(arch)
    apply_plan(model, random_plan(arch, seed=5))
    impls = lambda: sorted({getattr(c, "_experts_implementation", None)  # noqa: E731
                            for m in model.modules() if (c := m.__dict__.get("config")) is not None})
    before = impls()
    assert "eager" in before  # the case under test: some experts fell back to the eager loop
    kinds = {g.kind for g in analyze(model).groups}
    assert {"heads", "expert_channels", "experts"} <= kinds
    assert impls() == before  # the switch lasts only for the capture
