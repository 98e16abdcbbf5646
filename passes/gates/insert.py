"""The ``Gate`` pass: put a gate family's gates on the model (provides ``gates``).

::

    Pipeline([Load("smollm2-135m"), Analyze(), Gate(family="ddp", sparsity=0.2),
              Train(steps=200), Finalize(), Slice(), Evaluate(), Save()])

The family (any registered one: ``prunegraph passes Gate`` lists them with their options) is
built here with the budget; its own settings go in ``options`` (DDP: ``mu0``, ``mu_T``,
``init_std``; hard-concrete: ``temperature``, ``init_keep``; both: the multipliers' ``lr_l1``,
``lr_l2``, ``lr_l3``, ``dual_schedule``; LEAP: ``pattern``, ``alpha``, ``tau``, ``lambda1``,
``prior_strength`` ...), a mapping in specs or the family's options dataclass in Python. A family
with an ``initialise`` method (LEAP: logits from a one-shot Wanda mask) gets the model and the
tokenizer before its gates are installed. Everything is checked at construction: an unknown
family, a sparsity outside (0, 1), an unknown option or one of the wrong type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prunegraph.errors import SpecError
from prunegraph.passes.gates.base import DEFAULT_KINDS, check_fraction
from prunegraph.passes.gates.options import FamilyOptions
from prunegraph.passes.gates.registry import describe_families, family_class, registered_families
from prunegraph.pipeline.contract import Pass, PassResult, State, declare_key, register_pass

__all__ = ["Gate"]


declare_key("gate_family", "prunegraph.passes.gates.base.GateFamily",
            "the gate family whose gates are on the model (its budget, schedule and final values)")

@register_pass
@dataclass(frozen=True)
class Gate(Pass):
    """Insert trainable gates of ``family`` for a budget of ``sparsity`` (fraction of decoder
    parameters removed with ``budget='params'``, of units per kind with ``budget='units'``).

    Provides ``gates`` (the installed gates, a :class:`~prunegraph.plan.gating.GateSet` for unit
    families) and ``gate_family``.
    """

    name = "Gate"
    requires = ("model", "groups")
    provides = ("gates", "gate_family")
    guarantees = ("gates-at-one",)

    family: str = "ddp"
    sparsity: float = 0.2
    budget: Literal["params", "units"] = "params"
    scope: Literal["global", "group"] = "global"
    kinds: tuple[str, ...] = DEFAULT_KINDS
    lr: float | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.options, FamilyOptions):  # typed options from Python: the spec form
            family_class(self.family).options_type.from_mapping(self.options)  # its own type
            object.__setattr__(self, "options", self.options.to_dict())
        super().__post_init__()

    def validate(self) -> None:
        cls = family_class(self.family)
        check_fraction(self.sparsity)
        cls.check_settings(budget=self.budget, scope=self.scope, kinds=self.kinds)
        options = self.family_options()
        check_sparsity = getattr(cls, "check_sparsity", None)  # options that fix the sparsity
        if check_sparsity is not None:
            check_sparsity(self.sparsity, options)
        if self.lr is not None and self.lr <= 0:
            raise SpecError(f"pass Gate: lr must be > 0, got {self.lr}")

    def family_options(self) -> FamilyOptions:
        """The family's typed options (defaults filled in)."""
        return family_class(self.family).options_type.from_mapping(self.options)

    @classmethod
    def parameter_help(cls, full: bool) -> list[str]:
        """The registered families (with their options when ``full``), for ``prunegraph
        passes``."""
        if not full:
            return [f"family is one of {', '.join(sorted(registered_families()))}; "
                    f"`prunegraph passes Gate` lists their options"]
        return ["families and their options:", *(f"  {line}" for line in describe_families())]

    def run(self, state: State) -> PassResult:
        cls = family_class(self.family)
        family = cls(list(state.groups), self.sparsity, state.model, self.family_options(),
                     budget=self.budget, scope=self.scope, kinds=self.kinds, lr=self.lr,
                     seed=self.seed)
        init = getattr(family, "initialise", None)  # a weight family starts from a mask
        init_stats = init(state.model, state.get("tokenizer"), bool(state.progress)) if init \
            else {}
        device = next(state.model.parameters()).device
        family.to(device).eval()
        state.gates = family.install(state.model)
        state.gate_family = family
        values = state.gates.values
        units = sum(v.numel() for v in values.values())
        stats = {"family": self.family, "groups": len(values), "units": units,
                 "target_sparsity": round(family.target_sparsity(), 6), **init_stats}
        state.log.info("Gate: %s gates on %d groups (%d units), target %.1f%% of the gated pool",
                       self.family, len(values), units, 100 * family.target_sparsity())
        return PassResult(state, modified=True, stats=stats)
