"""The ``Analyze`` pass: capture the model and discover its pruning groups."""

from __future__ import annotations

from dataclasses import dataclass

from prunegraph.ir.analysis import analyze
from prunegraph.ir.analysis.report import summary
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

    def run(self, state: State) -> PassResult:
        analysis = analyze(state.model)
        state.graph = analysis.graph
        state.analysis = analysis
        state.groups = analysis.groups
        info = summary(analysis)
        state.log.info("%s: %d groups (%s), %s of %s parameters prunable", info["model_class"],
                       len(analysis.groups), info["groups"], f"{info['prunable_params']:,}",
                       f"{info['total_params']:,}")
        state.metrics.setdefault("analysis", info)
        return PassResult(state, modified=False, stats={"groups": len(analysis.groups), **info["groups"]})
