"""Mask maths against hand-computed cases, and the exact global top-k against a full sort."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunegraph.errors import SpecError
from prunegraph.passes.sparse_masks import (
    global_topk,
    keep_nm,
    keep_unstructured,
    magnitude_scores,
    ordered_key,
    wanda_scores,
)

T, F = True, False


def test_wanda_per_row_hand_case():
    W = torch.tensor([[1., -2., 3., -4.],
                      [-4., 3., -2., 1.]])
    norms = torch.tensor([4., 3., 1., 0.5])
    s = wanda_scores(W, norms, in_dim=1)
    assert torch.equal(s, torch.tensor([[4., 6., 3., 2.], [16., 9., 2., 0.5]]))
    keep = keep_unstructured(s, 0.5, in_dim=1)
    assert keep.tolist() == [[T, T, F, F], [T, T, F, F]]
    # magnitude keeps the large weights instead
    assert keep_unstructured(magnitude_scores(W), 0.5, 1).tolist() == [[F, F, T, T], [T, T, F, F]]


def test_per_row_vs_per_layer():
    s = torch.tensor([[9., 8., 7., 6.],
                      [1., 2., 3., 4.]])
    assert keep_unstructured(s, 0.5, 1, "row").tolist() == [[T, T, F, F], [F, F, T, T]]
    assert keep_unstructured(s, 0.5, 1, "layer").tolist() == [[T, T, T, T], [F, F, F, F]]
    # 75% of 4 per row = 3 removed
    assert keep_unstructured(s, 0.75, 1).tolist() == [[T, F, F, F], [F, F, F, T]]
    # rounding: 0.6 of 4 inputs = 2.4 -> 2 removed per row
    assert keep_unstructured(s, 0.6, 1).sum(1).tolist() == [2, 2]


def test_conv1d_orientation_ranks_along_dim_0():
    s = torch.tensor([[9., 1.], [8., 2.], [7., 3.], [6., 4.]])   # [in, out]
    assert keep_unstructured(s, 0.5, 0).tolist() == [[T, F], [T, F], [F, T], [F, T]]
    assert keep_nm(s, 2, 4, 0).tolist() == [[T, F], [T, F], [F, T], [F, T]]
    W = torch.tensor([[1., 1.], [1., 1.], [1., 1.], [1., 1.]])
    norms = torch.tensor([1., 4., 2., 3.])
    assert keep_nm(wanda_scores(W, norms, 0), 2, 4, 0).tolist() == [[F, F], [T, T], [F, F], [T, T]]


def test_two_four_hand_case():
    s = torch.tensor([[5., 1., 4., 2., 0., 3., 3., 1.]])
    assert keep_nm(s, 2, 4, 1).tolist() == [[T, F, T, F, F, T, T, F]]
    # ties go to the lower index
    assert keep_nm(torch.ones(1, 4), 2, 4, 1).tolist() == [[T, T, F, F]]
    assert keep_nm(s, 1, 4, 1).tolist() == [[T, F, F, F, F, T, F, F]]
    with pytest.raises(SpecError, match="multiple of 4"):
        keep_nm(torch.ones(2, 6), 2, 4, 1)


@given(rows=st.integers(1, 6), groups=st.integers(1, 6), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_two_four_keeps_the_two_largest_of_each_group(rows, groups, seed):
    s = torch.randn(rows, 4 * groups, generator=torch.Generator().manual_seed(seed))
    keep = keep_nm(s, 2, 4, 1)
    g = s.reshape(rows, groups, 4)
    k = keep.reshape(rows, groups, 4)
    assert bool((k.sum(-1) == 2).all())
    assert bool((g.masked_fill(~k, float("inf")).amin(-1)
                 >= g.masked_fill(k, -float("inf")).amax(-1)).all())


def test_ordered_key_sorts_like_floats():
    x = torch.tensor([-3., -0.0, 0.0, 1e-30, -1e-30, 5., float("inf"), -float("inf"), 2.5])
    assert torch.equal(torch.argsort(ordered_key(x), stable=True), torch.argsort(x, stable=True))
    with pytest.raises(SpecError, match="NaN"):
        ordered_key(torch.tensor([1.0, float("nan")]))


def test_global_topk_hand_case_with_tiebreak():
    scores = {"a": torch.tensor([[3., 1.], [2., 2.]]), "b": torch.tensor([2., 5., 0.])}
    tie = {"a": torch.tensor([[0., 0.], [1., 9.]]), "b": torch.tensor([5., 0., 0.])}
    keep = global_topk(scores, 4, tie)   # 5, 3 kept; two of the three 2s: tiebreak 9 and 5
    assert keep["a"].tolist() == [[T, F], [F, T]] and keep["b"].tolist() == [T, T, F]
    keep = global_topk(scores, 4)        # no tiebreak: the first 2s in order
    assert keep["a"].tolist() == [[T, F], [T, T]] and keep["b"].tolist() == [F, T, F]
    assert sum(int(v.sum()) for v in global_topk(scores, 7).values()) == 7
    assert sum(int(v.sum()) for v in global_topk(scores, 0).values()) == 0


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), seed=st.integers(0, 10_000),
       bf16=st.booleans(), frac=st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_global_topk_is_exact(sizes, seed, bf16, frac):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    scores = {f"w{i}": (torch.randn(n, generator=gen) * 0.05).to(dtype) for i, n in enumerate(sizes)}
    total = sum(sizes)
    k = round(frac * total)
    keep = global_topk(scores, k)
    flat = torch.cat([scores[n].float() for n in scores])
    kept = torch.cat([keep[n] for n in scores])
    assert int(kept.sum()) == k
    if 0 < k < total:
        assert flat[kept].min() >= flat[~kept].max()
        # the same set as a stable full sort (ties in order of position)
        want = torch.zeros(total, dtype=torch.bool)
        want[torch.argsort(flat, descending=True, stable=True)[:k]] = True
        assert torch.equal(kept, want)
