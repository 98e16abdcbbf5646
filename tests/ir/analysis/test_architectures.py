"""Groups discovered per architecture: counts, sizes, kinds and GQA/MoE structure.

Nothing here is told the architecture: every expectation below is read from the graph.
"""

from __future__ import annotations

import functools
import math

import pytest

from prunegraph.data.models import RANDOM_CONFIGS, load_model
from prunegraph.ir.analysis import analyze


@functools.cache
def analysis_of(arch: str):
    model, _ = load_model(f"random:{arch}")
    return model, analyze(model)


def kinds(analysis, layer=None):
    return sorted(g.kind for g in analysis.prunable() if layer is None or g.layer == layer)


@pytest.mark.slow
def test_totals_add_up_for_every_architecture():
    for arch in RANDOM_CONFIGS:
        model, a = analysis_of(arch)
        unique = {id(p): p.numel() for p in model.parameters()}
        assert a.total_params == sum(unique.values()), arch
        assert 0 < a.prunable_params() < a.total_params, arch


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "phi3"])
def test_dense_gqa_layers(arch):
    model, a = analysis_of(arch)
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        assert kinds(a, layer) == ["channels", "heads"]
    heads = a.by_kind("heads")
    assert len(heads) == cfg.num_hidden_layers
    for g in heads:
        assert g.size == cfg.num_attention_heads
        assert g.constraints.kv_heads == cfg.num_key_value_heads
        assert g.constraints.q_per_kv == cfg.num_attention_heads // cfg.num_key_value_heads
        assert g.constraints.head_dim == cfg.head_dim
        kv_members = [m for m in g.members if m.div > 1]
        assert kv_members and all(m.div == g.constraints.q_per_kv for m in kv_members)
        assert [m.role for m in g.gate_site] == ["consumer"]
    for g in a.by_kind("channels"):
        assert g.size == cfg.intermediate_size
        assert g.params_per_unit == 3 * cfg.hidden_size


def test_phi3_fused_projections_are_cut_into_offset_members():
    model, a = analysis_of("phi3")
    cfg = model.config
    heads = a.group("model.layers.0.self_attn:heads")
    qkv = sorted((m.offset, m.div) for m in heads.members if m.param.endswith("qkv_proj.weight"))
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_key_value_heads * cfg.head_dim
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    assert qkv == [(0, 1), (q_rows, rep), (q_rows + kv_rows, rep)]
    channels = a.group("model.layers.0.mlp:channels")
    gate_up = sorted(m.offset for m in channels.members if m.param.endswith("gate_up_proj.weight"))
    assert gate_up == [0, cfg.intermediate_size]


def test_gemma3_multi_query_attention_has_one_kv_head():
    model, a = analysis_of("gemma3")
    for g in a.by_kind("heads"):
        assert g.constraints.kv_heads == 1 and g.constraints.q_per_kv == model.config.num_attention_heads
        assert {m.param.rsplit(".", 2)[-2] for m in g.members if m.div > 1} == {"k_proj", "v_proj"}


def test_gpt2_conv1d_and_fused_c_attn():
    model, a = analysis_of("gpt2")
    cfg = model.config
    g = a.group("transformer.h.0.attn:heads")
    assert g.size == cfg.n_head and g.constraints.kv_heads == cfg.n_head
    offsets = sorted(m.offset for m in g.members if m.param.endswith("c_attn.weight"))
    assert offsets == [0, cfg.n_embd, 2 * cfg.n_embd]
    assert all(m.dim == 1 for m in g.members if m.param.endswith("c_attn.weight"))  # Conv1D is [in, out]
    ch = a.group("transformer.h.0.mlp:channels")
    assert ch.size == 4 * cfg.n_embd


def test_hidden_space_spans_embeddings_norms_projections_and_lm_head():
    for arch in ("llama", "mistral"):
        model, a = analysis_of(arch)
        (hidden,) = a.by_kind("hidden")
        assert hidden.size == model.config.hidden_size and hidden.constraints.pinned
        params = {m.param for m in hidden.members}
        names = {n for n, _ in model.named_parameters()}
        norms = {n for n in names if "norm" in n}
        assert norms <= params
        assert "model.embed_tokens.weight" in params
        assert any(n.endswith("o_proj.weight") for n in params)
        if arch == "mistral":  # untied head: its own parameter
            assert "lm_head.weight" in params
        else:  # tied: one tensor, reported once, with its alias
            aliases = a.graph.aliases["model.embed_tokens.weight"]
            assert aliases == ["model.embed_tokens.weight", "lm_head.weight"]


@pytest.mark.parametrize("arch,num_experts_key", [("qwen3-moe", "num_experts"),
                                                  ("mixtral", "num_local_experts"),
                                                  ("olmoe", "num_experts"), ("qwen2-moe", "num_experts")])
def test_moe_experts_router_and_expert_channels(arch, num_experts_key):
    model, a = analysis_of(arch)
    cfg = model.config
    E = getattr(cfg, num_experts_key)
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    experts = a.by_kind("experts")
    assert len(experts) == cfg.num_hidden_layers
    for g in experts:
        assert g.size == E
        assert g.constraints.removal == "mask_logit" and g.constraints.min_units == cfg.num_experts_per_tok
        assert g.router is not None and g.router.endswith("gate.weight")
        roles = {m.param.rsplit(".", 1)[-1]: m.role for m in g.members}
        assert roles["gate_up_proj"] == "producer" and roles["down_proj"] == "consumer"
    ec = a.by_kind("expert_channels")
    assert len(ec) == cfg.num_hidden_layers
    for g in ec:
        assert g.size == inter and g.constraints.experts == E
        assert all(m.expert_dim == 0 for m in g.members)
        assert sorted(m.offset for m in g.members if m.param.endswith("gate_up_proj")) == [0, inter]
    shared = a.by_kind("shared_expert_channels")
    if arch == "qwen2-moe":
        assert len(shared) == cfg.num_hidden_layers
        assert all(g.size == cfg.shared_expert_intermediate_size for g in shared)
    else:
        assert shared == []


def test_meta_device_model_is_analysed_without_weights():
    model, _ = load_model("random:qwen3-moe", meta=True)
    assert next(model.parameters()).is_meta
    a = analyze(model)
    _, real = analysis_of("qwen3-moe")
    assert [(g.name, g.kind, g.size) for g in a.groups] == [(g.name, g.kind, g.size) for g in real.groups]


def test_group_cost_matches_member_slices():
    model, a = analysis_of("qwen3-moe")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for g in a.prunable():
        expect = 0.0
        for m in g.members:
            per_index = math.prod(shapes[m.param]) / shapes[m.param][m.dim]
            if m.expert_dim is not None:
                per_index /= shapes[m.param][m.expert_dim]
            expect += per_index * m.inner / m.div
        assert g.params_per_unit == pytest.approx(expect)
