"""Gates on group units with an augmented-Lagrangian budget: the base of DDP and hard-concrete.

A unit family owns one learnable tensor per gated group (shape ``gate_shape(group)``: ``[size]``,
or ``[experts, size]`` for per-expert channels) and implements three functions of it:

* ``forward_values(step, total)``: the per-unit multipliers the gated model runs with (installed
  through :func:`prunegraph.plan.gating.apply_gates`, so gradients reach the family's tensors);
* ``retention(step, total)``: a score ``s`` in ``[0, 1]`` per unit, used only by the budget
  penalty (how "kept" a unit counts as);
* ``final_values()``: deterministic values after training (0 = removed).

Everything else (the budget, its penalty, the optimizer groups, installing, finalizing to a plan)
is here, so a new unit family is its gate parameterisation and its options only.

**Budget.** The family is built with a ``sparsity`` (fraction to remove) and a ``budget``:

* ``params`` (default): the fraction of the *decoder's parameters* removed, comparable across
  methods and with the one-shot Prune pass. Unit ``u`` of group ``g`` weighs ``w_g =
  params_per_unit(g)``; the expected kept fraction of the gated pool is
  ``s_hat = sum_g sum_u w_g s_gu / sum_g w_g n_g`` (``n_g`` units, experts included), and the
  target keep ratio is ``rho = 1 - sparsity * P_decoder / P_pool`` so that removing
  ``(1 - rho) * P_pool`` parameters removes ``sparsity * P_decoder`` (embeddings and pinned
  groups cannot shrink, so the gated pool loses a larger fraction than the decoder).
* ``units``: the DDP paper's definition, a fraction of the units of each group kind (heads:
  ``floor(sparsity * H) / H`` per group, channels: ``sparsity``); one constraint per kind.

``scope`` (:data:`~prunegraph.passes.gates.base.CONSTRAINT_SCOPES`) ``global`` puts one
constraint over every gated unit (per kind for ``units``); ``group`` averages the constraint over
groups with shared multipliers (methods.md §1.4):
``L_sp = mean_g [l1 (s_hat_g - rho_g) + l2 (s_hat_g - rho_g)^2]``.

**Augmented Lagrangian** (keep-ratio form, methods.md §1.3), per constraint ``c``::

    L_c = l1_c (s_hat_c - rho_c) + l2_c (s_hat_c - rho_c)^2 + l3_c mean(s (1 - s))

The multipliers start at 0 and are *ascended* (AdamW ``maximize=True``): ``l1`` grows while the
kept fraction is above target (sparsity under target) and pulls the gates down; ``l2`` and ``l3``
only grow.

**Final values to kept units** (:meth:`UnitGates.keep`, used by :meth:`UnitGates.finalize`):

* ``topk``: exactly the budget. With ``budget='params'`` the values are the unit scores of the
  same exact parameter-budget allocation the one-shot Prune pass uses
  (:func:`prunegraph.passes.allocate.allocate`: global, or ``uniform`` per layer for
  ``scope='group'``), so learned and one-shot plans remove the same number of parameters. With
  ``budget='units'`` each kind loses ``sparsity`` of its units (heads ``floor(sparsity * H)``
  per group), ranked by value globally or per group. This is DDP's evaluation path.
* ``threshold``: keep every unit whose value is above 0 (DDP's released slicing script).

Kept counts of channel groups take the widths ``round_to`` allows (:mod:`prunegraph.passes._widths`:
``auto`` by default, the device's multiple). ``params`` goes through the allocator, which honours
them exactly; ``units`` removes at least its unit count per kind with moves of allowed sizes (less
than one move over); ``threshold`` takes each group's allowed count nearest to its nonzero gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from prunegraph.errors import BudgetError, SpecError
from prunegraph.ir.groups import Group
from prunegraph.passes._widths import Widths, resolve_widths
from prunegraph.passes.gates.base import BUDGETS, CONSTRAINT_SCOPES, GateFamily
from prunegraph.passes.gates.options import FamilyOptions
from prunegraph.plan.gating import gate_shape

__all__ = ["UnitGates", "LagrangianOptions", "Constraint", "FINALIZE_MODES"]

#: How final values become kept units (see the module docstring).
FINALIZE_MODES = ("topk", "threshold")


@dataclass(frozen=True)
class LagrangianOptions(FamilyOptions):
    """Options every unit family shares: learning rates and schedule of the multipliers.

    ``lr_l1`` defaults to 0.2, ten times the reference code's 2e-2: with ~1M training tokens
    (the reference uses 33M) the paper's rate left SmolLM2 at 35.9 held-out perplexity for 20%
    removed against 29.8 with 0.2 (docs/benchmarks.md). ``dual_schedule``: ``cosine`` anneals
    the multipliers' learning rate with the gates' (the reference code); ``constant`` (default)
    keeps it after warm-up, so the multipliers still adapt when the budget is reached late (with
    few tokens the cosine tail froze them before the gates got there: 13% removed against a 20%
    target after 500 steps).
    """

    lr_l1: float = 0.2
    lr_l2: float = 0.4
    lr_l3: float = 2e-2
    dual_schedule: Literal["constant", "cosine"] = "constant"

    def validate(self) -> None:
        for key in ("lr_l1", "lr_l2", "lr_l3"):
            if getattr(self, key) < 0:
                raise SpecError(f"{self._where()}: option {key} must be >= 0, got "
                                f"{getattr(self, key)}")


class Constraint:
    """One budget constraint: the groups it covers, their unit weights and the target keep ratio
    (per group, for ``scope='group'``)."""

    def __init__(self, name: str, groups: list[Group], weights: list[float],
                 targets: list[float]) -> None:
        self.name, self.groups, self.weights, self.targets = name, groups, weights, targets

    def kept(self, s: dict[str, torch.Tensor], per_group: bool) -> list[tuple[torch.Tensor, float]]:
        """``[(s_hat, rho)]``: one pair for the whole constraint, or one per group."""
        if per_group:
            return [(s[g.name].mean(), t) for g, t in zip(self.groups, self.targets)]
        num = sum(w * s[g.name].sum() for g, w in zip(self.groups, self.weights))
        den = sum(w * s[g.name].numel() for g, w in zip(self.groups, self.weights))
        rho = sum(w * s[g.name].numel() * t for g, w, t in
                  zip(self.groups, self.weights, self.targets)) / den
        return [(num / den, rho)]


class UnitGates(GateFamily):
    """Base of the unit families; see the module docstring.

    Subclasses set ``name`` and ``options_type`` (a :class:`LagrangianOptions`), create their
    per-group tensors in :meth:`init_gates` and implement :meth:`forward_values`,
    :meth:`retention` and :meth:`final_values`. Constructor arguments: see
    :class:`~prunegraph.passes.gates.base.GateFamily`.
    """

    site = "unit"
    options_type = LagrangianOptions

    def __init__(self, groups, sparsity, model=None, options=None, **settings) -> None:
        super().__init__(groups, sparsity, model, options, **settings)
        opts = self.options
        self.lrs = dict(gates=self.lr, l1=opts.lr_l1, l2=opts.lr_l2, l3=opts.lr_l3)
        # experts (removal "mask_logit") only when asked: a gate scales the expert's output, and
        # at exactly 0 masks its router logit, as slicing it away does
        self.groups = [g for g in groups if g.prunable and g.kind in self.kinds and g.gate_site
                       and (g.constraints.removal == "zero" or g.kind == "experts")]
        if not self.groups:
            raise BudgetError(f"no prunable group of kinds {list(self.kinds)} to gate; the "
                              f"model's groups are {sorted({g.kind for g in groups})}")
        self.shapes = {g.name: gate_shape(g) for g in self.groups}
        self.constraints = self._constraints(model)
        n = len(self.constraints)
        self.l1 = nn.Parameter(torch.zeros(n))
        self.l2 = nn.Parameter(torch.zeros(n))
        self.l3 = nn.Parameter(torch.zeros(n))
        self.generator = torch.Generator().manual_seed(self.seed)
        self.gates = nn.ParameterDict()
        self.init_gates()
        self.committed = None  # the plan Train's polish trained under (see commit)

    @classmethod
    def check_settings(cls, *, budget: str, scope: str, kinds: tuple[str, ...]) -> None:
        if budget not in BUDGETS:
            raise SpecError(f"unknown budget '{budget}'; choose one of {', '.join(BUDGETS)}")
        if scope not in CONSTRAINT_SCOPES:
            raise SpecError(f"unknown constraint scope '{scope}' (over what the budget is "
                            f"enforced); choose one of {', '.join(CONSTRAINT_SCOPES)}")

    # -- to implement --------------------------------------------------------------------

    def init_gates(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def retention(self, step: int, total: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------

    def key(self, group_name: str) -> str:
        """ParameterDict key of a group (dots are not allowed there)."""
        return group_name.replace(".", "/")

    def tensor(self, group_name: str) -> nn.Parameter:
        return self.gates[self.key(group_name)]

    def install(self, model: nn.Module):
        """Gates at every gated group's site, at the evaluation values (a GateSet)."""
        from prunegraph.plan.gating import apply_gates

        values = {k: v.detach() for k, v in self.forward_values(0, 1).items()}
        return apply_gates(model, self.groups, values)

    def _constraints(self, model: nn.Module | None) -> list[Constraint]:
        groups = self.groups
        if self.budget == "params":
            weights = [float(g.params_per_unit) for g in groups]
            if any(w <= 0 for w in weights):
                raise BudgetError("budget='params' needs params_per_unit on every gated group; "
                                  "use budget='units' or re-run the analysis")
            pool = sum(w * math.prod(self.shapes[g.name]) for g, w in zip(groups, weights))
            total = pool
            if model is not None:
                from prunegraph.passes._param_space import param_space

                total = param_space(model, "decoder").total
            removed = self.sparsity * total
            if removed >= pool:
                raise BudgetError(
                    f"sparsity {self.sparsity:g} asks to remove {removed:,.0f} decoder parameters "
                    f"but the gated groups hold only {pool:,.0f}; the maximum is "
                    f"{pool / total:.3f}. Lower the sparsity or gate more kinds")
            rho = 1.0 - removed / pool
            return [Constraint("params", groups, weights, [rho] * len(groups))]
        out = []
        for kind in sorted({g.kind for g in groups}):
            members = [g for g in groups if g.kind == kind]
            targets = [1.0 - (math.floor(self.sparsity * g.size) / g.size if kind == "heads"
                              else self.sparsity) for g in members]
            out.append(Constraint(kind, members, [1.0] * len(members), targets))
        return out

    def target_keep(self) -> float:
        """Target keep ratio of the whole gated pool under the budget's weighting."""
        num = den = 0.0
        for c in self.constraints:
            for g, w, t in zip(c.groups, c.weights, c.targets):
                n = math.prod(self.shapes[g.name])
                num += w * n * t
                den += w * n
        return num / den

    def target_sparsity(self) -> float:
        """Target removed fraction of the gated pool under the budget's weighting."""
        return 1.0 - self.target_keep()

    def kept_fraction(self, values: dict[str, torch.Tensor]) -> float:
        """Budget-weighted fraction of units with a nonzero value (hard, for reports)."""
        num = den = 0.0
        for c in self.constraints:
            for g, w in zip(c.groups, c.weights):
                v = values[g.name]
                num += w * float((v != 0).sum())
                den += w * v.numel()
        return num / den

    def penalty(self, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Lagrangian budget terms at ``step`` and their stats (expected sparsity, multipliers)."""
        s = self.retention(step, total)
        loss = torch.zeros(())
        stats: dict[str, float] = {}
        exp_num = exp_den = 0.0
        for i, c in enumerate(self.constraints):
            pairs = c.kept(s, self.scope == "group")
            gap = torch.stack([kept - rho for kept, rho in pairs])
            term = self.l1[i] * gap.mean() + self.l2[i] * (gap ** 2).mean()
            allv = torch.cat([s[g.name].reshape(-1) for g in c.groups])
            term = term + self.l3[i] * (allv * (1 - allv)).mean()
            loss = loss + term
            for g, w in zip(c.groups, c.weights):
                exp_num += w * float(s[g.name].detach().sum())
                exp_den += w * s[g.name].numel()
            stats[f"l1_{c.name}"] = float(self.l1[i].detach())
            stats[f"l2_{c.name}"] = float(self.l2[i].detach())
            stats[f"l3_{c.name}"] = float(self.l3[i].detach())
        stats["expected_sparsity"] = 1.0 - exp_num / exp_den
        stats["penalty"] = float(loss.detach())
        return loss, stats

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: gates descend (the training configuration's ``lr_schedule``); the
        multipliers ascend (``maximize=True``) on ``dual_schedule``."""
        duals = [{"params": [getattr(self, k)], "lr": self.lrs[k], "weight_decay": 0.0,
                  "maximize": True, "name": k, "schedule": self.options.dual_schedule}
                 for k in ("l1", "l2", "l3")]
        return [{"params": list(self.gates.values()), "lr": self.lrs["gates"],
                 "weight_decay": 0.0, "name": "gates"}, *duals]

    def progress_keys(self) -> tuple[str, ...]:
        return (f"l1_{self.constraints[0].name}",)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "groups": [g.name for g in self.groups]}

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def write_plots(self, folder: Path, history: list[dict[str, Any]],
                    final: dict[str, torch.Tensor]) -> None:
        from prunegraph.passes.train.plots import write_plots

        write_plots(folder, history, self, final)

    # -- finalizing ------------------------------------------------------------------------

    def commit(self, keep: dict[str, torch.Tensor], widths: Widths) -> None:
        """Fix the ``topk`` result: Train's polish trained under this plan (made with
        ``widths``), and re-allocating its values could pick another plan of equal budget (the
        allocator trims overshoot with other moves). :meth:`keep` returns it for values that
        are zero outside it, when asked with the same widths."""
        self.committed = (widths.key(self.groups), str(widths),
                          {n: k.cpu() for n, k in keep.items()})

    def polished_under(self, widths: Widths) -> str | None:
        """The ``round_to`` the polish trained under when it differs from ``widths`` (then
        :meth:`keep` chooses again), else None."""
        if self.committed is None or self.committed[0] == widths.key(self.groups):
            return None
        return self.committed[1]

    def _committed_for(self, values: dict[str, torch.Tensor], widths: Widths):
        if self.committed is None or self.committed[0] != widths.key(self.groups):
            return None
        keep = self.committed[2]
        for g in self.groups:
            v = values[g.name]
            inside = torch.zeros(v.shape, dtype=torch.bool)
            inside.scatter_(-1, keep[g.name].to(torch.long), True)
            if bool((v[~inside] != 0).any()):
                return None
        return {g.name: _order_by(keep[g.name], values[g.name]) for g in self.groups}

    def keep(self, values: dict[str, torch.Tensor], mode: str = "topk", model=None,
             round_to: int | str | Widths = "auto") -> dict[str, torch.Tensor]:
        """Kept units per gated group (priority order) from final ``values``, kept counts of
        channel groups on the widths ``round_to`` allows."""
        if mode not in FINALIZE_MODES:
            raise SpecError(f"unknown finalize mode '{mode}'; choose one of "
                            f"{', '.join(FINALIZE_MODES)}")
        groups = self.groups
        widths = resolve_widths(groups, model, round_to)
        if mode == "threshold":
            return {g.name: _keep_count(g, values[g.name], float((values[g.name] > 0).sum()),
                                        widths) for g in groups}
        committed = self._committed_for(values, widths)
        if committed is not None:
            return committed
        if self.budget == "params":
            from prunegraph.passes.allocate import allocate

            strategy = "global" if self.scope == "global" else "uniform"
            alloc = allocate(groups, {g.name: values[g.name] for g in groups}, self.sparsity,
                             model=model, scope="decoder", strategy=strategy, round_to=widths)
            return {g.name: _order_by(alloc[g.name], values[g.name]) for g in groups}
        keep = {}
        for c in self.constraints:
            if self.scope == "group" or len(c.groups) == 1:
                for g, t in zip(c.groups, c.targets):
                    keep[g.name] = _keep_count(g, values[g.name], t * values[g.name].numel(),
                                               widths)
                continue
            if not widths.exact_for(c.groups):
                keep.update(_keep_units(c, values, widths))
                continue
            flat = torch.cat([values[g.name].reshape(-1).float() for g in c.groups])
            n_keep = round(sum(t * values[g.name].numel() for g, t in zip(c.groups, c.targets)))
            threshold_rank = torch.argsort(flat, descending=True, stable=True)[:n_keep]
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[threshold_rank] = True
            offset = 0
            for g in c.groups:
                n = values[g.name].numel()
                keep[g.name] = _keep_count(g, values[g.name],
                                           float(chosen[offset:offset + n].sum()))
                offset += n
        return keep

    def finalize(self, values: dict[str, torch.Tensor], *, mode: str = "topk", model=None,
                 round_to: int | str | Widths = "auto", fold_scales: bool = True):
        """The :class:`~prunegraph.plan.plan.Plan` of :meth:`keep`, constraints (GQA, per-expert
        equal widths, floors) repaired with the values as priorities, kept values as scales if
        ``fold_scales``."""
        from prunegraph.plan.plan import Plan

        keep = self.keep(values, mode, model=model, round_to=round_to)
        return Plan.from_keep(self.groups, keep, scales=values if fold_scales else None,
                              model=model, scores=values)


def _floor(group: Group) -> int:
    return max(group.constraints.min_units, 1)


def _rank(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values, largest first (ties by index)."""
    return torch.argsort(values.float(), descending=True, stable=True)[:k]


def _keep_count(group: Group, values: torch.Tensor, k: float,
                widths: Widths | None = None) -> torch.Tensor:
    """Top units by value: ``[k]``, or ``[experts, k]`` with one shared ``k`` per expert; ``k``
    moved to the nearest count ``widths`` allows."""
    rows = values.shape[0] if values.dim() == 2 else 1
    k = min(group.size, max(_floor(group), round(k / rows)))
    if widths is not None:
        k = widths.nearest(group, k)
    if values.dim() == 2:
        return torch.stack([_rank(row, k) for row in values])
    return _rank(values, k)


def _keep_units(c: Constraint, values: dict[str, torch.Tensor],
                widths: Widths) -> dict[str, torch.Tensor]:
    """A ``units`` budget over several groups with rounded widths: moves of allowed sizes
    (each group's lowest values first), taken in order of mean value until at least the
    constraint's units are removed (less than one move over, as the parameter allocator)."""
    from prunegraph.passes.allocate import _fill

    keys, costs, owner, counts, rows = [], [], [], [], []
    for i, g in enumerate(c.groups):
        v = values[g.name].float().reshape(-1, g.size)  # [rows (experts), size]
        rows.append(v.shape[0])
        allowed = widths.counts(g, _floor(g))
        low = v.sort(-1).values.sum(0)  # per rank, lowest first, summed over rows
        cum = torch.cat([torch.zeros(1), torch.cumsum(low.double(), 0)])
        removed = [g.size - k for k in allowed]
        cost = torch.tensor([(b - a) * v.shape[0] for a, b in zip(removed, removed[1:])],
                            dtype=torch.float64)
        score = torch.tensor([float(cum[b] - cum[a]) for a, b in zip(removed, removed[1:])],
                             dtype=torch.float64)
        if len(cost):
            keys.append(torch.cummax(score / cost, 0).values)
            costs.append(cost)
            owner.append(torch.full((len(cost),), i, dtype=torch.long))
        counts.append(allowed)
    goal = sum(values[g.name].numel() * (1 - t) for g, t in zip(c.groups, c.targets))
    taken = [0] * len(c.groups)
    if keys:
        keys, costs, owner = torch.cat(keys), torch.cat(costs), torch.cat(owner)
        order = torch.sort(keys, stable=True).indices
        taken = _fill(costs[order], owner[order], len(c.groups), round(goal)).tolist()
    return {g.name: _keep_count(g, values[g.name], counts[i][taken[i]] * rows[i])
            for i, g in enumerate(c.groups)}


def _order_by(kept: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Kept indices sorted by value, largest first (per expert row for 2-D)."""
    if kept.dim() == 2:
        return torch.stack([row[torch.argsort(values[e][row].float(), descending=True,
                                              stable=True)]
                            for e, row in enumerate(kept)])
    return kept[torch.argsort(values[kept].float(), descending=True, stable=True)]
