"""The ground truth of the analysis, over random architectures (hypothesis).

For every prunable group of a random model: zeroing a random subset of its units at the gate site
(the consumer slices, where a per-unit gate multiplies) gives the same outputs as zeroing the
matching slices of *every* member. A wrong index map, a member in the wrong group, or a kv head
zeroed while one of its query heads survives all change the outputs and fail this test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from prunegraph.data.models import RANDOM_CONFIGS
from prunegraph.ir.analysis import analyze
from prunegraph.ir.groups import Group, Member


@st.composite
def configs(draw):
    arch = draw(st.sampled_from(sorted(RANDOM_CONFIGS)))
    model_type, base = RANDOM_CONFIGS[arch]
    kw = dict(base)
    kv = draw(st.sampled_from([1, 2, 3]))
    rep = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))
    heads = kv * rep
    layers = draw(st.integers(1, 2))
    if arch == "gpt2":
        kw.update(n_head=heads, n_embd=heads * head_dim, n_layer=layers)
    else:
        kw.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                  hidden_size=heads * head_dim, num_hidden_layers=layers,
                  intermediate_size=draw(st.integers(5, 40)))
        if "layer_types" in kw:
            kw["layer_types"] = ["sliding_attention", "full_attention"][:layers]
        for key in ("num_experts", "num_local_experts"):
            if key in kw:
                kw[key] = draw(st.integers(3, 6))
        if arch in ("mixtral", "olmoe"):  # experts use intermediate_size
            kw["intermediate_size"] = draw(st.sampled_from([4, 8, 12]))
        if "moe_intermediate_size" in kw:
            # fused experts run grouped matmuls that need 16-byte aligned rows
            kw["moe_intermediate_size"] = draw(st.sampled_from([4, 8, 12]))
        if "shared_expert_intermediate_size" in kw:
            kw["shared_expert_intermediate_size"] = draw(st.integers(3, 20))
    if arch == "gemma3":  # multi-query attention
        kw.update(num_key_value_heads=1, num_attention_heads=rep, hidden_size=rep * 8)
    seed = draw(st.integers(0, 2**16))
    return arch, AutoConfig.for_model(model_type, **kw), seed


def _zero(model: torch.nn.Module, member: Member, units: torch.Tensor | list[torch.Tensor]) -> None:
    """Zero the slices ``units`` own in one member (a list of per-expert unit sets if per expert)."""
    p = dict(model.named_parameters())[member.param]
    with torch.no_grad():
        if member.expert_dim is None:
            p.index_fill_(member.dim, member.indices(units), 0.0)
        else:
            for e, u in enumerate(units):
                if len(u):
                    sub = p.select(member.expert_dim, e)
                    d = member.dim - (1 if member.dim > member.expert_dim else 0)
                    sub.index_fill_(d, member.indices(u), 0.0)


def _full_blocks(member: Member, units: torch.Tensor) -> torch.Tensor:
    """Units whose whole block is removed: a kv slice goes only with all of its query heads."""
    if member.div == 1:
        return units
    blocks, counts = torch.unique(units // member.div, return_counts=True)
    full = blocks[counts == member.div]
    return torch.cat([full * member.div + r for r in range(member.div)]) if len(full) else units[:0]


def _draw_units(data, group: Group):
    if group.constraints.experts is not None:
        return [torch.tensor(sorted(data.draw(st.sets(st.integers(0, group.size - 1), max_size=group.size))),
                             dtype=torch.long) for _ in range(group.constraints.experts)]
    chosen = data.draw(st.sets(st.integers(0, group.size - 1), min_size=1, max_size=group.size))
    return torch.tensor(sorted(chosen), dtype=torch.long)


@settings(max_examples=14, deadline=None, suppress_health_check=list(HealthCheck))
@given(configs(), st.data())
@pytest.mark.slow
def test_zeroing_at_gate_site_equals_zeroing_every_member(cfg, data):
    arch, config, seed = cfg
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    analysis = analyze(model)
    groups = analysis.prunable()
    assert groups, arch
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    for group in groups:
        units = _draw_units(data, group)
        at_gate, everywhere = copy.deepcopy(model), copy.deepcopy(model)
        for m in group.members:
            if m.role == "router":
                continue  # removing an expert masks its logit; zeroing the expert is what is compared
            u = units if m.expert_dim is not None else _full_blocks(m, units)
            if m.role == "consumer":
                _zero(at_gate, m, u)
            _zero(everywhere, m, u)
        with torch.no_grad():
            a = at_gate(input_ids=ids).logits
            b = everywhere(input_ids=ids).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                   msg=lambda s: f"{arch} group {group.name} units {units}: {s}")
