"""Gated MLPs, found in the captured graph and the groups rather than by module names.

A gated MLP computes ``down(act(x @ Wg^T) * (x @ Wu^T))``. It is found where two views agree:

* **the groups**: a channels group (``channels`` or ``shared_expert_channels``) whose producers
  are the rows of two linear weights, or two row ranges of one fused weight (Phi-3's
  ``gate_up_proj``), and whose one consumer is the columns of a linear weight;
* **the graph**: the two producers' linears read the same input, their outputs (sliced, for a
  fused weight) meet in one ``mul(act(a), b)``, and that product is the consumer linear's input.
  The activation is read from the ATen op (``silu``, ``gelu``, ``gelu_tanh``, ``relu``); the
  producer on the activation's side is the gate.

The graph alone decides what is computed; a group that covers the product names it and must
agree, and a channels group that is no gated MLP is reported with the reason. A product that no
group covers is still found (a pruned width of 1, which the analysis takes for a broadcast dim).
So Llama, Mistral, Qwen, Gemma (a gelu-tanh gate), Phi-3 (a fused ``gate_up_proj``) and
Qwen2-MoE's shared expert are found whatever their modules are called, and a plain MLP is
reported as not gated::

    found = find_gated_mlps(analysis.graph, analysis.groups)   # or gated_mlps(model)
    found.mlps[0]
    # GatedMLP(group='model.layers.0.mlp:channels', gate=Rows('model.layers.0.mlp.gate_up_proj
    #          .weight', 0, 96), up=Rows('...gate_up_proj.weight', 96, 96), down='...down_proj
    #          .weight', activation='silu', hidden=64, intermediate=96, bias=False,
    #          module='model.layers.0.mlp')
    found.not_gated
    # {'transformer.h.0.mlp:channels': 'not a gated MLP: one producer (...c_fc.weight) ...'}

``module`` is the innermost module whose forward computes exactly the pattern, from its input
``x`` to the down projection's output (so its forward can be replaced by a kernel), or ``None``
with ``module_reason`` saying what else it computes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from prunegraph.ir.capture import Graph
from prunegraph.ir.groups import Group

__all__ = ["Rows", "GatedMLP", "GatedMLPs", "find_gated_mlps", "gated_mlps"]

aten = torch.ops.aten

#: Group kinds whose units are MLP channels.
_CHANNEL_KINDS = ("channels", "shared_expert_channels", "expert_channels")
#: Ops that move values without computing them (``dropout`` only with ``train=False``).
_PASSTHROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.contiguous.default, aten.clone.default, aten.alias.default,
                aten.dropout.default}
_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
_SHAPE_ONLY = {aten.sym_size.int}


def _activation(node: fx.Node) -> str | None:
    """The activation a node applies elementwise, by its ATen op (None: not one)."""
    if node.target in (aten.silu.default, aten.silu_.default):
        return "silu"
    if node.target in (aten.relu.default, aten.relu_.default):
        return "relu"
    if node.target is aten.gelu.default:
        default = node.args[1] if len(node.args) > 1 else "none"
        approximate = node.kwargs.get("approximate", default)
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    return None


@dataclass(frozen=True)
class Rows:
    """Rows ``[offset, offset + size)`` of a 2-D weight in ``nn.Linear`` layout ``[out, in]``."""

    param: str
    offset: int
    size: int


@dataclass(frozen=True)
class GatedMLP:
    """One gated MLP: ``down(act(x @ gate^T) * (x @ up^T))``.

    Attributes:
        group: the channels group whose units are its intermediate channels (None where the
            analysis made none: a width of 1 is a broadcast dim to it).
        gate, up: the weight rows producing the gate and the up projection.
        down: the consumer weight (``[hidden, intermediate]``).
        activation: ``silu``, ``gelu``, ``gelu_tanh`` or ``relu``.
        hidden, intermediate: widths, as captured.
        bias: whether any of the three linears adds a bias.
        module: the module whose forward is exactly this MLP, or None (see ``module_reason``).
    """

    group: str | None
    gate: Rows
    up: Rows
    down: str
    activation: str
    hidden: int
    intermediate: int
    bias: bool
    module: str | None
    module_reason: str = ""

    def weight_reader(self, mlp: nn.Module) -> Callable[[], tuple[torch.Tensor, ...]]:
        """A function returning the live ``(gate, up, down)`` weights, read through ``mlp`` (the
        module at ``self.module``) at every call, so moved or cast weights are seen."""
        if self.module is None:
            raise ValueError(f"{self.down}: no module computes this MLP alone "
                             f"({self.module_reason})")
        readers = [_reader(mlp, self.module, r.param, r.offset, r.size)
                   for r in (self.gate, self.up)]
        readers.append(_reader(mlp, self.module, self.down, 0, None))
        return lambda: tuple(read() for read in readers)


def _reader(mlp: nn.Module, module: str, param: str, offset: int, size: int | None):
    owner_path, _, attr = param[len(module) + 1:].rpartition(".")
    owner = mlp.get_submodule(owner_path) if owner_path else mlp
    if size is None:
        return lambda: getattr(owner, attr)

    def read() -> torch.Tensor:
        w = getattr(owner, attr)
        return w if offset == 0 and size == w.shape[0] else w.narrow(0, offset, size)

    return read


@dataclass
class GatedMLPs:
    """What :func:`find_gated_mlps` found: the gated MLPs, and each channels group that is not
    one with the reason."""

    mlps: list[GatedMLP] = field(default_factory=list)
    not_gated: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ graph


@dataclass
class _Side:
    """One input of the product traced back to its linear."""

    rows: Rows
    activation: str | None
    x: object  # the linear's input node
    bias: bool
    nodes: list[fx.Node]


def _width(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    try:
        return int(val.shape[-1])
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def _last_dim(node: fx.Node, dim: int) -> bool:
    val = node.meta.get("val")
    ndim = getattr(val, "ndim", None)
    return ndim is not None and dim in (-1, ndim - 1)


def _piece_start(split: fx.Node, index: int) -> int | None:
    """Where piece ``index`` of a chunk/split along the last dim starts (None: another dim)."""
    src, args = split.args[0], split.args[1:]
    dim = args[1] if len(args) > 1 else split.kwargs.get("dim", 0)
    if not _last_dim(src, dim):
        return None
    if split.target is aten.chunk.default:
        n = _width(src)
        return None if n is None else index * math.ceil(n / args[0])
    if split.target is aten.split.Tensor:
        return index * args[0]
    return sum(args[0][:index])


def _side(graph: Graph, node: object) -> _Side | None:
    """Walk back from a product input through views, slices and at most one activation to a
    linear whose weight is a parameter; None if the path holds anything else."""
    width = _width(node) if isinstance(node, fx.Node) else None
    act, offset, nodes, cur = None, 0, [], node
    while isinstance(cur, fx.Node) and cur.op == "call_function" and width is not None:
        nodes.append(cur)
        name = _activation(cur)
        if name is not None:
            if act is not None:
                return None
            act, cur = name, cur.args[0]
        elif cur.target in _PASSTHROUGH:
            if cur.target is aten.dropout.default and cur.args[2:3] != (False,):
                return None
            cur = cur.args[0]
        elif cur.target is operator.getitem and getattr(cur.args[0], "target", None) in _SPLITS:
            start = _piece_start(cur.args[0], cur.args[1])
            if start is None:
                return None
            nodes.append(cur.args[0])
            offset, cur = offset + start, cur.args[0].args[0]
        elif cur.target is aten.slice.Tensor:
            dim, start = (list(cur.args[1:3]) + [0, 0])[:2]
            step = cur.args[4] if len(cur.args) > 4 else 1
            if not _last_dim(cur.args[0], dim) or step != 1 or not isinstance(start, int):
                return None
            offset, cur = offset + start, cur.args[0]
        elif cur.target is aten.linear.default:
            weight = cur.args[1]
            param = graph.param_of(weight.name) if isinstance(weight, fx.Node) else None
            if param is None or len(graph.shapes.get(param, ())) != 2:
                return None
            bias = len(cur.args) > 2 and cur.args[2] is not None
            return _Side(Rows(param, offset, width), act, cur.args[0], bias, nodes)
        else:
            return None
    return None


def _down(graph: Graph, product: fx.Node) -> tuple[str, fx.Node, list[fx.Node]] | None:
    """The linear that alone consumes the product (through views): its weight, node, path."""
    cur, nodes = product, []
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.op != "call_function" or not user.args or user.args[0] is not cur:
            return None
        if user.target is aten.linear.default:
            weight = user.args[1]
            param = graph.param_of(weight.name) if isinstance(weight, fx.Node) else None
            return (param, user, nodes) if param is not None else None
        if user.target not in _PASSTHROUGH:
            return None
        nodes.append(user)
        cur = user
    return None


@dataclass
class _Product:
    gate: _Side
    up: _Side
    mul: fx.Node
    down: str
    down_node: fx.Node
    nodes: list[fx.Node]


def _products(graph: Graph) -> dict[frozenset, _Product]:
    """Every ``mul(act(linear_a(x)), linear_b(x))`` consumed by one linear, by its producers."""
    found = {}
    for node in graph.fx.find_nodes(op="call_function", target=aten.mul.Tensor):
        a, b = node.args[:2]
        sides = [_side(graph, a), _side(graph, b)]
        if None in sides or (sides[0].activation is None) == (sides[1].activation is None):
            continue
        gate, up = sides if sides[0].activation else sides[::-1]
        if gate.x is not up.x or gate.rows.size != up.rows.size:
            continue
        down = _down(graph, node)
        if down is None:
            continue
        param, down_node, path = down
        nodes = gate.nodes + up.nodes + [node] + path + [down_node]
        key = frozenset({(gate.rows.param, gate.rows.offset), (up.rows.param, up.rows.offset)})
        found[key] = _Product(gate, up, node, param, down_node, nodes)
    return found


def _stack(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _module(graph: Graph, p: _Product) -> tuple[str | None, str]:
    """The innermost module whose forward is exactly the product's MLP, or why there is none."""
    stacks = [_stack(n) for n in p.nodes]
    common = []
    for paths in zip(*stacks):
        if len(set(paths)) != 1:
            break
        common.append(paths[0])
    module = common[-1] if common else ""
    if not module:
        return None, "its ops are not inside one submodule of the model"
    mine = {id(n) for n in p.nodes}
    extra = [n for n in graph.fx.nodes if n.op == "call_function" and id(n) not in mine
             and n.target not in _SHAPE_ONLY and module in _stack(n)]
    if extra:
        return None, (f"{module} computes more than the gated MLP ({extra[0].name}: "
                      f"{extra[0].target})")
    params = (p.gate.rows.param, p.up.rows.param, p.down)
    outside = [q for q in params if not q.startswith(module + ".")]
    if outside:
        return None, f"{outside[0]} is not a parameter of {module}"
    return module, ""


# ----------------------------------------------------------------------------------- groups


def _not_gated(group: Group) -> str | None:
    """Why a channels group cannot be a gated MLP, from its members' roles (None: it can)."""
    if group.kind == "expert_channels":
        return ("channels of routed experts (fused 3-D expert weights), not a dense MLP")
    producers = [m for m in group.members if m.role == "producer"]
    consumers = [m for m in group.members if m.role == "consumer"]
    if len(producers) == 1:
        return (f"not a gated MLP: one producer ({producers[0].param}) feeds the consumer "
                f"through act(x) alone, with no act(a) * b product")
    if len(producers) != 2 or len(consumers) != 1:
        return (f"not a gated MLP: {len(producers)} producers and {len(consumers)} consumers "
                f"(a gated MLP has two, gate and up, and one, down)")
    if any(m.dim != 0 or m.inner != 1 for m in producers) or consumers[0].dim != 1:
        return "not a gated MLP in nn.Linear layout (producers' rows, consumer's columns)"
    return None


def find_gated_mlps(graph: Graph, groups: Sequence[Group]) -> GatedMLPs:
    """The gated MLPs of a captured model (see the module docstring), in graph order."""
    products = _products(graph)
    group_of: dict[frozenset, str] = {}
    out = GatedMLPs()
    for group in groups:
        if group.kind not in _CHANNEL_KINDS:
            continue
        producers = [m for m in group.members if m.role == "producer"]
        key = frozenset((m.param, m.offset) for m in producers)
        reason = _not_gated(group)
        p = products.get(key)
        if reason is None:
            consumer = next(m for m in group.members if m.role == "consumer")
            if p is None or p.down != consumer.param or p.gate.rows.size != group.size:
                names = " and ".join(f"{m.param}[{m.offset}:]" for m in producers)
                reason = (f"not a gated MLP: the outputs of {names} do not meet in act(a) * b "
                          f"consumed by {consumer.param}")
        if reason is not None:
            out.not_gated[group.name] = reason
            products.pop(key, None)
        else:
            group_of[key] = group.name
    for key, p in products.items():  # a product no group covers is still one (width 1)
        module, why = _module(graph, p)
        down_bias = len(p.down_node.args) > 2 and p.down_node.args[2] is not None
        out.mlps.append(GatedMLP(
            group=group_of.get(key), gate=p.gate.rows, up=p.up.rows, down=p.down,
            activation=p.gate.activation, hidden=graph.shapes[p.down][0],
            intermediate=p.gate.rows.size, bias=p.gate.bias or p.up.bias or down_bias,
            module=module, module_reason=why))
    return out


def gated_mlps(model: nn.Module) -> GatedMLPs:
    """Capture and analyse ``model`` (as it is now, pruned widths included) and find its gated
    MLPs."""
    from prunegraph.ir.analysis import analyze

    analysis = analyze(model)
    return find_gated_mlps(analysis.graph, analysis.groups)
