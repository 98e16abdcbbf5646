"""``prunegraph export triton RUN_OR_MODEL OUT_DIR``: kernels specialised to a pruned model.

The MLPs lowered are the modules that meet the kernels' contract (the runner's: children
``gate_proj``/``up_proj``/``down_proj`` without bias, SiLU); modules with that triple that fail
the contract are reported as skipped with the reason. ``OUT_DIR`` gets ``kernels.py`` (standalone:
imports only torch and triton; kernels per hidden width, a plan per distinct pruned shape that
says, per token bucket, whether Triton or PyTorch runs it and why, one launcher per layer) and
``layers.json`` (which module each launcher serves, and the plans), written to temporary names and
renamed. Export on the GPU the kernels will run on (``--device cuda``) to have the plans timed
there (:mod:`prunegraph.targets.triton.choose`). Install the kernels with :func:`prunegraph.targets.triton.runner.install_triton_mlps`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from prunegraph.errors import PreconditionError, SpecError
from prunegraph.runfolder import atomic_write_text
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


def export_triton(model: nn.Module, out_dir: str | Path, *, overwrite: bool = False,
                  choose: str = "auto", timer=None) -> dict:
    """Write ``kernels.py`` and ``layers.json`` for ``model``'s SwiGLU MLPs into ``out_dir``.

    ``choose`` picks each shape's Triton-or-PyTorch plan per token bucket
    (:func:`prunegraph.targets.triton.choose.choose_plans`): ``"auto"`` times both on the GPU the
    model is on and falls back to Triton everywhere (recorded as untimed) on the CPU;
    ``"timed"`` insists on timing; ``"triton"`` never times. ``timer`` replaces the CUDA-graph
    timer (tests pass a fake one).
    """
    from prunegraph.targets.triton.choose import choose_plans
    from prunegraph.targets.triton.codegen import generate_source
    from prunegraph.targets.triton.runner import _linears, mlp_shapes

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SpecError(f"{out} exists and is not empty; pass --overwrite or another OUT_DIR")
    paths, skipped = swiglu_mlp_paths(model)
    if not paths:
        raise PreconditionError(
            "no MLP of this model is a bias-free SwiGLU (gate_proj, up_proj, down_proj, SiLU), "
            f"which is what the Triton kernels implement; skipped: {skipped}")
    shapes = mlp_shapes(model, paths)
    weights = {p: tuple(lin.weight.detach() for lin in _linears(model.get_submodule(p), p))
               for p in paths}
    plans = choose_plans(shapes, weights, mode=choose, timer=timer)
    source = generate_source(shapes, plans)
    out.mkdir(parents=True, exist_ok=True)
    kernels = atomic_write_text(out / "kernels.py", source)
    layers = {s.name: {"hidden": s.hidden, "intermediate": s.intermediate, "dtype": s.dtype_name,
                       "shape": s.key} for s in shapes}
    plan_record = {key: [{"max_tokens": c.max_tokens, "path": c.path, "why": c.why,
                          "source": c.source} for c in plan] for key, plan in plans.items()}
    atomic_write_text(out / "layers.json", json.dumps(
        {"layers": layers, "plans": plan_record, "skipped": skipped}, indent=1))
    return {"kernels": str(kernels), "layers": len(paths), "distinct_shapes": len(plans),
            "paths": {key: [c.path for c in plan] for key, plan in plans.items()},
            "skipped": skipped}


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="generate kernels for this weight dtype (default: the model's)")
    p.add_argument("--device", default=None,
                   help="move the model here before export (e.g. cuda: the GPU the kernels "
                        "will run on, where the Triton/PyTorch choice is timed)")
    p.add_argument("--choose", choices=["auto", "timed", "triton"], default="auto",
                   help="per shape and token bucket, Triton or PyTorch: timed on the model's GPU "
                        "(auto: when it is on one), or Triton everywhere")


@export_target("triton", "generate Triton SwiGLU kernels specialised to each layer's (pruned) widths",
               _configure)
def _export_command(args: argparse.Namespace) -> dict:
    from prunegraph.targets.onnx import load_run_or_model

    model, _ = load_run_or_model(args.model)
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    if args.device:
        model = model.to(args.device)
    return export_triton(model, args.out, overwrite=args.overwrite, choose=args.choose)
