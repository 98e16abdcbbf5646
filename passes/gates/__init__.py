"""Gate families for mask training: one interface (:class:`GateFamily`), several methods.

Each family is one module that registers itself (:func:`register_family`) with its name, where
its gates sit and its typed options; the built-in ones are imported below. ``make_family("ddp",
groups, sparsity=0.2, model=model)`` builds one by name; the ``Gate`` pass installs it, ``Train``
trains it and ``Finalize`` asks it for its plan, none of them knowing which family it is.

Modules: :mod:`.base` (the interface), :mod:`.options` (typed options), :mod:`.registry`,
:mod:`.units` (the base of unit families: augmented-Lagrangian budget, values -> kept units),
:mod:`.ddp`, :mod:`.hard_concrete`, :mod:`.leap` (weight gates; its objective in
:mod:`.leap_objective`), :mod:`.insert` (the ``Gate`` pass).
"""

from __future__ import annotations

from prunegraph.passes.gates.base import (
    BUDGETS,
    CONSTRAINT_SCOPES,
    DEFAULT_KINDS,
    SITES,
    GateFamily,
    check_fraction,
)

# the built-in families (each registers itself on import)
from prunegraph.passes.gates.ddp import DDPGates, DDPOptions  # noqa: E402
from prunegraph.passes.gates.hard_concrete import (  # noqa: E402
    HardConcreteGates,
    HardConcreteOptions,
)
from prunegraph.passes.gates.insert import Gate  # noqa: E402
from prunegraph.passes.gates.leap import LeapGates, LeapOptions  # noqa: E402
from prunegraph.passes.gates.options import FamilyOptions
from prunegraph.passes.gates.registry import (
    describe_families,
    family_class,
    make_family,
    register_family,
    registered_families,
)
from prunegraph.passes.gates.units import LagrangianOptions, UnitGates

__all__ = ["GateFamily", "UnitGates", "FamilyOptions", "LagrangianOptions", "DDPGates",
           "DDPOptions", "HardConcreteGates", "HardConcreteOptions", "LeapGates", "LeapOptions",
           "Gate", "register_family",
           "family_class", "registered_families", "make_family", "describe_families", "SITES",
           "BUDGETS", "CONSTRAINT_SCOPES", "DEFAULT_KINDS", "check_fraction"]
