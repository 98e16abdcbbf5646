"""Fused SwiGLU MLP kernels for pruned widths: ``y = down(silu(x @ Wg^T) * (x @ Wu^T))``.

Pruned models have ragged widths (``I = 11465``, ``H = 577``), so every load is masked and no
width needs to be a multiple of a block. Weights use the ``nn.Linear`` layouts: ``Wg, Wu: [I, H]``,
``Wd: [H, I]``. Accumulation is always fp32; inputs may be fp32, bf16 or fp16.

Every launch picks a :class:`TileConfig` by token count (:data:`TOKEN_BUCKETS`):

* one token (decode): two GEMV kernels. ``gemv_gate_up`` streams ``BLOCK_I`` rows of Wg and Wu
  per program (unit stride along H, 16-byte loads, fp32 partial sums kept as a 2-D tile and reduced
  once at the end) and writes ``act = silu(gate) * up``; ``gemv_down`` streams ``BLOCK_H`` rows of
  Wd per program against ``act`` (read from L2). Both are bound by weight bytes; each output has
  enough programs (``I / BLOCK_I`` and ``H / BLOCK_H``, hundreds at LLM sizes) to fill a large GPU
  without a split-K reduction or atomics.
* more tokens: a fused gate/up GEMM (``tl.dot``, both accumulators in one pass over ``x``) that
  writes ``act`` in the input dtype, then the down-projection GEMM. Both loop over their reduction
  with ``tl.range`` so that Triton pipelines the loads ``num_stages`` deep (cp.async; wgmma on
  Hopper), and walk their output tiles in groups of ``GROUP_T`` token blocks so that one weight tile
  serves several token blocks while it is in L2.

``act`` is allocated with rows padded to a multiple of 64 elements, so the down GEMM reads
128-byte aligned rows even when ``I`` is odd. ``H`` is a compile-time constant of every kernel
(one value per model); ``I``, the token count and the strides are run-time arguments, so the
layers of a non-uniformly pruned model share compiled kernels (Triton still specialises on whether
each integer is a multiple of 16, so aligned and odd widths get their own binaries).

The kernel *bodies* are ``@triton.jit`` device functions; :mod:`prunegraph.targets.triton.codegen`
copies their source and :func:`launch_swiglu`'s into generated modules, so the generic wrapper
here and the generated code run the same code.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) computes ``tl.dot`` on bf16 tiles wrongly
(numpy has no bf16), so under the interpreter the GEMM tiles are upcast to fp32 (``UPCAST``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = [
    "GENERIC_KERNELS",
    "KERNEL_BODIES",
    "TOKEN_BUCKETS",
    "TileConfig",
    "bucket_index",
    "choose_configs",
    "fit_config",
    "interpreting",
    "launch_swiglu",
    "swiglu",
    "swiglu_reference",
    "swiglu_decode_tile",
    "swiglu_gemv_gate_up_tile",
    "swiglu_gemv_down_tile",
    "swiglu_gate_up_tile",
    "swiglu_down_tile",
]

#: The launchers' token buckets: ``(largest token count, token count timed for it)``; ``None``
#: is "any larger count". Tile configs and the per-shape Triton-or-PyTorch choice are per bucket.
TOKEN_BUCKETS: tuple[tuple[int | None, int], ...] = ((1, 1), (16, 16), (256, 128), (None, 2048))


def interpreting() -> bool:
    """True when triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def swiglu_reference(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                     wd: torch.Tensor) -> torch.Tensor:
    """The PyTorch computation the kernels must match (what a Llama-style MLP does)."""
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


@dataclass(frozen=True)
class TileConfig:
    """Launch configuration of one token bucket.

    ``kind`` is ``"gemv"`` (one token: two GEMV kernels) or ``"gemm"``. Gate/up kernel: tiles of
    ``bt`` tokens x ``bi`` channels stepping ``bh`` over H (a GEMV program owns ``bi`` channels and
    steps ``bh``), ``warps`` and ``stages``. Down kernel: tiles of ``bt`` tokens x ``dh`` outputs
    stepping ``di`` over I (a GEMV program owns ``dh`` outputs), ``dwarps`` and ``dstages``.
    ``group``: token blocks walked together over one weight tile (GEMM only).
    """

    kind: str
    bt: int
    bi: int
    bh: int
    warps: int
    stages: int
    dh: int
    di: int
    dwarps: int
    dstages: int
    group: int = 8

    def literal(self) -> str:
        """The config as a ``dict(...)`` expression (what generated modules hold)."""
        return "dict(" + ", ".join(f"{k}={v!r}" for k, v in asdict(self).items()) + ")"


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def fit_config(cfg: TileConfig, H: int, I: int) -> TileConfig:
    """Shrink a config's blocks to the shape (powers of two; ``tl.dot`` dims stay >= 16)."""
    lo = 1 if cfg.kind == "gemv" else 16
    return replace(cfg, bi=min(cfg.bi, _pow2_at_least(I, lo)), bh=min(cfg.bh, _pow2_at_least(H)),
                   dh=min(cfg.dh, _pow2_at_least(H, lo)), di=min(cfg.di, _pow2_at_least(I)))


#: Hopper (H100/H200) tiles for bf16/fp16: what ``benchmarks/triton_mlp.py --sweep`` picked on an
#: H200 (each kernel timed alone over candidates at H=4096, I=14336 and I=11465, summed). One
#: token: 2 x 1024 rows per gate/up program and 4 x 512 per down program, 4 warps (3.9 TB/s of
#: weights at I=14336). GEMMs: 16 x 64 tiles stepping 128 (4 stages) up to 16 tokens, down
#: 16 x 256; 64 x 128 (4 stages) and 64 x 64 (5) up to 256; 128 x 128 (8 warps, 3 stages) above.
_HOPPER = (
    TileConfig("gemv", 1, 2, 1024, 4, 1, 4, 512, 4, 1),
    TileConfig("gemm", 16, 64, 128, 4, 4, 16, 256, 4, 4),
    TileConfig("gemm", 64, 128, 64, 4, 4, 64, 64, 4, 5, group=8),
    TileConfig("gemm", 128, 128, 64, 8, 3, 128, 64, 8, 3, group=8),
)
#: Smaller tiles for fp32 (twice the bytes per element) and for GPUs with less shared memory.
_SMALL = (
    TileConfig("gemv", 1, 4, 512, 4, 1, 4, 512, 4, 1),
    TileConfig("gemm", 16, 32, 64, 4, 2, 16, 64, 4, 2),
    TileConfig("gemm", 32, 64, 32, 4, 2, 32, 32, 4, 2, group=8),
    TileConfig("gemm", 64, 64, 32, 4, 2, 64, 32, 4, 2, group=8),
)


def choose_configs(H: int, I: int, dtype: torch.dtype,
                   capability: tuple[int, int] | None = None) -> tuple[TileConfig, ...]:
    """One :class:`TileConfig` per :data:`TOKEN_BUCKETS` entry for this MLP shape.

    16-bit weights on a Hopper GPU, or an unknown one (``capability=None``: generating on a CPU
    for the usual target), get the Hopper table; fp32 weights and older GPUs (less shared memory
    per block) get smaller, two-stage tiles. Blocks shrink to tiny shapes.
    """
    hopper = dtype != torch.float32 and (capability is None or capability >= (9, 0))
    return tuple(fit_config(c, H, I) for c in (_HOPPER if hopper else _SMALL))


# --------------------------------------------------------------------------------------------
# Kernel bodies (device functions). Keep them self-contained: codegen copies their source.
# --------------------------------------------------------------------------------------------


@triton.jit
def swiglu_decode_tile(x_ptr, wg_ptr, wu_ptr, wd_ptr, y32_ptr, i0, n_valid, scale,
                       stride_wg_i, stride_wg_h, stride_wu_i, stride_wu_h,
                       stride_wd_h, stride_wd_i,
                       H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    """Channels ``[i0, i0 + n_valid)`` of one token: gate/up GEMV over H, act in registers,
    ``act * scale`` times those columns of Wd, atomically added into fp32 ``y32[H]``."""
    offs_i = tl.arange(0, BLOCK_I)
    mask_i = offs_i < n_valid
    rows = i0 + offs_i
    gate = tl.zeros((BLOCK_I,), dtype=tl.float32)
    up = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(x_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        m2 = mask_i[:, None] & mask_h[None, :]
        wg = tl.load(wg_ptr + rows[:, None] * stride_wg_i + offs_h[None, :] * stride_wg_h,
                     mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(wu_ptr + rows[:, None] * stride_wu_i + offs_h[None, :] * stride_wu_h,
                     mask=m2, other=0.0).to(tl.float32)
        gate += tl.sum(wg * x[None, :], axis=1)
        up += tl.sum(wu * x[None, :], axis=1)
    act = gate * tl.sigmoid(gate) * up * scale
    act = tl.where(mask_i, act, 0.0)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        wd = tl.load(wd_ptr + offs_h[None, :] * stride_wd_h + rows[:, None] * stride_wd_i,
                     mask=mask_i[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        part = tl.sum(wd * act[:, None], axis=0)
        tl.atomic_add(y32_ptr + offs_h, part, mask=mask_h)


@triton.jit
def swiglu_gemv_gate_up_tile(x_ptr, wg_ptr, wu_ptr, act_ptr, i0, I, stride_wg_i, stride_wu_i,
                             H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    """``act[i0 : i0 + BLOCK_I]`` of one token: rows of Wg and Wu streamed along H (unit
    stride), fp32 partial products summed in a ``[BLOCK_I, BLOCK_H]`` tile, reduced once."""
    offs_i = i0 + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    gate = tl.zeros((BLOCK_I, BLOCK_H), dtype=tl.float32)
    up = tl.zeros((BLOCK_I, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(x_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        m2 = mask_i[:, None] & mask_h[None, :]
        wg = tl.load(wg_ptr + offs_i[:, None] * stride_wg_i + offs_h[None, :], mask=m2,
                     other=0.0, eviction_policy="evict_first")
        wu = tl.load(wu_ptr + offs_i[:, None] * stride_wu_i + offs_h[None, :], mask=m2,
                     other=0.0, eviction_policy="evict_first")
        gate += wg.to(tl.float32) * x[None, :]
        up += wu.to(tl.float32) * x[None, :]
    g = tl.sum(gate, axis=1)
    u = tl.sum(up, axis=1)
    act = g * tl.sigmoid(g) * u
    tl.store(act_ptr + offs_i, act.to(act_ptr.dtype.element_ty), mask=mask_i)


@triton.jit
def swiglu_gemv_down_tile(act_ptr, wd_ptr, y_ptr, h0, I, stride_wd_h,
                          H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    """``y[h0 : h0 + BLOCK_H]`` of one token: rows of Wd streamed along I against ``act``."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_H, BLOCK_I), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        a = tl.load(act_ptr + offs_i, mask=mask_i, other=0.0).to(tl.float32)
        w = tl.load(wd_ptr + offs_h[:, None] * stride_wd_h + offs_i[None, :],
                    mask=mask_h[:, None] & mask_i[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * a[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_h, y.to(y_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def swiglu_tile_ids(T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_T: tl.constexpr):
    """(token block, output block) of this program: ``GROUP_T`` token blocks in a row share
    each output (weight) block, so its weight tile is read from L2 rather than memory."""
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_T * n_n
    first_t = (pid // per_group) * GROUP_T
    rows = tl.minimum(n_t - first_t, GROUP_T)
    return first_t + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def swiglu_gate_up_tile(x_ptr, wg_ptr, wu_ptr, act_ptr, T, I, stride_xt, stride_wg_i,
                        stride_wu_i, stride_at,
                        H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
                        BLOCK_H: tl.constexpr, GROUP_T: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One ``[BLOCK_T, BLOCK_I]`` tile of ``act = silu(x Wg^T) * (x Wu^T)``: gate and up share
    each loaded ``x`` tile. Weights and ``x`` have unit stride along H."""
    pid_t, pid_i = swiglu_tile_ids(T, I, BLOCK_T, BLOCK_I, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_t = offs_t < T
    mask_i = offs_i < I
    gate = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    up = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for h0 in tl.range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_h[None, :],
                    mask=mask_t[:, None] & mask_h[None, :], other=0.0)
        wmask = mask_h[:, None] & mask_i[None, :]
        wg = tl.load(wg_ptr + offs_i[None, :] * stride_wg_i + offs_h[:, None], mask=wmask,
                     other=0.0)
        wu = tl.load(wu_ptr + offs_i[None, :] * stride_wu_i + offs_h[:, None], mask=wmask,
                     other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        gate = tl.dot(x, wg, gate, input_precision=DOT_PRECISION)
        up = tl.dot(x, wu, up, input_precision=DOT_PRECISION)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + offs_t[:, None] * stride_at + offs_i[None, :],
             act.to(act_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_i[None, :])


@triton.jit
def swiglu_down_tile(act_ptr, wd_ptr, y_ptr, T, I, stride_at, stride_wd_h, stride_yt,
                     H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_I: tl.constexpr, GROUP_T: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One ``[BLOCK_T, BLOCK_H]`` tile of ``y = act Wd^T``. ``act`` and Wd have unit stride
    along I."""
    pid_t, pid_h = swiglu_tile_ids(T, H, BLOCK_T, BLOCK_H, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for i0 in tl.range(0, I, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        a = tl.load(act_ptr + offs_t[:, None] * stride_at + offs_i[None, :],
                    mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        w = tl.load(wd_ptr + offs_h[None, :] * stride_wd_h + offs_i[:, None],
                    mask=mask_i[:, None] & mask_h[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_h[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_h[None, :])


#: Kernel bodies a generated module needs, in definition order.
KERNEL_BODIES = (swiglu_gemv_gate_up_tile, swiglu_gemv_down_tile, swiglu_tile_ids,
                 swiglu_gate_up_tile, swiglu_down_tile)


# --------------------------------------------------------------------------------------------
# Launch (copied into generated modules: uses only torch and triton).
# --------------------------------------------------------------------------------------------


def launch_swiglu(kernels, H, I, cfg, x2, wg, wu, wd, upcast):
    """Run the Triton SwiGLU on ``x2 [T, H]`` (unit inner strides) with tile config ``cfg`` (a
    dict of :class:`TileConfig` fields); ``kernels`` is ``(gemv_gate_up, gemv_down, gate_up,
    down)``. Returns ``y [T, H]`` in ``x2.dtype``."""
    gemv_gate_up, gemv_down, gate_up, down = kernels
    T = x2.shape[0]
    I_pad = -(-I // 64) * 64  # 128-byte aligned act rows whatever I is
    y = torch.empty(T, H, device=x2.device, dtype=x2.dtype)
    if T == 0:
        return y
    if cfg["kind"] == "gemv":
        if T != 1:
            raise ValueError(f"a gemv tile config serves one token, got {T}")
        act = torch.empty(I_pad, device=x2.device, dtype=x2.dtype)
        gemv_gate_up[(triton.cdiv(I, cfg["bi"]),)](
            x2, wg, wu, act, I, wg.stride(0), wu.stride(0), H=H, BLOCK_I=cfg["bi"],
            BLOCK_H=cfg["bh"], num_warps=cfg["warps"], num_stages=cfg["stages"])
        gemv_down[(triton.cdiv(H, cfg["dh"]),)](
            act, wd, y, I, wd.stride(0), H=H, BLOCK_H=cfg["dh"], BLOCK_I=cfg["di"],
            num_warps=cfg["dwarps"], num_stages=cfg["dstages"])
        return y
    precision = "ieee" if x2.dtype == torch.float32 else "tf32"
    bt = cfg["bt"]
    act = torch.empty(T, I_pad, device=x2.device, dtype=x2.dtype)
    gate_up[(triton.cdiv(T, bt) * triton.cdiv(I, cfg["bi"]),)](
        x2, wg, wu, act, T, I, x2.stride(0), wg.stride(0), wu.stride(0), I_pad, H=H,
        BLOCK_T=bt, BLOCK_I=cfg["bi"], BLOCK_H=cfg["bh"], GROUP_T=cfg["group"], UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=cfg["warps"], num_stages=cfg["stages"])
    down[(triton.cdiv(T, bt) * triton.cdiv(H, cfg["dh"]),)](
        act, wd, y, T, I, I_pad, wd.stride(0), y.stride(0), H=H, BLOCK_T=bt,
        BLOCK_H=cfg["dh"], BLOCK_I=cfg["di"], GROUP_T=cfg["group"], UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=cfg["dwarps"], num_stages=cfg["dstages"])
    return y


# --------------------------------------------------------------------------------------------
# Generic kernels (H a constexpr argument) and the Python wrapper.
# --------------------------------------------------------------------------------------------


@triton.jit
def _gemv_gate_up_kernel(x_ptr, wg_ptr, wu_ptr, act_ptr, I, stride_wg_i, stride_wu_i,
                         H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    swiglu_gemv_gate_up_tile(x_ptr, wg_ptr, wu_ptr, act_ptr, tl.program_id(0) * BLOCK_I, I,
                             stride_wg_i, stride_wu_i, H=H, BLOCK_I=BLOCK_I, BLOCK_H=BLOCK_H)


@triton.jit
def _gemv_down_kernel(act_ptr, wd_ptr, y_ptr, I, stride_wd_h,
                      H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    swiglu_gemv_down_tile(act_ptr, wd_ptr, y_ptr, tl.program_id(0) * BLOCK_H, I, stride_wd_h,
                          H=H, BLOCK_H=BLOCK_H, BLOCK_I=BLOCK_I)


@triton.jit
def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, act_ptr, T, I, stride_xt, stride_wg_i, stride_wu_i,
                    stride_at, H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
                    BLOCK_H: tl.constexpr, GROUP_T: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    swiglu_gate_up_tile(x_ptr, wg_ptr, wu_ptr, act_ptr, T, I, stride_xt, stride_wg_i,
                        stride_wu_i, stride_at, H=H, BLOCK_T=BLOCK_T, BLOCK_I=BLOCK_I,
                        BLOCK_H=BLOCK_H, GROUP_T=GROUP_T, UPCAST=UPCAST,
                        DOT_PRECISION=DOT_PRECISION)


@triton.jit
def _down_kernel(act_ptr, wd_ptr, y_ptr, T, I, stride_at, stride_wd_h, stride_yt,
                 H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_I: tl.constexpr, GROUP_T: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    swiglu_down_tile(act_ptr, wd_ptr, y_ptr, T, I, stride_at, stride_wd_h, stride_yt, H=H,
                     BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_I=BLOCK_I, GROUP_T=GROUP_T,
                     UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION)


GENERIC_KERNELS = (_gemv_gate_up_kernel, _gemv_down_kernel, _gate_up_kernel, _down_kernel)


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def bucket_index(tokens: int) -> int:
    """Index into :data:`TOKEN_BUCKETS` of the bucket that serves ``tokens`` tokens."""
    for k, (most, _) in enumerate(TOKEN_BUCKETS):
        if most is None or tokens <= most:
            return k
    raise AssertionError("TOKEN_BUCKETS ends with an open bucket")


def swiglu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
           configs: tuple[TileConfig, ...] | TileConfig | None = None) -> torch.Tensor:
    """Triton SwiGLU MLP for ``x [..., H]``; returns ``[..., H]`` in ``x.dtype``.

    ``configs``: one :class:`TileConfig` per :data:`TOKEN_BUCKETS` entry (default
    :func:`choose_configs`), or a single config used for any token count (the benchmark's sweep;
    a ``"gemv"`` config takes one token only).
    """
    I, H = wg.shape
    if wu.shape != (I, H) or wd.shape != (H, I) or x.shape[-1] != H:
        raise ValueError(f"swiglu: shapes do not fit: x {tuple(x.shape)}, wg {tuple(wg.shape)}, "
                         f"wu {tuple(wu.shape)}, wd {tuple(wd.shape)}; expected wg/wu [I, H] and "
                         f"wd [H, I] (nn.Linear layouts)")
    lead = x.shape[:-1]
    x2 = _unit_inner(x.reshape(-1, H))
    wg, wu, wd = _unit_inner(wg), _unit_inner(wu), _unit_inner(wd)
    if isinstance(configs, TileConfig):
        cfg = configs
    else:
        configs = configs or choose_configs(H, I, x.dtype)
        cfg = configs[bucket_index(x2.shape[0])]
    y = launch_swiglu(GENERIC_KERNELS, H, I, asdict(cfg), x2, wg, wu, wd, interpreting())
    return y.reshape(*lead, H)
