"""The ``Gate`` pass: put a gate family's per-unit gates on the model (provides ``gates``).

::

    Pipeline([Load("smollm2-135m"), Analyze(), Gate(family="ddp", sparsity=0.2),
              Train(steps=200), Finalize(), Slice(), Evaluate(), Save()])

The family (``ddp``, ``hard_concrete`` or ``leap``, see :mod:`prunegraph.passes.gates`) is built
here with the budget; family-specific settings go in ``options`` (DDP: ``mu0``, ``mu_T``,
``init_std``; hard-concrete: ``temperature``, ``init_keep``; LEAP: ``pattern``, ``alpha``,
``tau``, ``lambda1`` ... see :class:`~prunegraph.passes.gates.leap.LeapGates`). LEAP's gates sit
on the weights: its logits start from a one-shot Wanda mask, and ``state.gates`` is the
installed :class:`~prunegraph.passes.gates.leap.LeapMasks`. Everything is checked at construction: an unknown
family, a sparsity outside (0, 1), an unknown option.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, nearest, register_pass
from prunegraph.passes.gates import DEFAULT_KINDS, check_family, check_fraction, make_family
from prunegraph.passes.gates.base import GateFamily

__all__ = ["Gate"]


def _family_options(cls: type) -> set[str]:
    names = set()
    for klass in (cls, GateFamily) if issubclass(cls, GateFamily) else (cls,):
        names |= {p for p, v in inspect.signature(klass.__init__).parameters.items()
                  if v.kind == v.KEYWORD_ONLY}
    return names


@register_pass
@dataclass(frozen=True)
class Gate(Pass):
    """Insert trainable gates of ``family`` for a budget of ``sparsity`` (fraction of decoder
    parameters removed with ``budget='params'``, of units per kind with ``budget='units'``).

    Provides ``gates`` (the installed :class:`~prunegraph.plan.gating.GateSet`) and ``gate_family``.
    """

    name = "Gate"
    requires = ("model", "groups")
    provides = ("gates", "gate_family")

    family: str = "ddp"
    sparsity: float = 0.2
    budget: Literal["params", "units"] = "params"
    scope: Literal["global", "group"] = "global"
    kinds: tuple[str, ...] = DEFAULT_KINDS
    lr: float | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        cls = check_family(self.family)
        check_fraction(self.sparsity)
        known = _family_options(cls) - {"budget", "scope", "kinds", "lr", "seed"}
        for key in self.options:
            if key not in known:
                raise SpecError(f"pass Gate: family '{self.family}' has no option '{key}'; "
                                f"known: {', '.join(sorted(known))}.{nearest(key, known)}")
        if self.lr is not None and self.lr <= 0:
            raise SpecError(f"pass Gate: lr must be > 0, got {self.lr}")
        if getattr(cls, "site", "units") == "weights":
            if self.budget != "params":
                raise SpecError(f"pass Gate: family '{self.family}' masks weights; its sparsity "
                                f"is a fraction of the masked weights (leave budget: params)")
            opts = dict(self.options, **({"lr": self.lr} if self.lr is not None else {}))
            cls.check_options(self.sparsity, self.scope, opts)

    def run(self, state: State) -> PassResult:
        from prunegraph.plan.gating import apply_gates

        opts = dict(self.options)
        if self.lr is not None:
            opts["lr"] = self.lr
        if getattr(check_family(self.family), "site", "units") == "weights":
            return self._run_weights(state, opts)
        family = make_family(self.family, list(state.groups), self.sparsity, state.model,
                             budget=self.budget, scope=self.scope, kinds=self.kinds,
                             seed=self.seed, **opts)
        device = next(state.model.parameters()).device
        family.to(device).eval()
        values = {k: v.detach() for k, v in family.forward_values(0, 1).items()}
        state.gates = apply_gates(state.model, family.groups, values)
        state.gate_family = family
        units = sum(v.numel() for v in values.values())
        stats = {"family": self.family, "groups": len(family.groups), "units": units,
                 "target_sparsity": round(family.target_sparsity(), 6)}
        state.log.info("Gate: %s gates on %d groups (%d units), target %.1f%% of the gated pool",
                       self.family, len(family.groups), units, 100 * family.target_sparsity())
        return PassResult(state, modified=True, stats=stats)

    def _run_weights(self, state: State, opts: dict[str, Any]) -> PassResult:
        """A weight family (LEAP): logits initialised from a one-shot mask, forwards installed."""
        family = check_family(self.family)(state.model, self.sparsity, scope=self.scope,
                                           seed=self.seed, **opts)
        init = family.initialise(state.model, state.get("tokenizer"), bool(state.progress))
        family.to(next(state.model.parameters()).device).eval()
        state.gates = family.install(state.model)
        state.gate_family = family
        stats = {"family": self.family, "weights": len(family.linears),
                 "logit_params": sum(family.numel.values()),
                 "target_sparsity": round(family.target_sparsity(), 6), **init}
        state.log.info("Gate: %s logits on %d weights (%d), target %.1f%% of them, from a %s mask",
                       self.family, len(family.linears), stats["logit_params"],
                       100 * family.target_sparsity(), init["init"])
        return PassResult(state, modified=True, stats=stats)
