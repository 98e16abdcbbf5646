"""The ``MoEfy`` pass: split every dense MLP into contiguous experts by balanced k-means.

For every MLP ``channels`` group of the analysis (no per-architecture code), the channels are
clustered into ``E`` experts of ``G`` channels by *balanced* spherical k-means on the
L2-normalised rows of the gate projection: the group's first producer member, which the analysis
lists in graph order (``gate_proj`` before ``up_proj``; the ``offset 0`` half of a fused
``gate_up_proj``; ``c_fc`` for GPT-2, which has no gate), as in the PrunePath reference code
(methods.md §3.2). Every member of the group (producer rows, consumer columns, biases, norms) is
then permuted the same way, so each expert's channels are contiguous: expert ``e`` owns channels
``[e*G, (e+1)*G)``. A channel permutation of an MLP computes exactly what it computed before.

Balanced assignment (every cluster exactly ``G`` channels) is a greedy pass per Lloyd step:
channels in order of decreasing regret (best minus second-best similarity to the centroids) each
take their most similar centroid that still has room. k-means++ seeding and every tie-break use a
generator seeded by ``seed``, so the clustering is reproducible. The lowest-objective assignment
seen is kept.

``G`` must divide the width, unless ``ragged=True``: then ``E = ceil(I / G)`` and the last expert
has ``I - (E-1) G`` channels (the Triton kernels accept such a last expert).

The pass provides ``moe_layout`` (one entry per MLP: group, producer/consumer/router module paths,
width, group size, the permutation applied) for ``PrunePath``, and a ``plan`` that keeps every
unit (unless one exists already, from an earlier Prune) so that ``Save`` and
``prunegraph.from_pretrained`` handle the permuted model like any pruned one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.ir.groups import Group, Member
from prunegraph.passes.prunepath.router import ROUTER_ATTR
from prunegraph.pipeline.contract import (
    Pass,
    PassResult,
    State,
    declare_key,
    register_pass,
)
from prunegraph.plan.gating import owner_of

__all__ = ["MoEfy", "balanced_kmeans", "expert_sizes", "permute_group", "feature_member",
           "channel_features", "moefy", "contiguous_layout"]


def expert_sizes(width: int, group_size: int, ragged: bool = False) -> list[int]:
    """Channels per expert; SpecError if ``group_size`` does not divide ``width`` (not ragged)."""
    if group_size < 1:
        raise SpecError(f"MoEfy group_size must be >= 1, got {group_size}")
    if group_size > width:
        raise SpecError(f"MoEfy group_size {group_size} is larger than the MLP width {width}; "
                        f"choose a group size that divides {width}")
    if width % group_size and not ragged:
        divisors = [d for d in range(1, min(width, 4 * group_size) + 1) if width % d == 0]
        near = sorted(divisors, key=lambda d: abs(d - group_size))[:3]
        raise SpecError(f"MoEfy group_size {group_size} does not divide the MLP width {width}; "
                        f"use one that does (e.g. {sorted(near)}) or ragged=true for a smaller "
                        f"last expert")
    full, rest = divmod(width, group_size)
    return [group_size] * full + ([rest] if rest else [])


def balanced_kmeans(x: torch.Tensor, sizes: list[int], seed: int = 0, iters: int = 25
                    ) -> torch.Tensor:
    """Cluster the rows of ``x`` (``[N, D]``, L2-normalised here) into ``len(sizes)`` clusters
    of exactly ``sizes[k]`` rows each; returns labels ``[N]`` (long). Spherical k-means with
    k-means++ seeding and a greedy capacity-constrained assignment, both seeded."""
    n = x.shape[0]
    if sum(sizes) != n:
        raise PrunegraphError(f"cluster sizes sum to {sum(sizes)} but there are {n} rows")
    rng = np.random.default_rng(seed)
    xs = torch.nn.functional.normalize(x.detach().double(), dim=1).cpu().numpy()
    k = len(sizes)
    cap = np.asarray(sizes)
    # k-means++ seeding on cosine distance
    centers = [int(rng.integers(n))]
    d = 1.0 - xs @ xs[centers[0]]
    for _ in range(1, k):
        w = np.clip(d, 0, None) ** 2
        total = w.sum()
        nxt = int(rng.choice(n, p=w / total)) if total > 0 else int(rng.integers(n))
        centers.append(nxt)
        d = np.minimum(d, 1.0 - xs @ xs[nxt])
    c = xs[centers].copy()
    best, best_obj, prev = None, -np.inf, None
    jitter = rng.random(n) * 1e-9  # seeded tie-break between equal regrets
    for _ in range(max(1, iters)):
        sim = xs @ c.T
        labels = _assign(sim, cap, jitter)
        obj = float(sim[np.arange(n), labels].sum())
        if obj > best_obj:
            best, best_obj = labels, obj
        if prev is not None and np.array_equal(prev, labels):
            break
        prev = labels
        for j in range(k):
            m = xs[labels == j].sum(0)
            norm = np.linalg.norm(m)
            c[j] = m / norm if norm > 0 else c[j]
    return torch.as_tensor(best, dtype=torch.long)


def _assign(sim: np.ndarray, cap: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Greedy balanced assignment: highest-regret rows first, each to its most similar cluster
    with room left."""
    n, k = sim.shape
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    top2 = np.partition(sim, k - 2, axis=1)[:, -2:]
    regret = top2[:, 1] - top2[:, 0] + jitter
    order = np.argsort(-regret, kind="stable")
    left = cap.copy()
    labels = np.empty(n, dtype=np.int64)
    masked = sim.copy()
    full = np.zeros(k, dtype=bool)
    for i in order:
        row = masked[i]
        j = int(np.argmax(np.where(full, -np.inf, row)))
        labels[i] = j
        left[j] -= 1
        if left[j] == 0:
            full[j] = True
    return labels


def feature_member(group: Group) -> Member:
    """The member whose per-channel rows are clustered: the first producer (the gate)."""
    producers = [m for m in group.members if m.role == "producer"]
    if not producers:
        raise PrunegraphError(f"group {group.name!r} has no producer member to cluster")
    return min(producers, key=lambda m: (m.param != producers[0].param, m.offset))


def channel_features(model: nn.Module, group: Group) -> torch.Tensor:
    """``[size, D]``: one row per channel from the feature member's weight."""
    m = feature_member(group)
    mod, attr = owner_of(model, m.param)
    w = getattr(mod, attr).detach()
    rows = w.movedim(m.dim, 0)[m.unit_positions(group.size).reshape(-1)]
    return rows.reshape(group.size, -1)


def permute_group(model: nn.Module, group: Group, perm: torch.Tensor) -> None:
    """Reorder the group's units by ``perm`` (new unit ``j`` is old unit ``perm[j]``) in every
    member, in place."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    for m in group.members:
        if m.expert_dim is not None or m.div != 1:
            raise PrunegraphError(f"MoEfy cannot permute {m.param} (shared or per-expert "
                                  f"slices); only plain MLP channel groups are supported")
        mod, attr = owner_of(model, m.param)
        p = getattr(mod, attr)
        pos = m.unit_positions(group.size).reshape(-1)
        index = torch.arange(p.shape[m.dim])
        index[pos] = m.unit_positions(group.size).reshape(-1).view(group.size, m.inner)[perm].reshape(-1)
        with torch.no_grad():
            p.data = p.data.index_select(m.dim, index.to(p.device)).contiguous()


def _paths(group: Group) -> tuple[str, str, str]:
    producer = feature_member(group).param.rpartition(".")[0]
    consumers = [m for m in group.members if m.role == "consumer"]
    if len(consumers) != 1 or consumers[0].offset != 0 or consumers[0].inner != 1:
        raise PrunegraphError(f"group {group.name!r} needs exactly one consumer reading all its "
                              f"channels in order for PrunePath routing; found "
                              f"{[c.param for c in consumers]}")
    consumer = consumers[0].param.rpartition(".")[0]
    prefix = group.name.split(":")[0]
    if not prefix:
        prefix = consumer.rpartition(".")[0]
    return producer, consumer, f"{prefix}.{ROUTER_ATTR}" if prefix else ROUTER_ATTR


def _weight_roles(group: Group) -> dict[str, dict]:
    """Where the gate, up and down weights of a SwiGLU MLP sit (for the Triton kernels):
    ``{"gate"|"up"|"down": {"param", "dim", "offset"}}``; no ``up`` when there is one producer."""
    gate = feature_member(group)
    others = [m for m in group.members if m.role == "producer" and m is not gate]
    down = next(m for m in group.members if m.role == "consumer")
    out = {"gate": gate, "down": down}
    if len(others) == 1:
        out["up"] = others[0]
    return {k: {"param": m.param, "dim": m.dim, "offset": m.offset} for k, m in out.items()}


def mlp_groups(groups: list[Group]) -> list[Group]:
    return [g for g in groups if g.kind == "channels"]


def moefy(model: nn.Module, groups: list[Group], group_size: int = 32, *, ragged: bool = False,
          seed: int = 0, iters: int = 25) -> list[dict]:
    """MoEfy ``model`` in place (see the module docstring); returns the layout entries."""
    targets = mlp_groups(groups)
    if not targets:
        raise PrunegraphError("no MLP 'channels' group in the analysis: nothing to MoEfy; run "
                              "Analyze on a dense model with MLPs")
    plan = [(g, expert_sizes(g.size, group_size, ragged), _paths(g)) for g in targets]
    layout = []
    for i, (g, sizes, (producer, consumer, router)) in enumerate(plan):
        labels = balanced_kmeans(channel_features(model, g), sizes, seed=seed + i, iters=iters)
        perm = torch.argsort(labels, stable=True)
        permute_group(model, g, perm)
        layout.append({"group": g.name, "producer": producer, "consumer": consumer,
                       "router": router, "width": g.size, "group_size": group_size,
                       "weights": _weight_roles(g), "permutation": perm.tolist()})
    return layout


def contiguous_layout(groups: list[Group], group_size: int = 32, *, ragged: bool = False
                      ) -> list[dict]:
    """The layout :func:`moefy` would return if every MLP's channels were already in expert
    order (identity permutation, nothing clustered or moved): experts are the consecutive
    blocks of ``group_size`` channels. For speed measurements on random weights, where
    clustering means nothing and takes minutes at 8B scale."""
    targets = mlp_groups(groups)
    if not targets:
        raise PrunegraphError("no MLP 'channels' group in the analysis: nothing to route")
    layout = []
    for g in targets:
        expert_sizes(g.size, group_size, ragged)
        producer, consumer, router = _paths(g)
        layout.append({"group": g.name, "producer": producer, "consumer": consumer,
                       "router": router, "width": g.size, "group_size": group_size,
                       "weights": _weight_roles(g), "permutation": list(range(g.size))})
    return layout


declare_key("moe_layout", "builtins.list",
            "per MoEfied MLP: its group, module paths, expert sizes and permutation")

@register_pass
@dataclass(frozen=True)
class MoEfy(Pass):
    """Split each MLP into experts of ``group_size`` channels (balanced k-means on the gate
    rows) and make every expert contiguous; the model's outputs do not change."""

    name = "MoEfy"
    requires = ("model", "groups")
    provides = ("moe_layout", "plan")

    group_size: int = 32
    ragged: bool = False
    seed: int = 0
    iters: int = 25

    def validate(self) -> None:
        if self.group_size < 1:
            raise SpecError(f"MoEfy.group_size must be >= 1, got {self.group_size}")
        if self.iters < 1:
            raise SpecError(f"MoEfy.iters must be >= 1, got {self.iters}")

    def run(self, state: State) -> PassResult:
        from prunegraph.plan.plan import Plan

        groups = list(state.groups)
        for g in mlp_groups(groups):  # every width and shape checked before anything changes
            expert_sizes(g.size, self.group_size, self.ragged), _paths(g)
        if not state.has("plan"):  # identity plan taken before routers exist (fingerprint)
            state.plan = Plan.from_keep(groups, {}, model=state.model)
        layout = moefy(state.model, groups, self.group_size, ragged=self.ragged, seed=self.seed,
                       iters=self.iters)
        state.moe_layout = layout
        stats = {"mlps": len(layout), "group_size": self.group_size,
                 "experts": [-(-e["width"] // e["group_size"]) for e in layout][:1][0]}
        state.metrics["moefy"] = stats
        state.log.info("MoEfy: %d MLPs split into %d experts of %d channels", len(layout),
                       stats["experts"], self.group_size)
        return PassResult(state, modified=True, stats=stats)
