"""Per-shape choice between the Triton SwiGLU kernels and PyTorch eager, made once at export.

A generated kernel can lose to cuBLAS for some shapes (large aligned GEMMs, where cuBLAS is near
the tensor-core peak) and win by several times for others (odd pruned widths, which cuBLAS runs
on unaligned rows; one-token decode). So the exported module does not guess: for every distinct
``(H, I, dtype)`` and every token bucket (:data:`~prunegraph.targets.triton.swiglu.TOKEN_BUCKETS`)
:func:`timed_plan` times both paths on the target GPU at the bucket's representative token count
(median of CUDA-graph replays, :func:`cuda_graph_timer`), checks that Triton's output matches
PyTorch's, and keeps the faster. The plan, with the times, goes into the generated module
(:func:`prunegraph.targets.triton.codegen.generate_source`), which dispatches on it.

Without a GPU to time on (the CPU, the interpreter) :func:`default_plan` is used: Triton for
every bucket, recorded as untimed. It is deterministic, so CI and a CPU export produce the same
module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prunegraph.targets.triton.swiglu import (
    TOKEN_BUCKETS,
    TileConfig,
    choose_configs,
    swiglu,
    swiglu_reference,
)

__all__ = ["PathChoice", "Timer", "default_plan", "timed_plan", "cuda_graph_timer",
           "choose_plans"]

#: ``timer(path, shape, tokens, fn) -> microseconds``: ``path`` is ``"triton"`` or ``"torch"``,
#: ``shape`` the :class:`~prunegraph.targets.triton.codegen.MLPShape` being timed, ``fn`` runs it.
Timer = Callable[[str, Any, int, Callable[[], object]], float]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PathChoice:
    """What one token bucket of one shape runs, and why.

    ``max_tokens``: the bucket's largest token count (``None``: any larger); ``path``:
    ``"triton"`` or ``"torch"``; ``config``: the Triton tile config (kept for a torch entry too,
    so the module stays complete); ``why``: the sentence the generated module carries; ``source``:
    how the choice was made (``"timed on <GPU>"`` or ``"default, not timed"``).
    """

    max_tokens: int | None
    path: str
    config: TileConfig
    why: str
    source: str
    triton_us: float | None = None
    torch_us: float | None = None

    def __post_init__(self) -> None:
        if self.path not in ("triton", "torch"):
            raise ValueError(f"path must be 'triton' or 'torch', got {self.path!r}")


def _configs(shape, capability) -> tuple[TileConfig, ...]:
    return choose_configs(shape.hidden, shape.intermediate, _DTYPES[shape.dtype_name],
                          capability)


def default_plan(shape, reason: str = "no GPU to time on at export",
                 capability: tuple[int, int] | None = None) -> tuple[PathChoice, ...]:
    """Triton with the default tile configs for every bucket, untimed (deterministic)."""
    return tuple(PathChoice(most, "triton", cfg, f"not timed ({reason}): Triton by default",
                            "default, not timed")
                 for (most, _), cfg in zip(TOKEN_BUCKETS, _configs(shape, capability)))


def cuda_graph_timer(path: str, shape, tokens: int, fn: Callable[[], object]) -> float:
    """Median microseconds of ``fn`` as CUDA-graph replays (launch overhead excluded, as it is
    when a model runs under CUDA graphs)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def _close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Triton's output is as close to the fp64 reference as eager's is, within a margin."""
    return bool(torch.isfinite(y).all()) and bool(((y.float() - ref.float()).abs().max())
                                                   <= 4e-2 * max(1.0, ref.abs().max().item()))


@torch.no_grad()
def timed_plan(shape, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, *,
               timer: Timer = cuda_graph_timer, device_name: str | None = None,
               capability: tuple[int, int] | None = None,
               configs: Sequence[TileConfig] | None = None) -> tuple[PathChoice, ...]:
    """Time Triton and PyTorch for each bucket of ``shape`` on these weights; keep the faster.

    A bucket whose Triton output does not match PyTorch's (or that fails to launch) takes the
    torch path, with the reason recorded. ``configs`` overrides the tile table (one per bucket).
    """
    name = device_name or (torch.cuda.get_device_name(wg.device) if wg.is_cuda else
                           str(wg.device))
    source = f"timed on {name}"
    gen = torch.Generator(device="cpu").manual_seed(0)
    plan = []
    for ((most, tokens), cfg) in zip(TOKEN_BUCKETS, configs or _configs(shape, capability)):
        x = torch.randn(tokens, shape.hidden, generator=gen).to(wg.device, wg.dtype)
        try:
            ref = swiglu_reference(x, wg, wu, wd)
            y = swiglu(x, wg, wu, wd, configs=cfg)
            ok = _close(y, ref)
        except Exception as e:  # noqa: BLE001 - any launch failure means "use torch"
            plan.append(PathChoice(most, "torch", cfg, f"Triton failed at T={tokens}: "
                                   f"{type(e).__name__}: {str(e)[:80]}", source))
            continue
        torch_us = timer("torch", shape, tokens, lambda: swiglu_reference(x, wg, wu, wd))
        if not ok:
            plan.append(PathChoice(most, "torch", cfg, f"Triton output differs from PyTorch at "
                                   f"T={tokens}", source, torch_us=torch_us))
            continue
        triton_us = timer("triton", shape, tokens, lambda: swiglu(x, wg, wu, wd, configs=cfg))
        path = "triton" if triton_us <= torch_us else "torch"
        why = (f"T={tokens}: triton {triton_us:.1f} us, torch {torch_us:.1f} us "
               f"({torch_us / triton_us:.2f}x)")
        plan.append(PathChoice(most, path, cfg, why, source, triton_us, torch_us))
    return tuple(plan)


def choose_plans(shapes: Sequence, weights: Mapping[str, tuple[torch.Tensor, ...]], *,
                 mode: str = "auto", timer: Timer | None = None) -> dict[str, tuple[PathChoice,
                                                                                  ...]]:
    """A plan per distinct shape key. ``weights`` maps each shape's layer name to its
    ``(wg, wu, wd)``; the first layer of a shape is timed for all of its layers.

    ``mode``: ``"timed"`` (time on the weights' GPU, or with ``timer``; an error without either),
    ``"triton"`` (:func:`default_plan`), ``"auto"`` (timed when the weights are on a GPU and triton
    is not interpreting, or when a ``timer`` is given; else the default).
    """
    from prunegraph.errors import PreconditionError
    from prunegraph.targets.triton.swiglu import interpreting

    if mode not in ("auto", "timed", "triton"):
        raise ValueError(f"mode must be 'auto', 'timed' or 'triton', got {mode!r}")
    plans: dict[str, tuple[PathChoice, ...]] = {}
    for s in shapes:
        if s.key in plans:
            continue
        wg, wu, wd = weights[s.name]
        on_gpu = wg.is_cuda and not interpreting()
        if mode == "triton" or (mode == "auto" and timer is None and not on_gpu):
            why = ("Triton requested" if mode == "triton" else
                   "weights not on a GPU at export" if not wg.is_cuda else
                   "TRITON_INTERPRET is set")
            capability = torch.cuda.get_device_capability(wg.device) if on_gpu else None
            plans[s.key] = default_plan(s, why, capability)
            continue
        if timer is None and not on_gpu:
            raise PreconditionError(
                "timing the Triton/PyTorch choice needs the model on a CUDA GPU (the one it "
                "will run on) with TRITON_INTERPRET unset; move it there (--device cuda) or "
                "export with --choose triton")
        capability = torch.cuda.get_device_capability(wg.device) if on_gpu else None
        plans[s.key] = timed_plan(s, wg, wu, wd, timer=timer or cuda_graph_timer,
                                  capability=capability)
    return plans
