"""Gate families for mask training: one interface (:class:`GateFamily`), several methods.

``make_family("ddp", groups, sparsity=0.2, model=model)`` builds one by name; the Train pass
(:mod:`prunegraph.passes.train.loop`) runs any of them without knowing which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prunegraph.errors import SpecError
from prunegraph.ir.groups import Group
from prunegraph.passes.gates.base import BUDGETS, DEFAULT_KINDS, SCOPES, GateFamily, check_fraction
from prunegraph.passes.gates.ddp import DDPGates
from prunegraph.passes.gates.hard_concrete import HardConcreteGates
from prunegraph.passes.gates.leap import LeapGates

__all__ = ["FAMILIES", "GateFamily", "DDPGates", "HardConcreteGates", "LeapGates", "make_family",
           "check_family", "BUDGETS", "SCOPES", "DEFAULT_KINDS", "check_fraction"]

#: Unit families (GateFamily subclasses) and weight families (``site = "weights"``: LEAP).
FAMILIES: dict[str, type] = {"ddp": DDPGates, "hard_concrete": HardConcreteGates,
                             "leap": LeapGates}


def check_family(name: str) -> type[GateFamily]:
    """The family class for ``name``, or a SpecError naming the known ones."""
    if name not in FAMILIES:
        from prunegraph.pipeline.contract import nearest

        raise SpecError(f"unknown gate family '{name}'; choose one of "
                        f"{', '.join(sorted(FAMILIES))}.{nearest(name, FAMILIES)}")
    return FAMILIES[name]


def make_family(name: str, groups: Sequence[Group], sparsity: float, model: Any = None,
                **options: Any) -> GateFamily:
    """Build the gate family ``name`` over ``groups`` for ``sparsity`` (see :class:`GateFamily`)."""
    return check_family(name)(groups, sparsity, model, **options)


from prunegraph.passes.gates.insert import Gate  # noqa: E402  (the pass uses the registry above)

__all__ += ["Gate"]
