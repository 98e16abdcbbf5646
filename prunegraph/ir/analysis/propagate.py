"""Dimension propagation: run every node's op rule over the captured graph.

The walk reads shapes from ``node.meta["val"]`` (torch.export's fake tensors) and never runs the
model. Parameters get one atom per dim; buffers, constants and anything computed from no
parameter get atoms that pin whatever they meet (a RoPE table pins head_dim); graph outputs pin
their dims (the vocabulary). Every rule's output is checked against the node's real shape, so a
wrong rule fails loudly in tests instead of producing a wrong group.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

import prunegraph.ir.analysis.rules  # noqa: F401  (registers the built-in rules)
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


@dataclass
class Propagation:
    """The result of the walk: the union-find and what every parameter dim maps to."""

    spaces: Spaces
    param_atoms: dict[str, list[int]]
    roles: dict[Origin, set[str]] = field(default_factory=lambda: defaultdict(set))
    values: dict[str, object] = field(default_factory=dict)
    unruled: list[str] = field(default_factory=list)


def _tensor_shape(val):
    return list(val.shape) if isinstance(val, torch.Tensor) else None


def _all_token_dims(spaces: Spaces, v: Value) -> bool:
    return all(spaces.static_size(a) in (None, 1) for a in v.atoms)


def propagate(graph: Graph) -> Propagation:
    """Walk ``graph`` once, applying op rules; return the spaces of every parameter dim.

    Raises:
        UnsupportedOpError: a node that touches parameter spaces has no rule.
    """
    spaces = Spaces()
    values: dict[str, object] = {}
    param_atoms: dict[str, list[int]] = {}
    roles: dict[Origin, set[str]] = defaultdict(set)
    unruled: list[str] = []

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
        values[node.name] = _apply(node, graph, spaces, values, record_use, unruled)
    return Propagation(spaces, param_atoms, roles, values, unruled)


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


def _apply(node, graph: Graph, spaces: Spaces, values, record_use, unruled):
    ins = _inputs(node, values)
    param_dep = any(v.param_dep for v in ins)
    module = module_path(node)
    target = node.target
    fn = get_rule(target) if not isinstance(target, torch._ops.HigherOrderOperator) else None
    if fn is None:
        if not param_dep:
            # computed from buffers, constants or input data only: its dims pin what they meet
            where = f"{node.name} in {module or 'the model'}"
            return _fresh_outputs(node, spaces, f"computed from no parameter ({where})")
        if all(_all_token_dims(spaces, v) and v.value_space is None for v in ins):
            unruled.append(str(target))
            return _fresh_outputs(node, spaces, None)
        raise _unsupported(node, module, "has no dimension rule")
    ctx = RuleContext(node, spaces, values, module, record_use)
    try:
        result = fn(ctx)
    except Conflict as e:
        for v in ins:
            for a in v.atoms:
                spaces.pin(a, f"layouts that cannot be aligned at {node.name} ({e})")
        return _fresh_outputs(node, spaces, f"layouts that cannot be aligned at {node.name}")
    except (NotImplementedError, TypeError, IndexError, KeyError) as e:
        raise _unsupported(node, module, f"is used in a form its rule does not handle ({e})") from e
    _check_shapes(node, result, spaces, module)
    if isinstance(result, Value):
        result.param_dep = result.param_dep or param_dep
    return result


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
        if sizes != expect:
            raise UnsupportedOpError(
                f"the dimension rule for {node.target} ({rule_source(node.target)}) produced "
                f"spaces of sizes {sizes} for node {node.name} in {module or 'the model'}, whose "
                f"shape is {expect}. This is a bug in that rule: please report it with the model."
            )


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
