"""The ``Finalize`` pass: trained gate values -> a :class:`~prunegraph.plan.plan.Plan`.

``mode``:

* ``topk`` (default): exactly the budget. With ``budget='params'`` the gate values are the unit
  scores of the same exact parameter-budget allocation the one-shot Prune pass uses
  (:func:`prunegraph.passes.allocate.allocate`: global, or ``uniform`` per layer for
  ``scope='group'``), so learned and one-shot plans remove the same number of parameters. With
  ``budget='units'`` each kind loses ``sparsity`` of its units (heads ``floor(sparsity * H)``
  per group), ranked by gate value globally or per group. This is DDP's evaluation path.
* ``threshold``: keep every unit whose gate value is above 0 (DDP's released slicing script);
  the achieved sparsity is whatever training reached.

A weight family (LEAP, ``site = "weights"``) finalizes to per-weight masks instead: ``topk`` is
the exact global top-k of the logits, ``threshold`` the reference rule ``P > 0``; the zeros go
into the weights in place, ``state.masks`` holds the :class:`~prunegraph.plan.masks.MaskSet`
(with the per-layer table and plot in ``<run>/sparsity/``) and the plan keeps every unit.

Constraints (GQA, per-expert equal widths, floors) are repaired by :meth:`Plan.from_keep` with
the gate values as priorities. With ``fold_scales`` the kept units' continuous gate values become
the plan's scales, so the sliced model computes exactly what the gated model computes with the
plan's values; the live gates are set to those values (``plan.gate_values()``), and ``gate_mass_cut``
reports how much of the trained gates' mass the discrete choice removed beyond zero gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Finalize", "keep_from_values", "plan_from_values"]


def _floor(group) -> int:
    return max(group.constraints.min_units, 1)


def _rank(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values, largest first (ties by index)."""
    return torch.argsort(values.float(), descending=True, stable=True)[:k]


def _keep_count(group, values: torch.Tensor, k: float) -> torch.Tensor:
    """Top units by value: ``[k]``, or ``[experts, k]`` with one shared ``k`` per expert."""
    if values.dim() == 2:
        k = min(group.size, max(_floor(group), round(k / values.shape[0])))
        return torch.stack([_rank(row, k) for row in values])
    k = min(group.size, max(_floor(group), round(k)))
    return _rank(values, k)


def keep_from_values(family, values: dict[str, torch.Tensor], mode: str, model=None,
                     round_to: int = 1) -> dict[str, torch.Tensor]:
    """Kept units per gated group (priority order) from final gate values."""
    groups = family.groups
    if mode == "threshold":
        return {g.name: _keep_count(g, values[g.name], float((values[g.name] > 0).sum()))
                for g in groups}
    if family.budget == "params":
        from prunegraph.passes.allocate import allocate

        strategy = "global" if family.scope == "global" else "uniform"
        alloc = allocate(groups, {g.name: values[g.name] for g in groups}, family.sparsity,
                         model=model, scope="decoder", strategy=strategy, round_to=round_to)
        return {g.name: _order_by(alloc[g.name], values[g.name]) for g in groups}
    keep = {}
    for c in family.constraints:
        if family.scope == "group" or len(c.groups) == 1:
            for g, t in zip(c.groups, c.targets):
                keep[g.name] = _keep_count(g, values[g.name], t * values[g.name].numel())
            continue
        flat = torch.cat([values[g.name].reshape(-1).float() for g in c.groups])
        n_keep = round(sum(t * values[g.name].numel() for g, t in zip(c.groups, c.targets)))
        threshold_rank = torch.argsort(flat, descending=True, stable=True)[:n_keep]
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[threshold_rank] = True
        offset = 0
        for g in c.groups:
            n = values[g.name].numel()
            keep[g.name] = _keep_count(g, values[g.name], float(chosen[offset:offset + n].sum()))
            offset += n
    return keep


def _order_by(kept: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Kept indices sorted by gate value, largest first (per expert row for 2-D)."""
    if kept.dim() == 2:
        return torch.stack([row[torch.argsort(values[e][row].float(), descending=True, stable=True)]
                            for e, row in enumerate(kept)])
    return kept[torch.argsort(values[kept].float(), descending=True, stable=True)]


def plan_from_values(family, values: dict[str, torch.Tensor], mode: str, model=None,
                     round_to: int = 1, fold_scales: bool = True):
    """The :class:`~prunegraph.plan.plan.Plan` that Finalize makes from gate ``values`` (CPU float):
    the kept units of ``mode``, constraints repaired, kept values as scales if ``fold_scales``.
    Train's polish phase trains under the same choice, so it calls this too."""
    from prunegraph.plan.plan import Plan

    keep = keep_from_values(family, values, mode, model=model, round_to=round_to)
    return Plan.from_keep(family.groups, keep, scales=values if fold_scales else None,
                          model=model, scores=values)


@register_pass
@dataclass(frozen=True)
class Finalize(Pass):
    """Turn trained gates into a plan (``mode`` ``topk`` or ``threshold``), folding the kept
    gate values as scales when ``fold_scales``."""

    name = "Finalize"
    requires = ("model", "groups", "gate_family", "trained_gates")
    provides = ("plan",)

    mode: Literal["topk", "threshold"] = "topk"
    fold_scales: bool = True
    round_to: int = 1

    def validate(self) -> None:
        if self.round_to < 1:
            raise SpecError(f"pass Finalize: round_to must be >= 1, got {self.round_to}")

    def run(self, state: State) -> PassResult:
        family, model = state.gate_family, state.model
        if getattr(family, "site", "units") == "weights":
            return self._run_weights(state)
        values = {n: v.detach().float().cpu() for n, v in state.trained_gates.items()}
        plan = plan_from_values(family, values, self.mode, model=model, round_to=self.round_to,
                                fold_scales=self.fold_scales)
        state.plan = plan
        planned = plan.gate_values()
        total = sum(float(v.abs().sum()) for v in values.values())
        cut = sum(float((values[n] * (planned[n] == 0)).abs().sum()) for n in planned)
        if state.has("gates") and state.gates is not None:
            device = next(model.parameters()).device
            dtype = {n: v.dtype for n, v in state.gates.values.items()}
            for n, v in planned.items():
                if not self.fold_scales:
                    v = (v != 0).float()
                state.gates.values[n] = v.to(device, dtype.get(n, v.dtype))
        report = plan.report
        stats = {"mode": self.mode, "params_removed": report["params_removed"],
                 "params_fraction": report.get("params_fraction"),
                 "gate_mass_cut": cut / total if total else 0.0,
                 "zero_gates_fraction": 1.0 - family.kept_fraction(values)}
        state.metrics.setdefault("finalize", {}).update(stats)
        state.log.info("Finalize (%s): %s parameters removed, %.2f%% of the gate mass cut",
                       self.mode, f"{report['params_removed']:,.0f}", 100 * stats["gate_mass_cut"])
        return PassResult(state, modified=True, stats=stats)

    def _run_weights(self, state: State) -> PassResult:
        """A weight family (LEAP): hard masks from the logits, zeros in place, the forwards
        removed; ``state.masks`` holds them and ``state.plan`` keeps every unit (nothing to
        slice), so Evaluate, SaveSparse (or Slice + Save) follow as for any plan."""
        from prunegraph.plan.plan import Plan

        family, model = state.gate_family, state.model
        masks = family.final_masks(self.mode)
        if state.has("gates") and state.gates is not None:
            state.gates.remove()
        masks.apply_(model)
        masks.check_pattern()
        state.masks = masks
        state.plan = Plan.from_keep(list(state.groups), {}, model=model)
        if state.run_dir is not None:
            from prunegraph.passes._sparsity_report import write_sparsity_report

            write_sparsity_report(state.run_dir / "sparsity", masks)
        per_layer = {str(k): round(v, 4) for k, v in masks.per_layer().items()}
        stats = {"mode": self.mode, "pattern": masks.pattern,
                 "target_sparsity": round(family.target_sparsity(), 6),
                 "achieved_sparsity": round(masks.sparsity(), 6),
                 "per_layer_sparsity": per_layer}
        state.metrics.setdefault("finalize", {}).update(stats)
        state.log.info("Finalize (%s): %.2f%% of %d masked weights zeroed (target %.2f%%)",
                       self.mode, 100 * masks.sparsity(), masks.numel(),
                       100 * family.target_sparsity())
        return PassResult(state, modified=True, stats=stats)
