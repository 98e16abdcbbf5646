"""``prunegraph export triton RUN_OR_MODEL OUT_DIR``: kernels specialised to a pruned model.

The MLPs lowered are the modules that meet the kernels' contract (the runner's: children
``gate_proj``/``up_proj``/``down_proj`` without bias, SiLU); modules with that triple that fail
the contract are reported as skipped with the reason. ``OUT_DIR`` gets ``kernels.py`` (standalone:
imports only torch and triton, one set of kernels per distinct pruned shape, one launcher per
layer) and ``layers.json`` (which module each launcher serves), written to temporary names and
renamed. Install the kernels with :func:`prunegraph.targets.triton.runner.install_triton_mlps`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from torch import nn

from prunegraph.errors import PreconditionError
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.runfolder import atomic_write_text
from prunegraph.pipeline.targets import check_folder_output, target

__all__ = ["ExportTriton", "export_triton", "swiglu_mlp_paths", "triton_target"]


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


def export_triton(model: nn.Module, out_dir: str | Path, *, overwrite: bool = False,
                  dtype: str | None = None) -> dict:
    """Write ``kernels.py`` and ``layers.json`` for ``model``'s SwiGLU MLPs into ``out_dir``;
    ``dtype`` (``float32``, ``bfloat16``, ``float16``) generates kernels for weights of that
    type instead of the model's."""
    from prunegraph.targets.triton.codegen import MLPShape, generate_source
    from prunegraph.targets.triton.runner import mlp_shapes

    out = Path(out_dir)
    check_folder_output(out, overwrite)
    paths, skipped = swiglu_mlp_paths(model)
    if not paths:
        raise PreconditionError(
            "no MLP of this model is a bias-free SwiGLU (gate_proj, up_proj, down_proj, SiLU), "
            f"which is what the Triton kernels implement; skipped: {skipped}")
    shapes = mlp_shapes(model, paths)
    if dtype is not None:
        shapes = [MLPShape(s.name, s.hidden, s.intermediate, dtype) for s in shapes]
    source = generate_source(shapes)
    out.mkdir(parents=True, exist_ok=True)
    kernels = atomic_write_text(out / "kernels.py", source)
    layers = {s.name: {"hidden": s.hidden, "intermediate": s.intermediate, "dtype": s.dtype_name}
              for s in shapes}
    atomic_write_text(out / "layers.json", json.dumps({"layers": layers, "skipped": skipped}, indent=1))
    distinct = {(s.hidden, s.intermediate, s.dtype_name) for s in shapes}
    return {"kernels": str(kernels), "layers": len(paths), "distinct_shapes": len(distinct),
            "skipped": skipped}


@target("triton", pass_name="ExportTriton", provides="triton_kernels", output="triton")
def triton_target(state: State, out: Path, *, overwrite: bool,
                  dtype: Literal["float32", "bfloat16", "float16"] | None = None) -> dict:
    """Triton SwiGLU kernels specialised to each layer's (pruned) MLP widths.

    Args:
        dtype: generate kernels for weights of this type (default: the model's).
    """
    return export_triton(state.model, out, overwrite=overwrite, dtype=dtype)


ExportTriton = triton_target.pass_class
