"""Groups: sets of parameter slices that must shrink together.

A :class:`Group` is what the analysis (``prunegraph.ir.analysis``) hands to every later stage. It is
plain, serialisable data: a name, a kind, a number of *units*, and the :class:`Member` slices of
parameters that belong to each unit.

Worked example (SmolLM2 layer 3 attention, 9 query heads in 3 kv groups, head_dim 64)::

    Group(name="model.layers.3.self_attn:heads", kind="heads", size=9,
          members=[Member("model.layers.3.self_attn.q_proj.weight", dim=0, inner=64),
                   Member("model.layers.3.self_attn.k_proj.weight", dim=0, inner=64, div=3),
                   Member("model.layers.3.self_attn.v_proj.weight", dim=0, inner=64, div=3),
                   Member("model.layers.3.self_attn.o_proj.weight", dim=1, inner=64,
                          role="consumer")],
          constraints=Constraints(kv_heads=3, head_dim=64, ...))

Unit ``u`` (a query head) owns, in member ``m``, the indices
``m.offset + (u // m.div) * m.stride + i`` for ``i in range(m.inner)`` along ``m.dim``.
``div > 1`` means several units share one slice (a kv head serves ``div`` query heads): that slice
goes only when all of its units go. ``expert_dim`` marks members whose units are chosen separately
for every index of another dim (per-expert channels of a fused ``[E, I, H]`` tensor).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["Member", "Constraints", "Group", "GroupKind", "MemberRole", "kept_masks",
           "kept_numel", "removed_params"]

GroupKind = Literal[
    "hidden", "channels", "heads", "experts", "expert_channels", "shared_expert_channels",
    "head_dim", "other",
]
MemberRole = Literal["producer", "consumer", "norm", "router", "bias"]


@dataclass(frozen=True)
class Member:
    """One parameter slice pattern that belongs to a group.

    Attributes:
        param: qualified parameter name in the user's module (``model.layers.0.mlp.up_proj.weight``).
        dim: the parameter dim the group's units index.
        offset: first index of the sub-range (fused ``qkv_proj`` / ``gate_up_proj``).
        inner: contiguous indices per unit (``head_dim`` for heads, 1 for channels).
        stride: distance between consecutive units' blocks (``inner`` unless interleaved).
        div: how many units share one block (query heads per kv head for k/v members).
        role: ``producer`` writes the unit (output rows), ``consumer`` reads it (input columns,
            where a gate can be folded), ``norm`` scales it elementwise, ``router`` scores it
            (removal masks its logit instead of zeroing), ``bias`` adds to it.
        expert_dim: the param dim that indexes experts, when the units are per expert.
    """

    param: str
    dim: int
    offset: int = 0
    inner: int = 1
    stride: int | None = None
    div: int = 1
    role: MemberRole = "producer"
    expert_dim: int | None = None

    @property
    def step(self) -> int:
        return self.inner if self.stride is None else self.stride

    def blocks(self, size: int) -> int:
        """Number of distinct blocks for a group of ``size`` units."""
        return size // self.div

    def block_positions(self, size: int) -> torch.Tensor:
        """``[size // div, inner]``: the indices along ``dim`` of each block, in block order.

        This is the one place where units become indices; every other map is derived from it."""
        blocks = torch.arange(size // self.div, dtype=torch.long)
        return self.offset + blocks[:, None] * self.step + torch.arange(self.inner)[None, :]

    def unit_positions(self, size: int) -> torch.Tensor:
        """``[size, inner]``: the indices of each unit's block (a shared block repeats)."""
        return self.block_positions(size)[torch.arange(size) // self.div]

    def indices(self, units: torch.Tensor | list[int] | range) -> torch.Tensor:
        """Indices along ``dim`` owned by ``units`` (deduplicated for ``div > 1``, sorted)."""
        units = torch.as_tensor(units, dtype=torch.long)
        size = (int(units.max()) // self.div + 1) * self.div if units.numel() else 0
        return self.block_positions(size)[torch.unique(units // self.div)].reshape(-1)

    def covered(self, size: int) -> torch.Tensor:
        """Every index along ``dim`` that the group's ``size`` units own."""
        return self.block_positions(size).reshape(-1)

    def unit_index(self, size: int, extent: int) -> torch.Tensor:
        """For each of ``extent`` indices along ``dim``, the block that owns it, as the first
        unit of the block (``size`` where no unit does)."""
        owner = torch.full((extent,), size, dtype=torch.long)
        pos = self.block_positions(size)
        owner[pos.reshape(-1)] = (torch.arange(pos.shape[0]) * self.div).repeat_interleave(self.inner)
        return owner

    def kept_mask(self, size: int, kept: torch.Tensor, length: int) -> torch.Tensor:
        """Which of ``length`` indices along ``dim`` survive when the group keeps ``kept``.

        Indices the group does not cover are kept. ``kept`` is ``[k]`` (a ``[length]`` mask) or,
        per expert, ``[experts, k]`` (an ``[experts, length]`` mask). A block shared by ``div``
        units stays while any of them is kept."""
        kept = torch.as_tensor(kept, dtype=torch.long)
        rows = () if kept.dim() == 1 else (kept.shape[0],)
        mask = torch.ones(*rows, length, dtype=torch.bool)
        mask[..., self.covered(size)] = False
        if kept.numel() == 0:
            return mask
        if kept.dim() == 1:
            mask[self.indices(kept)] = True
        else:
            idx = self.block_positions(size)[kept // self.div]
            mask.scatter_(1, idx.reshape(kept.shape[0], -1), True)
        return mask

    def extent(self, size: int) -> int:
        """Number of indices along ``dim`` that the group covers."""
        return self.blocks(size) * self.inner

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Member:
        return cls(**data)


@dataclass(frozen=True)
class Constraints:
    """What finalize must respect when it chooses units to keep.

    Attributes:
        pinned: the group must not shrink; ``pinned_reason`` says why.
        kv_heads: number of kv heads (attention groups); units are ``kv_heads * q_per_kv``.
        q_per_kv: query heads per kv head. A kv head goes only with all its query heads, and
            kept query heads per kv head stay equal within a layer (``repeat_kv`` needs it).
        head_dim: elements per head, pinned (RoPE, QK-norm, attention scale).
        experts: number of experts for per-expert channel groups (units chosen per expert,
            equal count in every expert so fused ``[E, I, H]`` tensors stay dense).
        min_units: minimum units kept (top-k routing needs at least k experts).
        round_to: kept counts are rounded to a multiple of this where possible.
        removal: ``zero`` (removing a unit equals zeroing it at the gate site) or ``mask_logit``
            (routed units: removing an expert masks its router logit to -inf).
    """

    pinned: bool = False
    pinned_reason: str = ""
    kv_heads: int | None = None
    q_per_kv: int | None = None
    head_dim: int | None = None
    experts: int | None = None
    min_units: int = 1
    round_to: int = 1
    removal: Literal["zero", "mask_logit"] = "zero"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Constraints:
        return cls(**data)


@dataclass
class Group:
    """Units that must be removed together, with every parameter slice they own.

    Attributes:
        name: stable, readable name: ``<common module path>:<kind>``.
        kind: what the units are (see :data:`GroupKind`).
        size: number of units (query heads for attention groups).
        members: every parameter slice pattern (see :class:`Member`).
        constraints: see :class:`Constraints`.
        params_per_unit: parameters removed with one unit (kv slices counted per query head).
        flops_per_unit: forward FLOPs per token saved by removing one unit (2 per weight used;
            routed experts weighted by top_k / experts).
        gate_site: where a per-unit gate multiplies: the consumer members (a gate folded into the
            columns a unit is read by equals scaling the unit's activation).
        layer: decoder layer index if the group sits in one, for per-layer budgets and reports.
        router: for experts groups, the router parameter whose logits select experts.
    """

    name: str
    kind: str
    size: int
    members: list[Member]
    constraints: Constraints = field(default_factory=Constraints)
    params_per_unit: float = 0.0
    flops_per_unit: float = 0.0
    layer: int | None = None
    router: str | None = None

    @property
    def prunable(self) -> bool:
        return not self.constraints.pinned

    @property
    def gate_site(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]

    @property
    def params(self) -> float:
        return self.params_per_unit * self.size

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "layer": self.layer,
            "params_per_unit": self.params_per_unit,
            "flops_per_unit": self.flops_per_unit,
            "router": self.router,
            "constraints": self.constraints.to_dict(),
            "members": [m.to_dict() for m in self.members],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Group:
        return cls(
            name=data["name"],
            kind=data["kind"],
            size=int(data["size"]),
            members=[Member.from_dict(m) for m in data["members"]],
            constraints=Constraints.from_dict(data.get("constraints", {})),
            params_per_unit=float(data.get("params_per_unit", 0.0)),
            flops_per_unit=float(data.get("flops_per_unit", 0.0)),
            layer=data.get("layer"),
            router=data.get("router"),
        )


#: ``key -> dim -> (mask, expert_dim)``: which indices of each parameter dim survive a choice of
#: kept units. ``mask`` is ``[n]``, or ``[experts, n]`` for a dim chosen per expert.
KeptMasks = dict[Any, dict[int, tuple[torch.Tensor, "int | None"]]]


def kept_masks(selections: Iterable[tuple[Group, torch.Tensor]],
               shapes: Mapping[str, Sequence[int]],
               key: Callable[[str], Any] | None = None) -> KeptMasks:
    """Combine every ``(group, kept units)`` into kept-index masks per parameter and dim.

    One mask per ``(key(param), dim)`` joins every member touching it (fused projections; tied
    names share a key; a ``key`` of ``None`` leaves the member out): first everything a group
    covers is cleared, then its kept indices are set. Raises :class:`ValueError` when a dim is
    chosen per expert by one group and for all experts by another.
    """
    key = key or (lambda name: name)
    entries = []
    for group, kept in selections:
        kept = torch.as_tensor(kept, dtype=torch.long)
        for m in group.members:
            k = key(m.param)
            if k is not None:
                entries.append((m, group, kept, k, tuple(shapes[m.param])))
    masks: KeptMasks = {}
    for phase in ("covered", "kept"):
        for m, group, kept, k, shape in entries:
            per_dim = masks.setdefault(k, {})
            if m.dim not in per_dim:
                rows = () if m.expert_dim is None else (shape[m.expert_dim],)
                per_dim[m.dim] = (torch.ones(*rows, shape[m.dim], dtype=torch.bool), m.expert_dim)
            mask, expert_dim = per_dim[m.dim]
            if expert_dim != m.expert_dim:
                raise ValueError(f"{m.param} dim {m.dim} is sliced both per expert and for all "
                                 f"experts by different groups; the groups are inconsistent")
            if phase == "covered":
                mask[..., m.covered(group.size)] = False
            elif kept.dim() == 1 or m.expert_dim is None:
                mask[..., m.indices(torch.unique(kept))] = True
            else:
                idx = m.block_positions(group.size)[kept // m.div]
                mask.scatter_(1, idx.reshape(kept.shape[0], -1), True)
    return masks


def kept_numel(shape: Sequence[int], per_dim: Mapping[int, tuple[torch.Tensor, int | None]]) -> int:
    """Elements of a parameter of ``shape`` that survive its ``kept_masks`` entry."""
    shape = tuple(shape)
    plain = {d: m for d, (m, ed) in per_dim.items() if ed is None}
    pairs = {(ed, d): m for d, (m, ed) in per_dim.items() if ed is not None}
    if not pairs:
        return math.prod(int(plain[d].sum()) if d in plain else n for d, n in enumerate(shape))
    if len(pairs) == 1:
        (ed, d), m2 = next(iter(pairs.items()))
        if ed in plain:
            m2 = m2 & plain[ed][:, None]
        if d in plain:
            m2 = m2 & plain[d][None, :]
        rest = math.prod(int(plain[i].sum()) if i in plain else n
                         for i, n in enumerate(shape) if i not in (ed, d))
        return int(m2.sum()) * rest
    full = torch.ones(shape, dtype=torch.bool)  # rare: several per-expert dims on one tensor
    for d, m in plain.items():
        view = [1] * len(shape)
        view[d] = -1
        full &= m.view(view)
    for (ed, d), m2 in pairs.items():
        view = [1] * len(shape)
        view[ed], view[d] = m2.shape
        full &= (m2 if ed < d else m2.T).reshape(view)
    return int(full.sum())


def removed_params(selections: Iterable[tuple[Group, torch.Tensor]],
                   shapes: Mapping[str, Sequence[int]],
                   key: Callable[[str], Any] | None = None) -> int:
    """Exact number of parameters removed when each group keeps its units (each parameter counted
    once under its ``key``; overlaps, such as an expert removed whole and some of its channels
    too, counted once; a block shared by several units goes only when all of them go)."""
    key = key or (lambda name: name)
    masks = kept_masks(selections, shapes, key)
    shape_of = {key(n): tuple(s) for n, s in shapes.items() if key(n) is not None}
    return sum(math.prod(shape_of[k]) - kept_numel(shape_of[k], per_dim)
               for k, per_dim in masks.items())
