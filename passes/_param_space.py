"""Which parameters a budget counts, and exactly how many a choice of kept units removes.

``scope="decoder"`` counts the parameters under the model's decoder stack: the ``nn.ModuleList``
holding the most parameters (``model.layers`` in Llama/Qwen/Mistral, ``transformer.h`` in GPT-2).
Embeddings, ``lm_head`` and the final norm are outside it. ``scope="all"`` counts every parameter.
Tied parameters count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from prunegraph.errors import SpecError
from prunegraph.ir.groups import Group, Member
from prunegraph.ir.groups import removed_params as count_removed

__all__ = ["PARAM_SCOPES", "ParamSpace", "param_space", "decoder_stack", "removed_params",
           "member_index_cost"]

#: Which parameters a budget counts (see the module docstring); not the gate families'
#: constraint scopes (``global``/``group``, :data:`prunegraph.passes.gates.base.CONSTRAINT_SCOPES`).
PARAM_SCOPES = ("decoder", "all")


@dataclass(frozen=True)
class ParamSpace:
    """Shapes of every parameter and the set the budget counts.

    Attributes:
        shapes: canonical parameter name -> shape.
        canon: every name (tied aliases included) -> canonical name.
        scope: canonical names inside the budget's scope.
        total: number of parameters inside the scope.
    """

    shapes: dict[str, tuple[int, ...]]
    canon: dict[str, str]
    scope: frozenset[str]
    total: int

    def in_scope(self, name: str) -> bool:
        return self.canon.get(name, name) in self.scope

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.canon.get(name, name)]


def decoder_stack(model: nn.Module) -> str:
    """Qualified name of the ``nn.ModuleList`` holding the most parameters."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = name, n
    if best is None:
        raise SpecError(
            f"scope='decoder' needs a decoder stack (an nn.ModuleList of layers), and "
            f"{type(model).__name__} has none; use scope='all'."
        )
    return best


def param_space(model: nn.Module, scope: str = "decoder") -> ParamSpace:
    """Shapes and scope of ``model``'s parameters (works on the ``meta`` device)."""
    if scope not in PARAM_SCOPES:
        raise SpecError(f"unknown parameter scope '{scope}' (which parameters the budget "
                        f"counts); choose one of {', '.join(PARAM_SCOPES)}")
    first: dict[int, str] = {}
    shapes, canon = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".parametrizations." in name:  # a gated parameter: count it under its own name
            name = name.replace(".parametrizations.", ".").replace(".original", "")
        key = id(p)
        if key not in first:
            first[key] = name
            shapes[name] = tuple(p.shape)
        canon[name] = first[key]
    if scope == "all":
        names = set(shapes)
    else:
        prefix = decoder_stack(model) + "."
        names = {canon[n] for n in canon if n.startswith(prefix)}
    total = sum(math.prod(shapes[n]) for n in names)
    return ParamSpace(shapes, canon, frozenset(names), total)


def member_index_cost(member: Member, shape: tuple[int, ...]) -> float:
    """Parameters in one block of ``member`` (one index along ``dim`` is ``numel / shape[dim]``;
    a block is ``inner`` indices; per expert when the member has an ``expert_dim``)."""
    n = math.prod(shape) / shape[member.dim]
    if member.expert_dim is not None:
        n /= shape[member.expert_dim]
    return n * member.inner


def removed_params(groups: Iterable[Group], keep: Mapping[str, torch.Tensor],
                   space: ParamSpace) -> int:
    """Exact number of in-scope parameters removed when each group keeps ``keep[name]``
    (:func:`prunegraph.ir.groups.removed_params` over the space's canonical names)."""
    def canonical(name: str) -> str | None:
        name = space.canon.get(name, name)
        return name if name in space.scope else None

    selections = [(g, keep[g.name]) for g in groups if g.name in keep]
    shapes = {m.param: space.shape(m.param) for g, _ in selections for m in g.members
              if canonical(m.param) is not None}
    return count_removed(selections, shapes, key=canonical)
