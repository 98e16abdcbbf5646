"""The intermediate representation: the captured FX graph and the groups found in it.

``capture`` traces a model with torch.export; :mod:`prunegraph.ir.analysis` propagates index
spaces over the graph and joins them into :class:`Group` objects, each owning the
:class:`Member` slices of parameters that shrink together.
"""

from prunegraph.ir.groups import Constraints, Group, Member

__all__ = ["Constraints", "Group", "Member", "capture", "analyze"]


def __getattr__(name: str):
    """``capture`` and ``analyze`` import torch.export on first use, not at import."""
    if name == "capture":
        from prunegraph.ir.capture import capture

        return capture
    if name == "analyze":
        from prunegraph.ir.analysis import analyze

        return analyze
    raise AttributeError(f"module 'prunegraph.ir' has no attribute {name!r}")
