"""``prunegraph export triton RUN_OR_MODEL OUT_DIR``: kernels specialised to a pruned model.

The MLPs lowered are the gated MLPs that the captured graph and the groups show
(:mod:`~prunegraph.targets.triton.patterns`: Llama's ``gate_proj``/``up_proj``, Phi-3's fused
``gate_up_proj``, a shared expert ...) and that meet the kernels' contract (the runner's: SiLU,
no bias); every other channels group is reported as skipped with the reason (GPT-2's MLP is not
gated, Gemma's gate is gelu-tanh, routed experts are not dense MLPs). ``OUT_DIR`` gets
``kernels.py`` (standalone: imports only torch and triton, one set of kernels per distinct pruned
shape, one launcher per layer) and ``layers.json`` (which module each launcher serves and which
weight rows it reads), written to temporary names and renamed. Install the kernels with
:func:`prunegraph.targets.triton.runner.install_triton_mlps`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from torch import nn
from torch.nn.utils import parametrize

from prunegraph.errors import PreconditionError
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.runfolder import atomic_write_text
from prunegraph.pipeline.targets import check_folder_output, target
from prunegraph.targets.triton.patterns import GatedMLP, gated_mlps

__all__ = ["ExportTriton", "export_triton", "swiglu_mlp_paths", "swiglu_mlps", "triton_target"]


def swiglu_mlps(model: nn.Module) -> tuple[list[GatedMLP], dict[str, str]]:
    """The gated MLPs the SwiGLU kernels can serve, and every other MLP with the reason.

    Any width works, a pruned width of 1 included. Reasons are keyed by module path, or by group
    name where no module computes the MLP alone.
    """
    from prunegraph.targets.triton.runner import unsupported

    found = gated_mlps(model)
    served, skipped = [], dict(found.not_gated)
    for mlp in found.mlps:
        reason = unsupported(mlp)
        if reason is None:
            served.append(mlp)
        else:
            skipped[mlp.module or mlp.group or mlp.down] = reason
    return served, skipped


def swiglu_mlp_paths(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Module paths of the MLPs the SwiGLU kernels can serve, and the others with the reason."""
    served, skipped = swiglu_mlps(model)
    return [m.module for m in served], skipped


def export_triton(model: nn.Module, out_dir: str | Path, *, overwrite: bool = False,
                  dtype: str | None = None) -> dict:
    """Write ``kernels.py`` and ``layers.json`` for ``model``'s SwiGLU MLPs into ``out_dir``;
    ``dtype`` (``float32``, ``bfloat16``, ``float16``) generates kernels for weights of that
    type instead of the model's."""
    from prunegraph.targets.triton.codegen import MLPShape, generate_source
    from prunegraph.targets.triton.runner import mlp_shapes

    out = Path(out_dir)
    check_folder_output(out, overwrite)
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PreconditionError("the model still has gates (parametrizations); slice it (Slice "
                                "pass / apply_plan) or fold them (Fuse pass) before exporting")
    mlps, skipped = swiglu_mlps(model)
    if not mlps:
        raise PreconditionError(
            "no MLP of this model is a bias-free SwiGLU (down(silu(x @ Wg^T) * (x @ Wu^T))), "
            f"which is what the Triton kernels implement; skipped: {skipped}")
    shapes = mlp_shapes(model, mlps)
    if dtype is not None:
        shapes = [MLPShape(s.name, s.hidden, s.intermediate, dtype) for s in shapes]
    source = generate_source(shapes)
    out.mkdir(parents=True, exist_ok=True)
    kernels = atomic_write_text(out / "kernels.py", source)
    layers = {s.name: {"hidden": s.hidden, "intermediate": s.intermediate, "dtype": s.dtype_name,
                       "group": m.group, "gate": dataclasses.asdict(m.gate),
                       "up": dataclasses.asdict(m.up), "down": m.down}
              for s, m in zip(shapes, mlps)}
    atomic_write_text(out / "layers.json", json.dumps({"layers": layers, "skipped": skipped}, indent=1))
    distinct = {(s.hidden, s.intermediate, s.dtype_name) for s in shapes}
    return {"kernels": str(kernels), "layers": len(mlps), "distinct_shapes": len(distinct),
            "skipped": skipped}


@target("triton", pass_name="ExportTriton", provides="triton_kernels", output="triton")
def triton_target(state: State, out: Path, *, overwrite: bool,
                  dtype: Literal["float32", "bfloat16", "float16"] | None = None) -> dict:
    """Triton SwiGLU kernels specialised to each gated MLP's (pruned) widths.

    Args:
        dtype: generate kernels for weights of this type (default: the model's).
    """
    return export_triton(state.model, out, overwrite=overwrite, dtype=dtype)


ExportTriton = triton_target.pass_class
