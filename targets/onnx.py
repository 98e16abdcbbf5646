"""ONNX target: a pruned model (any per-layer widths) as an ONNX logits graph, checked end to end.

:func:`export_onnx` traces the model with ``torch.export`` (non-strict, ``use_cache=False``,
dynamic batch and sequence axes), converts it with the ``torch.onnx`` dynamo exporter, validates
the file with ``onnx.checker``, runs it in ``onnxruntime`` on inputs of a *different* shape than
the trace (so the axes really are dynamic) and compares the logits with PyTorch::

    |logits_ort - logits_torch| <= atol + rtol * max|logits_torch|   (default atol 1e-4, rtol 1e-3)

float32 itself is not more exact than that on real models: for the 20%-pruned SmolLM2 of the
one-shot example (max |logit| 36), PyTorch's float32 logits differ from float64 by 7.2e-3, and
onnxruntime's (graph optimisations off) are closer to float64 (4.3e-3) than PyTorch's are; with
its optimisations on the two float32 results differ by 1.2e-2 to 1.4e-2; ``rtol = 1e-3`` allows
3.6e-2.
Tiny random models agree to ~1e-6 (the tests hold them to 1e-4).

The graph has inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, seq]``) and output
``logits`` (``[batch, seq, vocab]``). A decode graph with past key/values is not exported.

Everything is written into a temporary folder next to the target and moved into place only after
the checks pass, so a failed export leaves nothing. An export that fails names the op and the
layer (module path): for a ``torch.export`` failure the innermost module running and the last op
called, for a conversion failure the graph node of the op without an ONNX translation.

Fused-expert MoE modules run their ``batched_mm`` implementation during the export (a gather and
a batched matmul, which ONNX has); HF's default grouped-GEMM custom op has no ONNX translation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunegraph.errors import PreconditionError, PrunegraphError, SpecError
from prunegraph.ir.capture import traceable_experts
from prunegraph.pipeline.contract import (
    Pass,
    PassResult,
    State,
    declare_key,
    register_pass,
)
from prunegraph.pipeline.runfolder import run_path
from prunegraph.targets.export_cli import export_target

__all__ = ["ExportONNX", "OnnxExportError", "export_onnx", "load_run_or_model", "run_onnx"]

_WRAP = "model"  # attribute of the wrapper holding the user's model (stripped from layer paths)


class OnnxExportError(PrunegraphError):
    """The model could not be exported to ONNX, or the exported graph disagrees with PyTorch."""


class _Logits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` with no KV cache: the graph that is exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).logits


# ------------------------------------------------------------------------- error locating


class _Where:
    """Records the innermost module running and the last op called while torch.export traces."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.last_layer = ""
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self.handles.append(mod.register_forward_hook(self._exit, always_call=True))
        self.mode = _LastOp()

    def _enter(self, name: str):
        def hook(_mod, _args):
            self.stack.append(name)
            self.last_layer = name
        return hook

    def _exit(self, _mod, _args, _out):
        if self.stack:
            self.stack.pop()

    @property
    def layer(self) -> str:
        return self.stack[-1] if self.stack else self.last_layer

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _LastOp(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.op = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        if not name.startswith("_") and not name.endswith(("__get__", "__set__")):
            self.op = name
        return func(*args, **(kwargs or {}))


def _layer_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    if path == _WRAP:
        return ""
    return path[len(_WRAP) + 1:] if path.startswith(_WRAP + ".") else path


def _failing_nodes(program: torch.export.ExportedProgram, error: BaseException) -> list[torch.fx.Node]:
    """Graph nodes whose op the conversion error names, else those without an ONNX translation."""
    text = "\n".join(str(e) for e in _chain(error))
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    named = [n for n in nodes if str(n.target) in text]
    if named:
        return named
    try:  # private API; only a better message depends on it
        from torch.onnx._internal.exporter._registration import ONNXRegistry

        registry = ONNXRegistry.from_torchlib()
        decomposed = torch.export.default_decompositions()
        return [n for n in nodes if isinstance(n.target, torch._ops.OpOverload)
                and not registry.is_registered(n.target) and n.target not in decomposed]
    except Exception:
        return []


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _code_frame(error: BaseException) -> str:
    """``, at file:line: code`` of the last traceback frame outside torch (the model's code)."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/torch/" not in f.filename and f.filename != __file__]
    if not frames:
        return ""
    f = frames[-1]
    return f", at {f.filename.rsplit('/', 1)[-1]}:{f.lineno}: {(f.line or '').strip()}"


def _first_line(error: BaseException) -> str:
    for e in reversed(list(_chain(error))):
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        if line:
            return f"{type(e).__name__}: {line[:300]}"
    return type(error).__name__


# ---------------------------------------------------------------------------------- export


def _check_target(path: Path, overwrite: bool) -> None:
    if path.suffix != ".onnx":
        raise SpecError(f"the output {path} must end in .onnx, e.g. {path.with_suffix('.onnx')}")
    if not path.parent.is_dir():
        raise SpecError(f"the folder {path.parent} does not exist; create it first")
    if path.exists() and not overwrite:
        raise SpecError(f"{path} already exists; choose another name or pass --overwrite")


def _check_model(model: nn.Module) -> None:
    from torch.nn.utils import parametrize

    if not isinstance(model, nn.Module):
        raise PreconditionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PreconditionError("the model still has gates (parametrizations); slice it (Slice "
                                "pass / apply_plan) or fold them (Fuse pass) before exporting")
    if not getattr(getattr(model, "config", None), "vocab_size", None):
        raise PreconditionError(f"{type(model).__name__} has no config.vocab_size; the ONNX target "
                                "exports Hugging Face causal LMs (forward(input_ids) -> logits)")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise PreconditionError("the model is on the meta device; load real weights to export")


def _inputs(model: nn.Module, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _trace(wrapper: _Logits, inputs: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    from torch.export import Dim

    config = wrapper.model.config
    max_seq = int(getattr(config, "max_position_embeddings", None)
                  or getattr(config, "n_positions", None) or 1 << 17)
    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=max_seq)
    shapes = {k: {0: batch, 1: seq} for k in inputs}
    where = _Where(wrapper.model)
    try:
        with torch.no_grad(), where.mode:
            return torch.export.export(wrapper, (), inputs, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise OnnxExportError(
            f"torch.export could not trace {type(wrapper.model).__name__} for ONNX: "
            f"{_first_line(e)} (layer {where.layer or '<model>'!r}, last op {where.mode.op!r}"
            f"{_code_frame(e)}). "
            "The ONNX target needs a forward that torch.export can trace with use_cache=False; "
            "load the model with attn_implementation='sdpa' or 'eager' and no custom kernels"
        ) from e
    finally:
        where.close()


def _convert(program: torch.export.ExportedProgram, optimize: bool):
    try:
        return torch.onnx.export(program, dynamo=True, optimize=optimize,
                                 output_names=["logits"], verbose=False)
    except Exception as e:
        nodes = _failing_nodes(program, e)
        if nodes:
            where = "; ".join(f"op {n.target} at layer {_layer_of(n) or '<model>'!r} (node {n.name})"
                              for n in nodes[:3])
        else:
            where = "op and layer unknown (see the cause below)"
        raise OnnxExportError(
            f"torch.onnx could not convert the traced graph: {where}. "
            "Register an ONNX translation for the op (torch.onnx.export(custom_translation_table=...)) "
            "or replace it in the model before exporting"
        ) from e


def run_onnx(path: str | os.PathLike, inputs: dict[str, torch.Tensor], session: Any = None):
    """Run the exported graph in onnxruntime (CPU) and return the logits as a torch tensor."""
    import onnxruntime as ort

    if session is None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: inputs[n].cpu().numpy() for n in names}
    return torch.from_numpy(session.run(None, feed)[0])


def export_onnx(model: nn.Module, path: str | os.PathLike, *, check: bool = True,
                atol: float = 1e-4, rtol: float = 1e-3, optimize: bool = True,
                overwrite: bool = False, check_shape: tuple[int, int] = (3, 11)) -> dict[str, Any]:
    """Export ``model`` to ``path`` (see the module docstring); returns a report.

    Args:
        check: run the file in onnxruntime on ``check_shape`` inputs and compare with PyTorch.
        atol, rtol: the tolerance of that comparison.
        optimize: let the exporter run onnxscript's graph optimizer (constant folding ...).

    Raises:
        SpecError: a bad output path (checked before any work).
        PreconditionError: gates still on the model, no vocabulary, meta weights.
        OnnxExportError: tracing or conversion failed (naming op and layer), the checker refused
            the file, or onnxruntime's logits differ from PyTorch's beyond the tolerance.
    """
    import onnx

    path = Path(path)
    _check_target(path, overwrite)
    _check_model(model)
    start = time.perf_counter()
    wrapper = _Logits(model).eval()
    with traceable_experts(model):
        program = _trace(wrapper, _inputs(model, 2, 16, seed=0))
        onnx_program = _convert(program, optimize)
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        out = tmp / path.name
        onnx_program.save(str(out), external_data=params > 1_800_000_000)
        try:
            onnx.checker.check_model(str(out), full_check=False)
        except Exception as e:
            raise OnnxExportError(f"onnx.checker refused the exported graph: {_first_line(e)}") from e
        report: dict[str, Any] = {"path": str(path), "export_seconds": round(seconds, 2),
                                  "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"],
                                  "dynamic_axes": {"batch": 0, "seq": 1}, "decode_graph": False,
                                  "opset": _opset(out)}
        if check:
            report.update(_compare(model, out, check_shape, atol, rtol))
        files = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # data first, graph last
        for f in files:
            os.replace(f, path.parent / f.name)
        report["bytes"] = sum((path.parent / f.name).stat().st_size for f in files)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _compare(model: nn.Module, path: Path, shape: tuple[int, int], atol: float,
             rtol: float) -> dict[str, Any]:
    inputs = _inputs(model, *shape, seed=1)
    with torch.no_grad():
        ref = _Logits(model)(**inputs).float().cpu()
    try:
        got = run_onnx(path, inputs).float()
    except Exception as e:
        raise OnnxExportError(f"onnxruntime could not run the exported graph on inputs of shape "
                              f"{list(shape)}: {_first_line(e)}") from e
    if got.shape != ref.shape:
        raise OnnxExportError(f"onnxruntime returned logits of shape {list(got.shape)}, PyTorch "
                              f"{list(ref.shape)}: the dynamic axes are broken")
    diff = float((got - ref).abs().max())
    tol = atol + rtol * float(ref.abs().max())
    if not diff <= tol:
        raise OnnxExportError(f"onnxruntime's logits differ from PyTorch's by {diff:.3g} "
                              f"(tolerance {tol:.3g} = {atol:g} + {rtol:g} * max|logit|)")
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"check_shape": list(shape), "max_abs_diff": diff, "tolerance": tol,
            "argmax_agreement": agree}


# ------------------------------------------------------------------------------ model input


def load_run_or_model(spec: str):
    """``(model, tokenizer)`` from a run folder (its ``model/``), a model folder or a load_model spec."""
    from prunegraph.data.models import load_model
    from prunegraph.pipeline.runfolder import RunFolder

    path = Path(spec)
    if path.is_dir() and RunFolder.is_run_folder(path):
        if not (path / "model").is_dir():
            raise PrunegraphError(f"the run folder {path} has no model/ folder; add a Save pass "
                                  "to the pipeline (or pass a model folder)")
        return load_model(str(path / "model"))
    return load_model(spec)


# ------------------------------------------------------------------------------- pass, CLI


declare_key("onnx_path", "builtins.str",
            "the ONNX file an export wrote")

@register_pass
@dataclass(frozen=True)
class ExportONNX(Pass):
    """Export ``state.model`` to ``path`` (relative to the run folder) as an ONNX logits graph with
    dynamic batch and sequence axes, checked against onnxruntime."""

    name = "ExportONNX"
    requires = ("model",)
    provides = ("onnx_path",)

    path: str = "model.onnx"
    check: bool = True
    atol: float = 1e-4
    rtol: float = 1e-3
    optimize: bool = True

    def validate(self) -> None:
        if not self.path.endswith(".onnx"):
            raise SpecError(f"ExportONNX.path must end in .onnx, got {self.path!r}")
        if self.atol < 0 or self.rtol < 0:
            raise SpecError("ExportONNX.atol and rtol must be >= 0")

    def run(self, state: State) -> PassResult:
        target = run_path(state.run_dir, self.path, "ExportONNX.path")
        report = export_onnx(state.model, target, check=self.check, atol=self.atol,
                             rtol=self.rtol, optimize=self.optimize, overwrite=True)
        state.onnx_path = str(target)
        state.metrics["onnx"] = report
        state.log.info("exported %s (max |ort - torch| = %s)", target, report.get("max_abs_diff"))
        return PassResult(state, modified=False, stats=report)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="tolerance relative to max |logit| (default 1e-3)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnxruntime comparison (the onnx checker still runs)")


@export_target("onnx", "an ONNX logits graph (dynamic batch/seq), checked in onnxruntime",
               _configure)
def _export(args: argparse.Namespace) -> dict[str, Any]:
    """Check the output path first, then load, export, validate, compare."""
    _check_target(Path(args.out), args.overwrite)
    model, _ = load_run_or_model(args.model)
    return export_onnx(model, args.out, check=not args.no_check, atol=args.atol,
                       rtol=args.rtol, overwrite=args.overwrite)
