"""2:4 semi-structured target: masked linears run on sparse tensor cores (cuSPARSELt / CUTLASS).

A 2:4-masked model saved by ``SaveSparse`` is a dense HF checkpoint with zeros. On an
Ampere/Hopper GPU (sm80+: A100, H100, H200) :func:`to_semi_structured` swaps every eligible
linear's weight for ``torch.sparse.to_sparse_semi_structured(weight)``: half the values plus
2-bit metadata, and ``F.linear`` dispatches to the sparse GEMM. Nothing else in the model
changes; outputs equal the masked dense model's up to the GEMM's accumulation order::

    model = AutoModelForCausalLM.from_pretrained("runs/wanda24/model", dtype=torch.bfloat16).cuda()
    report = to_semi_structured(model)          # {"converted": [...], "skipped": {name: why}}

Speed, measured on an H200 with torch 2.11 (``benchmarks/sparse24_gpu.py``, docs/benchmarks.md):
the converted Llama-3-8B-sized linears run 1.30-1.44x faster than cuBLAS when replayed in a CUDA
graph. Eager, every converted linear pays 0.6-1.1 ms of cuSPARSELt set-up per call, so capture
the forward in a CUDA graph. torch returns the sparse GEMM's output as a transposed view, and
attention on such heads falls back to a float32 path: every converted linear therefore gets a
forward hook (:func:`contiguous_output`) that copies its output row-major. With it a converted
stack of decoder layers runs at 0.84-0.87x of dense in CUDA graphs (it was 0.17-0.38x without):
the copies cost more than the GEMMs save, so end to end 2:4 is not yet faster.

Backends: cuSPARSELt (``auto`` picks it when torch has it; the only one on Hopper) and torch's
CUTLASS kernels, which run on compute capability 8.x only (on an H200 they raise "Supported only
on GPUs with compute capability 8.x"; :func:`to_semi_structured` refuses first).

A linear is eligible (:func:`candidates`, pure and CPU-checkable) when it is an ``nn.Linear``
(GPT-2's ``Conv1D`` stores ``[in, out]`` and is skipped), its weight dtype is one the backend
runs (bf16/fp16; CUTLASS also fp32), its shape is a multiple of the backend's tile (torch's own
``_DTYPE_SHAPE_CONSTRAINTS``: cuSPARSELt bf16 16 x 16, CUTLASS bf16 32 x 64) and its weight has
at most 2 nonzeros in every 4 consecutive inputs. The rest stay dense and are listed with the
reason. What needs the GPU: ``to_sparse_semi_structured`` itself (it refuses CPU tensors),
cuSPARSELt's compression and both sparse GEMMs. The CUTLASS compressed layout is computed by
torch in Python, so :func:`cutlass_roundtrip` checks on the CPU that a weight's compressed form
(values + metadata) decompresses to exactly the masked weight.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.plan.masks import nm_violations

__all__ = ["Candidate", "candidates", "to_semi_structured", "load_semi_structured",
           "cutlass_roundtrip", "contiguous_output", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "cusparselt", "cutlass")


@dataclass(frozen=True)
class Candidate:
    """One linear: whether it can be converted, and why not."""

    name: str
    shape: tuple[int, ...]
    ok: bool
    reason: str = ""


def _backend_class(backend: str):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return (SparseSemiStructuredTensorCUTLASS if backend == "cutlass"
            else SparseSemiStructuredTensorCUSPARSELT)


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``cusparselt`` when torch has cuSPARSELt, else ``cutlass``."""
    if backend not in BACKENDS:
        raise SpecError(f"unknown 2:4 backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", None)
    return "cusparselt" if available is not None and available() else "cutlass"


def _check(mod: nn.Module, backend: str) -> str:
    if not isinstance(mod, nn.Linear):
        return (f"{type(mod).__name__} is not nn.Linear (GPT-2's Conv1D stores [in, out]; "
                f"convert it to nn.Linear first)")
    w = mod.weight
    limits = _backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS
    if w.dtype not in limits or w.dtype in (torch.int8, torch.float8_e4m3fn):
        ok = sorted(str(d).removeprefix("torch.") for d in limits
                    if d not in (torch.int8, torch.float8_e4m3fn))
        return f"dtype {str(w.dtype).removeprefix('torch.')} (the {backend} backend runs {', '.join(ok)})"
    rows, cols = limits[w.dtype].sparse_min_rows, limits[w.dtype].sparse_min_cols
    if w.shape[0] % rows or w.shape[1] % cols:
        return (f"shape {tuple(w.shape)} is not a multiple of {rows} x {cols} "
                f"({backend}, {str(w.dtype).removeprefix('torch.')})")
    if nm_violations(w.detach() != 0, 2, 4, 1):
        return "weight is not 2:4 sparse along its inputs"
    if mod.bias is not None and mod.bias.dtype != w.dtype:
        return "bias dtype differs from the weight's"
    return ""


def candidates(model: nn.Module, backend: str = "auto", names: set[str] | None = None
               ) -> list[Candidate]:
    """Every linear (or those whose weight is in ``names``) with its eligibility."""
    backend = resolve_backend(backend)
    out = []
    for path, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        name = f"{path}.weight"
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or (names is not None
                                                                and name not in names):
            continue
        if not isinstance(mod, nn.Linear) and type(mod).__name__ != "Conv1D":
            continue
        reason = _check(mod, backend)
        out.append(Candidate(name, tuple(w.shape), not reason, reason))
    return out


@contextlib.contextmanager
def _forced(backend: str):
    from torch.sparse import SparseSemiStructuredTensor

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


def contiguous_output(_mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a converted linear: its output in row-major order.

    Some torch versions return the sparse GEMM's result as the transpose of a ``[out, tokens]``
    tensor. The values are right, but attention then sees query/key/value heads whose last dim
    is not contiguous, and ``scaled_dot_product_attention`` leaves the flash and
    memory-efficient kernels for its float32 math path (measured: a converted Llama-3-8B layer
    stack ran 2.6x slower than dense at 2048 tokens, 5.8x at 8192, almost all of it in that
    attention). One copy of the output, when needed, is far cheaper; so is it than torch's
    fused-transpose option (``_FUSE_TRANSPOSE``), whose cuSPARSELt kernel ran the same forward's
    GEMMs 1.9x slower on an H200."""
    return None if out.is_contiguous() else out.contiguous()


def _check_device(model: nn.Module) -> None:
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cuda":
        where = p.device if p is not None else "no parameters"
        raise PrunegraphError(f"2:4 semi-structured kernels need a CUDA GPU with sparse tensor "
                              f"cores (sm80+: A100, H100, H200); the model is on {where}. Move "
                              f"it first: model.to('cuda', torch.bfloat16)")
    major, _ = torch.cuda.get_device_capability(p.device)
    if major < 8:
        raise PrunegraphError(f"{torch.cuda.get_device_name(p.device)} has no sparse tensor "
                              f"cores (compute capability {major}.x < 8.0)")


@torch.no_grad()
def to_semi_structured(model: nn.Module, backend: Literal["auto", "cusparselt", "cutlass"] = "auto",
                       names: set[str] | None = None, min_converted: int = 1) -> dict[str, Any]:
    """Convert every eligible 2:4 linear of ``model`` in place (see the module docstring).

    Raises:
        PrunegraphError: the model is not on a sm80+ GPU, or fewer than ``min_converted``
            linears are eligible (the reasons of the first ones are named). Nothing is changed.
    """
    from torch.sparse import to_sparse_semi_structured

    _check_device(model)
    backend = resolve_backend(backend)
    major, _ = torch.cuda.get_device_capability(next(model.parameters()).device)
    if backend == "cutlass" and major != 8:
        raise PrunegraphError(f"torch's CUTLASS 2:4 kernels run on compute capability 8.x "
                              f"(A100) only; this GPU is {major}.x: use backend='cusparselt'")
    found = candidates(model, backend, names)
    ok = [c for c in found if c.ok]
    skipped = {c.name: c.reason for c in found if not c.ok}
    if len(ok) < min_converted:
        why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:3]) or "no linear found"
        raise PrunegraphError(f"no linear can run 2:4 ({why}); prune with pattern: '2:4' and "
                              f"load the model in bfloat16 or float16")
    with _forced(backend):
        for c in ok:
            mod = model.get_submodule(c.name.rpartition(".")[0])
            mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach().contiguous()),
                                      requires_grad=False)
            mod.register_forward_hook(contiguous_output)
    converted = sum(c.shape[0] * c.shape[1] for c in ok)
    return {"backend": backend, "converted": [c.name for c in ok], "skipped": skipped,
            "converted_params": converted}


def load_semi_structured(path: str, backend: str = "auto", device: str = "cuda",
                         dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, dict[str, Any]]:
    """A 2:4 checkpoint saved by ``SaveSparse`` loaded with plain ``from_pretrained`` onto the GPU
    and converted (only the weights its ``masks.safetensors`` names); ``(model, report)``."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from prunegraph.plan.masks import MASKS_FILE, MaskSet

    masks = MaskSet.load(Path(path) / MASKS_FILE)
    if masks.pattern != "2:4":
        raise PrunegraphError(f"{path} holds {masks.pattern} masks; the 2:4 kernels need a "
                              f"model pruned with pattern: '2:4'")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, to_semi_structured(model, backend, names=set(masks.masks))


def cutlass_roundtrip(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, metadata, decompressed)`` of a 2:4 weight in CUTLASS's compressed layout,
    computed on the CPU by torch's reference conversion; ``decompressed`` equals ``weight``
    exactly when the weight is 2:4 (what the GPU kernel multiplies with)."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    values, meta = sparse_semi_structured_from_dense_cutlass(weight.detach().contiguous())
    return values, meta, sparse_semi_structured_to_dense_cutlass(values, meta)
