"""The op-rule registry: how each ATen op relates the index spaces of its inputs and outputs.

A rule is a plain function registered for one or more ops::

    @rule(torch.ops.aten.silu.default, torch.ops.aten.neg.default)
    def _unary(ctx: RuleContext) -> Value:
        return ctx.input(0)              # same spaces in, same spaces out

``ctx`` gives the node, its inputs as :class:`Value` (one atom per dim, plus where each dim
comes from), the union-find (``ctx.spaces``) and helpers. Rules are pure functions of their
inputs: no state survives a call. An op with no rule, on a tensor that carries parameter spaces,
is an :class:`~prunegraph.errors.UnsupportedOpError` naming the op, the node and the module,
never a silent guess. Third-party code registers rules for its own custom ops the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prunegraph.ir.analysis.spaces import Spaces

__all__ = ["Value", "RuleContext", "rule", "family", "get_rule", "registered_ops", "rule_functions",
           "Origin"]

#: (parameter name, parameter dim) a tensor dim is a direct view of.
Origin = tuple[str, int]


@dataclass
class Value:
    """What the analysis knows about one tensor.

    Attributes:
        atoms: one index-space atom per dim.
        origins: per dim, the (parameter, dim) it is a direct view of, if any.
        value_space: for integer tensors whose *values* index a space (top-k expert ids), that
            space; it links the router's experts to the expert tensors the ids select.
        param_dep: the tensor depends on some parameter (else it is constant or input data).
    """

    atoms: list[int]
    origins: list[Origin | None] = field(default_factory=list)
    value_space: int | None = None
    param_dep: bool = False

    def __post_init__(self) -> None:
        if not self.origins:
            self.origins = [None] * len(self.atoms)

    @property
    def ndim(self) -> int:
        return len(self.atoms)


@dataclass
class RuleContext:
    node: torch.fx.Node
    spaces: Spaces
    values: dict[str, Any]
    module: str
    record_use: Callable[[Origin, str, int], None]

    def arg(self, i: int, default=None):
        args = self.node.args
        return args[i] if i < len(args) else default

    def kwarg(self, name: str, i: int | None = None, default=None):
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        if i is not None and i < len(self.node.args):
            return self.node.args[i]
        return default

    def param(self, name: str, default=None):
        """An argument by its schema name (``dim``, ``keepdim``), wherever the call put it."""
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        schema = getattr(self.node.target, "_schema", None)
        if schema is not None:
            for i, arg in enumerate(schema.arguments):
                if arg.name == name:
                    return self.node.args[i] if i < len(self.node.args) else default
        return default

    def tensor_inputs(self) -> list[tuple[Any, Value]]:
        """Every (fx node, Value) among the positional and keyword arguments, in order."""
        out = []
        for a in torch.utils._pytree.tree_leaves((self.node.args, self.node.kwargs)):
            v = self.value(a)
            if v is not None:
                out.append((a, v))
        return out

    def value(self, a) -> Value | None:
        if isinstance(a, torch.fx.Node):
            v = self.values.get(a.name)
            return v if isinstance(v, Value) else None
        return None

    def input(self, i: int) -> Value:
        v = self.value(self.arg(i))
        if v is None:
            raise TypeError(f"argument {i} of {self.node.format_node()} is not a tensor")
        return v

    def meta_shape(self, node: torch.fx.Node | None = None) -> list:
        shape = getattr((node or self.node).meta.get("val"), "shape", None)
        return list(shape) if shape is not None else []

    def fresh(self, shape, **flags: str) -> list[int]:
        return [self.spaces.new(s, **flags) for s in shape]

    def out(self, atoms: list[int], origins=None, value_space=None) -> Value:
        return Value(list(atoms), list(origins) if origins else [], value_space, True)

    def pin(self, atom: int, why: str) -> None:
        self.spaces.pin(atom, f"{why} ({self.node.target} in {self.module or 'the model'})")

    def unify(self, a: int, b: int, why: str = "incompatible layouts") -> None:
        self.spaces.try_unify(a, b, f"{why} at {self.node.name} in {self.module or 'the model'}")

    def use(self, v: Value, dim: int, role: str) -> None:
        """Record that tensor ``v``'s dim ``dim`` is used as ``role`` (consumer/producer/...)."""
        origin = v.origins[dim] if dim < len(v.origins) else None
        if origin is not None:
            self.record_use(origin, role, v.atoms[dim])


_RULES: dict[Any, Callable[[RuleContext], Any]] = {}
_SOURCES: dict[Any, str] = {}
#: (predicate over an OpOverload, rule): rules for whole families of ops, read from PyTorch's
#: own op metadata (``torch.Tag.pointwise``, ``torch.Tag.reduction``), tried after exact rules.
_FAMILIES: list[tuple[Callable[[Any], bool], Callable[[RuleContext], Any], str]] = []


def _source_of(fn) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return fn.__qualname__


def rule(*ops):
    """Register ``fn(ctx) -> Value | tuple[Value, ...]`` as the rule for ``ops``."""

    def decorator(fn):
        src = _source_of(fn)
        for op in ops:
            if op is None:  # an op this torch build does not have
                continue
            _RULES[op] = fn
            _SOURCES[op] = src
        return fn

    return decorator


def family(predicate: Callable[[Any], bool]):
    """Register ``fn(ctx)`` for every op ``predicate(op)`` accepts that has no exact rule.

    Example: ``@family(lambda op: torch.Tag.pointwise in op.tags)`` covers every elementwise op
    PyTorch tags, including ones added after this was written.
    """

    def decorator(fn):
        _FAMILIES.append((predicate, fn, _source_of(fn)))
        return fn

    return decorator


def _family_of(op):
    if not isinstance(op, torch._ops.OpOverload):
        return None
    for predicate, fn, src in _FAMILIES:
        try:
            if predicate(op):
                return fn, src
        except Exception:  # an op whose metadata a predicate cannot read is not in its family
            continue
    return None


def get_rule(op) -> Callable[[RuleContext], Any] | None:
    fn = _RULES.get(op)
    if fn is None and hasattr(op, "overloadpacket"):
        fn = _RULES.get(op.overloadpacket)
    if fn is None:
        found = _family_of(op)
        fn = found[0] if found else None
    return fn


def rule_source(op) -> str:
    src = _SOURCES.get(op) or _SOURCES.get(getattr(op, "overloadpacket", None))
    if src is None:
        found = _family_of(op)
        src = found[1] if found else "?"
    return src


def rule_functions() -> dict[str, Callable[[RuleContext], Any]]:
    """Every distinct rule function (exact and family), by qualified name: what a test that
    claims to exercise every rule must cover."""
    fns = {f"{fn.__module__}.{fn.__qualname__}": fn for fn in _RULES.values()}
    fns.update({f"{fn.__module__}.{fn.__qualname__}": fn for _, fn, _ in _FAMILIES})
    return fns


def registered_ops() -> list[str]:
    return sorted(str(op) for op in _RULES)
