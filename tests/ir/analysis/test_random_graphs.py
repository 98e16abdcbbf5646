"""The op rules, proven on random graphs built from the ops themselves (not only HF models).

For every group the analysis finds in a random model (``_random_graphs.py``): zeroing a random
subset of its units at the gate site (the consumer slices) gives the same logits as zeroing them
in every member. A rule that carries a dim it should pin (``down(cumsum(up(x), -1))`` reported
as a free channel group) or drops a relation it should keep fails here. The blocks together
run every registered rule (checked below), with ``strict=True``: no op falls back to pinning.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from _random_graphs import BLOCKS, VOCAB, build, every_variant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph.ir.analysis import analyze
from prunegraph.ir.analysis.registry import rule_functions
from prunegraph.ir.groups import Group, Member

#: variants whose inner space must stay prunable (the op passes units through one to one)
FREE = {
    *(f"Act:{k}" for k in BLOCKS["Act"].VARIANTS), "Glu:split", "Glu:chunk", "CatTwo:cat",
    "CatTwo:concatenate",
    "ScanTokens", "IndexChannels:narrow", "IndexChannels:slice_scatter", "ViewsAs", "Factories",
    *(f"IndexTokens:{k}" for k in BLOCKS["IndexTokens"].VARIANTS),
    *(f"EinsumBmm:{k}" for k in BLOCKS["EinsumBmm"].VARIANTS),
    *(f"Attention:{k}" for k in BLOCKS["Attention"].VARIANTS), "DepthwiseConv", "StackInterleave",
    "ChannelConv:1", "ChannelConv:2", "MoeDense", "MoeGrouped",
    "MoeIndexed",
}


def _ids(seed: int, batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _zero(model: torch.nn.Module, member: Member, units) -> None:
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
    """A slice shared by ``div`` units (a kv head) goes only with all of them."""
    if member.div == 1:
        return units
    blocks, counts = torch.unique(units // member.div, return_counts=True)
    full = blocks[counts == member.div]
    return torch.cat([full * member.div + r for r in range(member.div)]) if len(full) else units[:0]


def _units(group: Group, gen: torch.Generator):
    def some(n: int) -> torch.Tensor:
        k = int(torch.randint(1, n + 1, (), generator=gen))
        return torch.sort(torch.randperm(n, generator=gen)[:k]).values

    if group.constraints.experts is not None:
        return [some(group.size) for _ in range(group.constraints.experts)]
    return some(group.size)


def assert_zeroing_equivalence(model, analysis, seed: int) -> None:
    ids = _ids(seed)
    gen = torch.Generator().manual_seed(seed)
    for group in analysis.prunable():
        units = _units(group, gen)
        at_gate, everywhere = copy.deepcopy(model), copy.deepcopy(model)
        for m in group.members:
            if m.role == "router":
                continue  # removing an expert masks its logit; zeroing the expert is compared
            u = units if m.expert_dim is not None else _full_blocks(m, units)
            if m.role == "consumer":
                _zero(at_gate, m, u)
            _zero(everywhere, m, u)
        with torch.no_grad():
            a, b = at_gate(ids), everywhere(ids)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5,
                                   msg=lambda s: f"group {group.name} ({group.kind}) units "
                                                 f"{units}: {s}")


@functools.cache
def _block_analysis(name: str):
    """One model holding every variant of block ``name`` (one export per block class)."""
    variants = [v for v in every_variant() if v.split(":")[0] == name]
    model = build(variants, hidden=6, seed=0)
    return variants, model, analyze(model, {"input_ids": _ids(0)}, strict=True)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_is_sound_and_prunes_what_it_should(name):
    variants, model, analysis = _block_analysis(name)
    assert not analysis.propagation.fallback
    assert_zeroing_equivalence(model, analysis, seed=1)
    for j, variant in enumerate(variants):
        inside = [g for g in analysis.prunable() if g.kind != "hidden"
                  and any(m.param.startswith(f"blocks.{j}.") for m in g.members)]
        if variant in FREE:
            assert inside, f"{variant}: its inner space should stay prunable"
        else:
            assert not inside, f"{variant}: {[g.name for g in inside]} should be pinned"


def test_blocks_cover_every_rule():
    used: set[str] = set()
    for name in BLOCKS:
        used |= _block_analysis(name)[2].propagation.rules_used
    missing = sorted(set(rule_functions()) - used)
    assert not missing, f"rules no random-graph block runs (add a block that uses them): {missing}"


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(blocks=st.lists(st.sampled_from(every_variant()), min_size=1, max_size=3),
       hidden=st.sampled_from([4, 6, 8]), seed=st.integers(0, 2**16))
def test_random_graphs_zeroing_equivalence(blocks, hidden, seed):
    model = build(blocks, hidden, seed)
    analysis = analyze(model, {"input_ids": _ids(seed)}, strict=True)
    assert_zeroing_equivalence(model, analysis, seed)


def test_scan_over_channels_is_not_a_free_group():
    """The issue's example: down(cumsum(up(x), -1)) must pin the channels it scans."""
    model = build(["ScanChannels:cumsum"], hidden=6, seed=3)
    analysis = analyze(model, {"input_ids": _ids(3)}, strict=True)
    assert [g.kind for g in analysis.prunable()] == ["hidden"]
    up = analysis.propagation.param_atoms["blocks.0.up.weight"][0]
    assert "scanned over" in analysis.propagation.spaces.pinned(up)
