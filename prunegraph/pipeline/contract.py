"""The pass contract: :class:`State`, :class:`Pass`, :class:`PassResult` and the pass registry.

A pass is a frozen dataclass whose fields are its parameters. Its class attributes say its spec
``name``, the state keys it ``requires``, the keys it ``provides``, the keys it may provide
depending on its input (``may_provide``: ``Load`` of a pruned folder provides its ``plan``) and
the keys it ``invalidates`` with the reason (``Slice`` changes the model's shapes, so the
``groups`` no longer describe it). A pipeline is checked against these declarations before it
runs. Authors write ``run`` only; :meth:`Pass.__call__` alone checks preconditions, the result
type and postconditions, and wraps foreign exceptions in :class:`~prunegraph.errors.PassError`
naming the pass::

    from dataclasses import dataclass
    from typing import Literal

    from prunegraph.errors import SpecError
    from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

    @register_pass
    @dataclass(frozen=True)
    class Prune(Pass):
        \"\"\"One-shot structured pruning by an importance criterion.\"\"\"

        name = "Prune"                       # the name used in YAML specs (default: class name)
        requires = ("model", "groups")
        provides = ("plan",)

        sparsity: float = 0.5                # parameters: typed, defaulted, frozen
        criterion: Literal["magnitude", "wanda"] = "magnitude"

        def validate(self) -> None:          # optional range checks, run at construction
            if not 0.0 < self.sparsity < 1.0:
                raise SpecError(f"sparsity must be in (0, 1), got {self.sparsity}")

        def run(self, state: State) -> PassResult:
            state.plan = make_plan(state.model, state.groups, self.sparsity)
            state.log.info("pruned %d groups", len(state.groups))
            return PassResult(state, modified=True, stats={"groups": len(state.groups)})

    result = Prune(sparsity=0.2)(State(model=model, groups=groups))  # the checked call
    result.state.plan, result.stats                                   # {...}, {"groups": 12}

Parameter types are checked when a pass is built (``Prune(sparsity="0.2")`` raises
:class:`~prunegraph.errors.SpecError`); ints are accepted for floats and lists for tuples. The
supported annotations are ``int``, ``float``, ``str``, ``bool``, ``None``, ``Literal[...]``,
unions (``X | None``), ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]`` and ``Any``.
A pass must not keep mutable state between runs: it is frozen, and ``run`` gets everything from
``state``.

A :class:`State` holds named artifacts (``model``, ``tokenizer``, ``graph``, ``groups``,
``gates``, ``plan`` ...) as attributes. Keys are declared with :func:`declare_key` (name, type,
meaning): a pass that provides a declared key is checked to provide a value of its type, and
``prunegraph passes`` shows what each key means. Every artifact a later pass reads is a state key;
no pass reads another pass's results from attributes hidden on the model. Four *ambient* keys
always exist and need not be declared:
``metrics`` (a dict, saved as ``metrics.json``), ``log`` (a :class:`logging.Logger`), ``run_dir``
(a :class:`~pathlib.Path`, or ``None`` when the pipeline runs without a run folder) and
``progress`` (whether long passes should show progress bars: use :func:`progress_bar`).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from prunegraph.errors import (
    BudgetError,
    PassError,
    PostconditionError,
    PreconditionError,
    PrunegraphError,
    SpecError,
    nearest,
)

__all__ = [
    "AMBIENT_KEYS",
    "StateKey",
    "declare_key",
    "declared_keys",
    "MissingStateError",
    "Pass",
    "PassResult",
    "State",
    "register_pass",
    "get_pass_class",
    "registered_passes",
    "isolated_registry",
    "nearest",
    "coerce_param",
    "type_name",
    "progress_bar",
]

#: State keys that every :class:`State` has; passes need not list them in ``requires``.
AMBIENT_KEYS: tuple[str, ...] = ("metrics", "log", "run_dir", "progress")

_LOG = logging.getLogger("prunegraph.pipeline")


# ------------------------------------------------------------------------------- state keys


@dataclasses.dataclass(frozen=True)
class StateKey:
    """A declared state key: its name, the type of its value and what it means.

    ``type`` is a dotted path (``"prunegraph.plan.plan.Plan"``), imported only when a value is
    checked, so declaring a key costs nothing; ``""`` accepts any value.
    """

    name: str
    type: str = ""
    doc: str = ""

    def check(self, value: Any) -> str | None:
        """None if ``value`` fits the declared type, else what is wrong."""
        if not self.type or value is None:
            return None
        module, _, cls_name = self.type.rpartition(".")
        import importlib

        cls = getattr(importlib.import_module(module or "builtins"), cls_name)
        if isinstance(value, cls):
            return None
        return f"expected {self.type}, got {type(value).__module__}.{type(value).__qualname__}"


_KEYS: dict[str, StateKey] = {}


def declare_key(name: str, type: str = "", doc: str = "") -> StateKey:
    """Declare state key ``name`` (its value's type as a dotted path, and its meaning)."""
    if not name.isidentifier():
        raise ValueError(f"state key {name!r} must be a Python identifier")
    key = StateKey(name, type, doc)
    old = _KEYS.get(name)
    if old is not None and old != key:
        raise ValueError(f"state key {name!r} is already declared as {old}; choose another name")
    _KEYS[name] = key
    return key


def declared_keys() -> dict[str, StateKey]:
    """A copy of the declared keys: name -> :class:`StateKey`."""
    return dict(_KEYS)


for _name, _type, _doc in (
    ("model", "torch.nn.Module", "the user's model (the runtime view); passes change it in place"),
    ("tokenizer", "", "the model's tokenizer"),
    ("graph", "", "the captured torch.export program of the model as it was when analysed"),
    ("analysis", "", "the analysis result (index spaces, groups, timings) of that capture"),
    ("groups", "builtins.list", "the coupled groups of the model as analysed (list of Group)"),
    ("plan", "prunegraph.plan.plan.Plan",
     "which units of the base model are kept; it maps onto the model's parameters while they "
     "keep the plan's names"),
    ("gates", "prunegraph.plan.gating.GateHandle",
     "gates installed on the model (live values; a GateSet for unit gates)"),
    ("saved_model", "builtins.str", "the folder a pruned checkpoint was written to"),
    ("router", "builtins.dict",
     "dynamic routing a method runtime installed on the model (PrunePath's routers), as the "
     "description its checkpoint stores"),
):
    declare_key(_name, _type, _doc)


# --------------------------------------------------------------------------------------- State


class MissingStateError(PreconditionError, AttributeError):
    """``state.<key>`` for a key the state does not hold; an AttributeError too, so that
    ``hasattr(state, key)`` and ``getattr(state, key, default)`` keep working."""


class State:
    """Named artifacts flowing through a pipeline, read and written as attributes.

    ``state.groups`` raises :class:`PreconditionError` naming the key when it is absent;
    ``state.has("groups")`` asks first. ``state.keys()`` lists the artifacts present.
    """

    __slots__ = ("_items",)

    def __init__(self, **artifacts: Any) -> None:
        object.__setattr__(self, "_items", {})
        self._items.update(metrics={}, log=_LOG, run_dir=None, progress=False)
        for key, value in artifacts.items():
            setattr(self, key, value)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._items[key]
        except KeyError:
            present = ", ".join(sorted(self.keys())) or "nothing"
            raise MissingStateError(
                f"state has no {key!r} (it holds: {present}).{nearest(key, self._items)} "
                f"Add a pass that provides {key!r} earlier in the pipeline."
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        if hasattr(type(self), key):
            raise AttributeError(f"{key!r} is a State method and cannot name an artifact")
        if key == "run_dir" and value is not None:
            value = Path(value)
        if key == "metrics" and not isinstance(value, dict):
            raise TypeError(f"state.metrics must be a dict, got {type(value).__name__}")
        self._items[key] = value

    def __delattr__(self, key: str) -> None:
        if key in AMBIENT_KEYS:
            raise AttributeError(f"cannot delete the ambient state key {key!r}")
        if key not in self._items:
            raise PreconditionError(f"state has no {key!r} to delete")
        del self._items[key]

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def has(self, key: str) -> bool:
        """Whether artifact ``key`` is present (ambient keys always are)."""
        return key in self._items

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key, default)

    def keys(self) -> list[str]:
        """The artifact keys present, ambient keys excluded."""
        return [k for k in self._items if k not in AMBIENT_KEYS]

    def __repr__(self) -> str:
        return f"State({', '.join(self.keys())})"


def progress_bar(state: State, iterable: Any = None, *, total: int | None = None,
                 desc: str | None = None, **kwargs: Any) -> Any:
    """A tqdm bar for a long pass, shown only when ``state.progress`` is on."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not state.progress, leave=False,
                **kwargs)


@dataclasses.dataclass
class PassResult:
    """What :meth:`Pass.run` returns: the state, whether anything changed, and counts."""

    state: State
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------- Pass


class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses; see the module docstring."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    #: Keys provided only when the input allows (e.g. ``plan`` when Load reads a pruned folder).
    may_provide: ClassVar[tuple[str, ...]] = ()
    #: Keys this pass makes stale, with the reason: they are dropped from the state after it runs.
    invalidates: ClassVar[dict[str, str]] = {}
    #: Invariant checks (registered with ``register_check(..., guarantee=True)``) that must
    #: hold around this pass, such as ``sliced-equals-gated`` for ``Slice``.
    guarantees: ClassVar[tuple[str, ...]] = ()
    #: Runs on every rank of a ``torchrun`` launch (training); the ranks other than 0 leave
    #: after the last such pass (:mod:`prunegraph.pipeline.distributed`).
    collective: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self._check_params()
        self.validate()

    def validate(self) -> None:
        """Override to check parameter values (ranges, combinations); raise :class:`SpecError`."""

    def check_inputs(self) -> None:
        """Override to check, cheaply, what the pass will read from outside the pipeline (a
        model name, a file, a folder); raise :class:`SpecError`. :meth:`Pipeline.run` calls it
        for every pass before the run folder is created or any pass runs."""

    #: Whether the pass works on a model on the meta device (shapes only, no values), so that
    #: :func:`prunegraph.pipeline.early.meta_preflight` may run it before anything loads.
    runs_on_meta: ClassVar[bool] = False
    #: State keys :meth:`check_early` reads (empty: the pass has no early check).
    early_needs: ClassVar[tuple[str, ...]] = ()

    def check_early(self, state: State) -> None:
        """Override to refuse, before the heavy passes, a run this pass would fail later.

        The pipeline calls it once, as soon as the state holds every key in ``early_needs``
        and no pass between there and this one replaces or invalidates them (for ``Prune``:
        right after ``Analyze``, so an impossible budget fails before a dense evaluation);
        raise :class:`~prunegraph.errors.PrunegraphError` with the fix. It must not change
        the state.
        """

    def run(self, state: State) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {type(self).__name__} does not implement run(state)")

    # -- the checked call ------------------------------------------------------------------

    def __call__(self, state: State) -> PassResult:
        """Run with the contract checked: requires present, a PassResult back, provides present."""
        if not isinstance(state, State):
            raise TypeError(f"pass {self.pass_name()} expects a State, got {type(state).__name__}")
        missing = [k for k in self.requires if not state.has(k)]
        if missing:
            raise PreconditionError(
                f"pass {self.pass_name()} requires {', '.join(map(repr, missing))} but the state "
                f"holds only {', '.join(map(repr, state.keys())) or 'nothing'}. "
                f"{_providers_hint(missing[0])}"
            )
        try:
            result = self.run(state)
        except PrunegraphError:
            raise
        except Exception as e:
            from prunegraph.errors import missing_extra

            hint = missing_extra(e)
            raise PassError(f"pass {self.pass_name()} failed: "
                            + (hint or f"{type(e).__name__}: {e}")) from e
        if not isinstance(result, PassResult):
            raise PostconditionError(
                f"pass {self.pass_name()}.run returned {type(result).__name__}, expected "
                f"PassResult(state, modified, stats)"
            )
        if not isinstance(result.state, State):
            raise PostconditionError(
                f"pass {self.pass_name()} returned a PassResult whose state is "
                f"{type(result.state).__name__}, expected State"
            )
        if not isinstance(result.stats, dict):
            raise PostconditionError(f"pass {self.pass_name()} returned non-dict stats")
        absent = [k for k in self.provides if not result.state.has(k)]
        if absent:
            raise PostconditionError(
                f"pass {self.pass_name()} promised to provide {', '.join(map(repr, absent))} "
                f"but the state it returned lacks them"
            )
        for key in (*self.provides, *self.may_provide):
            declared = _KEYS.get(key)
            problem = declared.check(result.state.get(key)) if declared else None
            if problem:
                raise PostconditionError(f"pass {self.pass_name()} provided {key!r}: {problem}")
        for key in self.invalidates:
            if key not in self.provides and result.state.has(key):
                delattr(result.state, key)
        return result

    # -- parameters ------------------------------------------------------------------------

    @classmethod
    def pass_name(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def param_fields(cls) -> tuple[dataclasses.Field, ...]:
        """The parameter fields (``init=True`` dataclass fields)."""
        if not dataclasses.is_dataclass(cls):
            return ()
        return tuple(f for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def param_types(cls) -> dict[str, Any]:
        """Parameter name -> resolved annotation."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints.get(f.name, Any) for f in cls.param_fields()}

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Parameter name -> default (``dataclasses.MISSING`` for required parameters)."""
        out = {}
        for f in cls.param_fields():
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = dataclasses.MISSING
        return out

    def params(self) -> dict[str, Any]:
        """Every parameter with its resolved value, as plain JSON/YAML data."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in self.param_fields()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The spec form ``{Name: {param: value, ...}}`` with every default filled in."""
        return {self.pass_name(): self.params()}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, *, where: str = "") -> Pass:
        """Build from a parameter mapping, with nearest-name hints for unknown parameters."""
        params = {} if params is None else params
        prefix = f"{where}: " if where else ""
        if not isinstance(params, dict):
            raise SpecError(
                f"{prefix}parameters of pass {cls.pass_name()} must be a mapping, got "
                f"{type(params).__name__} {params!r}"
            )
        known = [f.name for f in cls.param_fields()]
        for key in params:
            if key not in known:
                listing = ", ".join(known) or "none"
                raise SpecError(
                    f"{prefix}pass {cls.pass_name()} has no parameter {key!r}."
                    f"{nearest(str(key), known)} Its parameters: {listing}."
                )
        missing = [k for k, v in cls.param_defaults().items()
                   if v is dataclasses.MISSING and k not in params]
        if missing:
            types_ = cls.param_types()
            raise SpecError(
                f"{prefix}pass {cls.pass_name()} needs parameter "
                + ", ".join(f"{k!r} ({type_name(types_[k])})" for k in missing)
            )
        try:
            return cls(**params)
        except (SpecError, BudgetError) as e:  # the same error, located in the spec
            raise type(e)(f"{prefix}{e}") from None

    def _check_params(self) -> None:
        types_ = self.param_types()
        for f in self.param_fields():
            value = getattr(self, f.name)
            try:
                coerced = coerce_param(value, types_[f.name])
            except TypeError:
                hint = (nearest(value, _literal_values(types_[f.name]))
                        if isinstance(value, str) else "")
                raise SpecError(
                    f"pass {self.pass_name()}: parameter {f.name!r} expects "
                    f"{type_name(types_[f.name])}, got {type(value).__name__} {value!r}"
                    + (f".{hint}" if hint else "")
                ) from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.param_fields())
        return f"{self.pass_name()}({args})"


def _literal_values(tp: Any) -> list[str]:
    """The string values of ``Literal[...]`` annotations in ``tp`` (unions searched)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return [a for a in typing.get_args(tp) if isinstance(a, str)]
    if origin in (typing.Union, types.UnionType):
        return [v for a in typing.get_args(tp) for v in _literal_values(a)]
    return []


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------ parameter type check


def type_name(tp: Any) -> str:
    """A readable name for an annotation: ``float``, ``'a' | 'b'``, ``tuple[int, ...]``."""
    origin = typing.get_origin(tp)
    if tp is type(None) or tp is None:
        return "None"
    if tp is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def coerce_param(value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widened to float, lists to
    tuples). Raise :class:`TypeError` when it does not fit."""
    if tp is Any:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return value
        raise TypeError
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        for a in typing.get_args(tp):
            if value == a and type(value) is type(a):
                return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return coerce_param(value, a)
            except TypeError:
                continue
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            items = tuple(coerce_param(v, args[0]) for v in value)
        elif not args:
            items = tuple(value)
        else:
            if len(args) != len(value):
                raise TypeError
            items = tuple(coerce_param(v, a) for v, a in zip(value, args))
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        args = typing.get_args(tp) or (Any, Any)
        return {coerce_param(k, args[0]): coerce_param(v, args[1]) for k, v in value.items()}
    if origin is list:
        raise TypeError("list parameters are mutable; annotate tuple[X, ...] instead")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value) if not isinstance(value, float) else value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise TypeError
        return value
    raise TypeError(f"unsupported parameter annotation {tp!r}")


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a frozen-dataclass :class:`Pass` under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"@register_pass expects a Pass subclass, got {cls!r}")
    if "name" not in cls.__dict__ or not cls.__dict__["name"]:
        cls.name = cls.__name__
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(
            f"pass {cls.name} must be a dataclass: put @dataclass(frozen=True) under "
            f"@register_pass"
        )
    if not cls.__dataclass_params__.frozen:
        raise TypeError(f"pass {cls.name} must be frozen: use @dataclass(frozen=True)")
    for attr in ("requires", "provides", "may_provide", "guarantees", "early_needs"):
        value = getattr(cls, attr)
        if not (isinstance(value, tuple) and all(isinstance(k, str) for k in value)):
            raise TypeError(f"pass {cls.name}.{attr} must be a tuple of str, got {value!r}")
    if not (isinstance(cls.invalidates, dict)
            and all(isinstance(k, str) and isinstance(v, str) and v
                    for k, v in cls.invalidates.items())):
        raise TypeError(f"pass {cls.name}.invalidates must map each key to the reason it goes "
                        f"stale, got {cls.invalidates!r}")
    typing.get_type_hints(cls)  # fail now on an annotation that does not resolve
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"pass name {cls.name!r} is already registered by {old.__module__}.{old.__qualname__}; "
            f"give {cls.__module__}.{cls.__qualname__} another name"
        )
    _REGISTRY[cls.name] = cls
    return cls


def get_pass_class(name: str) -> type[Pass]:
    """The registered pass called ``name``; :class:`SpecError` with the nearest names if none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        hint = nearest(str(name), _REGISTRY)
        if not hint:
            hint = f" Registered passes: {', '.join(sorted(_REGISTRY)) or 'none'}."
        raise SpecError(
            f"unknown pass {name!r}.{hint} (`prunegraph passes` lists every pass.)"
        ) from None


def registered_passes() -> dict[str, type[Pass]]:
    """A copy of the registry: name -> pass class."""
    return dict(_REGISTRY)


@contextmanager
def isolated_registry(*, empty: bool = False) -> Iterator[None]:
    """Register passes inside the block only (for tests): the registry is restored on exit.

    With ``empty=True`` the block starts with no pass and no state key declared, so test passes
    may reuse the names of real ones. Load plugins *before* the block: ones first imported inside it would be
    dropped on exit and, being imported once, never registered again.
    """
    saved, saved_keys = dict(_REGISTRY), dict(_KEYS)
    if empty:
        _REGISTRY.clear()
        _KEYS.clear()
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
        _KEYS.clear()
        _KEYS.update(saved_keys)


def _providers_hint(key: str) -> str:
    providers = sorted(n for n, c in _REGISTRY.items() if key in (*c.provides, *c.may_provide))
    if not providers:
        return f"No registered pass provides {key!r}."
    return f"Passes that provide {key!r}: {', '.join(providers)}."
