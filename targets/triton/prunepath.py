"""PrunePath FFN kernels: top-p routing over contiguous channel groups ("experts").

After MoEfication the FFN's ``I`` channels are ordered so that expert ``e`` owns the contiguous
channels ``[e*G, min((e+1)*G, I))``; ``E = ceil(I / G)``, so a pruned width that ``G`` does not
divide leaves a smaller last expert. A bias-free router ``Wr [E, H]`` scores the FFN input; per
token, ``p = softmax(r)``, experts are taken in descending ``p`` until the cumulative mass reaches
``tau``, and each taken expert's channels are scaled by ``sigmoid(r_e)`` (methods.md §3.3).

Two conventions for the expert that crosses ``tau`` (``mode``):

* ``"exclusive"`` (the reference code): keep rank ``k`` iff the inclusive cumulative sum
  ``c_k < tau``; rank 0 is always kept. The selected mass is below ``tau``.
* ``"inclusive"`` (standard top-p): keep rank ``k`` iff ``c_{k-1} < tau`` (``c_{-1} = 0``), i.e.
  include the expert whose mass crosses ``tau``.

Ties in ``p`` are ranked by the lower expert id first, in the kernel and the reference alike.

Weight layouts. ``Wg, Wu`` are ``[I, H]`` (``nn.Linear``): expert ``e``'s ``G`` rows are one
contiguous ``G*H`` block. ``Wd`` is taken as an ``[H, I]`` tensor with any strides; the kernels
read it through its strides, and :func:`pack_prunepath_weights` stores it column-major
(``wd.t().contiguous().t()``) so that expert ``e``'s ``G`` columns are also one contiguous ``G*H``
block. Every expert thus streams exactly three contiguous blocks, which is where the decode
bandwidth saving comes from.

Paths (:class:`PrunePathFFN` holds one FFN's weights and picks between them; the functions
below are the same paths for loose tensors):

* up to ``max_decode_tokens`` tokens (decode, small batches): the kernels of
  :mod:`~prunegraph.targets.triton.prunepath_decode`: the router GEMV spread over many programs
  with the selection fused into its last program, then the union of the tokens' active experts
  streamed by a gate/up kernel and a split-K down kernel whose partial sums are reduced without
  atomics on data (three launches for one token). The output is deterministic.
* more tokens (prefill): :mod:`~prunegraph.targets.triton.prunepath_prefill`: router GEMM and
  per-token selection, tokens grouped by expert, one grouped gate/up GEMM over the active
  (token, expert) pairs scattered into the activation, and the dense down GEMM (optionally, above
  an active fraction ``dense_above``, the masked path: every channel, then the gates).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from prunegraph.targets.triton import prunepath_decode as dec
from prunegraph.targets.triton import prunepath_prefill as pre
from prunegraph.targets.triton.prunepath_decode import DecodeBlocks, RouterSelection
from prunegraph.targets.triton.prunepath_prefill import PrefillBlocks

__all__ = [
    "Mode",
    "RouterSelection",
    "expert_mask",
    "prunepath_gates",
    "prunepath_ffn_reference",
    "pack_prunepath_weights",
    "router_select",
    "expert_swiglu_decode",
    "prunepath_ffn",
    "PrunePathFFN",
    "DecodeBlocks",
    "PrefillBlocks",
]

Mode = Literal["exclusive", "inclusive"]
_MODES = ("exclusive", "inclusive")


def _check_mode_tau(mode: str, tau: float) -> None:
    if mode not in _MODES:
        raise ValueError(f"PrunePath mode {mode!r} is unknown; use one of {_MODES}")
    if not tau > 0:
        raise ValueError(f"PrunePath tau must be > 0 (a cumulative probability mass), got {tau}")


def _num_experts(I: int, group_size: int) -> int:
    if group_size < 1:
        raise ValueError(f"PrunePath group_size must be >= 1, got {group_size}")
    return -(-I // group_size)


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------


def expert_mask(num_experts: int, intermediate: int, group_size: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """``{0,1}^{E x I}``: channel ``c`` belongs to expert ``c // group_size``."""
    owner = torch.arange(intermediate, device=device) // group_size
    return (owner[None, :] == torch.arange(num_experts, device=device)[:, None]).float()


def prunepath_gates(logits: torch.Tensor, tau: float, mode: Mode = "exclusive") -> torch.Tensor:
    """Per-token expert gates ``[T, E]`` (fp32): ``sigmoid(r_e)`` for selected experts, 0 else."""
    _check_mode_tau(mode, tau)
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
    c = torch.cumsum(sp, dim=-1)
    if mode == "exclusive":
        keep_sorted = c < tau
        keep_sorted[..., 0] = True
    else:
        before = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], dim=-1)
        keep_sorted = before < tau
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, torch.sigmoid(logits), torch.zeros_like(logits))


def prunepath_ffn_reference(x: torch.Tensor, wr: torch.Tensor, wg: torch.Tensor,
                            wu: torch.Tensor, wd: torch.Tensor, tau: float, group_size: int,
                            mode: Mode = "exclusive") -> torch.Tensor:
    """Dense PrunePath FFN: ``h = silu(x Wg^T) * (x Wu^T)``; ``h *= gates @ ExpertMask``;
    ``y = h Wd^T``. The router runs in fp32, as in the kernels. ``x`` is ``[..., H]``."""
    I = wg.shape[0]
    E = _num_experts(I, group_size)
    if wr.shape[0] != E:
        raise ValueError(f"router has {wr.shape[0]} experts but I={I}, group_size={group_size} "
                         f"gives {E}; the router must have ceil(I / group_size) rows")
    gates = prunepath_gates(F.linear(x.float(), wr.float()), tau, mode)
    h = F.silu(F.linear(x, wg)) * F.linear(x, wu)
    scale = gates @ expert_mask(E, I, group_size, device=x.device)
    return F.linear((h.float() * scale).to(h.dtype), wd)


def pack_prunepath_weights(wr: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                           wd: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The decode layout (done once before inference): router, gate and up row-major as given,
    down column-major so that each expert's ``G`` columns are contiguous."""
    return wr.contiguous(), wg.contiguous(), wu.contiguous(), wd.t().contiguous().t()


# --------------------------------------------------------------------------------------------
# Kernel paths
# --------------------------------------------------------------------------------------------


def _as_tokens(x: torch.Tensor, H: int) -> torch.Tensor:
    if x.shape[-1] != H:
        raise ValueError(f"PrunePath: input has hidden size {x.shape[-1]}, weights expect {H}")
    x2 = x.reshape(-1, H)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_shapes(wr: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                  group_size: int) -> None:
    I, H = wg.shape
    E = _num_experts(I, group_size)
    if wu.shape != (I, H) or wd.shape != (H, I):
        raise ValueError(f"PrunePath: wg/wu must be [I, H] and wd [H, I]; got wg "
                         f"{tuple(wg.shape)}, wu {tuple(wu.shape)}, wd {tuple(wd.shape)}")
    if wr.shape != (E, H):
        raise ValueError(f"router has shape {tuple(wr.shape)} but I={I}, group_size="
                         f"{group_size} gives {E} experts; the router must be [ceil(I / G)={E}, "
                         f"H={H}]")


class PrunePathFFN:
    """One routed SwiGLU FFN made ready for the kernels, once: the weights in the decode layout
    (``pack``: ``wd`` column-major, a copy unless it already is), the tiles for its shape and the
    ticket counters its decode kernels share. One instance must not run on two CUDA streams at
    once (the counters); the weights are referenced, not copied, except ``wd`` when packing.

    ``max_decode_tokens``: inputs of at most this many tokens take the decode kernels, larger
    ones the grouped prefill. ``dense_above``: an active fraction (of expert slots, read back to
    the host) above which the prefill takes the masked path (every channel computed, then gated)
    instead; ``None`` (default) always groups, with no host read-back: on an H200 the grouped
    prefill was faster than the masked path up to 90% active (``docs/benchmarks.md``)."""

    def __init__(self, wr: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                 group_size: int, *, max_decode_tokens: int = 64,
                 dense_above: float | None = None, decode_blocks: DecodeBlocks | None = None,
                 prefill_blocks: PrefillBlocks | None = None, pack: bool = True) -> None:
        _check_shapes(wr, wg, wu, wd, group_size)
        if max_decode_tokens < 1:
            raise ValueError(f"max_decode_tokens must be >= 1, got {max_decode_tokens}")
        I, H = wg.shape
        self.group_size, self.hidden, self.width = int(group_size), H, I
        self.experts = _num_experts(I, group_size)
        self.wr, self.wg, self.wu, self.wd = (pack_prunepath_weights(wr, wg, wu, wd) if pack
                                              else (wr, wg, wu, wd))
        self.max_decode_tokens, self.dense_above = int(max_decode_tokens), dense_above
        self.decode_blocks = decode_blocks or dec.choose_decode_blocks(
            H, I, self.group_size, self.experts, wg.device)
        self.prefill_blocks = prefill_blocks or PrefillBlocks()
        self.counters = dec.new_counters(self.decode_blocks, H, wg.device)

    def set_decode_blocks(self, blocks: DecodeBlocks) -> None:
        """Use other decode tiles from now on (the benchmark's sweep)."""
        self.decode_blocks = blocks
        self.counters = dec.new_counters(blocks, self.hidden, self.wg.device)

    def __call__(self, x: torch.Tensor, tau: float, mode: Mode = "exclusive") -> torch.Tensor:
        """The FFN output for ``x [..., H]`` in ``x.dtype``."""
        _check_mode_tau(mode, tau)
        x2 = _as_tokens(x, self.hidden)
        if x2.shape[0] <= self.max_decode_tokens:
            y = self.decode(x2, tau, mode)
        else:
            y = self.prefill(x2, tau, mode)
        return y.reshape(x.shape)

    def route(self, x2: torch.Tensor, tau: float, mode: Mode = "exclusive") -> RouterSelection:
        """Decode routing of ``x2 [T, H]`` (per-token lists and their union)."""
        return dec.route(x2, self.wr, tau, mode == "inclusive", self.decode_blocks, self.counters)

    def decode(self, x2: torch.Tensor, tau: float, mode: Mode = "exclusive",
               stages: str = "all") -> torch.Tensor:
        """``[T, H]`` through the decode kernels. ``stages`` leaves later kernels out, for
        timing each stage: ``"router"``, ``"gate_up"`` (the output is then unwritten)."""
        sel = self.route(x2, tau, mode)
        if stages == "router":
            return x2
        return dec.decode_experts(x2, self.wg, self.wu, self.wd, sel, self.group_size,
                                  self.decode_blocks, self.counters, stages=stages)

    def prefill(self, x2: torch.Tensor, tau: float, mode: Mode = "exclusive",
                path: str = "auto") -> torch.Tensor:
        """``[T, H]`` through the prefill path: ``"grouped"``, ``"masked"`` or ``"auto"``
        (grouped unless the active fraction is above ``dense_above``)."""
        if path not in ("auto", "grouped", "masked"):
            raise ValueError(f"prefill path {path!r} is unknown; use auto, grouped or masked")
        sel = pre.select_tokens(pre.router_logits(x2, self.wr), tau, mode == "inclusive")
        if path == "auto":
            path = "grouped"
            if self.dense_above is not None:
                fraction = float((sel.selected_gates >= 0).float().mean())
                path = "masked" if fraction > self.dense_above else "grouped"
        if path == "masked":
            return pre.masked_prefill(x2, self.wg, self.wu, self.wd, sel, self.group_size)
        return pre.grouped_prefill(x2, self.wg, self.wu, self.wd, sel, self.group_size,
                                   self.prefill_blocks)


def router_select(x: torch.Tensor, wr: torch.Tensor, tau: float,
                  mode: Mode = "exclusive") -> RouterSelection:
    """Route each token of ``x [..., H]`` with the decode router kernels (the GEMV over many
    programs, the selection fused into the last one for a single token).

    The kernels rank experts by an all-pairs comparison and sum the preceding mass as a tree,
    not the sequential cumulative sum of the reference: the two can differ in the last bits,
    which decides the selection only when a cumulative mass lies within rounding of ``tau``.
    """
    _check_mode_tau(mode, tau)
    E, H = wr.shape
    x2 = _as_tokens(x, H)
    blocks = dec.choose_decode_blocks(H, E, 1, E, x.device)
    return dec.route(x2, wr, tau, mode == "inclusive", blocks,
                     dec.new_counters(blocks, H, x.device))


def expert_swiglu_decode(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                         selection: RouterSelection, group_size: int,
                         blocks: DecodeBlocks | None = None) -> torch.Tensor:
    """The selected experts' SwiGLU, summed: ``[..., H]`` in ``x.dtype`` (the union of the
    tokens' experts is streamed once, each token weighted by its own gates)."""
    I, H = wg.shape
    E = _num_experts(I, group_size)
    if wu.shape != (I, H) or wd.shape != (H, I):
        raise ValueError(f"PrunePath: wg/wu must be [I, H] and wd [H, I]; got wg "
                         f"{tuple(wg.shape)}, wu {tuple(wu.shape)}, wd {tuple(wd.shape)}")
    x2 = _as_tokens(x, H)
    blocks = blocks or dec.choose_decode_blocks(H, I, group_size, E, x.device)
    y = dec.decode_experts(x2, wg, wu, wd, selection.with_union(E), group_size, blocks,
                           dec.new_counters(blocks, H, x.device))
    return y.reshape(x.shape)


def prunepath_ffn(x: torch.Tensor, wr: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                  wd: torch.Tensor, tau: float, group_size: int, mode: Mode = "exclusive",
                  max_decode_tokens: int = 64, dense_above: float | None = None,
                  decode_blocks: DecodeBlocks | None = None,
                  prefill_blocks: PrefillBlocks | None = None) -> torch.Tensor:
    """PrunePath FFN for ``x [..., H]``: decode kernels for up to ``max_decode_tokens`` tokens,
    the grouped prefill beyond (see :class:`PrunePathFFN`, which this builds without packing:
    keep one instance instead when calling repeatedly)."""
    _check_shapes(wr, wg, wu, wd, group_size)
    ffn = PrunePathFFN(wr, wg, wu, wd, group_size, max_decode_tokens=max_decode_tokens,
                       dense_above=dense_above, decode_blocks=decode_blocks,
                       prefill_blocks=prefill_blocks, pack=False)
    return ffn(x, tau, mode)
