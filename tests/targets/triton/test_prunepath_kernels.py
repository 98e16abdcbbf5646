"""PrunePath routing, decode and grouped prefill kernels match the dense PyTorch reference.

Selection is compared exactly (same expert set, same rank order, same count). The kernel's fp32
router GEMV and softmax round differently from PyTorch's, so examples whose cumulative mass lies
within ``1e-5`` of ``tau``, or whose sorted probabilities are within ``1e-6`` of each other, are
skipped (``assume``): there the rank or the crossing expert is decided by the last bit.
Outputs: fp32 within ``1e-5 * max(1, max|ref|)``, bf16 within ``2e-2 * max(1, max|ref|)``
(the reference rounds ``h`` to bf16, the kernels keep it in fp32). Tile sizes are drawn too, so
ragged widths (not multiples of a tile, not powers of two), several units per persistent program,
empty split-K chunks and several token blocks all occur on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from prunegraph.targets.triton import prunepath_prefill as pre
from prunegraph.targets.triton.prunepath import (
    PrefillBlocks,
    PrunePathFFN,
    expert_mask,
    expert_swiglu_decode,
    prunepath_ffn,
    prunepath_ffn_reference,
    prunepath_gates,
    router_select,
)
from prunegraph.targets.triton.prunepath_decode import choose_decode_blocks

MODES = ["exclusive", "inclusive"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make(T, H, G, I, logit_std, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    E = -(-I // G)
    x = torch.randn(T, H, generator=g)
    wr = torch.randn(E, H, generator=g) * logit_std / H**0.5
    wg = torch.randn(I, H, generator=g) / H**0.5
    wu = torch.randn(I, H, generator=g) / H**0.5
    wd = torch.randn(H, I, generator=g) / I**0.5
    return [t.to(device=device, dtype=dtype) for t in (x, wr, wg, wu, wd)]


def well_separated(x, wr, tau):
    """False when float rounding could decide the selection (see the module docstring)."""
    p = torch.softmax(x.double() @ wr.double().T, dim=-1)
    sp = p.sort(dim=-1, descending=True).values
    c = sp.cumsum(-1)
    gaps_ok = sp.shape[-1] < 2 or bool((sp[:, :-1] - sp[:, 1:]).min() > 1e-6)
    return gaps_ok and bool((c - tau).abs().min() > 1e-5)


def reference_order(x, wr, tau, mode):
    gates = prunepath_gates(x.float() @ wr.float().T, tau, mode)
    p = torch.softmax(x.float() @ wr.float().T, dim=-1)
    order = p.argsort(dim=-1, descending=True, stable=True)
    return gates, [[int(e) for e in row if gates[t, e] > 0] for t, row in enumerate(order)]


# ------------------------------------------------------------------------------------------
# The reference routing rule itself (pure PyTorch).
# ------------------------------------------------------------------------------------------


def test_worked_example_from_the_method_notes():
    """tau = 0.5, p = (0.45, 0.2, ...): exclusive keeps 1 expert, inclusive 2."""
    p = torch.tensor([[0.45, 0.2, 0.15, 0.1, 0.1]])
    logits = p.log()
    exc = prunepath_gates(logits, 0.5, "exclusive")
    inc = prunepath_gates(logits, 0.5, "inclusive")
    assert (exc > 0).tolist() == [[True, False, False, False, False]]
    assert (inc > 0).tolist() == [[True, True, False, False, False]]
    assert torch.allclose(inc[0, :2], torch.sigmoid(logits[0, :2]))


@settings(max_examples=60, deadline=None)
@given(E=st.integers(1, 40), tau=st.floats(0.01, 1.0), std=st.floats(0.1, 5.0),
       seed=st.integers(0, 2**16))
def test_reference_rule_properties(E, tau, std, seed):
    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(seed)) * std
    p = torch.softmax(logits, -1)
    exc = prunepath_gates(logits, tau, "exclusive") > 0
    inc = prunepath_gates(logits, tau, "inclusive") > 0
    assert bool((exc <= inc).all())  # exclusive is a subset of inclusive
    assert bool(((inc.sum(-1) - exc.sum(-1)) <= 1).all())
    assert bool((exc.sum(-1) >= 1).all())
    mass_exc = (p * exc).sum(-1)
    mass_inc = (p * inc).sum(-1)
    top1 = p.max(-1).values
    # exclusive: below tau unless only the forced top-1; inclusive: reaches tau unless all taken
    assert bool(((mass_exc < tau + 1e-6) | (exc.sum(-1) == 1)).all())
    assert bool(((mass_inc >= tau - 1e-5) | inc.all(-1)).all())
    # every kept expert is at least as likely as every dropped one
    for row_p, row_k in zip(p, inc):
        if (~row_k).any():
            assert row_p[row_k].min() >= row_p[~row_k].max()
    assert bool((top1 > 0).all())


# ------------------------------------------------------------------------------------------
# Kernels vs reference.
# ------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(H=st.integers(1, 96), G=st.integers(1, 24), I=st.integers(1, 96),
       T=st.sampled_from([1, 3]), tau=st.floats(0.01, 1.0), mode=st.sampled_from(MODES),
       std=st.floats(0.3, 4.0), seed=st.integers(0, 2**16))
def test_router_select_equals_reference_set(device, H, G, I, T, tau, mode, std, seed):
    x, wr, *_ = make(T, H, G, I, std, torch.float32, device, seed)
    assume(well_separated(x, wr, tau))
    sel = router_select(x, wr, tau, mode)
    gates, order = reference_order(x, wr, tau, mode)
    E = wr.shape[0]
    for t in range(T):
        n = int(sel.count[t])
        assert sel.ids[t, :n].tolist() == order[t]  # same set, in rank order
    torch.testing.assert_close(sel.gates(E).cpu(), gates.cpu(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sel.probs.cpu(), torch.softmax(x.float() @ wr.float().T, -1).cpu(),
                               atol=1e-6, rtol=1e-5)
    # the union (by expert id; one token: its rank order), each token's own gate per slot
    # (0 where it did not select that expert)
    n = int(sel.union_count[0])
    uids = sel.union_ids[:n].tolist()
    assert uids == (order[0] if T == 1 else sorted({e for row in order for e in row}))
    torch.testing.assert_close(sel.union_weights[:, :n].cpu(), gates[:, uids].cpu(),
                               atol=1e-6, rtol=1e-5)


def check_close(y, ref, dtype):
    scale = max(1.0, ref.abs().max().item())
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * scale, f"error {err:.3g}"


def reference(x, wr, wg, wu, wd, tau, G, mode):
    return prunepath_ffn_reference(*(t.double() for t in (x, wr, wg, wu, wd)), tau, G, mode)


DECODE_TILES = st.fixed_dictionaries({
    "gu_c": st.sampled_from([1, 2, 4, 16]), "gu_h": st.sampled_from([16, 32, 128]),
    "gu_programs": st.integers(1, 9), "down_k": st.sampled_from([1, 4, 32]),
    "down_h": st.sampled_from([16, 64]), "down_splits": st.integers(1, 9),
    "router_h": st.sampled_from([16, 64]), "down_splits_dot": st.integers(1, 5),
    "gu_c_dot": st.sampled_from([16, 32]), "down_k_dot": st.sampled_from([16, 32]),
    "gu_prefetch": st.booleans(), "down_prefetch": st.booleans(),
})


@settings(max_examples=30, deadline=None)
@given(H=st.integers(1, 80), G=st.integers(1, 24), I=st.integers(1, 80),
       T=st.sampled_from([1, 1, 2, 5]), tau=st.floats(0.01, 1.0), mode=st.sampled_from(MODES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), packed=st.booleans(),
       tiles=DECODE_TILES, std=st.floats(0.3, 4.0), seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_decode_matches_reference(device, H, G, I, T, tau, mode, dtype, packed, tiles, std,
                                  seed):
    """Decode kernels (T = 1: fused selection and reduction; T > 1: union, tl.dot tiles)."""
    x, wr, wg, wu, wd = make(T, H, G, I, std, dtype, device, seed)
    assume(well_separated(x.float(), wr.float(), tau))
    E = wr.shape[0]
    blocks = choose_decode_blocks(H, I, G, E, x.device, **tiles)
    ffn = PrunePathFFN(wr, wg, wu, wd, G, decode_blocks=blocks, pack=packed)
    y = ffn(x, tau, mode)
    assert y.shape == x.shape and y.dtype == dtype
    check_close(y, reference(x, wr, wg, wu, wd, tau, G, mode), dtype)
    assert bool((ffn.counters == 0).all())  # every ticket counter is reset for the next call


PREFILL_TILES = st.builds(PrefillBlocks, block_m=st.sampled_from([16, 32]),
                          block_n=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 32]),
                          warps=st.just(4), stages=st.just(2))


@settings(max_examples=20, deadline=None)
@given(H=st.integers(1, 64), G=st.integers(1, 40), I=st.integers(1, 80), T=st.integers(3, 40),
       tau=st.floats(0.01, 1.05), mode=st.sampled_from(MODES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), path=st.sampled_from(
           ["grouped", "grouped", "masked"]), tiles=PREFILL_TILES, std=st.floats(0.3, 4.0),
       seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_prefill_matches_reference(device, H, G, I, T, tau, mode, dtype, path, tiles, std, seed):
    """Grouped prefill (tokens sorted by expert, grouped gate/up GEMM, weighted scatter, dense
    down) and the masked prefill, tau > 1 (every expert) included."""
    x, wr, wg, wu, wd = make(T, H, G, I, std, dtype, device, seed)
    assume(well_separated(x.float(), wr.float(), tau))
    ffn = PrunePathFFN(wr, wg, wu, wd, G, max_decode_tokens=2, prefill_blocks=tiles)
    y = ffn.prefill(x, tau, mode, path=path)
    assert y.shape == x.shape and y.dtype == dtype
    check_close(y, reference(x, wr, wg, wu, wd, tau, G, mode), dtype)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 30), E=st.integers(1, 12), block_m=st.sampled_from([1, 2, 4, 16]),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_grouped_schedule_covers_every_pair_once(T, E, block_m, density, seed):
    """Tiles list every selected (token, expert) pair exactly once, by expert, in token order."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(T, E, generator=g) < density
    sch = pre.grouped_schedule(torch.where(sel, 0.5, -1.0), block_m)
    seen = []
    for k in range(sch["max_tiles"]):
        e = int(sch["tile_expert"][k])
        if e == E:
            continue
        first, count = int(sch["tile_first"][e]), int(sch["counts"][e])
        for m in range((k - first) * block_m, min((k - first + 1) * block_m, count)):
            seen.append((e, int(sch["pair_tok"][int(sch["pair_start"][e]) + m])))
    want = sorted((e, t) for t in range(T) for e in range(E) if sel[t, e])
    assert seen == want


def test_prefill_auto_picks_the_masked_path_above_dense_above(device, monkeypatch):
    x, wr, wg, wu, wd = make(12, 24, 8, 40, 0.5, torch.float32, device, 4)
    used = []
    monkeypatch.setattr(pre, "masked_prefill", lambda *a: used.append("masked") or a[0])
    monkeypatch.setattr(pre, "grouped_prefill", lambda *a: used.append("grouped") or a[0])
    for dense_above in (0.0, 1.0, None):
        PrunePathFFN(wr, wg, wu, wd, 8, max_decode_tokens=4, dense_above=dense_above)(x, 0.7)
    assert used == ["masked", "grouped", "grouped"]


@pytest.mark.parametrize("mode", MODES)
def test_tau_above_one_runs_every_expert(device, mode):
    """Stage-1 training uses tau > 1: every expert is active, scaled by its sigmoid."""
    x, wr, wg, wu, wd = make(1, 24, 8, 44, 1.0, torch.float32, device, 5)
    sel = router_select(x, wr, 1.05, mode)
    assert int(sel.count[0]) == 6 and int(sel.union_count[0]) == 6
    y = expert_swiglu_decode(x, wg, wu, wd, sel, 8)
    h = F.silu(x @ wg.T) * (x @ wu.T)
    scale = torch.sigmoid(x @ wr.T) @ expert_mask(6, 44, 8, device=x.device)
    torch.testing.assert_close(y, (h * scale) @ wd.T, atol=1e-5, rtol=1e-5)


def test_only_selected_experts_contribute(device):
    """Zeroing the weights of every unselected expert leaves the kernel's output unchanged."""
    x, wr, wg, wu, wd = make(1, 32, 8, 64, 3.0, torch.float32, device, 11)
    sel = router_select(x, wr, 0.5, "exclusive")
    y = expert_swiglu_decode(x, wg, wu, wd, sel, 8)
    keep = expert_mask(8, 64, 8, device=x.device)[sel.ids[0, : int(sel.count[0])].long()].sum(0)
    assert 0 < keep.sum() < 64
    y2 = expert_swiglu_decode(x, wg * keep[:, None], wu * keep[:, None], wd * keep[None, :],
                              sel, 8)
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=1e-6)


def test_a_selection_without_union_is_completed(device):
    """A RouterSelection built by hand (per-token lists only) still drives the expert kernels."""
    x, wr, wg, wu, wd = make(3, 24, 8, 40, 2.0, torch.float32, device, 3)
    sel = router_select(x, wr, 0.6, "exclusive")
    bare = type(sel)(sel.ids, sel.weights, sel.count, sel.probs)
    torch.testing.assert_close(expert_swiglu_decode(x, wg, wu, wd, bare, 8),
                               expert_swiglu_decode(x, wg, wu, wd, sel, 8))


def test_repeated_calls_are_identical(device):
    """No atomics on data: the same input gives the same bits, call after call."""
    x, wr, wg, wu, wd = make(1, 40, 8, 72, 2.0, torch.bfloat16, device, 9)
    ffn = PrunePathFFN(wr, wg, wu, wd, 8)
    first = ffn(x, 0.8)
    for _ in range(2):
        assert torch.equal(ffn(x, 0.8), first)


def test_many_tokens_take_the_prefill_path(device):
    x, wr, wg, wu, wd = make(5, 24, 8, 40, 2.0, torch.float32, device, 2)
    y = prunepath_ffn(x, wr, wg, wu, wd, 0.6, 8, "inclusive", max_decode_tokens=4,
                      dense_above=None)
    ffn = PrunePathFFN(wr, wg, wu, wd, 8, pack=False)
    assert torch.equal(y, ffn.prefill(x, 0.6, "inclusive", path="grouped"))
    check_close(y, reference(x, wr, wg, wu, wd, 0.6, 8, "inclusive"), torch.float32)


def test_bad_arguments_are_errors(device):
    x, wr, wg, wu, wd = make(1, 16, 8, 32, 1.0, torch.float32, device, 0)
    with pytest.raises(ValueError, match="mode"):
        router_select(x, wr, 0.5, "nucleus")
    with pytest.raises(ValueError, match="tau"):
        prunepath_gates(x @ wr.T, 0.0)
    with pytest.raises(ValueError, match="ceil"):
        prunepath_ffn_reference(x, wr, wg, wu, wd, 0.5, 5)
    with pytest.raises(ValueError, match="ceil"):
        prunepath_ffn(x, wr, wg, wu, wd, 0.5, 5)
    with pytest.raises(ValueError, match="hidden size"):
        PrunePathFFN(wr, wg, wu, wd, 8)(x[:, :8], 0.5)
    with pytest.raises(ValueError, match="max_decode_tokens"):
        PrunePathFFN(wr, wg, wu, wd, 8, max_decode_tokens=0)
    with pytest.raises(ValueError, match="prefill path"):
        PrunePathFFN(wr, wg, wu, wd, 8).prefill(x, 0.5, path="sparse")
