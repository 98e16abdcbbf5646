"""Which kept counts each group may take under a ``round_to``, and the report of the choice.

:func:`resolve_widths` turns a pass's ``round_to`` (``auto``, ``latency`` or an integer; see
:mod:`prunegraph.plan.widths` for the rule table) into a :class:`Widths`: per group, the kept
counts the allocator (:mod:`prunegraph.passes._moves`) and the gate families' finalize may
choose. It applies to channel-like groups (MLP channels, per-expert channels, hidden widths);
heads stay whole heads and experts whole experts, as before.

* **An integer** ``r``: multiples of ``r`` (and of the group's own ``round_to``). A group with no
  multiple of ``r`` below its size is kept whole and named in a warning; when that is every group
  the rounding applies to, it is a :class:`~prunegraph.errors.BudgetError` that says how to fix it
  (the whole budget would silently move to heads and experts).
* ``auto``: the table's multiple ``M`` for the model's device and dtype. A group with fewer than
  :data:`AUTO_MIN_WIDTHS` multiples of ``M`` below its size takes the largest of ``M/2, M/4, ...,
  1`` that gives it that many (named in a warning): such small GEMMs are bound by launches, not by
  alignment, and the budget stays fine-grained. ``auto`` is never an error.
* ``latency``: ``auto``'s widths, then the group's GEMMs (each producer and consumer matrix at
  the width) are timed on the model's device at one decode and one prefill token count
  (:class:`~prunegraph.plan.latency.LatencyTable`, cached per device, dtype and shape), and only
  the widths on the fast side of each latency step stay allowed: on a monotone fit of the cost
  (decode and prefill time summed, each relative to the full width), a width is dropped unless it
  is more than ``LATENCY_TOLERANCE`` cheaper than the last wider width kept, as latency-aware
  pruning (HALP) prunes to the edges of the latency staircase. The budget is still met exactly
  as before: the allocator just has fewer, larger moves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunegraph.errors import BudgetError
from prunegraph.ir.groups import Group
from prunegraph.plan.latency import TOKENS, Gemm, LatencyTable
from prunegraph.plan.widths import RoundTo, resolve_round_to

__all__ = ["Widths", "resolve_widths", "rounding_applies", "record_widths", "LATENCY_TOLERANCE",
           "AUTO_MIN_WIDTHS"]

#: ``auto`` gives every group at least this many smaller widths to choose from (see above).
AUTO_MIN_WIDTHS = 4

#: A width stays allowed only if it is this much cheaper than the last wider one kept.
LATENCY_TOLERANCE = 0.01


def rounding_applies(g: Group) -> bool:
    """``round_to`` shapes channel-like groups: not heads (``head_dim`` wide already; GQA keeps
    whole kv groups) and not experts (whole experts)."""
    gqa = g.kind == "heads" or g.constraints.kv_heads is not None
    return g.prunable and g.kind != "experts" and not gqa


def _floor(g: Group) -> int:
    return max(g.constraints.min_units, 1)


def _smaller(g: Group, r: int) -> int:
    """How many multiples of ``r`` lie in ``[floor, size)``."""
    return max(0, (g.size - 1) // r - (_floor(g) - 1) // r)


def _can_shrink(g: Group, r: int) -> bool:
    return _smaller(g, r) > 0


def _multiple_counts(size: int, r: int, kmin: int) -> list[int]:
    return [size] + [k for k in range(size - 1, -1, -1) if k % r == 0 and k >= kmin]


@dataclass
class Widths:
    """Kept counts each group may take (see the module docstring).

    Attributes:
        round_to: the resolved ``round_to``.
        multiples: per group the rounding applies to, the multiple its kept counts take.
        allowed: ``latency`` only: per group, the kept counts left on the fast side of each step.
        blocked: groups the rounding leaves no smaller size (kept whole).
        fallback: ``auto`` only: groups on a smaller multiple than the rule's, and that multiple.
        latency: ``latency`` only: per group, the candidate widths (largest first), the measured
            seconds of the group's GEMMs at each (per token count) and the allowed ones.
        latency_meta: ``latency`` only: the device, dtype, token counts and cache it used.
    """

    round_to: RoundTo
    multiples: dict[str, int] = field(default_factory=dict)
    allowed: dict[str, list[int]] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    fallback: dict[str, int] = field(default_factory=dict)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_meta: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return str(self.round_to)

    def counts(self, g: Group, kmin: int) -> list[int]:
        """Kept counts ``g`` may take, its size first, then smaller ones down to ``kmin``."""
        if g.name in self.allowed:
            return [k for k in self.allowed[g.name] if k == g.size or k >= kmin]
        r = max(g.constraints.round_to, self.multiples.get(g.name, 1))
        return _multiple_counts(g.size, r, kmin)

    def nearest(self, g: Group, k: float) -> int:
        """The allowed kept count nearest ``k`` (ties to the larger), at least the floor."""
        options = self.counts(g, _floor(g))
        return min(options, key=lambda m: (abs(m - k), -m))

    def key(self, groups: Sequence[Group]) -> tuple:
        """What decides the allowed counts of ``groups``: equal keys, the same choices."""
        names = {g.name for g in groups}
        return (tuple(sorted((n, r) for n, r in self.multiples.items() if n in names)),
                tuple(sorted((n, tuple(c)) for n, c in self.allowed.items() if n in names)))

    def exact_for(self, groups: Sequence[Group]) -> bool:
        """Whether every count is allowed for these groups (nothing to round)."""
        return not any(self.allowed.get(g.name) or self.multiples.get(g.name, 1) > 1
                       or g.constraints.round_to > 1 for g in groups)

    # -- reporting -------------------------------------------------------------------------

    def report(self, groups: Sequence[Group], keep: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The chosen widths per group (and, under ``latency``, their measured latencies)."""
        out: dict[str, Any] = {"round_to": self.round_to.to_dict(), "groups": {}}
        for g in groups:
            if g.name not in keep or not rounding_applies(g):
                continue
            kept = int(torch.as_tensor(keep[g.name]).shape[-1])
            row: dict[str, Any] = {"size": g.size, "kept": kept,
                                   "multiple": self.multiples.get(g.name, 1)}
            lat = self.latency.get(g.name)
            if lat is not None:
                i = lat["widths"].index(kept) if kept in lat["widths"] else None
                if i is not None:
                    row["latency_us"] = {p: round(1e6 * lat[p][i], 3) for p in TOKENS}
                row["dense_latency_us"] = {p: round(1e6 * lat[p][0], 3) for p in TOKENS}
            out["groups"][g.name] = row
        if self.blocked:
            out["blocked"] = list(self.blocked)
        if self.fallback:
            out["fallback"] = dict(self.fallback)
        if self.latency_meta:
            out["latency"] = dict(self.latency_meta)
        return out


def resolve_widths(groups: Sequence[Group], model: nn.Module | None, round_to: Any, *,
                   latency: LatencyTable | None = None) -> Widths:
    """The kept counts every group may take under ``round_to`` (an int, ``auto``, ``latency``, a
    :class:`~prunegraph.plan.widths.RoundTo` or an already resolved :class:`Widths`).

    Args:
        groups: the model's groups.
        model: the model (its device and dtype resolve ``auto``; its shapes give the GEMMs).
        round_to: see above.
        latency: the table ``latency`` reads (default: one on the model's device and dtype,
            cached under the user's cache folder).

    Raises:
        BudgetError: an integer ``round_to`` that no group it applies to can honour.
    """
    if isinstance(round_to, Widths):
        return round_to
    rt = round_to if isinstance(round_to, RoundTo) else resolve_round_to(round_to, model=model)
    widths = Widths(rt)
    applied = [g for g in groups if rounding_applies(g)]
    for g in applied:
        r = max(g.constraints.round_to, rt.multiple)
        if not rt.explicit and _smaller(g, r) < AUTO_MIN_WIDTHS:
            m = rt.multiple
            while m > 1 and _smaller(g, max(g.constraints.round_to, m)) < AUTO_MIN_WIDTHS:
                m //= 2
            if max(g.constraints.round_to, m) < r:
                r = max(g.constraints.round_to, m)
                widths.fallback[g.name] = r
        if not _can_shrink(g, r) and _can_shrink(g, g.constraints.round_to):
            widths.blocked.append(g.name)
        widths.multiples[g.name] = r
    if rt.explicit and rt.multiple > 1 and applied and len(widths.blocked) == len(applied):
        sizes = sorted({g.size for g in applied})
        raise BudgetError(
            f"round_to={rt.multiple} leaves no smaller size for any of the {len(applied)} groups "
            f"it applies to ({_names([g.name for g in applied])}; sizes "
            f"{', '.join(map(str, sizes))}): they would all be kept whole and the whole budget "
            f"taken from the other kinds (heads, experts). Use a round_to below the widths, e.g. "
            f"{_suggest(sizes[0])}, or round_to: auto (the device's multiple where groups allow "
            f"it)")
    if rt.latency and applied and model is not None:
        _measure(widths, applied, model, latency)
    return widths


def _names(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _suggest(size: int) -> int:
    r = 1
    while r * 2 <= max(size // 8, 1):
        r *= 2
    return r


# ------------------------------------------------------------------------------------ latency


def _gemms(g: Group, model: nn.Module, shapes: Mapping[str, tuple[int, ...]], top_k: int
           ) -> list[tuple[tuple[int, ...], int, int, float]]:
    """``(matrix shape [out, in], index of the dim the units shrink, indices per unit, token
    share)`` of every producer and consumer matrix of ``g`` (expert matrices per expert, with the
    share of tokens an expert sees)."""
    out = []
    for m in g.members:
        if m.role not in ("producer", "consumer") or m.div != 1 or m.param not in shapes:
            continue
        owner = m.param.rpartition(".")[0]
        try:
            if isinstance(model.get_submodule(owner), nn.Embedding):
                continue  # a lookup, not a GEMM
        except AttributeError:
            pass
        shape, dim, share = list(shapes[m.param]), m.dim, 1.0
        if m.expert_dim is not None:
            experts = shape.pop(m.expert_dim)
            dim -= m.expert_dim < dim
            share = min(1.0, top_k / experts)
        if len(shape) != 2:
            continue
        out.append((tuple(shape), dim, m.inner, share))
    return out


def _at_width(gemms, size: int, k: int, tokens: int) -> list[Gemm]:
    out = []
    for shape, dim, inner, share in gemms:
        s = list(shape)
        s[dim] -= (size - k) * inner
        if min(s) < 1:
            continue
        out.append(Gemm(max(1, math.ceil(tokens * share)), s[0], s[1]))
    return out


def _monotone(cost: list[float]) -> list[float]:
    """The least-squares fit of ``cost`` (widths largest first) that never grows as the width
    shrinks (pool adjacent violators): a width timed too fast by noise is averaged with its
    neighbours into a short plateau instead of hiding every narrower width behind it."""
    blocks: list[list[float]] = []  # [sum, count], in ascending width
    for c in reversed(cost):
        blocks.append([c, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, n = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += n
    fitted = [total / n for total, n in blocks for _ in range(int(n))]
    return fitted[::-1]


def _fast_side(widths: list[int], cost: list[float], tol: float) -> list[int]:
    """Widths (largest first) on the fast side of each latency step: on the monotone fit of the
    cost, each width kept is more than ``tol`` cheaper than the last one kept, so the widest width
    of every plateau stays and the narrower widths of the same plateau go (a smooth slope keeps
    one width every ``tol`` of cost)."""
    fitted = _monotone(cost)
    kept, last = [widths[0]], fitted[0]
    for w, c in zip(widths[1:], fitted[1:]):
        if c * (1 + tol) < last:
            kept.append(w)
            last = c
    return kept


def _measure(widths: Widths, groups: list[Group], model: nn.Module,
             table: LatencyTable | None) -> None:
    from prunegraph.passes._param_space import param_space
    from prunegraph.plan.plan import routing_top_k

    rt = widths.round_to
    if table is None:
        device = next((str(p.device) for p in model.parameters()), "cpu")
        table = LatencyTable(device if rt.device != "meta" and device != "meta" else rt.device,
                             rt.dtype)
    space = param_space(model, "all")
    shapes = {n: space.shape(n) for n in space.canon}
    top_k = routing_top_k(model)
    plans: dict[tuple, tuple[list[int], dict[str, list[list[Gemm]]]]] = {}
    for g in groups:
        gemms = _gemms(g, model, shapes, top_k)
        candidates = widths.counts(g, _floor(g))
        if not gemms or len(candidates) < 2:
            continue
        key = (g.size, tuple(candidates), tuple(gemms))
        if key not in plans:
            plans[key] = (candidates, {p: [_at_width(gemms, g.size, k, t) for k in candidates]
                                       for p, t in TOKENS.items()})
        widths.latency[g.name] = {"key": key}
    wanted = [x for _, per in plans.values() for rows in per.values() for row in rows for x in row]
    before = (table.hits, table.misses)
    seconds = table.seconds(wanted)
    measured: dict[tuple, dict[str, Any]] = {}
    for key, (candidates, per) in plans.items():
        row: dict[str, Any] = {"widths": candidates}
        cost = [0.0] * len(candidates)
        for p, rows in per.items():
            row[p] = [sum(seconds[x] for x in gemms) for gemms in rows]
            full = row[p][0] or 1.0
            cost = [c + t / full for c, t in zip(cost, row[p])]
        row["allowed"] = _fast_side(candidates, cost, LATENCY_TOLERANCE)
        measured[key] = row
    for name, entry in list(widths.latency.items()):
        row = measured[entry["key"]]
        widths.latency[name] = row
        widths.allowed[name] = row["allowed"]
    widths.latency_meta = {
        "device": table.name, "dtype": table.dtype, "tokens": dict(TOKENS),
        "tolerance": LATENCY_TOLERANCE, "cache": str(table.path) if table.path else None,
        "gemms_cached": table.hits - before[0], "gemms_timed": table.misses - before[1],
        "shapes": len(plans)}


# ------------------------------------------------------------------------------------ reporting


def record_widths(state, pass_name: str, widths: Widths, groups: Sequence[Group],
                  keep: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Report the chosen widths: warnings for groups the rounding could not honour, a log line,
    ``metrics[<pass>]["widths"]`` and, with a run folder, ``<run>/widths.json[<pass>]``."""
    import json

    from prunegraph.atomic import atomic_write_text

    rt = widths.round_to
    if widths.blocked:
        state.log.warning("%s: round_to=%s leaves no smaller size for %d group(s) (%s); they are "
                          "kept whole", pass_name, rt, len(widths.blocked), _names(widths.blocked))
    if widths.fallback:
        by = sorted(set(widths.fallback.values()), reverse=True)
        state.log.warning("%s: round_to=%s: %d group(s) are too small for multiples of %d and use "
                          "%s instead (%s)", pass_name, rt, len(widths.fallback), rt.multiple,
                          "/".join(map(str, by)), _names(list(widths.fallback)))
    report = widths.report(groups, keep)
    kept = [r["kept"] for r in report["groups"].values()]
    summary: dict[str, Any] = {**rt.to_dict()}
    if kept:
        summary["kept"] = [min(kept), max(kept)]
        summary["aligned"] = sum(k % rt.multiple == 0 for k in kept)
        summary["groups"] = len(kept)
    line = f"{pass_name}: widths round_to={rt}"
    if kept:
        line += (f": {min(kept)}-{max(kept)} kept, {summary['aligned']}/{len(kept)} groups a "
                 f"multiple of {rt.multiple}")
        small = sorted({widths.fallback[n] for n in report["groups"] if n in widths.fallback})
        if small:
            summary["fallback"] = len([n for n in report["groups"] if n in widths.fallback])
            line += (f" ({summary['fallback']} too small for it on multiples of "
                     f"{'/'.join(map(str, small[::-1]))})")
    timed = [r for r in report["groups"].values() if "latency_us" in r]
    if timed:
        for p in TOKENS:
            summary[f"{p}_us"] = round(sum(r["latency_us"][p] for r in timed), 3)
            summary[f"dense_{p}_us"] = round(sum(r["dense_latency_us"][p] for r in timed), 3)
        line += "; measured GEMM time " + ", ".join(
            f"{p} {summary[f'{p}_us']:.1f} us (full widths {summary[f'dense_{p}_us']:.1f})"
            for p in TOKENS)
    state.log.info(line)
    state.metrics.setdefault(pass_name.lower(), {})["widths"] = summary
    if state.run_dir is not None:
        from pathlib import Path

        path = Path(state.run_dir) / "widths.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[pass_name] = report
        atomic_write_text(path, json.dumps(data, indent=1))
    return report
