"""torch.export, tried the ways a model allows: from dynamic shapes down to a static strict trace.

A model's forward may guard on its input in ways ``torch.export`` cannot prove for a symbolic
size (a data-dependent branch on the sequence length, a range check a named dim violates).
:func:`export_with_fallbacks` tries, in order, and stops at the first that works:

1. ``dynamic batch and sequence``: named ranges for the batch and sequence dims;
2. ``automatic dynamic dims``: ``Dim.AUTO``, so export may narrow or specialise a dim (only
   after a constraint violation, which is what it fixes);
3. ``dynamic sequence only``: the batch dim static;
4. ``static shapes``: every dim as in the example;
5. ``static shapes, strict``: TorchDynamo's strict trace, which handles some Python that the
   non-strict trace cannot.

Dynamic shapes are keyed by the model's real ``forward`` signature (inputs that land in
``**kwargs`` are nested under its name), so models with renamed or keyword-only arguments
export too. If every attempt fails, the :class:`~prunegraph.errors.CaptureError` names each
attempt with its error.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.export import Dim

__all__ = ["Attempt", "ATTEMPTS", "dynamic_shapes_for", "export_with_fallbacks"]

log = logging.getLogger("prunegraph.ir.capture")

_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class Attempt:
    """One way to call ``torch.export``: which token dims are symbolic, and how."""

    name: str
    dims: str  # "named", "auto", "seq", "static"
    strict: bool = False
    only_after: Callable[[Exception], bool] | None = None


def _constraint_violation(error: Exception) -> bool:
    """Whether export failed only because a guard narrows a named dynamic dim's range."""
    kind = getattr(error, "error_type", None)
    return getattr(kind, "name", "") == "CONSTRAINT_VIOLATION" or \
        "Constraints violated" in str(error)


ATTEMPTS: tuple[Attempt, ...] = (
    Attempt("dynamic batch and sequence", "named"),
    Attempt("automatic dynamic dims", "auto", only_after=_constraint_violation),
    Attempt("dynamic sequence only", "seq"),
    Attempt("static shapes", "static"),
    Attempt("static shapes, strict", "static", strict=True),
)


def _token_dims(kind: str) -> dict | None:
    if kind == "named":
        return {0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=1 << 17)}
    if kind == "auto":
        return {0: Dim.AUTO, 1: Dim.AUTO}
    if kind == "seq":
        return {1: Dim.AUTO}
    return None


def dynamic_shapes_for(model: torch.nn.Module, kwargs: dict, kind: str) -> dict | None:
    """``dynamic_shapes`` for ``model.forward(**kwargs)``, keyed by the forward's signature.

    Token inputs shaped like ``input_ids`` get the symbolic dims of ``kind``; everything else
    is static. Inputs the signature collects in ``**kwargs`` are nested under that name.
    """
    dims = _token_dims(kind)
    if dims is None:
        return None
    ids = kwargs.get("input_ids")
    ids_shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else None

    def spec(name: str, value):
        if isinstance(value, torch.Tensor) and (name in _TOKEN_INPUTS or name == "input_ids") \
                and tuple(value.shape[:2]) == (ids_shape or ())[:2] and value.dim() >= 2:
            return dict(dims)
        return None

    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(**kwargs).arguments
    except (TypeError, ValueError):
        return {k: spec(k, v) for k, v in kwargs.items()}
    shapes: dict = {}
    for name, value in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(k, v) for k, v in value.items()}
        else:
            shapes[name] = spec(name, value)
    return shapes


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:240]


def export_with_fallbacks(model: torch.nn.Module, kwargs: dict, *, dynamic: bool = True,
                          export: Callable | None = None):
    """Export ``model(**kwargs)``, trying :data:`ATTEMPTS` in order.

    Returns:
        ``(program, attempt name, [(failed attempt name, error), ...])``.

    Raises:
        AllAttemptsFailed: every attempt failed; it carries each attempt's error (the caller
            turns it into a CaptureError).
    """
    export = export or _export
    failures: list[tuple[str, Exception]] = []
    attempts = ATTEMPTS if dynamic else tuple(a for a in ATTEMPTS if a.dims == "static")
    for attempt in attempts:
        if attempt.only_after is not None and not (failures and attempt.only_after(failures[-1][1])):
            continue
        if failures:
            log.warning("capture of %s: %s; retrying with %s", type(model).__name__,
                        _first_line(failures[-1][1]),
                        "automatic dynamic dims" if attempt.dims == "auto" else attempt.name)
        try:
            shapes = dynamic_shapes_for(model, kwargs, attempt.dims)
            program = export(model, kwargs, shapes, attempt.strict)
        except Exception as e:  # torch.export raises many unrelated types
            failures.append((attempt.name, e))
            continue
        return program, attempt.name, failures
    raise AllAttemptsFailed(failures)


class AllAttemptsFailed(Exception):
    """Every export attempt failed; ``failures`` holds (attempt name, error) in order."""

    def __init__(self, failures: list[tuple[str, Exception]]):
        self.failures = failures
        super().__init__("; ".join(f"{name}: {_first_line(e)}" for name, e in failures))


def _export(model: torch.nn.Module, kwargs: dict, shapes: dict | None, strict: bool):
    from prunegraph.ir.capture import export_program

    return export_program(model, kwargs, shapes, strict=strict)
