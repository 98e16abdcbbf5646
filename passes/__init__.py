"""Transformations over prunegraph's IR: analysis, importance and allocation, gate families,
training, finalize, slicing, distillation, fusion, PrunePath and evaluation. Importing this
package registers its passes and CLI commands; every pass class is importable from here::

    from prunegraph.passes import Analyze, Prune, Slice
"""

from prunegraph.passes.analyze import Analyze
from prunegraph.passes.distill import Distill
from prunegraph.passes.evaluation import Evaluate
from prunegraph.passes.finalize import Finalize
from prunegraph.passes.fuse import Fuse
from prunegraph.passes.gates import Gate
from prunegraph.passes.prune import Prune
from prunegraph.passes.prunepath import MoEfy, PrunePath, TauSweep
from prunegraph.passes.reconstruct import Reconstruct
from prunegraph.passes.save_sparse import SaveSparse
from prunegraph.passes.slice import Slice
from prunegraph.passes.sparse_prune import SparsePrune
from prunegraph.passes.train import Train

__all__ = ["Analyze", "Distill", "Evaluate", "Finalize", "Fuse", "Gate", "MoEfy", "Prune",
           "PrunePath", "Reconstruct", "Save", "SaveSparse", "Slice", "SparsePrune", "TauSweep",
           "Train"]


def __getattr__(name: str):
    """``Save`` is the HF checkpoint target's pass (``prunegraph.targets.hf``); it stays
    importable from here, where pipelines written before the move import it."""
    if name == "Save":
        from prunegraph.targets.hf import Save

        return Save
    raise AttributeError(f"module 'prunegraph.passes' has no attribute {name!r}")
