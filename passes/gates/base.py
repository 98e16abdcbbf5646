"""The gate-family interface and the budget machinery every trained family shares.

A *gate family* owns one learnable tensor per gated group (shape ``gate_shape(group)``:
``[size]``, or ``[experts, size]`` for per-expert channels) and knows three functions of it:

* ``forward_values(step, total)``: the per-unit multipliers the gated model runs with (installed
  through :func:`prunegraph.plan.gating.apply_gates`, so gradients reach the family's tensors);
* ``retention(step, total)``: a score ``s`` in ``[0, 1]`` per unit, used only by the budget
  penalty (how "kept" a unit counts as);
* ``final_values()``: deterministic values after training (0 = removed).

The Train pass only ever calls the methods of :class:`GateFamily`, never a family's internals.

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

``scope`` ``global`` puts one constraint over every gated unit (per kind for ``units``);
``group`` averages the constraint over groups with shared multipliers (methods.md §1.4):
``L_sp = mean_g [l1 (s_hat_g - rho_g) + l2 (s_hat_g - rho_g)^2]``.

**Augmented Lagrangian** (keep-ratio form, methods.md §1.3), per constraint ``c``::

    L_c = l1_c (s_hat_c - rho_c) + l2_c (s_hat_c - rho_c)^2 + l3_c mean(s (1 - s))

The multipliers start at 0 and are *ascended* (AdamW ``maximize=True``): ``l1`` grows while the
kept fraction is above target (sparsity under target) and pulls the gates down; ``l2`` and ``l3``
only grow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunegraph.errors import BudgetError, SpecError
from prunegraph.plan.gating import gate_shape
from prunegraph.ir.groups import Group

__all__ = ["GateFamily", "Constraint", "BUDGETS", "SCOPES", "DEFAULT_KINDS", "check_fraction"]

BUDGETS = ("params", "units")
SCOPES = ("global", "group")
DUAL_SCHEDULES = ("constant", "cosine")
#: Group kinds gated by default (whole experts and the pinned hidden size are left alone,
#: as in DDP, which masks heads, MLP channels and routed-expert channels).
DEFAULT_KINDS = ("heads", "channels", "expert_channels", "shared_expert_channels")


def check_fraction(value: Any, what: str = "sparsity") -> float:
    """``value`` as a float in (0, 1), or a BudgetError saying so."""
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise BudgetError(f"{what} must be a number in (0, 1), got {value!r}") from e
    if not 0.0 < v < 1.0:
        raise BudgetError(f"{what} must lie in (0, 1) (the fraction to remove), got {value}; "
                          f"e.g. {what}=0.2 removes 20%")
    return v


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


class GateFamily(nn.Module):
    """Base of every trained gate family; see the module docstring.

    Subclasses set ``name``, create their per-group tensors in :meth:`init_gates` and implement
    :meth:`forward_values`, :meth:`retention` and :meth:`final_values`.

    Args:
        groups: the analysis groups; the prunable ones of ``kinds`` are gated.
        sparsity: fraction to remove, in (0, 1).
        model: the model (for the decoder parameter count of ``budget='params'``).
        budget, scope: see the module docstring.
        lr: learning rate of the gate tensors; ``lr_l1``/``lr_l2``/``lr_l3`` of the multipliers.
            ``lr_l1`` defaults to 0.2, ten times the reference code's 2e-2: with ~1M training
            tokens (the reference uses 33M) the paper's rate left SmolLM2 at 35.9 held-out
            perplexity for 20% removed against 29.8 with 0.2 (docs/benchmarks.md).
        dual_schedule: ``cosine`` anneals the multipliers' learning rate with the gates' (the
            reference code); ``constant`` (default) keeps it after warm-up, so the multipliers
            still adapt when the budget is reached late (with few tokens the cosine tail froze
            them before the gates got there: 13% removed against a 20% target after 500 steps).
        seed: seeds the initialisation (and any sampling noise).
    """

    name = "base"

    def __init__(self, groups: Sequence[Group], sparsity: float, model: nn.Module | None = None,
                 *, budget: str = "params", scope: str = "global",
                 kinds: Iterable[str] = DEFAULT_KINDS, lr: float = 2e-2, lr_l1: float = 0.2,
                 lr_l2: float = 0.4, lr_l3: float = 2e-2, dual_schedule: str = "constant",
                 seed: int = 0) -> None:
        super().__init__()
        self.sparsity = check_fraction(sparsity)
        if budget not in BUDGETS:
            raise SpecError(f"unknown budget '{budget}'; choose one of {', '.join(BUDGETS)}")
        if scope not in SCOPES:
            raise SpecError(f"unknown budget scope '{scope}'; choose one of {', '.join(SCOPES)}")
        self.budget, self.scope = budget, scope
        if dual_schedule not in DUAL_SCHEDULES:
            raise SpecError(f"unknown dual_schedule '{dual_schedule}'; choose one of "
                            f"{', '.join(DUAL_SCHEDULES)}")
        self.dual_schedule = dual_schedule
        self.lrs = dict(gates=lr, l1=lr_l1, l2=lr_l2, l3=lr_l3)
        kinds = tuple(kinds)
        self.groups = [g for g in groups if g.prunable and g.kind in kinds
                       and g.gate_site and g.constraints.removal == "zero"]
        if not self.groups:
            raise BudgetError(f"no prunable group of kinds {list(kinds)} to gate; the model's "
                              f"groups are {sorted({g.kind for g in groups})}")
        self.shapes = {g.name: gate_shape(g) for g in self.groups}
        self.constraints = self._constraints(model)
        n = len(self.constraints)
        self.l1 = nn.Parameter(torch.zeros(n))
        self.l2 = nn.Parameter(torch.zeros(n))
        self.l3 = nn.Parameter(torch.zeros(n))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.gates = nn.ParameterDict()
        self.init_gates()

    # -- to implement --------------------------------------------------------------------

    def init_gates(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_values(self, step: int, total: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def retention(self, step: int, total: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def final_values(self) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def post_step(self) -> None:
        """Projection after each optimizer step (DDP clamps z >= -0.1)."""

    def schedule(self, step: int, total: int) -> dict[str, float]:
        """Annealed hyper-parameters at ``step`` (for logs)."""
        return {}

    # -- shared ----------------------------------------------------------------------------

    def key(self, group_name: str) -> str:
        """ParameterDict key of a group (dots are not allowed there)."""
        return group_name.replace(".", "/")

    def tensor(self, group_name: str) -> nn.Parameter:
        return self.gates[self.key(group_name)]

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
        """Optimizer groups: gates descend; the multipliers ascend (``maximize=True``).
        ``schedule`` tells the training loop how to anneal each group's learning rate."""
        duals = [{"params": [getattr(self, k)], "lr": self.lrs[k], "weight_decay": 0.0,
                  "maximize": True, "name": k, "schedule": self.dual_schedule}
                 for k in ("l1", "l2", "l3")]
        return [{"params": list(self.gates.values()), "lr": self.lrs["gates"],
                 "weight_decay": 0.0, "name": "gates", "schedule": "cosine"}, *duals]

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state a checkpoint needs (the sampling generator)."""
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def achieved_sparsity(self) -> float:
        """Budget-weighted fraction removed if training stopped now (final value 0)."""
        return 1.0 - self.kept_fraction(self.final_values())

    def target_sparsity(self) -> float:
        """Target removed fraction of the gated pool under the budget's weighting."""
        return 1.0 - self.target_keep()
