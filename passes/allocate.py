"""Budget allocation: from per-unit scores to the units every group keeps.

``sparsity`` is the fraction of the *scope's* parameters to remove (see
:mod:`prunegraph.passes._param_space`: ``decoder`` = parameters under the decoder stack, so no
embedding, ``lm_head`` or final norm; ``all`` = every parameter, tied ones once). The allocation
removes at least ``sparsity * total`` parameters, counted exactly (a kv slice goes only with all
its query heads; an expert's channels are not counted twice), and overshoots by less than one
move: moves are taken in rank order while they fit under the target, the last gap is filled by
the next-ranked moves that still fit, and the smallest move that reaches the target ends it.

**Moves.** Every group is turned into an ordered list of *moves*, each removing a few units while
keeping the group valid:

* channels, experts, per-expert channels: remove the next lowest-scored unit (per-expert channel
  groups remove one channel in *every* expert, the expert's lowest, so the fused ``[E, I, H]``
  tensor stays dense); kept counts stay multiples of ``round_to`` (an int, or the per-group
  counts a :class:`~prunegraph.passes._widths.Widths` allows: ``auto`` and ``latency``) and at
  least ``min_units`` (experts: at least the router's top-k).
* attention heads with GQA (``kv_heads`` x ``q_per_kv``): either drop a whole kv group (its kv
  head and its kept query heads) or drop one query head from *every* kept kv group, whichever has
  the lower score per parameter, so kept query heads per kv head stay equal within a layer.

**Global** ranks all moves of all groups by score per parameter and takes the lowest until the
target is met (moves of one group keep their order: keys are made non-decreasing within a group).
Raw scores of different kinds are not comparable: a head's score sums four matrices' slices, a
channel's three rows, and activation or gradient scales differ between sites. So a unit's key is
its score per parameter divided by a mean score per parameter, chosen by ``normalize``:

* ``kind``: the mean over all units of that kind (all layers). Layers then compete on raw scores,
  which is right when scores share one scale across layers: Taylor scores all measure the same
  loss. Across kinds, an average parameter of one kind is assumed worth one of another.
* ``group``: the mean over the group's own units. Every layer's units average 1, so the
  allocation follows how unequal the units of a layer are, not raw scale. Needed for Wanda and
  magnitude, whose scales grow with depth (activation norms, weight norms): with ``kind`` they
  strip the early layers (SmolLM2-135M at 20%, Wanda: perplexity 24144 with ``kind``, 65 with
  ``group``; Taylor: 45 with ``kind``, 46 with ``group``; dense 21.2).
* ``auto`` (default): ``kind`` for Taylor scores, ``group`` otherwise (read from
  ``scores.stats["criterion"]``; ``group`` when unknown).

**Uniform** stacks the groups of one kind that have the same structure across layers and moves
them together (one move removes the lowest unit of every layer), so every layer keeps the same
count of each kind and the result is a standard HF checkpoint. How the budget splits between
kinds is still decided by the normalised scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunegraph.errors import BudgetError, PreconditionError, SpecError
from prunegraph.ir.groups import Group
from prunegraph.passes._moves import GroupMoves, build_moves
from prunegraph.passes._param_space import ParamSpace, param_space, removed_params
from prunegraph.passes._widths import Widths, resolve_widths
from prunegraph.plan.plan import routing_top_k

__all__ = [
    "STRATEGIES", "Allocation", "allocate", "check_budget", "check_sparsity", "max_removable",

]

STRATEGIES = ("global", "uniform")
NORMALIZE = ("auto", "kind", "group")


class Allocation(dict):
    """``group name -> kept unit indices`` (``Tensor[k]``, or ``Tensor[experts, k]`` for
    per-expert channel groups), with ``stats`` (target, removed, total, achieved sparsity)."""

    def __init__(self, *args, stats: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats: dict = dict(stats or {})


def check_sparsity(sparsity) -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError) as e:
        raise BudgetError(f"sparsity must be a number in (0, 1), got {sparsity!r}") from e
    if not 0.0 < value < 1.0:
        raise BudgetError(
            f"sparsity must lie in (0, 1) (the fraction of the scope's parameters to remove), "
            f"got {sparsity}; e.g. sparsity=0.2 removes 20%."
        )
    return value


@contextlib.contextmanager
def _one_thread():
    """Allocation works on many small tensors, where intra-op threads only add overhead (60x
    slower on a busy 2-core machine); use one thread and restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _zero_scores(groups: Iterable[Group], space: ParamSpace) -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        experts = next((space.shape(m.param)[m.expert_dim] for m in g.members
                        if m.expert_dim is not None), None)
        out[g.name] = torch.zeros(g.size) if experts is None else torch.zeros(experts, g.size)
    return out


def _setup(groups, model, scope, strategy):
    if strategy not in STRATEGIES:
        raise SpecError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    space = param_space(model, scope)
    groups = [g for g in groups if g.prunable]
    return groups, space


def max_removable(groups: Iterable[Group], model: nn.Module, scope: str = "decoder",
                  strategy: str = "global", round_to: int | str | Widths = 1) -> tuple[int, int]:
    """``(most parameters the constraints let go, parameters in scope)``; no scores needed."""
    groups = list(groups)
    round_to = resolve_widths(groups, model, round_to)
    groups, space = _setup(groups, model, scope, strategy)
    with _one_thread():
        units = build_moves(groups, _zero_scores(groups, space), space, strategy=strategy,
                            round_to=round_to, top_k=routing_top_k(model))
        keep = {}
        for u in units:
            keep.update(u.keep(len(u.costs)))
        return removed_params(groups, keep, space), space.total


def check_budget(groups: Iterable[Group], sparsity: float, model: nn.Module,
                 scope: str = "decoder", strategy: str = "global",
                 round_to: int | str | Widths = 1) -> float:
    """Validate a budget before any work; returns the sparsity as a float.

    Raises:
        BudgetError: ``sparsity`` outside (0, 1), or above what the constraints allow (the
            message gives the maximum achievable sparsity), or an integer ``round_to`` that
            leaves no group it applies to a smaller size.
    """
    value = check_sparsity(sparsity)
    groups = list(groups)
    round_to = resolve_widths(groups, model, round_to)  # refuses an int no group can honour
    most, total = max_removable(groups, model, scope, strategy, round_to)
    if total == 0:
        raise BudgetError(f"scope '{scope}' holds no parameters; use scope='all'")
    if value * total > most:
        raise BudgetError(
            f"sparsity {value:g} asks to remove {value * total:,.0f} of {total:,} parameters "
            f"(scope '{scope}'), but the groups' constraints (pinned groups, minimum kept units, "
            f"GQA, round_to={round_to}) let at most {most:,} go: the maximum achievable sparsity "
            f"is {most / total:.4f}. Lower the sparsity, use scope='all', or unpin groups."
        )
    return value


def allocate(groups: Iterable[Group], scores: Mapping[str, torch.Tensor], sparsity: float, *,
             model: nn.Module, scope: str = "decoder", strategy: str = "global",
             round_to: int | str | Widths = 1, normalize: str = "auto") -> Allocation:
    """Kept units per prunable group that remove at least ``sparsity`` of the scope's parameters.

    Args:
        groups: the model's groups (pinned ones are left whole and not returned).
        scores: per-unit scores from :func:`prunegraph.passes.importance.score_groups`.
        sparsity: fraction of the scope's parameters to remove, in (0, 1).
        model: the model the groups belong to (only shapes and config are read; meta is fine).
        scope: ``decoder`` or ``all`` (see the module docstring).
        strategy: ``global`` or ``uniform`` (see the module docstring).
        round_to: kept counts of channel groups are multiples of this int; ``auto`` or
            ``latency`` (:mod:`prunegraph.passes._widths`), or the counts an already resolved
            :class:`~prunegraph.passes._widths.Widths` allows.
        normalize: ``auto``, ``kind`` or ``group``: over which units the mean score per
            parameter that normalises a unit's score is taken (see the module docstring).
    """
    if normalize not in NORMALIZE:
        raise SpecError(f"unknown normalize '{normalize}'; choose one of {', '.join(NORMALIZE)}")
    groups = list(groups)
    round_to = resolve_widths(groups, model, round_to)
    value = check_budget(groups, sparsity, model, scope, strategy, round_to)
    groups, space = _setup(groups, model, scope, strategy)
    missing = [g.name for g in groups if g.name not in scores]
    if missing:
        raise PreconditionError(
            f"no scores for {len(missing)} prunable group(s) ({', '.join(missing[:3])}); score "
            "the same groups with score_groups(model, groups, ...) before allocating."
        )
    target = value * space.total
    with _one_thread():
        chosen = {g.name: torch.as_tensor(scores[g.name], dtype=torch.float64) for g in groups}
        if normalize == "auto":
            criterion = getattr(scores, "stats", {}).get("criterion")
            normalize = "kind" if criterion == "taylor" else "group"
        if normalize == "group":
            chosen = {n: s / m if (m := float(s.mean())) > 0 else s for n, s in chosen.items()}
        units = build_moves(groups, chosen, space,
                            strategy=strategy, round_to=round_to, top_k=routing_top_k(model))
        taken, keep, removed = _take(units, groups, space, target)
    stats = {
        "strategy": strategy, "scope": scope, "normalize": normalize, "total": space.total,
        "target": round(target),
        "removed": removed, "sparsity": removed / space.total, "moves": taken,
        "kept_fraction": {g.name: _kept_count(keep[g.name]) / g.size for g in groups},
    }
    return Allocation(keep, stats=stats)


def _kept_count(kept: torch.Tensor) -> int:
    return int(kept.shape[-1])


def _take(units: list[GroupMoves], groups: list[Group], space: ParamSpace, target: float):
    """Take the globally cheapest moves until the exact removed count reaches ``target``."""
    keys, costs, owner = [], [], []
    for i, u in enumerate(units):
        if len(u.costs):
            keys.append(torch.cummax(u.keys, 0).values)
            costs.append(u.costs)
            owner.append(torch.full((len(u.costs),), i, dtype=torch.long))
    if not keys:
        raise BudgetError("no group can shrink: every group is pinned or at its minimum")
    keys, costs, owner = torch.cat(keys), torch.cat(costs), torch.cat(owner)
    order = torch.sort(keys, stable=True).indices
    costs, owner = costs[order].double(), owner[order]
    goal = target
    for _ in range(64):  # estimated costs double-count overlaps; raise the goal by the deficit
        counts = _fill(costs, owner, len(units), goal)
        keep = {}
        for i, u in enumerate(units):
            keep.update(u.keep(int(counts[i])))
        removed = removed_params(groups, keep, space)
        if removed >= target or int(counts.sum()) == len(order):
            break
        # overlaps make the estimate too high by a roughly constant factor: rescale the goal
        goal = max(goal * target / max(removed, 1), goal + 1.0)
    if removed < target:
        raise BudgetError(
            f"the allocation removed {removed:,} parameters but the target is {target:,.0f}; "
            "the constraints do not allow more. Lower the sparsity."
        )
    return int(counts.sum()), keep, removed


def _fill(costs: torch.Tensor, owner: torch.Tensor, n_units: int, goal: float) -> torch.Tensor:
    """Moves taken per unit: the best-ranked prefix that stays under ``goal``, then the gap
    filled in rank order by moves that still fit (a unit whose move was skipped is closed, as
    its later moves need it), then the smallest skipped move that reaches ``goal``."""
    cum = torch.cumsum(costs, 0)
    n0 = int(torch.searchsorted(cum, torch.tensor(goal, dtype=torch.float64)).item())
    counts = torch.bincount(owner[:n0], minlength=n_units).tolist()
    if n0 == len(costs):
        return torch.tensor(counts)
    removed = float(cum[n0 - 1]) if n0 else 0.0
    smallest = float(costs[n0:].min())
    closed: set[int] = set()
    finisher = None
    for u, c in zip(owner[n0:].tolist(), costs[n0:].tolist()):
        if finisher is not None and finisher[1] <= smallest and goal - removed < smallest:
            break  # nothing fits any more and no finisher can be smaller
        if u in closed:
            continue
        if removed + c < goal:
            counts[u] += 1
            removed += c
            continue
        closed.add(u)
        if finisher is None or c < finisher[1]:
            finisher = (u, c)
    if removed < goal and finisher is not None:
        counts[finisher[0]] += 1
    return torch.tensor(counts)
