"""The ``Prune`` pass: one-shot structured pruning by an importance criterion, to a budget.

No training: score every unit of every prunable group on calibration text (the calibration
split, :func:`prunegraph.data.blocks.text_blocks`) with :mod:`prunegraph.passes.importance`,
allocate the parameter budget (:mod:`prunegraph.passes.allocate`) and hand the kept units to
:meth:`Plan.from_keep`. These are the baselines every trained method is compared against::

    Pipeline([Load("smollm2-135m"), Analyze(), Prune(criterion="wanda", sparsity=0.2), Slice()])

A model larger than memory is scored layer by layer (``sequential: true``, see
:mod:`prunegraph.passes._sequential`): load it on ``meta`` (no weights read; analysis runs
there), and each decoder layer's weights are read from its safetensors folder (``weights``,
default the folder it was loaded from) while its calibration activations pass through; the
others wait in CPU memory or on disk (``offload``). The scores, and so the plan, are the
in-memory ones::

    Pipeline([Load("/models/qwen3-32b", device="meta"), Analyze(),
              Prune(criterion="wanda", sparsity=0.2, sequential=True)])

The budget is checked before the heavy work: a sparsity outside (0, 1) when the pass is built,
one above what the constraints allow (or a ``round_to`` no group can honour) right after
``Analyze`` (:meth:`Prune.check_early`; before the model loads when a meta-device analysis can
tell, see :mod:`prunegraph.pipeline.early`), as a :class:`~prunegraph.errors.BudgetError` with the
achievable maximum.

Kept widths are ones the hardware runs fast (``round_to``, :mod:`prunegraph.passes._widths`):
``auto`` (default) rounds channel counts to the multiple the model's device and dtype want (64 for
bf16/fp16 on CUDA, 32 on the CPU: :mod:`prunegraph.plan.widths`), ``latency`` keeps only widths
on the fast side of the latency steps measured on the device, an integer is taken as given (1:
exact). What it resolved to is in ``metrics["prune"]["widths"]`` and ``<run>/widths.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prunegraph.errors import BudgetError, SpecError
from prunegraph.passes._widths import record_widths, resolve_widths
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
    early_needs = ("model", "groups")  # the budget is checked right after Analyze

    criterion: Literal["magnitude", "wanda", "taylor"] = "wanda"
    sparsity: float = 0.2
    strategy: Literal["global", "uniform"] = "global"
    scope: Literal["decoder", "all"] = "decoder"
    calib_blocks: int = 32
    block_len: int = 128
    round_to: int | Literal["auto", "latency"] = "auto"
    source: str = "wikipedia"
    batch_size: int = 4
    normalize: Literal["auto", "kind", "group"] = "auto"
    sequential: bool = False
    weights: str | None = None
    offload: Literal["cpu", "disk"] = "cpu"

    def validate(self) -> None:
        from prunegraph.plan.widths import check_round_to

        try:
            check_sparsity(self.sparsity)
        except BudgetError as e:
            raise BudgetError(f"pass Prune: {e}") from None
        for key, low in (("calib_blocks", 1), ("block_len", 2), ("batch_size", 1)):
            if getattr(self, key) < low:
                raise SpecError(f"pass Prune: {key} must be >= {low}, got {getattr(self, key)}")
        check_round_to(self.round_to, "pass Prune: round_to")

    def _weights(self, model) -> str:
        """The safetensors folder the sequential path reads (``weights``, else the folder the
        model was loaded from)."""
        from pathlib import Path

        folder = self.weights or getattr(getattr(model, "config", None), "_name_or_path", "")
        if not folder or not any(Path(folder).glob("*.safetensors")):
            raise SpecError(f"Prune(sequential=True) reads the weights layer by layer from a "
                            f"folder of safetensors shards, and {folder or 'the model'!r} is "
                            f"none; set Prune.weights to the model's Hugging Face folder")
        return str(folder)

    def check_early(self, state: State) -> None:
        """The budget and the rounding fit the groups (before calibration or any other work)."""
        check_budget(list(state.groups), self.sparsity, state.model, self.scope, self.strategy,
                     self.round_to)

    def run(self, state: State) -> PassResult:
        from prunegraph.plan.plan import Plan

        model, groups = state.model, list(state.groups)
        widths = resolve_widths(groups, model, self.round_to)
        check_budget(groups, self.sparsity, model, self.scope, self.strategy, widths)
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
        if self.sequential:
            from prunegraph.passes._sequential import score_sequential

            scores = score_sequential(model, groups, self.criterion, blocks,
                                      self._weights(model), batch_size=self.batch_size,
                                      offload=self.offload, progress=bool(state.progress))
        else:
            scores = score_groups(model, groups, self.criterion, blocks=blocks,
                                  batch_size=self.batch_size, progress=bool(state.progress))
        keep = allocate(groups, scores, self.sparsity, model=model, scope=self.scope,
                        strategy=self.strategy, round_to=widths, normalize=self.normalize)
        state.plan = Plan.from_keep(groups, keep, model=model, scores=scores)
        record_widths(state, self.name, widths, groups, keep)
        stats = {k: keep.stats[k] for k in ("total", "target", "removed", "sparsity",
                                            "normalize")}
        stats.update(criterion=self.criterion, strategy=self.strategy,
                     groups=len(keep), forwards=scores.stats.get("forwards", 0),
                     wanda_fallback=sorted(scores.stats.get("wanda_fallback", {})),
                     round_to=str(widths))
        state.metrics.setdefault("prune", {}).update(stats)
        state.log.info("Prune: removed %d of %d parameters (%.1f%%, %s, %s)", stats["removed"],
                       stats["total"], 100 * stats["sparsity"], self.criterion, self.strategy)
        return PassResult(state, modified=True, stats=stats)
