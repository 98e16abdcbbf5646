"""The ``Prune`` pass: one-shot structured pruning by an importance criterion, to a budget.

No training: score every unit of every prunable group on calibration text (the calibration
split, :func:`prunegraph.data.blocks.text_blocks`) with :mod:`prunegraph.passes.importance`,
allocate the parameter budget (:mod:`prunegraph.passes.allocate`) and hand the kept units to
:meth:`Plan.from_keep`. These are the baselines every trained method is compared against::

    Pipeline([Load("smollm2-135m"), Analyze(), Prune(criterion="wanda", sparsity=0.2), Slice()])

The budget is checked before anything is loaded or run: a sparsity outside (0, 1) or above what
the constraints allow raises :class:`~prunegraph.errors.BudgetError` with the achievable maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prunegraph.errors import SpecError
from prunegraph.passes.allocate import allocate, check_budget, check_sparsity
from prunegraph.passes.importance import score_groups
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Prune"]


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """One-shot pruning: score units by ``criterion``, remove ``sparsity`` of the scope's
    parameters (``strategy`` ``global`` ranks units across layers, ``uniform`` keeps the same
    count per layer), and provide the ``plan``."""

    name = "Prune"
    requires = ("model", "tokenizer", "groups")
    provides = ("plan",)

    criterion: Literal["magnitude", "wanda", "taylor"] = "wanda"
    sparsity: float = 0.2
    strategy: Literal["global", "uniform"] = "global"
    scope: Literal["decoder", "all"] = "decoder"
    calib_blocks: int = 32
    block_len: int = 128
    round_to: int = 1
    source: str = "wikipedia"
    batch_size: int = 4
    normalize: Literal["auto", "kind", "group"] = "auto"

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        for key, low in (("calib_blocks", 1), ("block_len", 2), ("round_to", 1),
                         ("batch_size", 1)):
            if getattr(self, key) < low:
                raise SpecError(f"pass Prune: {key} must be >= {low}, got {getattr(self, key)}")

    def run(self, state: State) -> PassResult:
        from prunegraph.plan.plan import Plan

        model, groups = state.model, list(state.groups)
        check_budget(groups, self.sparsity, model, self.scope, self.strategy, self.round_to)
        blocks = None
        if self.criterion != "magnitude":
            if state.tokenizer is None:
                raise SpecError(
                    f"criterion '{self.criterion}' needs a tokenizer for calibration text, and "
                    "the state's tokenizer is None; load a model with a tokenizer or use "
                    "criterion='magnitude'"
                )
            from prunegraph.data.blocks import text_blocks

            blocks = text_blocks(state.tokenizer, self.source, "calibration", self.block_len,
                                 self.calib_blocks)
        scores = score_groups(model, groups, self.criterion, blocks=blocks,
                              batch_size=self.batch_size, progress=bool(state.progress))
        keep = allocate(groups, scores, self.sparsity, model=model, scope=self.scope,
                        strategy=self.strategy, round_to=self.round_to,
                        normalize=self.normalize)
        state.plan = Plan.from_keep(groups, keep, model=model, scores=scores)
        stats = {k: keep.stats[k] for k in ("total", "target", "removed", "sparsity",
                                            "normalize")}
        stats.update(criterion=self.criterion, strategy=self.strategy,
                     groups=len(keep), forwards=scores.stats.get("forwards", 0),
                     wanda_fallback=sorted(scores.stats.get("wanda_fallback", {})))
        state.metrics.setdefault("prune", {}).update(stats)
        state.log.info("Prune: removed %d of %d parameters (%.1f%%, %s, %s)", stats["removed"],
                       stats["total"], 100 * stats["sparsity"], self.criterion, self.strategy)
        return PassResult(state, modified=True, stats=stats)
