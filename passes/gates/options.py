"""Typed options of a gate family, validated like pass parameters.

Each family declares a frozen dataclass of its own settings (DDP's annealing ``mu0``/``mu_T``,
hard-concrete's ``temperature`` ...), subclassing :class:`FamilyOptions`. In a spec they are the
``options`` mapping of the ``Gate`` pass::

    - Gate: {family: ddp, sparsity: 0.2, options: {mu_T: 0.05, dual_schedule: cosine}}

:meth:`FamilyOptions.from_mapping` builds them: an unknown key is a
:class:`~prunegraph.errors.SpecError` with the nearest names, a value of the wrong type (or not one
of a ``Literal``'s values) is one too, and :meth:`FamilyOptions.validate` checks ranges, all when
the pass is built. The annotations allowed are those of pass parameters
(:func:`prunegraph.pipeline.contract.coerce_param`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import coerce_param, nearest, type_name

__all__ = ["FamilyOptions"]


@dataclass(frozen=True)
class FamilyOptions:
    """Base of every family's options (no options of its own). Subclasses are frozen
    dataclasses with typed, defaulted fields; override :meth:`validate` for ranges."""

    #: The family these options belong to (set by ``register_family``), for messages.
    family: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                coerced = coerce_param(value, hints[f.name])
            except TypeError:
                raise SpecError(f"{self._where()}: option {f.name!r} expects "
                                f"{type_name(hints[f.name])}, got {type(value).__name__} "
                                f"{value!r}") from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Override to check values (ranges, combinations); raise :class:`SpecError`."""

    @classmethod
    def _where(cls) -> str:
        return f"gate family '{cls.family}'" if cls.family else cls.__name__

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | FamilyOptions | None) -> FamilyOptions:
        """Options from a spec mapping (missing keys take their defaults), or ``data`` itself if
        it already is an instance of this class.

        Raises:
            SpecError: an unknown option (with the nearest names), a value of the wrong type or
                out of range, or options of another family.
        """
        if data is None:
            return cls()
        if isinstance(data, FamilyOptions):
            if not isinstance(data, cls):
                raise SpecError(f"{cls._where()} takes {cls.__name__}, got "
                                f"{type(data).__name__}")
            return data
        if not isinstance(data, Mapping):
            raise SpecError(f"{cls._where()}: options must be a mapping, got "
                            f"{type(data).__name__} {data!r}")
        known = cls.names()
        for key in data:
            if key not in known:
                listing = ", ".join(known) or "none"
                raise SpecError(f"{cls._where()} has no option {key!r}."
                                f"{nearest(str(key), known)} Its options: {listing}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Every option with its value, as plain data."""
        return {k: getattr(self, k) for k in self.names()}

    @classmethod
    def describe(cls) -> list[str]:
        """``name: type = default`` per option (``prunegraph passes Gate``)."""
        hints = typing.get_type_hints(cls)
        return [f"{f.name}: {type_name(hints[f.name])} = {f.default!r}"
                for f in dataclasses.fields(cls)]
