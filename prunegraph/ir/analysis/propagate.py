"""Dimension propagation: run every node's op rule over the captured graph.

The walk reads shapes from ``node.meta["val"]`` (torch.export's fake tensors) and never runs the
model. Parameters get one atom per dim; buffers, constants and anything computed from no
parameter get atoms that pin whatever they meet (a RoPE table pins head_dim); graph outputs pin
their dims (the vocabulary). Every rule's output is checked against the node's real shape, so a
wrong rule fails loudly in tests instead of producing a wrong group.

An op with no rule (or a rule that cannot handle the form it is used in) is handled by the
*conservative fallback*: every space it touches is pinned, which is never wrong (fewer units are
prunable), and one warning names the ops and how to register a rule. ``strict=True`` makes it an
:class:`~prunegraph.errors.UnsupportedOpError` instead.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch

import prunegraph.ir.analysis.rules  # noqa: F401  (registers the built-in rules)
import prunegraph.ir.analysis.rules_families  # noqa: F401  (op families, index ops, convolutions)
from prunegraph.errors import UnsupportedOpError
from prunegraph.ir.analysis.registry import (
    Origin,
    RuleContext,
    Value,
    get_rule,
    rule_source,
)
from prunegraph.ir.analysis.spaces import Conflict, Spaces, as_size
from prunegraph.ir.capture import Graph, module_path

__all__ = ["Propagation", "propagate"]

log = logging.getLogger(__name__)


@dataclass
class Propagation:
    """The result of the walk: the union-find and what every parameter dim maps to."""

    spaces: Spaces
    param_atoms: dict[str, list[int]]
    roles: dict[Origin, set[str]] = field(default_factory=lambda: defaultdict(set))
    values: dict[str, object] = field(default_factory=dict)
    unruled: list[str] = field(default_factory=list)
    #: op -> nodes the conservative fallback pinned (no rule, or a form its rule cannot handle)
    fallback: dict[str, list[str]] = field(default_factory=dict)
    #: qualified names of the rule functions that ran (what a coverage test reads)
    rules_used: set[str] = field(default_factory=set)


def _tensor_shape(val):
    return list(val.shape) if isinstance(val, torch.Tensor) else None


def _all_token_dims(spaces: Spaces, v: Value) -> bool:
    """Every dim is a batch / sequence dim, size 1, or already pinned: nothing prunable to lose."""
    return all(spaces.static_size(a) in (None, 1) or spaces.pinned(a) for a in v.atoms)


def propagate(graph: Graph, *, strict: bool = False) -> Propagation:
    """Walk ``graph`` once, applying op rules; return the spaces of every parameter dim.

    Args:
        strict: an op with no rule that touches parameter spaces is an error instead of being
            pinned by the conservative fallback.

    Raises:
        UnsupportedOpError: ``strict`` and a node that touches parameter spaces has no rule.
    """
    spaces = Spaces()
    values: dict[str, object] = {}
    param_atoms: dict[str, list[int]] = {}
    roles: dict[Origin, set[str]] = defaultdict(set)
    unruled: list[str] = []
    state = _Walk(strict)

    def record_use(origin: Origin, role: str, atom: int) -> None:
        roles[origin].add(role)

    for node in graph.fx.nodes:
        if node.op == "placeholder":
            shape = _tensor_shape(node.meta.get("val"))
            if shape is None:
                values[node.name] = None
                continue
            pname = graph.param_of(node.name)
            if pname is not None:
                atoms = [spaces.new(s) for s in shape]
                if pname in param_atoms:  # a tied parameter seen under another name
                    for a, b in zip(param_atoms[pname], atoms):
                        spaces.unify(a, b)
                    atoms = param_atoms[pname]
                else:
                    param_atoms[pname] = atoms
                values[node.name] = Value(atoms, [(pname, d) for d in range(len(atoms))], None, True)
            else:
                what = graph.buffer_names.get(node.name)
                reason = f"buffer {what}" if what else f"model input {node.name}"
                atoms = [spaces.new(s, pinned=reason) for s in shape]
                values[node.name] = Value(atoms)
            continue
        if node.op == "output":
            for out in torch.utils._pytree.tree_leaves(node.args):
                v = values.get(out.name) if isinstance(out, torch.fx.Node) else None
                if isinstance(v, Value):
                    for a in v.atoms:
                        spaces.pin(a, "model output")
            continue
        if node.op != "call_function":
            values[node.name] = None
            continue
        values[node.name] = _apply(node, graph, spaces, values, record_use, unruled, state)
    spaces.resolve_deferred()
    if state.fallback:
        _warn_fallback(state.fallback)
    return Propagation(spaces, param_atoms, roles, values, unruled, state.fallback, state.rules_used)


@dataclass
class _Walk:
    strict: bool
    fallback: dict[str, list[str]] = field(default_factory=dict)
    rules_used: set[str] = field(default_factory=set)


def _warn_fallback(fallback: dict[str, list[str]]) -> None:
    ops = ", ".join(f"{op} ({len(nodes)} node{'s' if len(nodes) > 1 else ''})"
                    for op, nodes in sorted(fallback.items()))
    log.warning(
        "no dimension rule for %s: every space these ops touch is pinned (kept whole), so the "
        "model stays correct but fewer units are prunable. To let them prune, register a rule: "
        "`from prunegraph.ir.analysis import rule` and decorate `def my_rule(ctx): ...` with "
        "`@rule(torch.ops.aten.<op>.<overload>)` (see prunegraph/ir/analysis/rules.py); "
        "analyze(..., strict=True) makes this an error.", ops)


def _inputs(node: torch.fx.Node, values) -> list[Value]:
    out = []
    for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(a, torch.fx.Node):
            v = values.get(a.name)
            if isinstance(v, Value):
                out.append(v)
            elif isinstance(v, tuple):
                out.extend(x for x in v if isinstance(x, Value))
    return out


def _fresh_outputs(node, spaces: Spaces, pinned: str | None):
    val = node.meta.get("val")
    flags = {"pinned": pinned} if pinned else {}
    if isinstance(val, torch.Tensor):
        return Value([spaces.new(s, **flags) for s in val.shape])
    if isinstance(val, (tuple, list)):
        return tuple(Value([spaces.new(s, **flags) for s in t.shape]) if isinstance(t, torch.Tensor)
                     else None for t in val)
    return None


def _apply(node, graph: Graph, spaces: Spaces, values, record_use, unruled, state: _Walk):
    ins = _inputs(node, values)
    param_dep = any(v.param_dep for v in ins)
    module = module_path(node)
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        inlined = _inline(node, graph, spaces, values, record_use, unruled, state)
        if inlined is not _NOT_INLINED:
            return inlined
    fn = get_rule(target) if not isinstance(target, torch._ops.HigherOrderOperator) else None
    if fn is None:
        if not param_dep:
            # computed from buffers, constants or input data only: its dims pin what they meet
            where = f"{node.name} in {module or 'the model'}"
            return _fresh_outputs(node, spaces, f"computed from no parameter ({where})")
        if all(_all_token_dims(spaces, v) and v.value_space is None for v in ins):
            unruled.append(str(target))
            return _fresh_outputs(node, spaces, f"computed by {target}, which has no rule, from "
                                                f"token dims only ({node.name})")
        if state.strict:
            raise _unsupported(node, module, "has no dimension rule")
        return _fallback(node, module, ins, spaces, state, "no dimension rule")
    ctx = RuleContext(node, spaces, values, module, record_use)
    state.rules_used.add(f"{fn.__module__}.{fn.__qualname__}")
    try:
        result = fn(ctx)
    except Conflict as e:
        for v in ins:
            for a in v.atoms:
                spaces.pin(a, f"layouts that cannot be aligned at {node.name} ({e})")
        return _fresh_outputs(node, spaces, f"layouts that cannot be aligned at {node.name}")
    except (NotImplementedError, TypeError, IndexError, KeyError, ValueError) as e:
        if state.strict:
            raise _unsupported(node, module, f"is used in a form its rule does not handle ({e})") from e
        return _fallback(node, module, ins, spaces, state, f"a form its rule does not handle ({e})")
    try:
        _check_shapes(node, result, spaces, module)
    except UnsupportedOpError:
        if state.strict:
            raise
        return _fallback(node, module, ins, spaces, state, "its rule produced wrong shapes")
    if isinstance(result, Value):
        result.param_dep = result.param_dep or param_dep
    return result


_NOT_INLINED = object()
#: higher-order ops that only run a subgraph under a context (no_grad, autocast): walked inline
_WRAPPERS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def _inline(node, graph: Graph, spaces: Spaces, values, record_use, unruled, state: _Walk):
    """Walk the subgraph of a wrapper higher-order op with its inputs' values."""
    if getattr(node.target, "__name__", str(node.target)) not in _WRAPPERS:
        return _NOT_INLINED
    args = list(node.args)
    found = next(((i, sub) for i, a in enumerate(args)
                  if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                  and isinstance(sub := getattr(graph.program.graph_module, str(a.target), None),
                                 torch.fx.GraphModule)), None)
    if found is None:
        return _NOT_INLINED
    index, sub = found
    local: dict[str, object] = {}
    inputs = args[index + 1:]
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for ph, a in zip(placeholders, inputs):
        local[ph.name] = values.get(a.name) if isinstance(a, torch.fx.Node) else None
    for n in sub.graph.nodes:
        if n.op == "output":
            outs = n.args[0]
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return tuple(local.get(o.name) if isinstance(o, torch.fx.Node) else None for o in outs)
        if n.op == "call_function":
            local[n.name] = _apply(n, graph, spaces, local, record_use, unruled, state)
        elif n.op != "placeholder":
            local[n.name] = None
    return _NOT_INLINED


def _fallback(node, module: str, ins: list[Value], spaces: Spaces, state: _Walk, why: str):
    """Pin every space the node touches (inputs, index value spaces, outputs)."""
    reason = (f"{node.target} has {why}: pinned by the conservative fallback "
              f"({node.name} in {module or 'the model'})")
    for v in ins:
        for a in v.atoms:
            spaces.pin(a, reason)
        if v.value_space is not None:
            spaces.pin(v.value_space, reason)
    state.fallback.setdefault(str(node.target), []).append(node.name)
    return _fresh_outputs(node, spaces, reason)


def _check_shapes(node, result, spaces: Spaces, module: str) -> None:
    val = node.meta.get("val")
    pairs = []
    if isinstance(result, Value):
        pairs = [(result, val)]
    elif isinstance(result, tuple) and isinstance(val, (tuple, list)):
        pairs = list(zip(result, val))
    for v, t in pairs:
        if v is None or not isinstance(t, torch.Tensor):
            continue
        sizes = [spaces.size(a) for a in v.atoms]
        expect = [as_size(s) for s in t.shape]
        if sizes != expect and not _equal_in_trace(sizes, expect, t):
            raise UnsupportedOpError(
                f"the dimension rule for {node.target} ({rule_source(node.target)}) produced "
                f"spaces of sizes {sizes} for node {node.name} in {module or 'the model'}, whose "
                f"shape is {expect}. This is a bug in that rule: please report it with the model."
            )


def _equal_in_trace(sizes: list, expect: list, t: torch.Tensor) -> bool:
    """Sizes that differ only in how the trace wrote them: a guard learnt later made a
    symbolic expression equal to another (``chunks == 1``). Compared at the example's values."""
    if len(sizes) != len(expect):
        return False
    env = next((d.node.shape_env for d in t.shape if hasattr(d, "node")), None)
    hints = getattr(env, "backed_var_to_val", None) or getattr(env, "var_to_val", None) or {}
    for a, b in zip(sizes, expect):
        if a == b:
            continue
        if not (a.free_symbols or b.free_symbols) or not hints:
            return False
        try:
            if a.xreplace(hints) != b.xreplace(hints):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _unsupported(node, module: str, what: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"op {node.target} {what}: node `{node.format_node()}` in module "
        f"'{module or '<top level>'}'. prunegraph does not guess how an unknown op relates "
        "dimensions. Register a rule: `from prunegraph.ir.analysis import rule` and decorate "
        f"`def my_rule(ctx): ...` with `@rule({_op_expr(node.target)})`; see "
        "prunegraph/ir/analysis/rules.py for examples (return ctx.input(0) for ops that keep "
        "every dim)."
    )


def _op_expr(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        return f"torch.ops.{ns}.{name}.{target._overloadname or 'default'}"
    return repr(target)
