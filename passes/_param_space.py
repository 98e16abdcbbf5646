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


def _kept_mask_1d(member: Member, size: int, kept: torch.Tensor, length: int) -> torch.Tensor:
    mask = torch.ones(length, dtype=torch.bool)
    mask[member.indices(torch.arange(size))] = False
    if kept.numel():
        mask[member.indices(kept)] = True
    return mask


def _kept_mask_2d(member: Member, size: int, kept: torch.Tensor, length: int) -> torch.Tensor:
    """Per-expert kept mask ``[experts, length]``; ``kept`` is ``[experts, k]``."""
    mask = torch.ones(kept.shape[0], length, dtype=torch.bool)
    mask[:, member.indices(torch.arange(size))] = False
    inner = torch.arange(member.inner)
    idx = member.offset + (kept // member.div)[..., None] * member.step + inner
    mask.scatter_(1, idx.reshape(kept.shape[0], -1), True)
    return mask


def removed_params(groups: Iterable[Group], keep: Mapping[str, torch.Tensor],
                   space: ParamSpace) -> int:
    """Exact number of in-scope parameters removed when each group keeps ``keep[name]``.

    Overlaps are counted once (an expert removed whole and some of its channels removed too); a
    block shared by several units (``div > 1``) goes only when all of them go.
    """
    dim_masks: dict[str, dict[int, torch.Tensor]] = {}
    pair_masks: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for g in groups:
        if g.name not in keep:
            continue
        kept = torch.as_tensor(keep[g.name], dtype=torch.long)
        for m in g.members:
            name = space.canon.get(m.param, m.param)
            if name not in space.scope:
                continue
            shape = space.shapes[name]
            if m.expert_dim is None:
                units = torch.unique(kept) if kept.dim() == 2 else kept
                mask = _kept_mask_1d(m, g.size, units, shape[m.dim])
                masks = dim_masks.setdefault(name, {})
                masks[m.dim] = masks[m.dim] & mask if m.dim in masks else mask
                continue
            experts = shape[m.expert_dim]
            per_expert = kept if kept.dim() == 2 else kept.expand(experts, -1)
            mask = _kept_mask_2d(m, g.size, per_expert, shape[m.dim])
            pairs = pair_masks.setdefault(name, {})
            key = (m.expert_dim, m.dim)
            pairs[key] = pairs[key] & mask if key in pairs else mask
    removed = 0
    for name in set(dim_masks) | set(pair_masks):
        shape = space.shapes[name]
        removed += math.prod(shape) - _kept_numel(shape, dim_masks.get(name, {}),
                                                  pair_masks.get(name, {}))
    return int(removed)


def _kept_numel(shape, masks: dict[int, torch.Tensor], pairs: dict) -> int:
    if not pairs:
        return math.prod(int(masks[d].sum()) if d in masks else n for d, n in enumerate(shape))
    if len(pairs) == 1:
        (ed, d), m2 = next(iter(pairs.items()))
        if ed in masks:
            m2 = m2 & masks[ed][:, None]
        if d in masks:
            m2 = m2 & masks[d][None, :]
        rest = math.prod(int(masks[i].sum()) if i in masks else n
                         for i, n in enumerate(shape) if i not in (ed, d))
        return int(m2.sum()) * rest
    full = torch.ones(shape, dtype=torch.bool)  # rare: several per-expert dims on one tensor
    for d, m in masks.items():
        view = [1] * len(shape)
        view[d] = -1
        full &= m.view(view)
    for (ed, d), m2 in pairs.items():
        view = [1] * len(shape)
        view[ed], view[d] = m2.shape
        full &= (m2 if ed < d else m2.T).reshape(view)
    return int(full.sum())
