"""Dependency analysis: discover coupled channels, heads and experts from the graph itself.

``analyze(model)`` captures the model (``prunegraph.ir.capture``), propagates index spaces over every
node with the op-rule registry, and groups them::

    analysis = prunegraph.analyze(model)
    for g in analysis.prunable():
        print(g.name, g.kind, g.size, g.params_per_unit)

No architecture is hand-coded and no head count is asked for: GQA, fused projections and fused
MoE experts are read from the ops (``view`` factorises, ``expand``+``reshape`` replicates kv
heads, ``chunk``/``slice`` cut fused tensors, ``topk`` ids select expert slices).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from prunegraph.ir.analysis.grouping import build_groups
from prunegraph.ir.analysis.propagate import Propagation, propagate
from prunegraph.ir.analysis.registry import RuleContext, Value, registered_ops, rule
from prunegraph.ir.capture import Graph, capture
from prunegraph.ir.groups import Group

__all__ = ["Analysis", "analyze", "rule", "RuleContext", "Value", "registered_ops"]


@dataclass
class Analysis:
    """Groups found in a model, with the graph they were read from."""

    graph: Graph
    groups: list[Group]
    total_params: int
    model_class: str
    seconds: dict[str, float] = field(default_factory=dict)
    propagation: Propagation | None = None

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        from prunegraph.errors import nearest

        raise KeyError(f"no group named {name!r}.{nearest(name, [g.name for g in self.groups])}")

    def by_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def prunable_params(self) -> int:
        """Parameters that sit in at least one prunable group (each counted once)."""
        names = {m.param for g in self.prunable() for m in g.members}
        return sum(math.prod(self.graph.shapes[n]) for n in names)

    def to_dict(self) -> dict:
        prunable = self.prunable_params()
        return {
            "model_class": self.model_class,
            "total_params": self.total_params,
            "prunable_params": prunable,
            "fixed_params": self.total_params - prunable,
            "seconds": self.seconds,
            "groups": [g.to_dict() for g in self.groups],
        }


def analyze(model: torch.nn.Module, example_inputs: dict | None = None,
            graph: Graph | None = None) -> Analysis:
    """Capture ``model`` (unless ``graph`` is given) and discover its pruning groups.

    Raises:
        CaptureError: the model does not trace.
        UnsupportedOpError: an op touching parameter spaces has no rule (message says how to add one).
    """
    t0 = time.perf_counter()
    graph = graph or capture(model, example_inputs)
    t1 = time.perf_counter()
    prop = propagate(graph)
    groups = build_groups(graph, prop)
    t2 = time.perf_counter()
    total = sum(math.prod(s) for s in graph.shapes.values())
    return Analysis(graph, groups, total, graph.model_class,
                    {"capture": round(graph.seconds if graph.seconds else t1 - t0, 3),
                     "analysis": round(t2 - t1, 3)}, prop)
