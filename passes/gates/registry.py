"""The gate-family registry: each family declares itself once, with ``@register_family``.

::

    @register_family
    class DDPGates(UnitGates):
        name = "ddp"                  # Gate: {family: ddp}
        options_type = DDPOptions     # Gate: {options: {mu_T: 0.05}}, typed and validated
        ...

``family_class("ddp")`` finds it (an unknown name is a :class:`~prunegraph.errors.SpecError` with
the nearest names), :func:`make_family` builds one from flat settings, and
:func:`describe_families` lists every family with its options for ``prunegraph passes Gate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prunegraph.errors import SpecError
from prunegraph.ir.groups import Group
from prunegraph.passes.gates.base import SITES, GateFamily
from prunegraph.passes.gates.options import FamilyOptions
from prunegraph.pipeline.contract import nearest

__all__ = ["register_family", "family_class", "registered_families", "make_family",
           "describe_families", "isolated_families", "SETTINGS"]

#: Settings every family takes from the ``Gate`` pass, beside its options.
SETTINGS = ("budget", "scope", "kinds", "lr", "seed")

_FAMILIES: dict[str, type[GateFamily]] = {}


def register_family(cls: type[GateFamily]) -> type[GateFamily]:
    """Class decorator: register a :class:`GateFamily` subclass under its ``name``.

    Raises:
        TypeError: not a GateFamily, no name, an unknown ``site``, or options that are not a
            frozen :class:`FamilyOptions` dataclass.
        ValueError: the name is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, GateFamily)):
        raise TypeError(f"@register_family expects a GateFamily subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"gate family {cls.__qualname__} must set a class attribute name = "
                        f"'...' (the name specs use)")
    if cls.site not in SITES:
        raise TypeError(f"gate family {name}: site must be one of {', '.join(SITES)}, got "
                        f"{cls.site!r}")
    opts = cls.options_type
    if not (isinstance(opts, type) and issubclass(opts, FamilyOptions)
            and dataclasses.is_dataclass(opts) and opts.__dataclass_params__.frozen):
        raise TypeError(f"gate family {name}: options_type must be a frozen dataclass "
                        f"subclassing FamilyOptions, got {opts!r}")
    old = _FAMILIES.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                  cls.__qualname__):
        raise ValueError(f"gate family {name!r} is already registered by "
                         f"{old.__module__}.{old.__qualname__}")
    opts.family = name
    _FAMILIES[name] = cls
    return cls


def family_class(name: str) -> type[GateFamily]:
    """The family registered as ``name``, or a SpecError naming the known ones."""
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise SpecError(f"unknown gate family '{name}'; choose one of "
                        f"{', '.join(sorted(_FAMILIES))}.{nearest(str(name), _FAMILIES)}"
                        ) from None


def registered_families() -> dict[str, type[GateFamily]]:
    """A copy of the registry: name -> family class."""
    return dict(_FAMILIES)


@contextmanager
def isolated_families() -> Iterator[None]:
    """Families registered inside the block are forgotten on exit (for tests)."""
    saved = dict(_FAMILIES)
    try:
        yield
    finally:
        _FAMILIES.clear()
        _FAMILIES.update(saved)


def make_family(name: str, groups: Sequence[Group], sparsity: float, model: Any = None,
                options: FamilyOptions | dict[str, Any] | None = None,
                **settings: Any) -> GateFamily:
    """Build family ``name`` over ``groups`` for ``sparsity``. ``settings`` are the ``Gate``
    settings (:data:`SETTINGS`) and, flat, the family's options (``mu_T=0.05``); ``options``
    may give them instead."""
    cls = family_class(name)
    common = {k: settings.pop(k) for k in SETTINGS if k in settings}
    if settings:
        if options is not None:
            raise SpecError(f"gate family '{name}': give its options either in options= or "
                            f"flat, not both (flat: {', '.join(settings)})")
        options = settings
    return cls(groups, sparsity, model, cls.options_type.from_mapping(options), **common)


def describe_families() -> list[str]:
    """Every registered family: name, where its gates sit, summary, options with defaults."""
    import inspect

    lines = []
    for name in sorted(_FAMILIES):
        cls = _FAMILIES[name]
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        lines.append(f"{name} ({cls.site} gates, lr {cls.default_lr:g}): {doc}".rstrip(": "))
        lines.extend(f"    {line}" for line in cls.options_type.describe())
    return lines
