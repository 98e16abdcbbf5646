"""The compiler's view of gates: the captured FX graph with a gate node at every group's site.

``prunegraph.plan.gating`` gates the user's ``nn.Module`` (the runtime view: ``generate()``, KV cache).
This module puts the same gates into the captured graph, so a user can print or draw where every
gate multiplies and run the gated graph directly::

    graph = prunegraph.ir.capture(model)
    gm = gated_graph(graph, analysis.prunable())
    print(gm.graph)            # ... %gate__model_layers_0_mlp_channels ... %gated_down_proj_weight
    gm.gates["model.layers.0.mlp:channels"][:10] = 0.0

Both views hold the same parameter tensors (``ExportedProgram.module()`` shares them), and a gate
is the same multiplier in both: the consumer slices of the group, expanded from per-unit values
with each member's index map. The experts' router-logit mask (a value of exactly 0 removes an
expert) lives only in the runtime view; here an expert gate scales its output.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from prunegraph.ir.capture import Graph
from prunegraph.ir.groups import Group, Member
from prunegraph.plan.gating import gate_shape

__all__ = ["gated_graph", "member_unit_index"]

aten = torch.ops.aten


def member_unit_index(member: Member, size: int, extent: int) -> torch.Tensor:
    """For each index along the member's dim, the unit that owns it (``size``: no unit)."""
    owner = torch.full((extent,), size, dtype=torch.long)
    for unit in range(size):
        owner[member.indices([unit])] = unit
    return owner


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def gated_graph(graph: Graph, groups: list[Group],
                values: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """A runnable copy of ``graph`` with gate nodes on every prunable group's consumer slices.

    Returns the unlifted ``GraphModule`` (parameters shared with the model) with a ``gates``
    dict attribute: group name -> the gate tensor the graph reads (edit it in place).
    """
    gm = graph.program.module()
    g = gm.graph
    alias_of = {a: canon for canon, names in graph.aliases.items() for a in names}
    attrs: dict[str, list[fx.Node]] = {}
    for node in g.nodes:
        if node.op == "get_attr":
            attrs.setdefault(alias_of.get(node.target, node.target), []).append(node)
    gates: dict[str, torch.Tensor] = {}
    one = torch.ones(1)
    for gi, group in enumerate(gr for gr in groups if gr.prunable):
        shape = gate_shape(group)
        value = (values or {}).get(group.name)
        gate = torch.ones(shape) if value is None else value.detach().clone().float()
        gates[group.name] = gate
        gname = f"gate__{_safe(group.name)}"
        gm.register_buffer(gname, gate)
        for mi, m in enumerate(group.gate_site):
            for pnode in attrs.get(m.param, []):
                p = graph.shapes[m.param]
                idx_name = f"{gname}__index{mi}"
                gm.register_buffer(idx_name, member_unit_index(m, group.size, p[m.dim]))
                ones_name = f"{gname}__one"
                if not hasattr(gm, ones_name):
                    gm.register_buffer(ones_name, one.expand(*shape[:-1], 1).clone())
                with g.inserting_after(pnode):
                    users = [u for u in pnode.users]
                    gnode = g.get_attr(gname)
                with g.inserting_after(gnode):
                    onode = g.get_attr(ones_name)
                with g.inserting_after(onode):
                    inode = g.get_attr(idx_name)
                with g.inserting_after(inode):
                    ext = g.call_function(aten.cat.default, ([gnode, onode], -1))
                with g.inserting_after(ext):
                    sel = g.call_function(aten.index_select.default, (ext, len(shape) - 1, inode))
                view_shape = [1] * len(p)
                view_shape[m.dim] = p[m.dim]
                last = sel
                if m.expert_dim is not None:
                    view_shape[m.expert_dim] = p[m.expert_dim]
                    if m.expert_dim > m.dim:
                        with g.inserting_after(last):
                            last = g.call_function(aten.transpose.int, (last, 0, 1))
                with g.inserting_after(last):
                    mult = g.call_function(aten.view.default, (last, view_shape))
                with g.inserting_after(mult):
                    gated = g.create_node("call_function", aten.mul.Tensor, (pnode, mult),
                                          name=f"gated_{_safe(m.param)}")
                for u in users:
                    u.replace_input_with(pnode, gated)
    g.lint()
    gm.recompile()
    gm.gates = {name: getattr(gm, f"gate__{_safe(name)}") for name in gates}
    return gm
