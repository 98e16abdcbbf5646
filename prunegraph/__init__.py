"""prunegraph: a compiler for pruning language models."""

from prunegraph.errors import *  # noqa: F401,F403
from prunegraph.ir.capture import capture  # noqa: E402  (the function shadows its module's name)
from prunegraph.ir.groups import Constraints, Group, Member

__all__ = ["Constraints", "Group", "Member", "capture", "analyze", "load_model", "Plan", "apply_gates", "remove_gates", "apply_plan",
           "save_pruned", "from_pretrained"]

_LAZY = {"analyze": "prunegraph.ir.analysis",
         "load_model": "prunegraph.data.models", "Plan": "prunegraph.plan.plan", "apply_gates": "prunegraph.plan.gating",
         "remove_gates": "prunegraph.plan.gating", "apply_plan": "prunegraph.plan.slicing",
         "save_pruned": "prunegraph.plan.checkpoint", "from_pretrained": "prunegraph.plan.checkpoint"}


def __getattr__(name: str):
    """Import the heavier API (torch.export, transformers) on first use, not at import."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunegraph' has no attribute {name!r}")


__version__ = "0.1.0"
