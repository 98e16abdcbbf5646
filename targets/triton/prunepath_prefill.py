"""Grouped PrunePath prefill (many tokens): gate/up only over the active (token, expert) pairs.

1. Router logits ``x Wr^T`` in fp32 (:func:`_router_logits_kernel`, a tiled ``tl.dot`` GEMM with
   fp32 accumulation: the products of bf16 inputs are exact, as in the fp32 reference) and the
   per-token selection of :mod:`~prunegraph.targets.triton.prunepath_decode` (one program per
   token).
2. A schedule without host synchronisation (:func:`grouped_schedule`, a few PyTorch ops): the
   pairs sorted by expert (token ids grouped per expert, in token order), each expert's pairs cut
   into tiles of ``BLOCK_M`` rows, and the expert of every tile (``E`` marks the unused tail of a
   grid sized for the worst case).
3. :func:`_grouped_gate_up_kernel`: one grouped GEMM for gate and up together: tile ``(i, n)``
   gathers its ``BLOCK_M`` tokens' rows of ``x``, multiplies by the expert's ``BLOCK_N`` gate
   and up rows, and scatters ``act = silu(gate) * up * sigmoid(r_e)`` into its tokens' channels of
   a zeroed ``[T, I]`` activation (the weighted scatter back; unselected pairs stay 0).
4. The down projection is one dense GEMM over that activation (cuBLAS). Why not per expert:
   experts are small (``G`` channels) and a token uses many of them, so per-pair down outputs
   would be ``(active experts per token) x`` the ``[T, H]`` output to write and sum (56x at
   H=4096, G=128, half the experts); the dense down is a third of the dense FFN's FLOPs.

So the FLOPs are ``(2 f + 1) / 3`` of the dense FFN at active fraction ``f``, against the dense
masked path's full FFN plus its masking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from prunegraph.targets.triton.prunepath_decode import RouterSelection, _select_kernel
from prunegraph.targets.triton.swiglu import interpreting

__all__ = ["PrefillBlocks", "router_logits", "select_tokens", "grouped_schedule",
           "grouped_prefill", "masked_prefill"]


class PrefillBlocks:
    """Tiles of the grouped gate/up GEMM (``BLOCK_M`` pairs x ``BLOCK_N`` channels x
    ``BLOCK_K`` hidden). The defaults were the fastest of four in the sweep of
    ``benchmarks/prunepath_kernels.py`` on an H200 (H=4096, G=128, 30% active)."""

    def __init__(self, block_m: int = 128, block_n: int = 128, block_k: int = 64, warps: int = 8,
                 stages: int = 3) -> None:
        self.block_m, self.block_n, self.block_k = block_m, block_n, block_k
        self.warps, self.stages = warps, stages

    def fitted(self, H: int, G: int) -> PrefillBlocks:
        """The same tiles shrunk to the widths (``tl.dot`` needs 16 at least)."""
        p2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731
        return PrefillBlocks(self.block_m, min(self.block_n, p2(G)), min(self.block_k, p2(H)),
                             self.warps, self.stages)

    def __repr__(self) -> str:
        return (f"PrefillBlocks(m={self.block_m}, n={self.block_n}, k={self.block_k}, "
                f"warps={self.warps}, stages={self.stages})")


@triton.jit
def _router_logits_kernel(x_ptr, wr_ptr, out_ptr, T, H, E, stride_xt, stride_wr_e,
                          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``out[t, e] = sum_h x[t, h] wr[e, h]`` in fp32 (``x`` and ``wr`` unit-stride along H)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_m = offs_m < T
    mask_e = offs_e < E
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        x = tl.load(x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(wr_ptr + offs_e[None, :] * stride_wr_e + offs_k[:, None],
                    mask=mask_k[:, None] & mask_e[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * E + offs_e[None, :], acc,
             mask=mask_m[:, None] & mask_e[None, :])


@triton.jit
def _grouped_gate_up_kernel(x_ptr, wg_ptr, wu_ptr, gsel_ptr, pair_tok_ptr, tile_expert_ptr,
                            tile_first_ptr, pair_start_ptr, counts_ptr, act_ptr,
                            H, I, E, G, stride_xt, stride_wg_i, stride_wu_i, stride_at,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Tile ``program_id(0)`` of the expert-sorted pairs, channel block ``program_id(1)``."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < E:
        first = tl.load(tile_first_ptr + e)
        count = tl.load(counts_ptr + e)
        start = tl.load(pair_start_ptr + e)
        offs_m = (tile - first) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        tok = tl.load(pair_tok_ptr + start + offs_m, mask=mask_m, other=0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = e * G + offs_n
        mask_n = (offs_n < G) & (rows < I)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wmask = mask_k[:, None] & mask_n[None, :]
            wg = tl.load(wg_ptr + rows[None, :] * stride_wg_i + offs_k[:, None], mask=wmask,
                         other=0.0)
            wu = tl.load(wu_ptr + rows[None, :] * stride_wu_i + offs_k[:, None], mask=wmask,
                         other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            gate = tl.dot(x, wg, gate, input_precision=DOT_PRECISION)
            up = tl.dot(x, wu, up, input_precision=DOT_PRECISION)
        weight = tl.maximum(tl.load(gsel_ptr + tok * E + e, mask=mask_m, other=0.0), 0.0)
        act = gate * tl.sigmoid(gate) * up * weight[:, None]
        tl.store(act_ptr + tok[:, None] * stride_at + rows[None, :],
                 act.to(act_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def router_logits(x2: torch.Tensor, wr: torch.Tensor, block_m: int = 16) -> torch.Tensor:
    """fp32 ``[T, E]`` router logits of ``x2 [T, H]`` (small row tiles: ``E`` is small, so
    the grid needs many of them to cover the GPU)."""
    T, H = x2.shape
    E = wr.shape[0]
    x2, wr = _unit_inner(x2), _unit_inner(wr)
    out = torch.empty(T, E, dtype=torch.float32, device=x2.device)
    block_e = min(64, max(16, triton.next_power_of_2(E)))
    block_k = min(64, max(16, triton.next_power_of_2(H)))
    _router_logits_kernel[(triton.cdiv(T, block_m), triton.cdiv(E, block_e))](
        x2, wr, out, T, H, E, x2.stride(0), wr.stride(0), BLOCK_M=block_m, BLOCK_E=block_e,
        BLOCK_K=block_k, UPCAST=interpreting(), DOT_PRECISION=_precision(x2.dtype), num_warps=4,
        num_stages=4)
    return out


def select_tokens(logits: torch.Tensor, tau: float, inclusive: bool) -> RouterSelection:
    """The PrunePath selection of every row of fp32 ``logits [T, E]`` (one program a token)."""
    T, E = logits.shape
    dev = logits.device
    block_e = max(16, triton.next_power_of_2(E))
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    ids = torch.empty(T, E, dtype=torch.int32, device=dev)
    wts = torch.empty(T, E, dtype=torch.float32, device=dev)
    cnt = torch.empty(T, dtype=torch.int32, device=dev)
    gsel = torch.empty(T, E, dtype=torch.float32, device=dev)
    _select_kernel[(T,)](logits.contiguous(), cnt, probs, ids, wts, cnt, gsel, cnt, wts, cnt,
                         float(tau), T, E, 1, UNION=False, INCLUSIVE=inclusive,
                         BLOCK_E=block_e, BLOCK_J=max(16, min(block_e, 8192 // block_e)),
                         BLOCK_HS=1, BLOCK_TU=1, num_warps=8)
    return RouterSelection(ids, wts, cnt, probs, selected_gates=gsel)


def grouped_schedule(gsel: torch.Tensor, block_m: int) -> dict[str, torch.Tensor]:
    """Pairs ``(t, e)`` with ``gsel[t, e] >= 0`` grouped by expert, and the tiles over them.

    ``pair_tok[pair_start[e] + i]``: the ``i``-th token (in token order) that selected ``e``;
    ``counts[e]`` such tokens; tile ``k`` belongs to ``tile_expert[k]`` (``E``: past the last
    tile) and covers that expert's pairs ``[(k - tile_first[e]) * block_m, ...)``. The grid is
    sized for every pair active, so nothing is read back to the host."""
    T, E = gsel.shape
    dev = gsel.device
    # expert-major [E, T]: every scan runs along the contiguous dimension (a scan along dim 0 of
    # [T, E] is a sequential loop per column in PyTorch, about 0.4 ms at T = 2048)
    sel = (gsel >= 0).t().contiguous()
    counts = sel.sum(1, dtype=torch.int32)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    max_tiles = E * triton.cdiv(T, block_m)
    tile_expert = torch.searchsorted(tile_end, torch.arange(max_tiles, device=dev,
                                                            dtype=torch.int32), right=True)
    pair_start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    pos = torch.cumsum(sel, 1, dtype=torch.int32) - 1 + pair_start[:, None]
    index = torch.where(sel, pos, T * E).flatten().long()
    pair_tok = torch.empty(T * E + 1, dtype=torch.int32, device=dev)
    tokens = torch.arange(T, device=dev, dtype=torch.int32)[None, :].expand(E, T).flatten()
    pair_tok.scatter_(0, index, tokens)
    return dict(pair_tok=pair_tok, tile_expert=tile_expert.to(torch.int32),
                tile_first=(tile_end - tiles).contiguous(), pair_start=pair_start.contiguous(),
                counts=counts.contiguous(), max_tiles=max_tiles)


def grouped_prefill(x2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                    sel: RouterSelection, group_size: int,
                    blocks: PrefillBlocks | None = None) -> torch.Tensor:
    """``y [T, H]``: the grouped gate/up over the selected pairs, then the dense down GEMM."""
    T, H = x2.shape
    I = wg.shape[0]
    G = group_size
    E = sel.selected_gates.shape[1]
    b = (blocks or PrefillBlocks()).fitted(H, G)
    x2, wg, wu = _unit_inner(x2), _unit_inner(wg), _unit_inner(wu)
    sch = grouped_schedule(sel.selected_gates, b.block_m)
    act = torch.zeros(T, I, dtype=x2.dtype, device=x2.device)
    _grouped_gate_up_kernel[(sch["max_tiles"], triton.cdiv(G, b.block_n))](
        x2, wg, wu, sel.selected_gates, sch["pair_tok"], sch["tile_expert"], sch["tile_first"],
        sch["pair_start"], sch["counts"], act, H, I, E, G, x2.stride(0), wg.stride(0),
        wu.stride(0), act.stride(0), BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k,
        UPCAST=interpreting(), DOT_PRECISION=_precision(x2.dtype), num_warps=b.warps,
        num_stages=b.stages)
    return F.linear(act, wd)


def masked_prefill(x2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                   sel: RouterSelection, group_size: int) -> torch.Tensor:
    """Every channel computed (cuBLAS), then scaled by its expert's gate: for active fractions
    where grouping does not pay."""
    I = wg.shape[0]
    gates = sel.selected_gates.clamp_min(0.0)
    scale = gates.repeat_interleave(group_size, dim=1)[:, :I]
    h = F.silu(F.linear(x2, wg)) * F.linear(x2, wu)
    return F.linear((h.float() * scale).to(x2.dtype), wd)
