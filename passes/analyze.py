"""The ``Analyze`` pass: capture the model and discover its pruning groups."""

from __future__ import annotations

from dataclasses import dataclass

from prunegraph.ir.analysis import analyze
from prunegraph.ir.analysis.report import summary
from prunegraph.pipeline import distributed
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Analyze"]


@register_pass
@dataclass(frozen=True)
class Analyze(Pass):
    """Capture the model with torch.export and find its coupled channels, heads and experts.

    Provides ``graph`` (the captured program), ``analysis`` and ``groups`` (every group,
    pinned ones included; later passes use the prunable ones).
    """

    name = "Analyze"
    requires = ("model",)
    provides = ("graph", "analysis", "groups")
    runs_on_meta = True  # capture and analysis read shapes only

    #: an op with no dimension rule is an error instead of pinning what it touches
    strict: bool = False

    def run(self, state: State) -> PassResult:
        if distributed.active():  # once, on rank 0: every rank gets the same groups
            return self._run_once(state)
        return self._analyze(state)

    def _analyze(self, state: State) -> PassResult:
        analysis = analyze(state.model, strict=self.strict)
        state.graph = analysis.graph
        state.analysis = analysis
        state.groups = analysis.groups
        info = summary(analysis)
        state.log.info("%s: %d groups (%s), %s of %s parameters prunable", info["model_class"],
                       len(analysis.groups), info["groups"], f"{info['prunable_params']:,}",
                       f"{info['total_params']:,}")
        state.metrics.setdefault("analysis", info)
        return PassResult(state, modified=False, stats={"groups": len(analysis.groups), **info["groups"]})

    def _run_once(self, state: State) -> PassResult:
        """Under ``torchrun``: rank 0 analyses and broadcasts the groups and the summary; the
        other ranks hold no graph (they only train, then leave)."""
        if distributed.is_main():
            result = self._analyze(state)
            distributed.broadcast((state.groups, state.metrics["analysis"]))
            return result
        state.groups, info = distributed.broadcast(None)
        state.graph = state.analysis = None
        state.metrics.setdefault("analysis", info)
        return PassResult(state, modified=False, stats={"groups": len(state.groups),
                                                        **info["groups"]})
