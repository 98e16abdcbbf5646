"""Capture: a Hugging Face causal LM as an ATen-level FX graph, via ``torch.export``.

``capture(model)`` exports non-strict with ``use_cache=False`` and dynamic batch and sequence
dims, and returns a :class:`Graph`: the exported program plus the maps the rest of prunegraph
needs (graph placeholder -> the module's own parameter name, tied parameters -> one canonical
name, node -> module path). It works for models on the ``meta`` device, so the config of a 32B
model can be analysed with no weights.

Example::

    model, _ = prunegraph.data.models.load_model("random:llama")
    graph = prunegraph.ir.capture(model)
    graph.param_of("p_model_layers_0_mlp_up_proj_weight")  # 'model.layers.0.mlp.up_proj.weight'
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.export import Dim

from prunegraph.errors import CaptureError

__all__ = ["Graph", "capture", "module_path", "canonical_parameters"]

log = logging.getLogger(__name__)


@dataclass
class Graph:
    """An exported model with the bookkeeping prunegraph's analyses read.

    Attributes:
        program: the ``torch.export.ExportedProgram``.
        param_names: placeholder name -> canonical parameter name (tied params share one).
        buffer_names: placeholder name -> buffer name.
        aliases: canonical parameter name -> every name that shares the tensor.
        shapes: canonical parameter name -> shape.
        seconds: how long the export took.
    """

    program: torch.export.ExportedProgram
    param_names: dict[str, str]
    buffer_names: dict[str, str]
    aliases: dict[str, list[str]]
    shapes: dict[str, tuple[int, ...]]
    model_class: str
    seconds: float = 0.0

    @property
    def fx(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def param_of(self, placeholder: str) -> str | None:
        return self.param_names.get(placeholder)


def module_path(node: torch.fx.Node) -> str:
    """The module path of the innermost module a node was traced in ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def canonical_parameters(model: torch.nn.Module) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map every parameter name to a canonical one (the first name of a shared tensor)."""
    by_id: dict[int, str] = {}
    canon: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(p), name)
        canon[name] = first
        aliases.setdefault(first, []).append(name)
    return canon, aliases


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one tensor (tied embeddings ...), each list canonical name first; the one
    discovery of tied parameters that checkpoints, plans and budgets use."""
    return [names for names in canonical_parameters(model)[1].values() if len(names) > 1]


@contextlib.contextmanager
def traceable_experts(model: torch.nn.Module, impl: str = "batched_mm",
                      only: tuple[str, ...] | None = None) -> Iterator[None]:
    """Run fused-expert modules with a traceable implementation for the duration.

    Slicing gives modules with unaligned expert widths their own config copy set to the eager
    experts loop, whose data-dependent loop torch.export cannot trace; ``batched_mm`` (a gather
    and a batched matmul) computes the same and traces. ``only`` limits the switch to configs
    currently set to one of those implementations.
    """
    saved = []
    configs = {id(c): c for m in model.modules()
               if (c := m.__dict__.get("config")) is not None}
    for cfg in configs.values():
        current = getattr(cfg, "_experts_implementation", None)
        if current not in (None, impl) and (only is None or current in only):
            saved.append((cfg, current))
            cfg._experts_implementation = impl
    try:
        yield
    finally:
        for cfg, value in saved:
            cfg._experts_implementation = value


@contextlib.contextmanager
def _export_friendly(model: torch.nn.Module):
    """Turn off what torch.export cannot trace: the KV cache and data-dependent expert loops."""
    config = getattr(model, "config", None)
    saved = {}
    if config is not None:
        for key, value in (("use_cache", False),):
            if hasattr(config, key):
                saved[key] = getattr(config, key)
                setattr(config, key, value)
        # The eager experts forward loops over the experts hit by the batch (data-dependent);
        # the grouped path is traceable and is what transformers uses under compile/export.
        impl = getattr(config, "_experts_implementation", None)
        if impl == "eager":
            saved["_experts_implementation"] = impl
            config._experts_implementation = "grouped_mm"
    try:
        with traceable_experts(model, only=("eager",)):  # sliced modules' own config copies
            yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _example_inputs(model: torch.nn.Module, batch: int, seq: int) -> dict:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 2
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    ids = torch.randint(0, int(vocab), (batch, seq), device="cpu")
    return {"input_ids": ids.to(device)}


def _dynamic_shapes(kwargs: dict, auto: bool) -> dict:
    """Symbolic batch and sequence dims for ``input_ids`` (and a same-shaped attention mask):
    named ranges, or ``Dim.AUTO`` where export may narrow or specialise them."""
    shapes: dict = {k: None for k in kwargs}
    if "input_ids" in kwargs:
        shapes["input_ids"] = ({0: Dim.AUTO, 1: Dim.AUTO} if auto else
                               {0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=1 << 17)})
    if "attention_mask" in kwargs:
        shapes["attention_mask"] = shapes["input_ids"]
    return shapes


def _export(model: torch.nn.Module, kwargs: dict, shapes: dict | None):
    with _export_friendly(model), torch.no_grad():
        return torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)


def _constraint_violation(error: Exception) -> bool:
    """Whether export failed only because a guard narrows a named dynamic dim's range."""
    kind = getattr(error, "error_type", None)
    return getattr(kind, "name", "") == "CONSTRAINT_VIOLATION" or \
        "Constraints violated" in str(error)


def capture(model: torch.nn.Module, example_inputs: dict | None = None, *,
            dynamic: bool = True, batch: int = 2, seq: int = 16) -> Graph:
    """Export ``model`` to an ATen-level FX graph with parameters mapped to their names.

    Args:
        model: a causal LM (``forward(input_ids=...)`` returning logits); any device, ``meta`` too.
        example_inputs: keyword inputs for the trace; by default random ``input_ids``.
        dynamic: make the batch and sequence dims symbolic.

    Raises:
        CaptureError: torch.export failed; the message names the model class and the construct.
    """
    inputs = dict(example_inputs) if example_inputs else _example_inputs(model, batch, seq)
    kwargs = dict(inputs)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    shapes = _dynamic_shapes(kwargs, auto=False) if dynamic else None
    cls = type(model).__name__
    start = time.perf_counter()
    try:
        try:
            program = _export(model, kwargs, shapes)
        except Exception as e:  # torch.export raises many unrelated types
            if shapes is None or not _constraint_violation(e):
                raise
            # The model's code guards the sequence length in a way this torch cannot prove for
            # the whole named range (e.g. torch 2.11 with transformers 5.17 on SmolLM2):
            # automatic dims let export narrow the range or specialise instead of failing.
            log.warning("capture of %s: %s; retrying with automatic dynamic dims", cls,
                        str(e).strip().splitlines()[0])
            program = _export(model, kwargs, _dynamic_shapes(kwargs, auto=True))
    except Exception as e:  # torch.export raises many unrelated types
        where = _user_frame(e)
        raise CaptureError(
            f"could not capture {cls} with torch.export: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}{where}. "
            "prunegraph needs a model whose forward traces with torch.export (non-strict). "
            "Common fixes: load it with attn_implementation='sdpa' or 'eager', disable custom "
            "kernels (trust_remote_code models), or pass example_inputs that match its forward."
        ) from e
    seconds = time.perf_counter() - start

    canon, aliases = canonical_parameters(model)
    sig = program.graph_signature
    param_names = {ph: canon.get(name, name) for ph, name in sig.inputs_to_parameters.items()}
    buffer_names = dict(sig.inputs_to_buffers)
    buffer_names.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    named = dict(model.named_parameters(remove_duplicate=False))
    shapes_by_name = {canon[n]: tuple(named[n].shape) for n in named}
    log.info("captured %s in %.1fs (%d nodes)", cls, seconds, len(program.graph.nodes))
    return Graph(program=program, param_names=param_names, buffer_names=buffer_names,
                 aliases=aliases, shapes=shapes_by_name, model_class=cls, seconds=seconds)


def _user_frame(e: BaseException) -> str:
    """The last frame inside transformers/model code, to point at the construct that failed."""
    frames = traceback.extract_tb(e.__traceback__)
    for frame in reversed(frames):
        if "transformers" in frame.filename or "modeling" in frame.filename:
            return f" (at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} in {frame.name}: {frame.line})"
    return ""
