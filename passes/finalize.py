"""The ``Finalize`` pass: trained gate values -> the gate family's result (a
:class:`~prunegraph.plan.plan.Plan` of kept units).

The gate family itself turns its values into kept units (``family.finalize``, see
:mod:`prunegraph.passes.gates.base`; the rules of the unit families are in
:mod:`prunegraph.passes.gates.units`), since only it knows how its budget counts. ``mode``:

* ``topk`` (default): exactly the budget (for ``budget='params'`` the same exact allocation the
  one-shot Prune pass uses, so learned and one-shot plans remove the same number of parameters;
  for ``budget='units'`` the fraction of units per kind). This is DDP's evaluation path.
* ``threshold``: keep every unit whose gate value is above 0 (DDP's released slicing script);
  the achieved sparsity is whatever training reached.

Kept counts of channel groups take widths the hardware runs fast: ``round_to`` ``auto``
(default: the multiple the model's device and dtype want), ``latency`` (measured steps) or an
integer (1: exact); see :mod:`prunegraph.passes._widths`. ``Train``'s polish trains under the plan
this pass will make, so give both the same ``round_to`` (both default to ``auto``).

A weight family (LEAP, ``site = "weight"``) finalizes to per-weight masks instead: ``topk`` is
the exact global top-k of the logits, ``threshold`` the reference rule ``P > 0``; the zeros go
into the weights in place, ``state.masks`` holds the :class:`~prunegraph.plan.masks.MaskSet`
(with the per-layer table and plot in ``<run>/sparsity/``) and the plan keeps every unit.

Constraints (GQA, per-expert equal widths, floors) are repaired by :meth:`Plan.from_keep` with
the gate values as priorities. With ``fold_scales`` the kept units' continuous gate values become
the plan's scales, so the sliced model computes exactly what the gated model computes with the
plan's values; the live gates are set to those values (``plan.gate_values()``), and
``gate_mass_cut`` reports how much of the trained gates' mass the discrete choice removed beyond
zero gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prunegraph.passes._widths import record_widths, resolve_widths
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Finalize"]


@register_pass
@dataclass(frozen=True)
class Finalize(Pass):
    """Turn trained gates into a plan (``mode`` ``topk`` or ``threshold``), folding the kept
    gate values as scales when ``fold_scales``."""

    name = "Finalize"
    requires = ("model", "groups", "gate_family", "trained_gates")
    provides = ("plan",)
    #: A weight family's result: per-weight masks (zeros in place) beside a keep-all plan.
    may_provide = ("masks",)

    mode: Literal["topk", "threshold"] = "topk"
    fold_scales: bool = True
    round_to: int | Literal["auto", "latency"] = "auto"

    def validate(self) -> None:
        from prunegraph.plan.widths import check_round_to

        check_round_to(self.round_to, "pass Finalize: round_to")

    def run(self, state: State) -> PassResult:
        from prunegraph.plan.plan import Plan

        family, model = state.gate_family, state.model
        if family.site == "weight":
            return self._run_weights(state)
        values = {n: v.detach().float().cpu() for n, v in state.trained_gates.items()}
        widths = resolve_widths(list(state.groups), model, self.round_to)
        polished = family.polished_under(widths)
        if polished is not None:
            state.log.warning("Finalize: Train polished under round_to=%s but Finalize uses "
                              "round_to=%s; the plan is chosen again and differs from the one "
                              "the polish trained (give both passes the same round_to)",
                              polished, widths)
        plan = family.finalize(values, mode=self.mode, model=model, round_to=widths,
                               fold_scales=self.fold_scales)
        if isinstance(plan, Plan):
            record_widths(state, self.name, widths, [pg.group for pg in plan.groups],
                          {pg.group.name: pg.keep for pg in plan.groups})
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
        stats = {"mode": self.mode, "round_to": str(widths),
                 "params_removed": report["params_removed"],
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
        masks = family.finalize(mode=self.mode)
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
