"""``prunegraph export triton RUN_OR_MODEL OUT_DIR``: kernels specialised to a pruned model.

The MLPs lowered are the gated MLPs that the captured graph and the groups show
(:mod:`~prunegraph.targets.triton.patterns`: Llama's ``gate_proj``/``up_proj``, Phi-3's fused
``gate_up_proj``, a shared expert ...) and that meet the kernels' contract (the runner's: SiLU,
no bias); every other channels group is reported as skipped with the reason (GPT-2's MLP is not
gated, Gemma's gate is gelu-tanh, routed experts are not dense MLPs). ``OUT_DIR`` gets
``kernels.py`` (standalone: imports only torch and triton; kernels per hidden width, a plan per
distinct pruned shape that says, per token bucket, whether Triton or PyTorch runs it and why, one
launcher per layer) and ``layers.json`` (which module each launcher serves, which weight rows it
reads, and the plans), written to temporary names and renamed. Export on the GPU the kernels will
run on (``--device cuda``) to have the plans timed there
(:mod:`prunegraph.targets.triton.choose`). Install the kernels with
:func:`prunegraph.targets.triton.runner.install_triton_mlps`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from torch import nn

from prunegraph.errors import PreconditionError
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.runfolder import atomic_write_text
from prunegraph.pipeline.targets import check_folder_output, target
from prunegraph.plan.gating import has_gates
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
                  dtype: str | None = None, choose: str = "auto", timer=None) -> dict:
    """Write ``kernels.py`` and ``layers.json`` for ``model``'s SwiGLU MLPs into ``out_dir``.

    ``dtype`` (``float32``, ``bfloat16``, ``float16``) generates kernels for weights of that type
    instead of the model's. ``choose`` picks each shape's Triton-or-PyTorch plan per token bucket
    (:func:`prunegraph.targets.triton.choose.choose_plans`): ``"auto"`` times both on the GPU the
    model is on and falls back to Triton everywhere (recorded as untimed) on the CPU;
    ``"timed"`` insists on timing; ``"triton"`` never times. ``timer`` replaces the CUDA-graph
    timer (tests pass a fake one).
    """
    from prunegraph.targets.triton.choose import choose_plans
    from prunegraph.targets.triton.codegen import MLPShape, generate_source
    from prunegraph.targets.triton.runner import mlp_shapes

    out = Path(out_dir)
    check_folder_output(out, overwrite)
    if has_gates(model):
        raise PreconditionError("the model still has gates; slice it (Slice "
                                "pass / apply_plan) or fold them (Fuse pass) before exporting")
    mlps, skipped = swiglu_mlps(model)
    if not mlps:
        raise PreconditionError(
            "no MLP of this model is a bias-free SwiGLU (down(silu(x @ Wg^T) * (x @ Wu^T))), "
            f"which is what the Triton kernels implement; skipped: {skipped}")
    shapes = mlp_shapes(model, mlps)
    weights = {m.module: m.weight_reader(model.get_submodule(m.module))() for m in mlps}
    if dtype is not None:
        shapes = [MLPShape(s.name, s.hidden, s.intermediate, dtype) for s in shapes]
    plans = choose_plans(shapes, weights, mode=choose, timer=timer)
    source = generate_source(shapes, plans)
    out.mkdir(parents=True, exist_ok=True)
    kernels = atomic_write_text(out / "kernels.py", source)
    layers = {s.name: {"hidden": s.hidden, "intermediate": s.intermediate, "dtype": s.dtype_name,
                       "shape": s.key, "group": m.group, "gate": dataclasses.asdict(m.gate),
                       "up": dataclasses.asdict(m.up), "down": m.down}
              for s, m in zip(shapes, mlps)}
    plan_record = {key: [{"max_tokens": c.max_tokens, "path": c.path, "why": c.why,
                          "source": c.source} for c in plan] for key, plan in plans.items()}
    atomic_write_text(out / "layers.json", json.dumps(
        {"layers": layers, "plans": plan_record, "skipped": skipped}, indent=1))
    return {"kernels": str(kernels), "layers": len(mlps), "distinct_shapes": len(plans),
            "paths": {key: [c.path for c in plan] for key, plan in plans.items()},
            "skipped": skipped}


@target("triton", pass_name="ExportTriton", provides="triton_kernels", output="triton")
def triton_target(state: State, out: Path, *, overwrite: bool,
                  dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                  device: str | None = None,
                  choose: Literal["auto", "timed", "triton"] = "auto") -> dict:
    """Triton SwiGLU kernels specialised to each gated MLP's (pruned) widths, with a per-shape
    plan (Triton or PyTorch eager per token count).

    Args:
        dtype: generate kernels for weights of this type (default: the model's); with
            ``device`` the model is also cast to it, so the plans are timed in that type.
        device: move the model here (in place) before export (e.g. ``cuda``: the GPU the
            kernels will run on, where the Triton/PyTorch choice is timed).
        choose: per shape and token bucket, Triton or PyTorch: timed on the model's GPU
            (``auto``: when it is on one; ``timed``: insist), or Triton everywhere.
    """
    model = state.model
    if device is not None:
        import torch

        model = model.to(device=device, dtype=getattr(torch, dtype) if dtype else None)
    return export_triton(model, out, overwrite=overwrite, dtype=dtype, choose=choose)


ExportTriton = triton_target.pass_class
