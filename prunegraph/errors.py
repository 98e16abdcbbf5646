"""One error tree for prunegraph.

Every error a user can meet derives from :class:`PrunegraphError`, and every message says what is
wrong and how to fix it. Foreign exceptions are re-raised ``from`` the original so the cause stays
visible.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "PrunegraphError",
    "CaptureError",
    "UnsupportedOpError",
    "SpecError",
    "PreconditionError",
    "PostconditionError",
    "PassError",
    "PlanError",
    "CheckpointError",
    "BudgetError",
    "missing_extra",
]

#: Optional packages and the ``prunegraph[extra]`` that installs each.
OPTIONAL_EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "onnx_ir": "onnx",
                   "triton": "triton", "datasets": "datasets"}


class PrunegraphError(Exception):
    """Base class of every error prunegraph raises on purpose."""


class CaptureError(PrunegraphError):
    """The model could not be captured as a graph (torch.export failed)."""


class UnsupportedOpError(PrunegraphError):
    """The analysis met an op that has no dimension rule."""


class SpecError(PrunegraphError, ValueError):
    """A pipeline spec, pass name or parameter is invalid."""


class PreconditionError(PrunegraphError):
    """A pass was asked to run without what it requires."""


class PostconditionError(PrunegraphError):
    """A pass did not provide what it promised, or broke an invariant."""


class PassError(PrunegraphError):
    """A pass failed while running."""


class PlanError(PrunegraphError, ValueError):
    """A plan is invalid, corrupt, or belongs to another model."""


class CheckpointError(PrunegraphError):
    """A saved model or run folder is missing, corrupt or truncated."""


class BudgetError(PrunegraphError, ValueError):
    """A pruning budget is out of range or impossible under the group constraints."""


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ``" Did you mean 'a' or 'b'?"`` suffix for an error message (empty if nothing is close).

    Every "did you mean" in prunegraph comes from here, so suggestions read the same everywhere."""
    unique = list(dict.fromkeys(str(c) for c in candidates))  # a name listed twice is one hint
    close = difflib.get_close_matches(str(name), unique, n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def missing_extra(error: BaseException) -> str | None:
    """For an ImportError of an optional package, the line that says how to install it."""
    name = getattr(error, "name", None) or ""
    extra = OPTIONAL_EXTRAS.get(name.split(".")[0]) if isinstance(error, ImportError) else None
    if extra is None:
        return None
    return (f"this needs the optional package {name.split('.')[0]!r}: "
            f"pip install 'prunegraph[{extra}]'")
