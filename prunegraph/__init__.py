"""prunegraph: a compiler for pruning language models."""

from prunegraph.errors import *  # noqa: F401,F403

__all__ = ["Constraints", "Group", "Member", "capture", "analyze", "load_model", "Plan",  # noqa: F405
           "apply_gates", "remove_gates", "apply_plan", "save_pruned", "from_pretrained"]

_LAZY = {"capture": "prunegraph.ir.capture", "Constraints": "prunegraph.ir.groups",
         "Group": "prunegraph.ir.groups", "Member": "prunegraph.ir.groups",
         "analyze": "prunegraph.ir.analysis",
         "load_model": "prunegraph.data.models", "Plan": "prunegraph.plan.plan",
         "apply_gates": "prunegraph.plan.gating",
         "remove_gates": "prunegraph.plan.gating", "apply_plan": "prunegraph.plan.slicing",
         "save_pruned": "prunegraph.plan.checkpoint", "from_pretrained": "prunegraph.plan.checkpoint"}


def __getattr__(name: str):
    """Import the API (torch, torch.export, transformers) on first use, not at import, so that
    ``import prunegraph`` and ``prunegraph --help`` stay fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunegraph' has no attribute {name!r}")


__version__ = "0.1.0"
