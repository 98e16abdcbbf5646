"""PrunePath decode kernels (a few tokens): routing, then the active experts' SwiGLU.

The FFN weights are memory-bound at decode: one token reads every active expert's ``3 * G * H``
weights once, so the kernels are built to stream those rows at the copy bandwidth and to add as
little fixed time as possible (launches, serial latency chains, atomics). Expert ``e`` owns the
contiguous channels ``[e*G, min((e+1)*G, I))`` (after MoEfication); ``wg``/``wu`` are ``[I, H]``
row-major and ``wd`` is read through its strides, fastest column-major
(:func:`~prunegraph.targets.triton.prunepath.pack_prunepath_weights`), so each expert is three
contiguous ``G x H`` blocks.

Pipeline for ``T`` tokens (``T == 1``: three launches; ``T > 1``: five):

1. :func:`_router_kernel`: the router GEMV ``x Wr^T`` spread over ``ceil(E / BLOCK_RE) *
   ceil(H / BLOCK_RH)`` programs, each writing fp32 partial logits ``[H-split, T, E]``. For
   ``T == 1`` the selection is fused: every program takes a ticket from an atomic counter after its
   stores, and the last one sums the partials and selects (no second launch, no atomics on data).
2. :func:`_select_kernel` (``T > 1`` only): one program per token selects; the last one (ticket
   again) builds the union.
   Selection (:func:`_select_token`) is the PrunePath rule in fp32: softmax, every expert's rank and
   the mass ranked before it from an all-pairs comparison on registers (ties: lower id first;
   ``E^2`` compares in one step, where a sort takes ``log^2 E`` dependent steps), exclusive or
   inclusive cumulative mass ``tau``, ``sigmoid(r_e)`` gates. The per-token lists in rank order
   are written (:class:`RouterSelection`), and the **union** of the tokens' experts (by id; for
   one token its list), each with a per-token weight (``sigmoid`` or 0): batched decode streams
   each union expert's weights once for all tokens, never more bytes than per-token lists (which
   re-read shared experts).
3. :func:`_gate_up_kernel`: a persistent grid over units ``(union slot, block of BLOCK_C
   channels)``; each unit streams its channels' gate and up rows in ``BLOCK_H``-wide coalesced
   tiles and writes ``act = silu(x wg) * (x wu) * weight`` (fp32) to a compact ``[T, slot*G + c]``
   buffer. ``T == 1``: vector FMAs; ``T > 1``: ``tl.dot`` over a token block.
4. :func:`_down_kernel`: program ``(j, s)`` owns output tile ``j`` (``BLOCK_HD`` of ``H``) and the
   ``s``-th contiguous chunk of the active units (split-K), streaming those ``down`` rows (columns
   of ``wd``) and writing an fp32 partial ``[s, T, tile]``. ``T == 1``: a 2-D accumulator
   (reduced once, not per unit) and the next unit's tile loaded before the current one is used
   (as in the gate/up kernel's flattened loop); after a ticket per tile,
   the last program of tile ``j`` sums its partials and writes ``y`` in the input dtype (no fp32
   atomics, deterministic). ``T > 1``: :func:`_sum_partials_kernel` reduces them (one more launch,
   fully parallel over ``T x H``).

Every ticket counter is reset to 0 by the program that read the last ticket, so the kernels can be
replayed from a CUDA graph. Counters live in a small int32 buffer (:func:`new_counters`) that the
caller keeps (one per layer) or allocates per call; two launches that share counters must not run
concurrently (one stream does that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from prunegraph.targets.triton.swiglu import interpreting

__all__ = [
    "DecodeBlocks",
    "RouterSelection",
    "choose_decode_blocks",
    "new_counters",
    "route",
    "decode_experts",
    "num_sms",
]


# --------------------------------------------------------------------------------------------
# Device functions
# --------------------------------------------------------------------------------------------


@triton.jit
def _select_token(logits, t, tau, probs_ptr, ids_ptr, wts_ptr, cnt_ptr, gsel_ptr, uids_ptr,
                  uw_ptr, ucnt_ptr, E, INCLUSIVE: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_J: tl.constexpr, DIRECT_UNION: tl.constexpr):
    """Token ``t``'s selection from its logits ``[BLOCK_E]`` (lanes ``>= E`` ignored). Writes
    ``probs[t]``, the rank-ordered ``ids/wts[t, :cnt[t]]`` and ``gsel[t, e]`` (``sigmoid(r_e)``
    if selected, else -1); with ``DIRECT_UNION`` (one token) the union is that list too. All
    ``[T, E]`` buffers are contiguous with row stride ``E``.

    Ranks come from an all-pairs comparison. Up to ``BLOCK_E = 256`` it runs on registers in
    one step (the probabilities are compared with themselves in the other layout); beyond, in
    chunks of ``BLOCK_J`` re-read from ``probs`` (each chunk an L2 round trip)."""
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    row = t * E
    logits = tl.where(mask_e, logits, float("-inf"))
    ex = tl.exp(logits - tl.max(logits, axis=0))
    ex = tl.where(mask_e, ex, 0.0)
    p = ex / tl.sum(ex, axis=0)
    sig = tl.sigmoid(logits)
    tl.store(probs_ptr + row + offs_e, p, mask=mask_e)
    if BLOCK_E <= 256:
        pj = tl.where(mask_e, p, -1.0)
        # j precedes e: more probable, or equally probable with a lower id
        prec = (pj[None, :] > p[:, None]) | ((pj[None, :] == p[:, None])
                                             & (offs_e[None, :] < offs_e[:, None]))
        rank = tl.sum(prec.to(tl.int32), axis=1)
        before = tl.sum(tl.where(prec, pj[None, :], 0.0), axis=1)
    else:
        tl.debug_barrier()  # the probabilities are re-read below in chunks, by other threads
        rank = tl.zeros((BLOCK_E,), dtype=tl.int32)
        before = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for j0 in range(0, E, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < E
            pjc = tl.load(probs_ptr + row + offs_j, mask=mask_j, other=-1.0)
            prec = (pjc[None, :] > p[:, None]) | ((pjc[None, :] == p[:, None])
                                                  & (offs_j[None, :] < offs_e[:, None]))
            prec = prec & mask_j[None, :]
            rank += tl.sum(prec.to(tl.int32), axis=1)
            before += tl.sum(tl.where(prec, pjc[None, :], 0.0), axis=1)
    if INCLUSIVE:
        active = before < tau
    else:
        active = ((before + p) < tau) | (rank == 0)
    active = active & mask_e
    count = tl.sum(active.to(tl.int32), axis=0)
    tl.store(ids_ptr + row + rank, offs_e.to(tl.int32), mask=active)
    tl.store(wts_ptr + row + rank, sig, mask=active)
    tl.store(cnt_ptr + t, count)
    tl.store(gsel_ptr + row + offs_e, tl.where(active, sig, -1.0), mask=mask_e)
    if DIRECT_UNION:
        tl.store(uids_ptr + rank, offs_e.to(tl.int32), mask=active)
        tl.store(uw_ptr + rank, sig, mask=active)
        tl.store(ucnt_ptr, count)


@triton.jit
def _build_union(gsel_ptr, uids_ptr, uw_ptr, ucnt_ptr, T, E, BLOCK_TU: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """Union of the tokens' selected experts, by expert id: ``uids[:ucnt]`` and per-token
    weights ``uw[t, slot]`` (the gate, 0 where token ``t`` did not select that expert). One 2-D
    load (no serial chain over tokens); ``.cg`` reads the other programs' stores from L2."""
    offs_t = tl.arange(0, BLOCK_TU)
    offs_e = tl.arange(0, BLOCK_E)
    m2 = (offs_t[:, None] < T) & (offs_e[None, :] < E)
    g = tl.load(gsel_ptr + offs_t[:, None] * E + offs_e[None, :], mask=m2, other=-1.0,
                cache_modifier=".cg")
    used = tl.max((g >= 0).to(tl.int32), axis=0)
    pos = tl.cumsum(used, 0) - 1
    keep = used > 0
    tl.store(uids_ptr + pos, offs_e.to(tl.int32), mask=keep)
    tl.store(ucnt_ptr, tl.sum(used, axis=0))
    tl.store(uw_ptr + offs_t[:, None] * E + pos[None, :], tl.maximum(g, 0.0),
             mask=m2 & keep[None, :])


@triton.jit
def _summed_logits(part_ptr, t, T, E, NHS, BLOCK_HS: tl.constexpr, BLOCK_E: tl.constexpr):
    """Token ``t``'s logits: the sum of the ``NHS`` partial rows ``part[s, t, :E]``."""
    offs_s = tl.arange(0, BLOCK_HS)
    offs_e = tl.arange(0, BLOCK_E)
    m2 = (offs_e[:, None] < E) & (offs_s[None, :] < NHS)
    parts = tl.load(part_ptr + offs_s[None, :] * (T * E) + t * E + offs_e[:, None], mask=m2,
                    other=0.0, cache_modifier=".cg")
    return tl.sum(parts, axis=1)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _router_kernel(x_ptr, wr_ptr, part_ptr, counter_ptr,
                   probs_ptr, ids_ptr, wts_ptr, cnt_ptr, gsel_ptr, uids_ptr, uw_ptr, ucnt_ptr,
                   tau, T, H, E, stride_xt, stride_xh, stride_wr_e, stride_wr_h,
                   BLOCK_T: tl.constexpr, BLOCK_RE: tl.constexpr, BLOCK_RH: tl.constexpr,
                   FUSE_SELECT: tl.constexpr, INCLUSIVE: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_J: tl.constexpr, BLOCK_HS: tl.constexpr, BLOCK_TU: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program ``pid``: expert block ``pid % NEB`` times hidden split ``pid // NEB``; writes the
    fp32 partial logits ``part[split, t, e]``. With ``FUSE_SELECT`` the last program to finish
    selects for every token and builds the union."""
    pid = tl.program_id(0)
    neb = tl.cdiv(E, BLOCK_RE)
    nhs = tl.cdiv(H, BLOCK_RH)
    eb = pid % neb
    hs = pid // neb
    offs_e = eb * BLOCK_RE + tl.arange(0, BLOCK_RE)
    offs_h = hs * BLOCK_RH + tl.arange(0, BLOCK_RH)
    mask_e = offs_e < E
    mask_h = offs_h < H
    w = tl.load(wr_ptr + offs_e[:, None] * stride_wr_e + offs_h[None, :] * stride_wr_h,
                mask=mask_e[:, None] & mask_h[None, :], other=0.0)
    part = part_ptr + hs * (T * E)
    if BLOCK_T == 1:
        wf = w.to(tl.float32)
        for t in range(T):
            x = tl.load(x_ptr + t * stride_xt + offs_h * stride_xh, mask=mask_h,
                        other=0.0).to(tl.float32)
            tl.store(part + t * E + offs_e, tl.sum(wf * x[None, :], axis=1), mask=mask_e)
    else:
        if UPCAST:
            w = w.to(tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_h[None, :] * stride_xh,
                        mask=mask_t[:, None] & mask_h[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
            tl.store(part + offs_t[:, None] * E + offs_e[None, :], acc,
                     mask=mask_t[:, None] & mask_e[None, :])
    if FUSE_SELECT:
        tl.debug_barrier()  # every thread's partial stores happen before the ticket
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == neb * nhs - 1:
            if BLOCK_TU == 1:  # one token: its list is the union, written directly
                logits = _summed_logits(part_ptr, 0, T, E, nhs, BLOCK_HS, BLOCK_E)
                _select_token(logits, 0, tau, probs_ptr, ids_ptr, wts_ptr, cnt_ptr, gsel_ptr,
                              uids_ptr, uw_ptr, ucnt_ptr, E, INCLUSIVE, BLOCK_E, BLOCK_J, True)
            else:
                for t in range(T):
                    logits = _summed_logits(part_ptr, t, T, E, nhs, BLOCK_HS, BLOCK_E)
                    _select_token(logits, t, tau, probs_ptr, ids_ptr, wts_ptr, cnt_ptr,
                                  gsel_ptr, uids_ptr, uw_ptr, ucnt_ptr, E, INCLUSIVE, BLOCK_E,
                                  BLOCK_J, False)
                tl.debug_barrier()
                _build_union(gsel_ptr, uids_ptr, uw_ptr, ucnt_ptr, T, E, BLOCK_TU, BLOCK_E)
            tl.store(counter_ptr, 0)


@triton.jit
def _select_kernel(part_ptr, counter_ptr, probs_ptr, ids_ptr, wts_ptr, cnt_ptr, gsel_ptr,
                   uids_ptr, uw_ptr, ucnt_ptr, tau, T, E, NHS,
                   UNION: tl.constexpr, INCLUSIVE: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_J: tl.constexpr, BLOCK_HS: tl.constexpr, BLOCK_TU: tl.constexpr):
    """Program ``t`` selects token ``t`` from ``NHS`` partial logit rows; with ``UNION`` the
    last program to finish builds the union of all tokens' experts."""
    t = tl.program_id(0)
    logits = _summed_logits(part_ptr, t, T, E, NHS, BLOCK_HS, BLOCK_E)
    _select_token(logits, t, tau, probs_ptr, ids_ptr, wts_ptr, cnt_ptr, gsel_ptr, uids_ptr,
                  uw_ptr, ucnt_ptr, E, INCLUSIVE, BLOCK_E, BLOCK_J, False)
    if UNION:
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == T - 1:
            _build_union(gsel_ptr, uids_ptr, uw_ptr, ucnt_ptr, T, E, BLOCK_TU, BLOCK_E)
            tl.store(counter_ptr, 0)


@triton.jit
def _gate_up_step(x_ptr, wg_ptr, wu_ptr, uids_ptr, step, valid, pid, nprog, nh, ncb, H, I, G,
                  stride_xh, stride_wg_i, stride_wg_h, stride_wu_i, stride_wu_h,
                  BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Tiles of step ``step`` of a program's flattened (unit, hidden block) loop (one token;
    nothing read unless ``valid``)."""
    unit = pid + (step // nh) * nprog
    offs_h = (step % nh) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    e = tl.load(uids_ptr + unit // ncb, mask=valid, other=0)
    offs_c = (unit % ncb) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = e * G + offs_c
    mask_c = (offs_c < valid.to(tl.int32) * G) & (rows < I)
    m2 = mask_c[:, None] & mask_h[None, :]
    x = tl.load(x_ptr + offs_h * stride_xh, mask=mask_h, other=0.0)
    wg = tl.load(wg_ptr + rows[:, None] * stride_wg_i + offs_h[None, :] * stride_wg_h, mask=m2,
                 other=0.0)
    wu = tl.load(wu_ptr + rows[:, None] * stride_wu_i + offs_h[None, :] * stride_wu_h, mask=m2,
                 other=0.0)
    return x, wg, wu


@triton.jit
def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, uids_ptr, uw_ptr, ucnt_ptr, act_ptr,
                    T, H, I, E, G, stride_xt, stride_xh, stride_wg_i, stride_wg_h,
                    stride_wu_i, stride_wu_h,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                    PREFETCH: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Persistent: program ``pid`` takes units ``pid, pid + P, ...`` of the ``ucnt * NCB``
    units (union slot, channel block). ``act[t, slot*G + c]`` is written for ``c < G`` of a
    real channel (``e*G + c < I``); the buffer's row stride is ``E*G``. ``PREFETCH`` (one
    token): the loop over (unit, hidden block) steps is flattened, the next step's tiles are
    loaded before the current ones are used, and 2-D accumulators are reduced once per unit."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ncb = tl.cdiv(G, BLOCK_C)
    n_units = tl.load(ucnt_ptr) * ncb
    stride_at = E * G
    if BLOCK_T == 1 and PREFETCH:
        nh = tl.cdiv(H, BLOCK_H)
        n_steps = tl.cdiv(n_units - pid, nprog) * nh
        x_n, wg_n, wu_n = _gate_up_step(x_ptr, wg_ptr, wu_ptr, uids_ptr, 0, 0 < n_steps, pid,
                                        nprog, nh, ncb, H, I, G, stride_xh, stride_wg_i,
                                        stride_wg_h, stride_wu_i, stride_wu_h, BLOCK_C, BLOCK_H)
        gate2 = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
        up2 = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
        for step in range(0, n_steps):
            x, wg, wu = x_n, wg_n, wu_n
            x_n, wg_n, wu_n = _gate_up_step(x_ptr, wg_ptr, wu_ptr, uids_ptr, step + 1,
                                            step + 1 < n_steps, pid, nprog, nh, ncb, H, I, G,
                                            stride_xh, stride_wg_i, stride_wg_h, stride_wu_i,
                                            stride_wu_h, BLOCK_C, BLOCK_H)
            xf = x.to(tl.float32)[None, :]
            gate2 += wg.to(tl.float32) * xf
            up2 += wu.to(tl.float32) * xf
            if step % nh == nh - 1:  # the unit's last hidden block: finish it
                unit = pid + (step // nh) * nprog
                slot = unit // ncb
                offs_c = (unit % ncb) * BLOCK_C + tl.arange(0, BLOCK_C)
                e = tl.load(uids_ptr + slot)
                gate = tl.sum(gate2, axis=1)
                up = tl.sum(up2, axis=1)
                act = gate * tl.sigmoid(gate) * up * tl.load(uw_ptr + slot)
                tl.store(act_ptr + slot * G + offs_c, act,
                         mask=(offs_c < G) & (e * G + offs_c < I))
                gate2 = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
                up2 = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
        return
    for unit in range(pid, n_units, nprog):
        slot = unit // ncb
        cb = unit % ncb
        e = tl.load(uids_ptr + slot)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = e * G + offs_c
        mask_c = (offs_c < G) & (rows < I)
        if BLOCK_T == 1:
            gate = tl.zeros((BLOCK_C,), dtype=tl.float32)
            up = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                x = tl.load(x_ptr + offs_h * stride_xh, mask=mask_h, other=0.0).to(tl.float32)
                m2 = mask_c[:, None] & mask_h[None, :]
                wg = tl.load(wg_ptr + rows[:, None] * stride_wg_i + offs_h[None, :] * stride_wg_h,
                             mask=m2, other=0.0).to(tl.float32)
                wu = tl.load(wu_ptr + rows[:, None] * stride_wu_i + offs_h[None, :] * stride_wu_h,
                             mask=m2, other=0.0).to(tl.float32)
                gate += tl.sum(wg * x[None, :], axis=1)
                up += tl.sum(wu * x[None, :], axis=1)
            weight = tl.load(uw_ptr + slot)
            act = gate * tl.sigmoid(gate) * up * weight
            tl.store(act_ptr + slot * G + offs_c, act, mask=mask_c)
        else:
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                mask_t = offs_t < T
                gate = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
                up = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    offs_h = h0 + tl.arange(0, BLOCK_H)
                    mask_h = offs_h < H
                    x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_h[None, :] * stride_xh,
                                mask=mask_t[:, None] & mask_h[None, :], other=0.0)
                    m2 = mask_h[:, None] & mask_c[None, :]
                    wg = tl.load(wg_ptr + rows[None, :] * stride_wg_i
                                 + offs_h[:, None] * stride_wg_h, mask=m2, other=0.0)
                    wu = tl.load(wu_ptr + rows[None, :] * stride_wu_i
                                 + offs_h[:, None] * stride_wu_h, mask=m2, other=0.0)
                    if UPCAST:
                        x = x.to(tl.float32)
                        wg = wg.to(tl.float32)
                        wu = wu.to(tl.float32)
                    gate = tl.dot(x, wg, gate, input_precision=DOT_PRECISION)
                    up = tl.dot(x, wu, up, input_precision=DOT_PRECISION)
                weight = tl.load(uw_ptr + offs_t * E + slot, mask=mask_t, other=0.0)
                act = gate * tl.sigmoid(gate) * up * weight[:, None]
                tl.store(act_ptr + offs_t[:, None] * stride_at + slot * G + offs_c[None, :], act,
                         mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _down_unit(act_ptr, wd_ptr, uids_ptr, unit, valid, offs_h, mask_h, ncb, I, G, stride_wd_h,
               stride_wd_i, BLOCK_K: tl.constexpr):
    """One token's ``act`` block and ``down`` tile of a unit (nothing read unless ``valid``)."""
    slot = unit // ncb
    offs_c = (unit % ncb) * BLOCK_K + tl.arange(0, BLOCK_K)
    e = tl.load(uids_ptr + slot, mask=valid, other=0)
    rows = e * G + offs_c
    mask_c = (offs_c < valid.to(tl.int32) * G) & (rows < I)  # no channel of an invalid unit
    a = tl.load(act_ptr + slot * G + offs_c, mask=mask_c, other=0.0)
    w = tl.load(wd_ptr + rows[:, None] * stride_wd_i + offs_h[None, :] * stride_wd_h,
                mask=mask_c[:, None] & mask_h[None, :], other=0.0)
    return a, w


@triton.jit
def _down_kernel(act_ptr, wd_ptr, uids_ptr, ucnt_ptr, part_ptr, counter_ptr, y_ptr,
                 T, H, I, E, G, S, stride_wd_h, stride_wd_i, stride_yt,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HD: tl.constexpr,
                 BLOCK_S: tl.constexpr, FUSED_REDUCE: tl.constexpr, PREFETCH: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program ``(j, s)``: output columns ``[j*BLOCK_HD, ...)``, units ``[s*per, (s+1)*per)``
    (unit = union slot, block of ``BLOCK_K`` channels). Writes ``part[s, t, h]``; with
    ``FUSED_REDUCE`` (``T == 1``) the last program of tile ``j`` sums the non-empty splits
    into ``y``."""
    j = tl.program_id(0)
    s = tl.program_id(1)
    offs_h = j * BLOCK_HD + tl.arange(0, BLOCK_HD)
    mask_h = offs_h < H
    ncb = tl.cdiv(G, BLOCK_K)
    n_units = tl.load(ucnt_ptr) * ncb
    per = tl.cdiv(n_units, S)
    u0 = s * per
    u1 = tl.minimum(u0 + per, n_units)
    stride_at = E * G
    if BLOCK_T == 1:
        # 2-D accumulator (one reduction at the end, none per unit) and the next unit's tile
        # loaded before the current one is used (two tiles in flight per program)
        acc2 = tl.zeros((BLOCK_K, BLOCK_HD), dtype=tl.float32)
        if PREFETCH:
            a_next, w_next = _down_unit(act_ptr, wd_ptr, uids_ptr, u0, u0 < u1, offs_h, mask_h,
                                        ncb, I, G, stride_wd_h, stride_wd_i, BLOCK_K)
            for unit in range(u0, u1):
                a, w = a_next, w_next
                a_next, w_next = _down_unit(act_ptr, wd_ptr, uids_ptr, unit + 1, unit + 1 < u1,
                                            offs_h, mask_h, ncb, I, G, stride_wd_h,
                                            stride_wd_i, BLOCK_K)
                acc2 += w.to(tl.float32) * a[:, None]
        else:
            for unit in range(u0, u1):
                a, w = _down_unit(act_ptr, wd_ptr, uids_ptr, unit, unit < u1, offs_h, mask_h,
                                  ncb, I, G, stride_wd_h, stride_wd_i, BLOCK_K)
                acc2 += w.to(tl.float32) * a[:, None]
        if u0 < u1:
            tl.store(part_ptr + s * H + offs_h, tl.sum(acc2, axis=0), mask=mask_h)
    else:
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            acc = tl.zeros((BLOCK_T, BLOCK_HD), dtype=tl.float32)
            for unit in range(u0, u1):
                slot = unit // ncb
                offs_c = (unit % ncb) * BLOCK_K + tl.arange(0, BLOCK_K)
                e = tl.load(uids_ptr + slot)
                rows = e * G + offs_c
                mask_c = (offs_c < G) & (rows < I)
                a = tl.load(act_ptr + offs_t[:, None] * stride_at + slot * G + offs_c[None, :],
                            mask=mask_t[:, None] & mask_c[None, :], other=0.0)
                w = tl.load(wd_ptr + rows[:, None] * stride_wd_i + offs_h[None, :] * stride_wd_h,
                            mask=mask_c[:, None] & mask_h[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                else:
                    a = a.to(w.dtype)
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if u0 < u1:
                tl.store(part_ptr + s * (T * H) + offs_t[:, None] * H + offs_h[None, :], acc,
                         mask=mask_t[:, None] & mask_h[None, :])
    if FUSED_REDUCE:
        tl.debug_barrier()  # every thread's partial stores happen before the ticket
        ticket = tl.atomic_add(counter_ptr + j, 1, sem="acq_rel")
        if ticket == S - 1:
            n_full = tl.cdiv(n_units, per)
            offs_s = tl.arange(0, BLOCK_S)
            parts = tl.load(part_ptr + offs_s[:, None] * H + offs_h[None, :],
                            mask=(offs_s[:, None] < n_full) & mask_h[None, :], other=0.0,
                            cache_modifier=".cg")
            tl.store(y_ptr + offs_h, tl.sum(parts, axis=0).to(y_ptr.dtype.element_ty),
                     mask=mask_h)
            tl.store(counter_ptr + j, 0)


@triton.jit
def _sum_partials_kernel(part_ptr, ucnt_ptr, y_ptr, N, H, G, S, stride_yt,
                         BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    """``y[t, h] = sum_s part[s, t, h]`` over the splits that had work (``N = T * H``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n_units = tl.load(ucnt_ptr) * tl.cdiv(G, BLOCK_K)
    n_full = tl.cdiv(n_units, tl.cdiv(n_units, S))
    offs_s = tl.arange(0, BLOCK_S)
    parts = tl.load(part_ptr + offs_s[:, None] * N + offs[None, :],
                    mask=(offs_s[:, None] < n_full) & mask[None, :], other=0.0)
    t = offs // H
    tl.store(y_ptr + t * stride_yt + offs % H, tl.sum(parts, axis=0).to(y_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterSelection:
    """Compact per-token routing: ``ids[t, :count[t]]`` are the active experts in rank order,
    ``weights[t, :count[t]]`` their ``sigmoid(r_e)``; entries past ``count`` are unspecified.
    ``probs`` is the full softmax ``[T, E]`` (for entropy and load statistics).

    The union of the tokens' experts, which the decode expert kernels stream:
    ``union_ids[:union_count]`` (by expert id; for one token, its list in rank order),
    ``union_weights[t, slot]`` the gate of that expert for token ``t`` (0 where ``t`` did not
    select it). ``selected_gates[t, e]`` is
    ``sigmoid(r_e)`` where selected, -1 elsewhere."""

    ids: torch.Tensor  # [T, E] int32
    weights: torch.Tensor  # [T, E] fp32
    count: torch.Tensor  # [T] int32
    probs: torch.Tensor  # [T, E] fp32
    union_ids: torch.Tensor | None = None  # [E] int32
    union_weights: torch.Tensor | None = None  # [T, E] fp32
    union_count: torch.Tensor | None = None  # [1] int32
    selected_gates: torch.Tensor | None = None  # [T, E] fp32

    def gates(self, num_experts: int) -> torch.Tensor:
        """Dense ``[T, E]`` gates (0 for unselected experts), comparable to
        :func:`~prunegraph.targets.triton.prunepath.prunepath_gates`."""
        if self.selected_gates is not None:
            return self.selected_gates.clamp_min(0.0)
        T = self.count.shape[0]
        out = torch.zeros(T, num_experts, dtype=torch.float32, device=self.count.device)
        for t in range(T):
            n = int(self.count[t])
            out[t, self.ids[t, :n].long()] = self.weights[t, :n]
        return out

    def with_union(self, num_experts: int) -> RouterSelection:
        """This selection with the union fields filled (computed in PyTorch) if they are not."""
        if self.union_ids is not None:
            return self
        gsel = torch.full((self.count.shape[0], num_experts), -1.0, dtype=torch.float32,
                          device=self.count.device)
        for t in range(self.count.shape[0]):
            n = int(self.count[t])
            gsel[t, self.ids[t, :n].long()] = self.weights[t, :n].float()
        used = (gsel >= 0).any(0)
        uids = torch.zeros(num_experts, dtype=torch.int32, device=gsel.device)
        ids = torch.nonzero(used).flatten()
        uids[: ids.numel()] = ids.to(torch.int32)
        uw = torch.zeros_like(gsel)
        uw[:, : ids.numel()] = gsel[:, ids].clamp_min(0.0)
        cnt = torch.tensor([ids.numel()], dtype=torch.int32, device=gsel.device)
        return RouterSelection(self.ids, self.weights, self.count, self.probs, uids, uw, cnt,
                               gsel)


@dataclass(frozen=True)
class DecodeBlocks:
    """Tile sizes of the decode kernels.

    ``router_e``/``router_h``: router tile (experts x hidden) of one program. ``gu_c``/``gu_h``:
    channels x hidden tile of a gate/up unit at ``T == 1``; ``gu_programs``: its persistent grid.
    ``down_k``/``down_h``: channels x output tile of the down kernel, ``down_splits`` its split-K
    count. ``*_prefetch``: load the next tile before using the current one (T = 1). ``*_dot``
    fields: the same for ``T > 1`` (``tl.dot`` tiles, all >= 16).
    """

    router_e: int = 16
    router_h: int = 256
    router_warps: int = 8
    gu_c: int = 4
    gu_h: int = 2048
    gu_warps: int = 8
    gu_programs: int = 528
    down_k: int = 16
    down_h: int = 512
    down_splits: int = 32
    down_warps: int = 8
    gu_prefetch: bool = True
    down_prefetch: bool = True
    gu_c_dot: int = 16
    gu_h_dot: int = 256
    gu_warps_dot: int = 4
    down_k_dot: int = 64
    down_h_dot: int = 128
    down_splits_dot: int = 16
    down_warps_dot: int = 4
    stages_dot: int = 3


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in on the CPU interpreter, so that
    the persistent loops really loop in tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def choose_decode_blocks(H: int, I: int, G: int, E: int, device: torch.device,
                         **overrides) -> DecodeBlocks:
    """Tiles for one FFN shape: about one router program per SM, gate/up and down programs
    enough to cover the GPU a few times, tiles no wider than the (power-of-two padded) widths.
    The defaults are the fastest of the one-knob sweeps of ``benchmarks/prunepath_kernels.py``
    on an H200 (bf16, H = 4096, G = 128; T = 1 at 30% and one expert, T = 32 at 30%), the tiles
    its table in ``docs/benchmarks.md`` was measured with. ``overrides`` replace fields."""
    sms = num_sms(device)
    router_e = 16  # tl.dot (T > 1) needs >= 16; masked lanes cost nothing
    neb = -(-E // router_e)
    router_h = 64
    while router_h < 2048 and neb * -(-H // router_h) > sms:  # about one program per SM
        router_h *= 2
    router_h = min(router_h, _pow2(H, 16))
    down_h = min(512, _pow2(H, 16))
    down_splits = max(1, min(64, (2 * sms) // -(-H // down_h)))
    down_h_dot = min(128, _pow2(H, 16))
    fields = dict(router_e=router_e, router_h=router_h, gu_c=min(4, _pow2(G)),
                  gu_h=min(2048, _pow2(H, 16)), gu_programs=4 * sms,
                  down_k=min(16, _pow2(G)), down_h=down_h, down_splits=down_splits,
                  gu_c_dot=min(16, _pow2(G, 16)), gu_h_dot=min(256, _pow2(H, 16)),
                  down_k_dot=min(64, _pow2(G, 16)), down_h_dot=down_h_dot, down_splits_dot=16)
    fields.update(overrides)
    return DecodeBlocks(**fields)


def new_counters(blocks: DecodeBlocks, H: int, device: torch.device) -> torch.Tensor:
    """Zeroed ticket counters for one layer: 1 for routing, one per down output tile."""
    return torch.zeros(1 + -(-H // min(blocks.down_h, blocks.down_h_dot)), dtype=torch.int32,
                       device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _token_block(T: int) -> int:
    return 16 if T <= 16 else 32


def route(x2: torch.Tensor, wr: torch.Tensor, tau: float, inclusive: bool,
          blocks: DecodeBlocks, counters: torch.Tensor) -> RouterSelection:
    """Router and selection for ``x2 [T, H]`` (one launch for ``T == 1``, two otherwise)."""
    T, H = x2.shape
    E = wr.shape[0]
    dev = x2.device
    block_e = _pow2(E, 16)
    block_j = max(16, min(block_e, 8192 // block_e))  # few chunks: each costs an L2 round trip
    nhs = -(-H // blocks.router_h)
    neb = -(-E // blocks.router_e)
    part = torch.empty(nhs, T, E, dtype=torch.float32, device=dev)
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    ids = torch.empty(T, E, dtype=torch.int32, device=dev)
    wts = torch.empty(T, E, dtype=torch.float32, device=dev)
    cnt = torch.empty(T, dtype=torch.int32, device=dev)
    gsel = torch.empty(T, E, dtype=torch.float32, device=dev)
    uids = torch.empty(E, dtype=torch.int32, device=dev)
    uw = torch.empty(T, E, dtype=torch.float32, device=dev)
    ucnt = torch.empty(1, dtype=torch.int32, device=dev)
    fuse = T == 1
    common = dict(INCLUSIVE=inclusive, BLOCK_E=block_e, BLOCK_J=block_j,
                  BLOCK_HS=_pow2(nhs), BLOCK_TU=_pow2(T))
    _router_kernel[(neb * nhs,)](
        x2, wr, part, counters, probs, ids, wts, cnt, gsel, uids, uw, ucnt, float(tau), T, H, E,
        x2.stride(0), x2.stride(1), wr.stride(0), wr.stride(1),
        BLOCK_T=1 if T == 1 else _token_block(T), BLOCK_RE=blocks.router_e,
        BLOCK_RH=blocks.router_h, FUSE_SELECT=fuse, UPCAST=interpreting(),
        DOT_PRECISION=_dot_precision(x2.dtype), num_warps=blocks.router_warps, **common)
    if not fuse:
        _select_kernel[(T,)](part, counters, probs, ids, wts, cnt, gsel, uids, uw, ucnt,
                             float(tau), T, E, nhs, UNION=True, num_warps=8, **common)
    return RouterSelection(ids, wts, cnt, probs, uids, uw, ucnt, gsel)


def decode_experts(x2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                   sel: RouterSelection, group_size: int, blocks: DecodeBlocks,
                   counters: torch.Tensor, stages: str = "all") -> torch.Tensor:
    """``y [T, H]`` (``x2.dtype``): the union experts' SwiGLU with per-token gates.

    ``stages="gate_up"`` stops after the gate/up kernel and returns ``y`` unwritten (the
    benchmark times stages by leaving the later ones out)."""
    T, H = x2.shape
    I = wg.shape[0]
    G = group_size
    E = -(-I // G)
    dev = x2.device
    upcast, precision = interpreting(), _dot_precision(x2.dtype)
    act = torch.empty(T, E * G, dtype=torch.float32, device=dev)
    y = torch.empty(T, H, dtype=x2.dtype, device=dev)
    if T == 1:
        bc, bh, warps, stages_n = blocks.gu_c, blocks.gu_h, blocks.gu_warps, 1
    else:
        bc, bh, warps, stages_n = (blocks.gu_c_dot, blocks.gu_h_dot, blocks.gu_warps_dot,
                                   blocks.stages_dot)
    max_units = E * -(-G // bc)
    _gate_up_kernel[(max(1, min(max_units, blocks.gu_programs)),)](
        x2, wg, wu, sel.union_ids, sel.union_weights, sel.union_count, act,
        T, H, I, E, G, x2.stride(0), x2.stride(1), wg.stride(0), wg.stride(1),
        wu.stride(0), wu.stride(1),
        BLOCK_T=1 if T == 1 else _token_block(T), BLOCK_C=bc, BLOCK_H=bh,
        PREFETCH=blocks.gu_prefetch, UPCAST=upcast, DOT_PRECISION=precision, num_warps=warps,
        num_stages=stages_n)
    if stages == "gate_up":
        return y
    if T == 1:
        bk, bhd, splits, warps = blocks.down_k, blocks.down_h, blocks.down_splits, \
            blocks.down_warps
    else:
        bk, bhd, splits, warps = blocks.down_k_dot, blocks.down_h_dot, blocks.down_splits_dot, \
            blocks.down_warps_dot
    nht = -(-H // bhd)
    part = torch.empty(splits, T, H, dtype=torch.float32, device=dev)
    _down_kernel[(nht, splits)](
        act, wd, sel.union_ids, sel.union_count, part, counters[1:], y,
        T, H, I, E, G, splits, wd.stride(0), wd.stride(1), y.stride(0),
        BLOCK_T=1 if T == 1 else _token_block(T), BLOCK_K=bk, BLOCK_HD=bhd,
        BLOCK_S=_pow2(splits), FUSED_REDUCE=T == 1, PREFETCH=blocks.down_prefetch,
        UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=warps, num_stages=1 if T == 1 else blocks.stages_dot)
    if T > 1:
        block = max(16, min(1024, 8192 // _pow2(splits)))
        _sum_partials_kernel[(triton.cdiv(T * H, block),)](
            part, sel.union_count, y, T * H, H, G, splits, y.stride(0), BLOCK_K=bk,
            BLOCK_S=_pow2(splits), BLOCK=block, num_warps=4)
    return y
