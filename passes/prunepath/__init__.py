"""PrunePath (methods.md §3): a dense FFN split into experts (``MoEfy``), routers trained on it
(``PrunePath``) and a τ sweep from one checkpoint (``TauSweep``). :mod:`.router` is the runtime
the pruned model carries; it registers a checkpoint extension so saved models rebuild their
routers."""

from prunegraph.passes.prunepath.moefy import MoEfy
from prunegraph.passes.prunepath.training import PrunePath, TauSweep

__all__ = ["MoEfy", "PrunePath", "TauSweep"]
