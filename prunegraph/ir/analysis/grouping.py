"""From index spaces to groups: which parameter slices make one prunable unit.

Every parameter dim is a space made of segments (``cat``) of factors (``prod``). A *unit chain*
is a run of factors that always appear together, outer first: GQA's query heads are
``[kv_head, q_in_group]`` in ``q_proj``/``o_proj``, and ``k_proj``/``v_proj`` carry only the
``kv_head`` prefix (so a kv slice serves several query heads: ``Member.div``). Factors after the
chain form the unit's contiguous block (``head_dim``). A chain that starts with a pinned factor,
or is not outermost in its dim, is not prunable.

Kinds are read from structure, never from module names: a space chosen by ``topk`` is
``experts``; a space in fused tensors that also carry an experts dim is ``expert_channels``;
units with a block (head_dim) are ``heads``; the space the token embedding writes is ``hidden``;
other free spaces are ``channels`` (``shared_expert_channels`` beside an experts group).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from prunegraph.ir.analysis.propagate import Propagation
from prunegraph.ir.capture import Graph
from prunegraph.ir.groups import Constraints, Group, Member, MemberRole

__all__ = ["build_groups"]

_ROLE_ORDER: tuple[MemberRole, ...] = ("router", "consumer", "producer", "norm", "bias")


@dataclass
class _Occurrence:
    param: str
    dim: int
    offset: int
    factors: list[int]


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for comps in zip(*parts):
        if all(c == comps[0] for c in comps):
            out.append(comps[0])
        else:
            break
    return ".".join(out)


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)(?:\.|:|$)", name)
    return int(m.group(1)) if m else None


def build_groups(graph: Graph, prop: Propagation, notes: list[str] | None = None) -> list[Group]:
    """Turn the propagated spaces into :class:`Group` objects (prunable and pinned).

    A free space that no member reads as an input has no gate site: its parameters are unused
    by the traced forward (an encoder's or a cross-attention's, when an encoder-decoder model
    runs as a causal LM) or only written. It is left out, with a line in ``notes``.
    """
    notes = notes if notes is not None else []
    used = {graph.param_of(n.name) for n in graph.fx.nodes if n.op == "placeholder" and n.users}
    unused_left_out: list[str] = []
    sp = prop.spaces
    occurrences: dict[int, list[_Occurrence]] = defaultdict(list)  # leaf factor -> where
    all_occ: list[_Occurrence] = []
    for param, atoms in prop.param_atoms.items():
        for dim, atom in enumerate(atoms):
            offset = 0
            for seg in sp.segments(atom):
                facs = sp.factors(seg)
                occ = _Occurrence(param, dim, offset, facs)
                all_occ.append(occ)
                for f in facs:
                    occurrences[sp.find(f)].append(occ)
                offset += int(sp.size(seg)) if sp.static_size(seg) is not None else 0

    # nesting: factor B always directly follows factor A => B is the inner part of A's unit
    preds: dict[int, set] = defaultdict(set)
    for occ in all_occ:
        prev = None
        for f in occ.factors:
            f = sp.find(f)
            preds[f].add(prev)
            prev = f
    def free(a: int) -> bool:
        return sp.pinned(a) is None and sp.static_size(a) is not None
    nested_under: dict[int, int] = {}
    for f, ps in preds.items():
        if len(ps) == 1:
            (p,) = ps
            # only replicated axes nest (GQA: query heads = kv heads x replicas)
            if p is not None and free(p) and free(f) and "replica" in sp.flags(f):
                nested_under[f] = p
    children: dict[int, list[int]] = defaultdict(list)
    for f, p in nested_under.items():
        children[p].append(f)

    def chain_of(head: int) -> list[int]:
        chain = [head]
        while len(children.get(chain[-1], [])) == 1:
            chain.append(children[chain[-1]][0])
        return chain

    expert_heads = {sp.find(a) for a in occurrences if sp.routed(a) and free(a)}
    groups: list[Group] = []
    used_inner: set[int] = set()
    pending_pinned: list[int] = []
    for head in occurrences:
        if head in nested_under:
            continue
        if not free(head):
            pending_pinned.append(head)
            continue
        chain = chain_of(head)
        if math.prod(sp.known_size(c) for c in chain) <= 1:
            continue
        group = _make_group(graph, prop, head, chain, occurrences[head], expert_heads)
        if group is None:
            continue
        if not group.gate_site:
            params = sorted({m.param for m in group.members})
            if all(p not in used for p in params):
                unused_left_out.extend(params)
            else:
                notes.append(f"left out a space of {group.size} units in {', '.join(params[:3])}"
                             f"{' ...' if len(params) > 3 else ''}: no parameter reads it as an "
                             f"input in the traced forward, so no gate can be placed")
            continue
        groups.append(group)
        for occ in occurrences[head]:
            facs = [sp.find(f) for f in occ.factors]
            k = facs.index(head)
            used_inner.update(facs[k + 1:])
    for head in pending_pinned:
        if head in used_inner:
            continue  # a head_dim: reported as the constraint of its heads group
        group = _make_pinned_group(graph, prop, head, occurrences[head])
        if group is not None:
            groups.append(group)
    if unused_left_out:
        names = sorted(set(unused_left_out))
        notes.append(f"{len(names)} parameters are not used by the traced forward (an encoder's or "
                     f"cross-attention's in a model run as a causal LM): left out of every group "
                     f"(e.g. {', '.join(names[:3])})")
    _name_groups(groups)
    return groups


def _role(prop: Propagation, param: str, dim: int, graph: Graph) -> MemberRole:
    roles = prop.roles.get((param, dim), set())
    for r in _ROLE_ORDER:
        if r in roles:
            return r
    if len(graph.shapes.get(param, ())) == 1:
        return "norm"
    return "producer"


def _make_group(graph: Graph, prop: Propagation, head: int, chain: list[int],
                occs: list[_Occurrence], expert_heads: set[int]) -> Group | None:
    sp = prop.spaces
    sizes = [sp.known_size(c) for c in chain]  # a chain is free atoms only: static sizes
    size = math.prod(sizes)
    members: list[Member] = []
    blocks: list[int] = []
    experts = None
    topk = None
    is_experts = head in expert_heads
    if is_experts:
        topk = int(sp.flags(head)["topk"])
    for occ in occs:
        facs = [sp.find(f) for f in occ.factors]
        k = facs.index(head)
        outer = math.prod(sp.static_size(f) or 0 for f in facs[:k]) if k else 1
        run = 1
        while run < len(chain) and k + run < len(facs) and facs[k + run] == chain[run]:
            run += 1
        rest = facs[k + run:]
        inner_sizes = [s for f in rest if (s := sp.static_size(f)) is not None]
        if outer != 1 or len(inner_sizes) < len(rest):
            return None  # the unit is not outermost in this dim: not representable as slices
        inner = math.prod(inner_sizes) if inner_sizes else 1
        div = math.prod(sizes[run:]) if run < len(chain) else 1
        role = _role(prop, occ.param, occ.dim, graph)
        expert_dim = None
        if not is_experts:
            pshape = prop.param_atoms[occ.param]
            for d2, a2 in enumerate(pshape):
                if d2 != occ.dim and sp.find(a2) in expert_heads:
                    expert_dim = d2
                    experts = sp.static_size(a2)
                    topk = int(sp.flags(a2)["topk"])
        members.append(Member(occ.param, occ.dim, occ.offset, inner, None, div, role, expert_dim))
        blocks.append(inner)
    if not members:
        return None
    if experts is not None and any(m.expert_dim is None for m in members):
        # the space also lives outside the expert tensors (a hidden size the experts share):
        # one unit spans every expert, it is not chosen per expert
        members = [Member(m.param, m.dim, m.offset, m.inner, m.stride, m.div, m.role, None)
                   for m in members]
        experts = topk = None
    if is_experts:
        members = _expert_roles(graph, prop, members)
        kind = "experts"
    elif experts is not None:
        kind = "expert_channels"
    elif "embedding" in sp.flags(head):
        kind = "hidden"
    elif max(blocks) > 1:
        kind = "heads"
    else:
        kind = "channels"
    head_dim = max(blocks) if kind == "heads" else None
    kv_heads = sizes[0]
    q_per_kv = math.prod(sizes[1:]) if len(sizes) > 1 else 1
    if "replica" in sp.flags(head) and len(sizes) == 1:
        # query heads that are copies of one broadcast kv head (MQA through expand)
        kv_heads, q_per_kv = 1, sizes[0]
    constraints = Constraints(
        kv_heads=kv_heads if kind == "heads" else None,
        q_per_kv=q_per_kv if kind == "heads" else None,
        head_dim=head_dim,
        experts=experts if kind == "expert_channels" else None,
        min_units=max(1, topk or 1) if kind == "experts" else 1,
        removal="mask_logit" if kind == "experts" else "zero",
    )
    group = Group(name="", kind=kind, size=size, members=members, constraints=constraints)
    _costs(graph, group, experts, topk)
    if kind == "experts":
        routers = [m.param for m in members if m.role == "router"]
        group.router = routers[0] if routers else None
    return group


def _expert_roles(graph: Graph, prop: Propagation, members: list[Member]) -> list[Member]:
    """Router rows score experts; expert tensors read by the output projection consume them."""
    sp = prop.spaces
    out = []
    for m in members:
        shape = graph.shapes[m.param]
        role = m.role
        if len(shape) == 2:
            role = "router"
        elif len(shape) == 3:
            # the expert tensor whose contracted dim is an expert-internal space writes the output
            consumed = [d for d in range(3) if d != m.dim and "consumer" in prop.roles.get((m.param, d), ())]
            reads_hidden = any("embedding" in sp.flags(prop.param_atoms[m.param][d]) for d in consumed)
            role = "producer" if reads_hidden else "consumer"
        out.append(Member(m.param, m.dim, m.offset, m.inner, m.stride, m.div, role, m.expert_dim))
    return out


def _costs(graph: Graph, group: Group, experts: int | None, topk: int | None) -> None:
    params = 0.0
    for m in group.members:
        shape = graph.shapes[m.param]
        numel = math.prod(shape)
        per = numel / shape[m.dim] * m.inner / m.div
        if m.expert_dim is not None:
            per /= shape[m.expert_dim]
        params += per
    group.params_per_unit = params
    routed = 1.0
    if topk and group.kind == "experts":
        routed = topk / group.size
    elif topk and group.kind == "expert_channels" and experts is not None:
        routed = topk / experts
    router_params = sum(math.prod(graph.shapes[m.param]) / graph.shapes[m.param][m.dim]
                        for m in group.members if m.role == "router")
    group.flops_per_unit = 2.0 * ((params - router_params) * routed + router_params)


def _make_pinned_group(graph: Graph, prop: Propagation, head: int,
                       occs: list[_Occurrence]) -> Group | None:
    sp = prop.spaces
    size = sp.static_size(head)
    if size is None or size <= 1:
        return None
    members = []
    for occ in occs:
        facs = [sp.find(f) for f in occ.factors]
        k = facs.index(head)
        inner = math.prod(sp.static_size(f) or 1 for f in facs[k + 1:])
        members.append(Member(occ.param, occ.dim, occ.offset, inner, None, 1,
                              _role(prop, occ.param, occ.dim, graph)))
    flags = sp.flags(head)
    reason = flags.get("pinned", "")
    if "embedding" in flags:
        kind = "hidden"
    elif "token ids" in reason or reason.startswith("model output"):
        kind = "vocab"
    else:
        return None  # pieces of head_dim, RoPE tables: nothing a user prunes or needs listed
    group = Group(name="", kind=kind, size=size, members=members,
                  constraints=Constraints(pinned=True, pinned_reason=reason))
    _costs(graph, group, None, None)
    return group


def _name_groups(groups: list[Group]) -> None:
    experts_parents = set()
    for g in groups:
        prefix = _common_prefix([_module_of(m.param) for m in g.members])
        g.name = f"{prefix}:{g.kind}" if prefix and g.kind != "hidden" else g.kind
        g.layer = _layer_index(prefix) if prefix else None
        if g.kind == "experts":
            experts_parents.add(prefix)
    for g in groups:
        if g.kind == "channels":
            prefix = g.name.rsplit(":", 1)[0]
            parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
            if parent in experts_parents or prefix in experts_parents:
                g.kind = "shared_expert_channels"
                g.name = f"{prefix}:{g.kind}"
    seen: dict[str, int] = defaultdict(int)
    for g in groups:
        seen[g.name] += 1
        if seen[g.name] > 1:
            g.name = f"{g.name}#{seen[g.name]}"
