"""A PrunePath FFN as one PyTorch operator, ``torch.ops.prunegraph.prunepath_ffn``.

``torch.compile`` of a whole decode step (to fuse the small norm, rotary and residual kernels
around the FFNs) cannot trace through :class:`~prunegraph.targets.triton.prunepath.PrunePathFFN`
(Python tile choices, allocations, several launches); a graph break per layer would split the
step into dozens of graphs. Registered as a custom operator with a shape-only fake, each FFN is one
opaque node that the compiled graph calls. The operator takes a *handle* to an FFN held by
:func:`register` (weakly: the FFN lives as long as the forward that uses it) and runs it with the
given τ and mode.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from prunegraph.targets.triton.prunepath import PrunePathFFN

__all__ = ["register", "prunepath_ffn_op"]

_FFNS: weakref.WeakValueDictionary[int, PrunePathFFN] = weakref.WeakValueDictionary()
_NEXT = itertools.count()


def register(ffn: PrunePathFFN) -> int:
    """A handle for ``ffn`` that :func:`prunepath_ffn_op` takes."""
    handle = next(_NEXT)
    _FFNS[handle] = ffn
    return handle


@torch.library.custom_op("prunegraph::prunepath_ffn", mutates_args=())
def prunepath_ffn_op(x: torch.Tensor, handle: int, tau: float, inclusive: bool) -> torch.Tensor:
    """The PrunePath FFN ``handle`` applied to ``x [..., H]``."""
    ffn = _FFNS.get(handle)
    if ffn is None:
        raise RuntimeError(f"PrunePath FFN handle {handle} is gone (its model's kernels were "
                           f"uninstalled); install them again")
    return ffn(x, tau, "inclusive" if inclusive else "exclusive")


@prunepath_ffn_op.register_fake
def _fake(x: torch.Tensor, handle: int, tau: float, inclusive: bool) -> torch.Tensor:
    return torch.empty_like(x)
