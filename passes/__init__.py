"""Transformations over prunegraph's IR: analysis, importance and allocation, gate families,
training, finalize, slicing, fusion, PrunePath and evaluation. Importing this package registers
its passes and CLI commands; every pass class is importable from here::

    from prunegraph.passes import Analyze, Prune, Slice
"""

from prunegraph.passes.analyze import Analyze
from prunegraph.passes.evaluation import Evaluate
from prunegraph.passes.finalize import Finalize
from prunegraph.passes.fuse import Fuse
from prunegraph.passes.gates import Gate
from prunegraph.passes.prune import Prune
from prunegraph.passes.prunepath import MoEfy, PrunePath, TauSweep
from prunegraph.passes.save import Save
from prunegraph.passes.save_sparse import SaveSparse
from prunegraph.passes.slice import Slice
from prunegraph.passes.sparse_prune import SparsePrune
from prunegraph.passes.train import Train

__all__ = ["Analyze", "Evaluate", "Finalize", "Fuse", "Gate", "MoEfy", "Prune", "PrunePath",
           "Save", "SaveSparse", "Slice", "SparsePrune", "TauSweep", "Train"]
