"""The ``Slice`` pass: physically remove the units a plan drops (see :mod:`prunegraph.plan.slicing`).

The slicing machinery lives in the core (checkpoint loading rebuilds pruned architectures with it);
this module re-exports :func:`apply_plan` and registers the pass::

    Pipeline([..., Finalize(round_to=8), Slice(), ...])
"""

from __future__ import annotations

from dataclasses import dataclass

from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass
from prunegraph.plan.gating import remove_gates
from prunegraph.plan.slicing import apply_plan

__all__ = ["Slice", "apply_plan"]


@register_pass
@dataclass(frozen=True)
class Slice(Pass):
    """Slice ``state.model`` in place to ``state.plan``: gates come off, scales fold in.

    Stats: parameters before/after, parameters sliced, attributes rewritten.
    """

    name = "Slice"
    requires = ("model", "plan")
    provides = ("model",)
    invalidates = {k: "slicing changed the model's shapes" for k in
                   ("graph", "analysis", "groups", "gates", "gate_family", "trained_gates")}
    guarantees = ("sliced-equals-gated",)

    check: bool = True

    def run(self, state: State) -> PassResult:
        remove_gates(state.get("gates") or state.model)
        remove_gates(state.model)
        if state.has("gates"):
            del state.gates
        stats = apply_plan(state.model, state.plan, check=self.check)
        state.log.info("sliced %d parameters: %d -> %d", stats["parameters_sliced"],
                       stats["params_before"], stats["params_after"])
        state.metrics["slice"] = stats
        return PassResult(state, modified=stats["params_after"] != stats["params_before"],
                          stats=stats)
