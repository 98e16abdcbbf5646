"""The gate-family interface: what ``Gate``, ``Train`` and ``Finalize`` call, and nothing more.

A *gate family* is a method of learned masks (DDP, hard-concrete; LEAP next). It owns its
learnable tensors and is asked three kinds of things:

* **installing** (the ``Gate`` pass): :meth:`GateFamily.install` puts its gates on the model and
  returns the live handle (``.values``: name -> tensor the gated forward multiplies in;
  ``.remove()``);
* **training** (``Train``, through :class:`~prunegraph.passes.train.gate_objective.GateObjective`):
  :meth:`~GateFamily.param_groups`, :meth:`~GateFamily.forward_values` (the multipliers of a
  training forward, gradients reaching the family's tensors), :meth:`~GateFamily.penalty` (its
  budget terms), :meth:`~GateFamily.post_step` (projections), :meth:`~GateFamily.final_values`
  (deterministic values after training, 0 = removed), :meth:`~GateFamily.kept_fraction`,
  :meth:`~GateFamily.target_sparsity`, :meth:`~GateFamily.config`, checkpoint state;
* **finalizing** (``Finalize``, and Train's polish, which trains under the same choice):
  :meth:`GateFamily.finalize` turns final values into the family's result. For families whose
  gates sit on group units (``site = "unit"``) that is a :class:`~prunegraph.plan.plan.Plan` of
  kept units; the family alone knows how its budget maps values to units, so nothing outside
  reads its budget internals.

**Where the gates sit** (``site``): ``"unit"`` families gate the units of the analysis groups
(heads, channels, experts) at each group's gate site (:mod:`prunegraph.plan.gating`); their common
base is :class:`~prunegraph.passes.gates.units.UnitGates` (augmented-Lagrangian budget).
``"weight"`` families gate every weight of a parameter (LEAP: one logit per weight). Such a
family subclasses :class:`GateFamily` directly and implements:

* ``install``: a per-weight mask on each covered parameter (e.g. a parametrization), keyed by
  parameter name in ``.values``;
* ``forward_values``/``final_values``: per-weight tensors of the parameter's shape;
* ``finalize``: its result is a per-weight mask, not kept units: an object with
  ``gate_values()`` (the 0/1 mask the polish and the live gates use) and ``report`` (the
  parameters removed), which ``Finalize`` stores as the state's plan.

Each family is one module: the class with ``@register_family``, its ``name``, ``site`` and
typed options (:mod:`prunegraph.passes.gates.options`), added to the imports of
``prunegraph/passes/gates/__init__.py`` (or registered from a plugin).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from prunegraph.errors import BudgetError
from prunegraph.ir.groups import Group
from prunegraph.passes.gates.options import FamilyOptions

__all__ = ["GateFamily", "FinalChoice", "GateHandle", "SITES", "BUDGETS", "CONSTRAINT_SCOPES",
           "DEFAULT_KINDS", "check_fraction"]

#: Where a family's gates sit: on group units, or on every weight of a parameter.
SITES = ("unit", "weight")
#: What ``sparsity`` is a fraction of: decoder parameters, or units of each kind (DDP's paper).
BUDGETS = ("params", "units")
#: Over what one budget constraint is enforced: every gated unit at once, or each group.
CONSTRAINT_SCOPES = ("global", "group")
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


class GateHandle(Protocol):
    """The gates installed on a model (:class:`prunegraph.plan.gating.GateSet` for units)."""

    values: dict[str, torch.Tensor]

    def remove(self) -> None: ...


class FinalChoice(Protocol):
    """What :meth:`GateFamily.finalize` returns (a :class:`~prunegraph.plan.plan.Plan` for unit
    families)."""

    report: dict[str, Any]

    def gate_values(self) -> dict[str, torch.Tensor]: ...


class GateFamily(nn.Module):
    """Base of every gate family; see the module docstring.

    Args:
        groups: the analysis groups (a unit family gates the prunable ones of ``kinds``).
        sparsity: fraction to remove, in (0, 1).
        model: the model (for budgets counted in parameters).
        options: the family's typed options (an instance of ``options_type``, a mapping of
            them, or None for the defaults).
        budget, scope, kinds: the ``Gate`` pass's budget settings (:data:`BUDGETS`,
            :data:`CONSTRAINT_SCOPES`, group kinds); :meth:`check_settings` refuses the ones a
            family does not support.
        lr: learning rate of the gate tensors (``default_lr`` when None).
        seed: seeds the initialisation and any sampling noise.
    """

    #: The family's name in specs (``Gate: {family: NAME}``).
    name: ClassVar[str] = ""
    #: Where its gates sit (:data:`SITES`).
    site: ClassVar[Literal["unit", "weight"]] = "unit"
    #: Its typed options.
    options_type: ClassVar[type[FamilyOptions]] = FamilyOptions
    #: Learning rate of the gate tensors when ``Gate.lr`` is not given.
    default_lr: ClassVar[float] = 2e-2

    def __init__(self, groups: Sequence[Group], sparsity: float, model: nn.Module | None = None,
                 options: FamilyOptions | dict[str, Any] | None = None, *,
                 budget: str = "params", scope: str = "global",
                 kinds: Iterable[str] = DEFAULT_KINDS, lr: float | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.options = self.options_type.from_mapping(options)
        self.sparsity = check_fraction(sparsity)
        kinds = tuple(kinds)
        self.check_settings(budget=budget, scope=scope, kinds=kinds)
        self.budget, self.scope, self.kinds = budget, scope, kinds
        self.lr = float(self.default_lr if lr is None else lr)
        self.seed = int(seed)

    @classmethod
    def check_settings(cls, *, budget: str, scope: str, kinds: tuple[str, ...]) -> None:
        """Raise :class:`~prunegraph.errors.SpecError` for budget settings the family does not
        support (called by ``Gate`` at construction, before any work)."""

    # -- installing ------------------------------------------------------------------------

    def install(self, model: nn.Module) -> GateHandle:  # pragma: no cover - abstract
        """Put the gates on ``model`` at their evaluation values; the live handle."""
        raise NotImplementedError

    # -- training --------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:  # pragma: no cover - abstract
        """AdamW groups of the family's tensors (see :class:`~prunegraph.passes.train.objective.
        Objective`)."""
        raise NotImplementedError

    def forward_values(self, step: int, total: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        """The multipliers of the forward at ``step`` of ``total`` (training or evaluation)."""
        raise NotImplementedError

    def penalty(self, step: int, total: int
                ) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
        """The budget terms at ``step`` and their stats (``expected_sparsity`` among them)."""
        raise NotImplementedError

    def final_values(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Deterministic values after training (0 = removed)."""
        raise NotImplementedError

    def kept_fraction(self, values: dict[str, torch.Tensor]) -> float:  # pragma: no cover
        """Budget-weighted fraction of ``values`` that is nonzero."""
        raise NotImplementedError

    def target_sparsity(self) -> float:  # pragma: no cover - abstract
        """The fraction of the gated pool the budget removes, under its own weighting."""
        raise NotImplementedError

    def post_step(self) -> None:
        """Projection after each optimizer step."""

    def schedule(self, step: int, total: int) -> dict[str, float]:
        """Annealed hyper-parameters at ``step`` (for the step records)."""
        return {}

    def progress_keys(self) -> tuple[str, ...]:
        """Keys of a step's record worth showing on the progress bar."""
        return ()

    def config(self) -> dict[str, Any]:
        """The settings a training checkpoint must have been made with to be resumed."""
        return {"family": self.name, "sparsity": self.sparsity, "budget": self.budget,
                "scope": self.scope, "kinds": list(self.kinds), "lr": self.lr,
                "options": self.options.to_dict()}

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state a checkpoint needs (the sampling generator)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def write_plots(self, folder: Path, history: list[dict[str, Any]],
                    final: dict[str, torch.Tensor]) -> None:
        """Plots of a training run into ``folder`` (none by default)."""

    # -- finalizing ------------------------------------------------------------------------

    def finalize(self, values: dict[str, torch.Tensor], *, mode: str = "topk",
                 model: nn.Module | None = None, round_to: Any = "auto",
                 fold_scales: bool = True) -> FinalChoice:  # pragma: no cover - abstract
        """The family's result from final ``values`` (CPU float): ``mode`` ``topk`` (exactly
        the budget) or ``threshold`` (every nonzero value kept); kept values folded as scales
        when ``fold_scales``; unit counts on the widths ``round_to`` allows (``auto``,
        ``latency``, an int or a resolved :class:`~prunegraph.passes._widths.Widths`) where the
        budget allows."""
        raise NotImplementedError

    def polished_under(self, widths: Any) -> str | None:
        """The ``round_to`` Train's polish trained under, when it differs from the resolved
        ``widths`` Finalize uses (the plan is then chosen again); None when they agree or there
        was no polish."""
        return None

    def achieved_sparsity(self) -> float:
        """Budget-weighted fraction removed if training stopped now (final value 0)."""
        return 1.0 - self.kept_fraction(self.final_values())
