"""Moves: the ordered, always-valid ways a group (or a row of groups) can shrink.

A :class:`GroupMoves` holds, for one group (``global``) or for the groups of one kind and one
structure across layers (``uniform``), the sequence of moves the allocation may take: the raw
score each move removes, the in-scope parameters it removes, and ``keep(n)``, the kept units after
the first ``n`` moves. See :mod:`prunegraph.passes.allocate` for how moves are chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from prunegraph.ir.groups import Group
from prunegraph.passes._param_space import ParamSpace, member_index_cost
from prunegraph.passes._widths import Widths

__all__ = ["GroupMoves", "build_moves"]


@dataclass
class GroupMoves:
    """Moves of one group or one stack of same-structure groups.

    Attributes:
        kind: the groups' kind (scores are normalised per kind).
        names: the group names this covers (one per layer for ``uniform``).
        scores: ``Tensor[moves]``, summed raw unit scores each move removes.
        costs: ``Tensor[moves]``, in-scope parameters each move removes (estimate: overlaps
            between groups are not subtracted; the allocation recounts exactly).
        unit_ratio: score per parameter of every unit, for the per-kind normaliser.
        keep: ``keep(n) -> {group name: kept units}`` after the first ``n`` moves.
        keys: normalised score per parameter of each move (set by :func:`build_moves`).
    """

    kind: str
    names: list[str]
    scores: torch.Tensor
    costs: torch.Tensor
    unit_ratio: torch.Tensor
    keep: Callable[[int], dict[str, torch.Tensor]]
    keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def _signature(g: Group, space: ParamSpace, strategy: str):
    if strategy == "global" or g.layer is None:
        return ("group", g.name)
    members = tuple((m.dim, m.offset, m.inner, m.step, m.div, m.role, m.expert_dim,
                     space.shape(m.param), space.in_scope(m.param)) for m in g.members)
    return ("stack", g.kind, g.size, g.constraints, members)


def _is_gqa(g: Group) -> bool:
    return g.kind == "heads" or g.constraints.kv_heads is not None


def build_moves(groups: Sequence[Group], scores: Mapping[str, torch.Tensor], space: ParamSpace,
                *, strategy: str, round_to: int | Widths, top_k: int) -> list[GroupMoves]:
    """Moves for every prunable group, with per-kind normalised keys. ``round_to``: kept counts
    of channel groups are multiples of an int, or those a :class:`Widths` allows."""
    stacks: dict[tuple, list[Group]] = {}
    for g in groups:
        stacks.setdefault(_signature(g, space, strategy), []).append(g)
    units = []
    for stack in stacks.values():
        stack = sorted(stack, key=lambda g: (g.layer if g.layer is not None else -1, g.name))
        s = torch.stack([torch.as_tensor(scores[g.name], dtype=torch.float64) for g in stack])
        build = _heads_moves if _is_gqa(stack[0]) else _ranked_moves
        unit = build(stack, s, space, round_to=round_to, top_k=top_k)
        if unit is not None:
            units.append(unit)
    ratios: dict[str, list[torch.Tensor]] = {}
    for u in units:
        ratios.setdefault(u.kind, []).append(u.unit_ratio.flatten())
    norm = {}
    for kind, parts in ratios.items():
        mean = float(torch.cat(parts).mean())
        norm[kind] = mean if math.isfinite(mean) and mean > 0 else 1.0
    for u in units:
        per_param = torch.where(u.costs > 0, u.scores / u.costs.clamp_min(1e-30),
                                torch.full_like(u.scores, math.inf))
        u.keys = per_param / norm[u.kind]
    return units


def _costs(g: Group, space: ParamSpace) -> tuple[float, float, float]:
    """In-scope parameters per unit: (per-expert part, shared part, kv block part)."""
    per_expert = shared = kv_block = 0.0
    for m in g.members:
        if not space.in_scope(m.param):
            continue
        c = member_index_cost(m, space.shape(m.param))
        if m.expert_dim is not None:
            per_expert += c / m.div
        elif m.div > 1:
            kv_block += c
        else:
            shared += c
    return per_expert, shared, kv_block


def _ranked_moves(stack: list[Group], s: torch.Tensor, space: ParamSpace, *,
                  round_to: int | Widths, top_k: int) -> GroupMoves | None:
    """Units removed lowest first; per-expert groups remove one channel in every expert."""
    g = stack[0]
    per_expert, shared, kv_block = _costs(g, space)
    shared += kv_block / max(max(m.div for m in g.members), 1)  # shared blocks split evenly
    experts = s.shape[1] if s.dim() == 3 else 1
    slot_cost = len(stack) * (experts * per_expert + shared)
    if slot_cost <= 0:
        return None
    kmin = g.constraints.min_units
    r = g.constraints.round_to
    if g.kind == "experts":
        kmin = max(kmin, top_k)
    elif not isinstance(round_to, Widths):
        r = max(r, round_to)
    if isinstance(round_to, Widths):  # multiples of the device's width, or the fast latencies
        counts = round_to.counts(g, kmin)
    else:
        counts = [g.size] + [k for k in range(g.size - 1, -1, -1) if k % r == 0 and k >= kmin]
    vals, order = s.sort(-1)
    slot = vals.reshape(-1, g.size).sum(0)
    cum = torch.cat([torch.zeros(1, dtype=slot.dtype), torch.cumsum(slot, 0)])
    removed = torch.tensor([g.size - k for k in counts])
    scores = cum[removed[1:]] - cum[removed[:-1]]
    costs = (removed[1:] - removed[:-1]).double() * slot_cost

    def keep(n: int) -> dict[str, torch.Tensor]:
        k = counts[n]
        kept = order[..., g.size - k:].sort(-1).values
        return {grp.name: kept[i] for i, grp in enumerate(stack)}

    unit_cost = per_expert + shared / experts
    return GroupMoves(g.kind, [x.name for x in stack], scores, costs, s / unit_cost, keep)


def _heads_moves(stack: list[Group], s: torch.Tensor, space: ParamSpace, *,
                 round_to: int | Widths, top_k: int) -> GroupMoves | None:
    """GQA heads: drop a whole kv group, or one query head from every kept kv group."""
    g = stack[0]
    _, q_cost, kv_cost = _costs(g, space)
    kv = g.constraints.kv_heads or g.size
    q = g.constraints.q_per_kv or g.size // kv
    layers = len(stack)
    if q_cost + kv_cost <= 0:
        return None
    kmin = g.constraints.min_units
    qv, qo = s.reshape(layers, kv, q).sort(-1)
    alive = torch.ones(layers, kv, dtype=torch.bool)
    kp, qp = kv, q
    states = [(alive.clone(), qp)]
    scores, costs = [], []
    while True:
        options = []
        if kp - 1 >= (1 if kmin >= 1 else 0) and (kp - 1) * qp >= kmin:
            sums = qv[:, :, q - qp:].sum(-1).masked_fill(~alive, math.inf)
            drop = sums.argmin(-1)
            cost = layers * (kv_cost + qp * q_cost)
            score = float(sums.gather(1, drop[:, None]).sum())
            options.append((score / cost if cost else math.inf, 0, score, cost, drop))
        if kp > 0 and qp > 1 and kp * (qp - 1) >= kmin:
            score = float((qv[:, :, q - qp] * alive).sum())
            cost = layers * kp * q_cost
            options.append((score / cost if cost else math.inf, 1, score, cost, None))
        if not options:
            break
        _, which, score, cost, drop = min(options, key=lambda o: (o[0], o[1]))
        if which == 0:
            alive[torch.arange(layers), drop] = False
            kp -= 1
        else:
            qp -= 1
        scores.append(score)
        costs.append(cost)
        states.append((alive.clone(), qp))

    def keep(n: int) -> dict[str, torch.Tensor]:
        alive_n, qp_n = states[n]
        out = {}
        for i, grp in enumerate(stack):
            heads = [kvg * q + qo[i, kvg, q - qp_n:] for kvg in range(kv) if alive_n[i, kvg]]
            kept = torch.cat(heads) if heads else torch.zeros(0, dtype=torch.long)
            out[grp.name] = kept.sort().values
        return out

    unit_ratio = s / (q_cost + kv_cost / q)
    return GroupMoves(g.kind, [x.name for x in stack], torch.tensor(scores, dtype=torch.float64),
                      torch.tensor(costs, dtype=torch.float64), unit_ratio, keep)
