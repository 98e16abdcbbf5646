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
from dataclasses import dataclass, field

import torch

from prunegraph.errors import CaptureError

__all__ = ["Graph", "capture", "export_program", "module_path", "canonical_parameters"]

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
        meta: how the capture went (the export attempt that worked, the ones that failed).
    """

    program: torch.export.ExportedProgram
    param_names: dict[str, str]
    buffer_names: dict[str, str]
    aliases: dict[str, list[str]]
    shapes: dict[str, tuple[int, ...]]
    model_class: str
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

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


def _takes_use_cache(model: torch.nn.Module) -> bool:
    """Whether ``forward`` accepts ``use_cache`` (by name, or through ``**kwargs`` on a model
    whose config, or text config, has the field): a cache object in the output cannot be
    exported."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "use_cache" in params:
        return True
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") \
        else None
    has_field = any(getattr(c, "use_cache", None) is not None for c in (config, text) if c)
    return has_field and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _special_ids(config) -> set[int]:
    """Token ids the config names (pad, bos, image placeholders ...): random inputs avoid them,
    so a multimodal model does not look for image features that are not there."""
    ids: set[int] = set()
    for key, value in (vars(config).items() if config is not None else ()):
        if (key.endswith("token_id") or key.endswith("token_index")) and isinstance(value, int):
            ids.add(value)
    return ids


def _example_inputs(model: torch.nn.Module, batch: int, seq: int) -> dict:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or \
        getattr(getattr(config, "text_config", None), "vocab_size", None) or 2
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    allowed = [i for i in range(int(vocab)) if i not in _special_ids(config)] or [0]
    rows = batch * int(getattr(config, "num_codebooks", None) or 1)  # one row per codebook
    pick = torch.randint(0, len(allowed), (rows, seq), device="cpu")
    ids = torch.tensor(allowed)[pick]
    return {"input_ids": ids.to(device)}


def export_program(module: torch.nn.Module, kwargs: dict, dynamic_shapes: dict | None, *,
                   model: torch.nn.Module | None = None,
                   strict: bool = False) -> torch.export.ExportedProgram:
    """prunegraph's one ``torch.export`` call: no grad, with ``model``'s KV cache and
    data-dependent expert loops off for the duration. ``module`` is what is traced (the model, or
    a wrapper around it such as the ONNX target's logits graph); ``model`` defaults to it.
    Non-strict unless ``strict`` (capture's last attempt, a TorchDynamo trace)."""
    # torch.distributions checks its arguments' values (a data-dependent guard) by default
    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with _export_friendly(module if model is None else model), torch.no_grad():
            return torch.export.export(module, (), kwargs, dynamic_shapes=dynamic_shapes,
                                       strict=strict)
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)


def capture(model: torch.nn.Module, example_inputs: dict | None = None, *,
            dynamic: bool = True, batch: int = 2, seq: int = 16) -> Graph:
    """Export ``model`` to an ATen-level FX graph with parameters mapped to their names.

    Export is tried the ways the model allows (``prunegraph.ir.export_attempts``): dynamic batch
    and sequence first, then fewer dynamic dims, static shapes, and a strict trace; the graph
    records which attempt worked in ``meta["attempt"]``.

    Args:
        model: a causal LM (``forward(input_ids=...)`` returning logits); any device, ``meta`` too.
        example_inputs: keyword inputs for the trace; by default random ``input_ids``.
        dynamic: make the batch and sequence dims symbolic (where the model allows it).

    Raises:
        CaptureError: every attempt failed; the message names the model class, the construct
            and each attempt with its error.
    """
    from prunegraph.ir.export_attempts import AllAttemptsFailed, export_with_fallbacks

    inputs = dict(example_inputs) if example_inputs else _example_inputs(model, batch, seq)
    kwargs = dict(inputs)
    if _takes_use_cache(model):
        kwargs["use_cache"] = False
    cls = type(model).__name__
    start = time.perf_counter()
    try:
        program, attempt, failures = export_with_fallbacks(model, kwargs, dynamic=dynamic)
    except AllAttemptsFailed as group:
        first = group.failures[0][1]
        where = _user_frame(first)
        tried = "; ".join(f"[{name}] {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:200]}"
                          for name, e in group.failures)
        raise CaptureError(
            f"could not capture {cls} with torch.export{where}. Tried: {tried}. "
            "prunegraph needs a model whose forward traces with torch.export. "
            "Common fixes: load it with attn_implementation='sdpa' or 'eager', disable custom "
            "kernels (trust_remote_code models), or pass example_inputs that match its forward."
        ) from first
    seconds = time.perf_counter() - start

    canon, aliases = canonical_parameters(model)
    sig = program.graph_signature
    param_names = {ph: canon.get(name, name) for ph, name in sig.inputs_to_parameters.items()}
    buffer_names = dict(sig.inputs_to_buffers)
    buffer_names.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    named = dict(model.named_parameters(remove_duplicate=False))
    shapes_by_name = {canon[n]: tuple(named[n].shape) for n in named}
    log.info("captured %s in %.1fs (%d nodes) with %s", cls, seconds, len(program.graph.nodes),
             attempt)
    return Graph(program=program, param_names=param_names, buffer_names=buffer_names,
                 aliases=aliases, shapes=shapes_by_name, model_class=cls, seconds=seconds,
                 meta={"attempt": attempt, "failed_attempts": [
                     (name, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
                     for name, e in failures]})


def _user_frame(e: BaseException) -> str:
    """The last frame inside transformers/model code, to point at the construct that failed."""
    frames = traceback.extract_tb(e.__traceback__)
    for frame in reversed(frames):
        if "transformers" in frame.filename or "modeling" in frame.filename:
            return f" (at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} in {frame.name}: {frame.line})"
    return ""
