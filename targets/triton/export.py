"""``prunegraph export triton RUN_OR_MODEL OUT_DIR``: kernels specialised to a pruned model.

The MLPs lowered are the modules that meet the kernels' contract (the runner's: children
``gate_proj``/``up_proj``/``down_proj`` without bias, SiLU); modules with that triple that fail
the contract are reported as skipped with the reason. ``OUT_DIR`` gets ``kernels.py`` (standalone:
imports only torch and triton, one set of kernels per distinct pruned shape, one launcher per
layer) and ``layers.json`` (which module each launcher serves), written to temporary names and
renamed. Install the kernels with :func:`prunegraph.targets.triton.runner.install_triton_mlps`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from prunegraph.errors import PreconditionError, SpecError
from prunegraph.pipeline.runfolder import atomic_write_text
from prunegraph.targets.export_cli import export_target

__all__ = ["swiglu_mlp_paths", "export_triton"]


def swiglu_mlp_paths(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """MLP module paths the SwiGLU kernels can serve, and near-misses with the reason.

    The kernels' contract is the runner's: a module with ``gate_proj``/``up_proj``/``down_proj``
    ``nn.Linear`` children, no bias, SiLU. Any width works, a pruned width of 1 included.
    """
    from prunegraph.targets.triton.runner import _check_silu, _linears

    paths, skipped = [], {}
    for path, module in model.named_modules():
        if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            continue
        try:
            gate, _, _ = _linears(module, path)
            _check_silu(module, path, gate.weight)
        except PreconditionError as e:
            skipped[path] = str(e)
            continue
        paths.append(path)
    return paths, skipped


def export_triton(model: nn.Module, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Write ``kernels.py`` and ``layers.json`` for ``model``'s SwiGLU MLPs into ``out_dir``."""
    from prunegraph.targets.triton.codegen import generate_source
    from prunegraph.targets.triton.runner import mlp_shapes

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SpecError(f"{out} exists and is not empty; pass --overwrite or another OUT_DIR")
    paths, skipped = swiglu_mlp_paths(model)
    if not paths:
        raise PreconditionError(
            "no MLP of this model is a bias-free SwiGLU (gate_proj, up_proj, down_proj, SiLU), "
            f"which is what the Triton kernels implement; skipped: {skipped}")
    shapes = mlp_shapes(model, paths)
    source = generate_source(shapes)
    out.mkdir(parents=True, exist_ok=True)
    kernels = atomic_write_text(out / "kernels.py", source)
    layers = {s.name: {"hidden": s.hidden, "intermediate": s.intermediate, "dtype": s.dtype_name}
              for s in shapes}
    atomic_write_text(out / "layers.json", json.dumps({"layers": layers, "skipped": skipped}, indent=1))
    distinct = {(s.hidden, s.intermediate, s.dtype_name) for s in shapes}
    return {"kernels": str(kernels), "layers": len(paths), "distinct_shapes": len(distinct),
            "skipped": skipped}


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="generate kernels for this weight dtype (default: the model's)")


@export_target("triton", "generate Triton SwiGLU kernels specialised to each layer's (pruned) widths",
               _configure)
def _export_command(args: argparse.Namespace) -> dict:
    from prunegraph.targets.onnx import load_run_or_model

    model, _ = load_run_or_model(args.model)
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    return export_triton(model, args.out, overwrite=args.overwrite)
