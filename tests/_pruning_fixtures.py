"""Shared helpers for the gating / plan / slicing / checkpoint tests: tiny models, their groups,
random plans.

Groups come from ``prunegraph.ir.analysis.analyze``; since capturing takes seconds per model, they are
cached in-process and on disk under ``.pytest_cache`` keyed by the analysis sources, transformers
version and architecture (stale caches are impossible: any change to the analysis changes the key).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path

import torch
import transformers

from prunegraph.data.models import RANDOM_CONFIGS, load_model
from prunegraph.ir.groups import Group
from prunegraph.plan.plan import Plan

ARCHS = sorted(RANDOM_CONFIGS)
_ROOT = Path(__file__).resolve().parent.parent
_CACHE = _ROOT / ".pytest_cache" / "prunegraph-groups"


@functools.cache
def _base(arch: str) -> torch.nn.Module:
    model, _ = load_model(f"random:{arch}", seed=0)
    return model


def fresh(arch: str) -> torch.nn.Module:
    """A new copy of the tiny random model of ``arch`` (same weights every time)."""
    return copy.deepcopy(_base(arch))


def _analysis_key(arch: str) -> str:
    h = hashlib.sha256(f"{arch}|{transformers.__version__}|{torch.__version__}".encode())
    for f in sorted((_ROOT / "prunegraph" / "ir").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


@functools.cache
def groups_of(arch: str) -> tuple[Group, ...]:
    """The analysis groups of ``arch`` (cached)."""
    path = _CACHE / f"{arch}-{_analysis_key(arch)}.json"
    if path.exists():
        return tuple(Group.from_dict(d) for d in json.loads(path.read_text()))
    from prunegraph.ir.analysis import analyze

    groups = analyze(fresh(arch)).groups
    _CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([g.to_dict() for g in groups]))
    tmp.replace(path)
    return tuple(groups)


def random_keep(groups, seed: int, *, p_group: float = 0.8) -> dict[str, torch.Tensor]:
    """Random kept units for a random subset of the prunable groups (respecting floors)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        if not g.prunable or torch.rand((), generator=gen) > p_group:
            continue
        floor = max(g.constraints.min_units, 1)
        k = int(torch.randint(floor, g.size + 1, (), generator=gen))
        if g.constraints.experts:
            rows = [torch.randperm(g.size, generator=gen)[:k] for _ in range(g.constraints.experts)]
            keep[g.name] = torch.stack(rows)
        else:
            keep[g.name] = torch.randperm(g.size, generator=gen)[:k]
    return keep


def random_scales(groups, keep, seed: int) -> dict[str, torch.Tensor]:
    from prunegraph.plan.gating import gate_shape

    gen = torch.Generator().manual_seed(seed + 1)
    by_name = {g.name: g for g in groups}
    return {n: 0.5 + torch.rand(gate_shape(by_name[n]), generator=gen) for n in keep}


def random_plan(arch: str, seed: int, *, scales: bool = True) -> Plan:
    groups = groups_of(arch)
    keep = random_keep(groups, seed)
    return Plan.from_keep(groups, keep, random_scales(groups, keep, seed) if scales else None,
                          model=_base(arch))


def input_ids(arch: str, seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    vocab = _base(arch).config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits
