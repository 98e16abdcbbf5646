"""Executing a decision: the :class:`Plan`, gates at run time, slicing and checkpoints.

Everything before a plan decides which units to keep; everything here carries it out on the
user's module: :func:`apply_gates` multiplies units by gate values (exact, reversible),
:func:`apply_plan` slices parameters physically, :func:`save_pruned` / :func:`from_pretrained`
store and rebuild the pruned model with per-layer widths.
"""

__all__ = ["Plan", "PlanGroup", "apply_gates", "remove_gates", "apply_plan", "save_pruned",
           "from_pretrained"]

_LAZY = {"Plan": "prunegraph.plan.plan", "PlanGroup": "prunegraph.plan.plan",
         "apply_gates": "prunegraph.plan.gating", "remove_gates": "prunegraph.plan.gating",
         "apply_plan": "prunegraph.plan.slicing", "save_pruned": "prunegraph.plan.checkpoint",
         "from_pretrained": "prunegraph.plan.checkpoint"}


def __getattr__(name: str):
    """Import torch-heavy modules on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunegraph.plan' has no attribute {name!r}")
