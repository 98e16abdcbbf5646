"""The one unit -> index map (:class:`prunegraph.ir.groups.Member`) against a direct reading of
its definition: unit ``u`` owns ``offset + (u // div) * step + i`` for ``i < inner``."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunegraph.ir.groups import Group, Member, kept_masks, kept_numel, removed_params


@st.composite
def members(draw):
    div = draw(st.integers(1, 3))
    size = div * draw(st.integers(1, 6))
    inner = draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.integers(inner, inner + 3)))
    offset = draw(st.integers(0, 5))
    m = Member("w", dim=0, offset=offset, inner=inner, stride=stride, div=div)
    length = offset + (size // div) * m.step + draw(st.integers(0, 3))
    return m, size, length


def _owned(m: Member, unit: int) -> list[int]:
    return [m.offset + (unit // m.div) * m.step + i for i in range(m.inner)]


@settings(max_examples=200, deadline=None)
@given(members(), st.data())
def test_index_map_matches_the_definition(case, data):
    m, size, length = case
    for u in range(size):
        assert m.unit_positions(size)[u].tolist() == _owned(m, u)
    units = data.draw(st.lists(st.integers(0, size - 1), unique=True))
    want = sorted({i for u in units for i in _owned(m, u)})
    assert m.indices(units).tolist() == want
    assert sorted(m.covered(size).tolist()) == sorted({i for u in range(size) for i in _owned(m, u)})
    owner = m.unit_index(size, length)
    for i in range(length):
        owners = [u for u in range(size) if i in _owned(m, u)]
        assert owner[i].item() == (min(owners) if owners else size)
    mask = m.kept_mask(size, torch.tensor(units, dtype=torch.long), length)
    covered = set(m.covered(size).tolist())
    assert mask.tolist() == [i not in covered or i in want for i in range(length)]


@settings(max_examples=100, deadline=None)
@given(members(), st.data())
def test_removed_params_counts_what_slicing_drops(case, data):
    m, size, length = case
    cols = data.draw(st.integers(1, 4))
    group = Group("g", "channels", size, [m])
    kept = torch.tensor(data.draw(st.lists(st.integers(0, size - 1), unique=True)),
                        dtype=torch.long)
    shapes = {"w": (length, cols)}
    masks = kept_masks([(group, kept)], shapes)
    assert kept_numel(shapes["w"], masks["w"]) == int(masks["w"][0][0].sum()) * cols
    dropped = len(m.covered(size)) - len(m.indices(kept)) if len(kept) else len(m.covered(size))
    assert removed_params([(group, kept)], shapes) == dropped * cols


def test_per_expert_channels_and_whole_experts_count_once():
    """[E, I, H] expert weights: experts removed whole and channels removed per expert."""
    E, I, H = 4, 6, 3
    experts = Group("e", "experts", E, [Member("w", dim=0)])
    channels = Group("c", "expert_channels", I, [Member("w", dim=1, expert_dim=0)])
    keep_e = torch.tensor([0, 2])
    keep_c = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5]])
    shapes = {"w": (E, I, H)}
    removed = removed_params([(experts, keep_e), (channels, keep_c)], shapes)
    assert removed == E * I * H - 2 * 2 * H  # 2 experts left, 2 channels each
