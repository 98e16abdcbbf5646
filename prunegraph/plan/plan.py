"""The Plan: which units of which groups to keep, for one base model.

A plan is the hinge between deciding and executing. It holds, per group, the :class:`Group` itself
(so it can be applied with no analysis), the sorted kept unit indices (``[k]``, or ``[experts, k]``
for per-expert channel groups) and optional per-unit scales to fold into the consumers. It records
a fingerprint of the base model (class, config, parameter names and shapes) and refuses other
models. On disk it is ``plan.json`` (readable, diffable) plus ``plan.safetensors`` (indices and
scales)::

    plan = Plan.from_keep(groups, {"model.layers.0.mlp:channels": [0, 5, 7]}, model=model)
    plan.save("run/plan")            # run/plan/plan.json + run/plan/plan.safetensors
    plan = Plan.load("run/plan")
    plan.check_model(model)          # PlanError naming the differences if it is another model

:meth:`Plan.from_keep` enforces the group constraints:

* pinned groups cannot shrink (a request to shrink one is a :class:`BudgetError`);
* ``min_units`` (and, for experts groups, the model's top-k) is a floor: fewer is a BudgetError;
* ``round_to``: kept counts go to the nearest multiple in ``[min_units, size]`` where one exists,
  adding or dropping units by priority (``scores`` if given, else the order of the request, then
  index order);
* GQA (``q_per_kv > 1``): a kv head stays while any of its query heads is requested, and every kept
  kv head keeps the same number ``r = round(requested / kept kv heads)`` of query heads (clamped to
  ``[1, q_per_kv]``), its requested heads first by priority, then its others. ``round_to`` does not
  apply to heads groups (``head_dim`` already sets the hardware width). ``repair=False`` raises
  instead of repairing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunegraph.atomic import atomic_dir
from prunegraph.errors import BudgetError, PlanError
from prunegraph.ir.capture import tied_names
from prunegraph.ir.groups import Group, kept_masks, removed_params
from prunegraph.plan.gating import gate_shape

__all__ = ["Plan", "PlanGroup", "fingerprint", "routing_top_k", "FORMAT", "VERSION"]

FORMAT = "prunegraph.plan.plan"
VERSION = 1

#: Config keys that describe how a model was saved or run, not its architecture.
_VOLATILE_CONFIG = {"transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
                    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
                    "tie_encoder_decoder", "is_encoder_decoder"}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _param_name(name: str) -> str:
    """Parameter name with parametrization wrappers (gates) removed."""
    return name.replace(".parametrizations.", ".").replace(".original", "") if (
        ".parametrizations." in name) else name


def fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Identity of a base model: class, architecture config, parameter names and shapes."""
    config = getattr(model, "config", None)
    cfg = {}
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items()
               if k not in _VOLATILE_CONFIG and not k.startswith("_")}
        cfg = json.loads(json.dumps(cfg, sort_keys=True, default=str))
    params = {_param_name(n): list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    total = sum(p.numel() for p in model.parameters())
    tied = [[_param_name(n) for n in names] for names in tied_names(model)]
    return {"model_class": type(model).__name__, "config_sha256": _sha(cfg),
            "params_sha256": _sha(params), "params_total": total, "tied": tied, "config": cfg,
            "params": params}


@dataclass
class PlanGroup:
    """One group's decision: kept unit indices (sorted) and optional scales aligned with them."""

    group: Group
    keep: torch.Tensor
    scales: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def kept(self) -> int:
        """Kept units (per expert for per-expert groups)."""
        return int(self.keep.shape[-1])

    @property
    def removed_units(self) -> int:
        """Removed units in all, summed over experts for per-expert groups."""
        rows = self.keep.shape[0] if self.keep.dim() == 2 else 1
        return rows * (self.group.size - self.kept)

    def full_values(self) -> torch.Tensor:
        """Per-unit gate values equivalent to this decision: 0 removed, scale (or 1) kept."""
        full = torch.zeros(gate_shape(self.group))
        src = self.scales if self.scales is not None else torch.ones(self.keep.shape)
        return full.scatter(-1, self.keep, src.to(full.dtype))

    def kv_kept(self) -> int | None:
        """Kept kv heads for an attention group (blocks of ``q_per_kv`` with a kept query head)."""
        q_per_kv = self.group.constraints.q_per_kv
        if not q_per_kv:
            return None
        return int(torch.unique(self.keep // q_per_kv).numel())


@dataclass
class Plan:
    """Kept units per group for one base model; see the module docstring."""

    groups: list[PlanGroup]
    fingerprint: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pg in self.groups:
            _validate_keep(pg)
        if not self.report:
            self.report = _report(self.groups, self.fingerprint)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_keep(cls, groups: Sequence[Group], keep: Mapping[str, Any],
                  scales: Mapping[str, torch.Tensor] | None = None, *,
                  model: torch.nn.Module | None = None,
                  scores: Mapping[str, torch.Tensor] | None = None, repair: bool = True) -> Plan:
        """Build a plan from requested kept units, enforcing every group constraint.

        Args:
            groups: the analysis groups (only those named in ``keep`` enter the plan).
            keep: group name -> unit indices to keep, in priority order (most important first);
                ``[experts, k]`` (equal ``k``) for per-expert groups.
            scales: group name -> per-unit values of the group's gate shape (``[size]`` or
                ``[experts, size]``); the kept units' values are folded into the consumers.
            model: the base model, for the fingerprint and the experts' top-k floor.
            scores: group name -> per-unit importance, used as priority when units must be
                added or dropped (rounding, GQA repair).
            repair: repair GQA violations (see module docstring) instead of raising PlanError.

        Raises:
            PlanError: unknown group, malformed indices or scales, GQA violation with
                ``repair=False``.
            BudgetError: a pinned group asked to shrink, or fewer units than the group's floor.
        """
        by_name = {g.name: g for g in groups}
        top_k = routing_top_k(model)
        out = []
        for name, request in keep.items():
            if name not in by_name:
                from prunegraph.pipeline.contract import nearest

                raise PlanError(f"keep names no group {name!r}.{nearest(name, by_name)}")
            group = by_name[name]
            score = None if scores is None or name not in scores else torch.as_tensor(scores[name])
            idx = _select(group, request, score, top_k, repair)
            scale = None
            if scales is not None and name in scales:
                full = torch.as_tensor(scales[name], dtype=torch.float32)
                if tuple(full.shape) != gate_shape(group):
                    raise PlanError(f"scales for {name!r} must have the group's gate shape "
                                    f"{list(gate_shape(group))} (one value per unit), got "
                                    f"{list(full.shape)}")
                scale = full.gather(-1, idx)
            out.append(PlanGroup(group, idx, scale))
        return cls(out, fingerprint(model) if model is not None else None)

    # -- queries ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> PlanGroup:
        for pg in self.groups:
            if pg.name == name:
                return pg
        raise KeyError(name)

    def gate_values(self) -> dict[str, torch.Tensor]:
        """Gate values that make a gated model compute what the sliced model computes."""
        return {pg.name: pg.full_values() for pg in self.groups}

    def summary(self) -> str:
        """A few lines for people: per group kept/size, then the achieved reduction."""
        lines = [f"{pg.name}: keep {pg.kept}/{pg.group.size}"
                 + (f" per expert x{pg.keep.shape[0]}" if pg.keep.dim() == 2 else "")
                 for pg in self.groups]
        r = self.report
        lines.append(f"parameters removed: {r['params_removed']:.0f}"
                     + (f" ({r['params_fraction']:.1%})" if r.get("params_fraction") is not None else ""))
        lines.append(f"forward FLOPs/token removed: {r['flops_removed']:.0f}")
        return "\n".join(lines)

    # -- model identity --------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise PlanError naming the differences if ``model`` is not this plan's base model."""
        if self.fingerprint is None:
            raise PlanError("this plan has no base-model fingerprint; build it with "
                            "Plan.from_keep(..., model=base_model)")
        mine, theirs = self.fingerprint, fingerprint(model)
        problems = []
        if mine["model_class"] != theirs["model_class"]:
            problems.append(f"model class: plan {mine['model_class']}, model {theirs['model_class']}")
        if mine["config_sha256"] != theirs["config_sha256"]:
            a, b = mine["config"], theirs["config"]
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            problems.append("config: " + "; ".join(
                f"{k}: plan {a.get(k)!r}, model {b.get(k)!r}" for k in diff[:6])
                + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""))
        if mine["params_sha256"] != theirs["params_sha256"]:
            a, b = mine["params"], theirs["params"]
            missing = [n for n in a if n not in b]
            extra = [n for n in b if n not in a]
            shapes = [f"{n} {a[n]} vs {b[n]}" for n in a if n in b and a[n] != b[n]]
            for label, items in (("missing from model", missing), ("not in plan's model", extra),
                                 ("shape plan vs model", shapes)):
                if items:
                    problems.append(f"parameters {label}: " + ", ".join(items[:4])
                                    + (f" (+{len(items) - 4} more)" if len(items) > 4 else ""))
        if problems:
            raise PlanError("this plan belongs to another model: " + " | ".join(problems)
                            + ". Apply it to the unpruned base checkpoint it was made from.")

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON part (tensors are referenced by key, stored in the safetensors file)."""
        groups = []
        for pg in self.groups:
            d = pg.group.to_dict()
            d.update(kept=pg.kept, keep_shape=list(pg.keep.shape), has_scales=pg.scales is not None)
            groups.append(d)
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                "report": self.report, "groups": groups}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for pg in self.groups:
            out[f"keep/{pg.name}"] = pg.keep.contiguous()
            if pg.scales is not None:
                out[f"scales/{pg.name}"] = pg.scales.to(torch.float32).contiguous()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/plan.json`` and ``path/plan.safetensors`` atomically (temp folder, rename)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.write_files(tmp, "plan")
        return path

    def write_files(self, folder: Path, stem: str, extra: dict[str, Any] | None = None) -> None:
        """Write ``<stem>.json`` and ``<stem>.safetensors`` into an existing folder."""
        from safetensors.torch import save_file

        tensor_file = folder / f"{stem}.safetensors"
        save_file(self.tensors(), str(tensor_file), metadata={"format": "pt"})
        data = self.to_dict()
        data["tensors"] = {"file": tensor_file.name,
                           "sha256": hashlib.sha256(tensor_file.read_bytes()).hexdigest()}
        if extra:
            data["extra"] = extra
        (folder / f"{stem}.json").write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan folder written by :meth:`save` (or a ``plan.json`` path), validating it."""
        path = Path(path)
        if path.suffix == ".json":
            return cls.read_files(path.parent, path.stem)[0]
        return cls.read_files(path, "plan")[0]

    @classmethod
    def read_files(cls, folder: Path, stem: str, fix: str = "re-save the plan"
                   ) -> tuple[Plan, dict[str, Any]]:
        """Read ``<stem>.json`` + ``<stem>.safetensors``; returns the plan and the extra section.

        ``fix`` ends the error messages: what the user can do about a missing or corrupt file
        (a pruned model folder says to copy it again or re-run its pipeline)."""
        jfile, tfile = folder / f"{stem}.json", folder / f"{stem}.safetensors"
        for f in (jfile, tfile):
            if not f.is_file():
                raise PlanError(f"{f} is missing; a plan is {stem}.json + {stem}.safetensors "
                                f"written together by Plan.save; {fix}")
        try:
            data = json.loads(jfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{jfile} is corrupt or truncated ({e}); {fix}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"{jfile} is not a prunegraph plan (no \"format\": \"{FORMAT}\")")
        if data.get("version", 0) > VERSION:
            raise PlanError(f"{jfile} has plan version {data['version']}, newer than this "
                            f"prunegraph understands ({VERSION}); upgrade prunegraph")
        blob = tfile.read_bytes()
        want = (data.get("tensors") or {}).get("sha256")
        if want is not None and hashlib.sha256(blob).hexdigest() != want:
            raise PlanError(f"{tfile} does not match {jfile.name} (sha256 differs): it is "
                            f"truncated, modified, or from another save; {fix}")
        try:
            from safetensors.torch import load

            tensors = load(blob)
        except Exception as e:
            raise PlanError(f"{tfile} is corrupt or truncated ({e}); {fix}") from e
        try:
            groups = []
            for d in data["groups"]:
                group = Group.from_dict(d)
                keep = tensors.get(f"keep/{group.name}")
                if keep is None:
                    raise PlanError(f"{tfile} has no kept indices for group {group.name!r}")
                if list(keep.shape) != d["keep_shape"]:
                    raise PlanError(f"{tfile}: kept indices of {group.name!r} have shape "
                                    f"{list(keep.shape)}, {jfile.name} says {d['keep_shape']}")
                scales = tensors.get(f"scales/{group.name}") if d.get("has_scales") else None
                if d.get("has_scales") and scales is None:
                    raise PlanError(f"{tfile} has no scales for group {group.name!r}")
                groups.append(PlanGroup(group, keep.long(), scales))
            plan = cls(groups, data.get("fingerprint"), data.get("report") or {})
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{jfile} is malformed ({type(e).__name__}: {e}); {fix}") from e
        return plan, data.get("extra") or {}

    def masks(self, shapes: Mapping[str, Sequence[int]], key: Mapping[str, Any] | None = None
              ) -> dict[Any, dict[int, tuple[torch.Tensor, int | None]]]:
        """Kept-index masks per parameter and dim: ``key(param) -> dim -> (mask, expert_dim)``.

        ``mask`` is ``[n]`` or, for per-expert members, ``[experts, n]``. One mask per (parameter,
        dim) combines every member touching it (fused projections; tied names share a ``key``):
        first everything a group covers is cleared, then its kept indices are set.

        Raises:
            PlanError: a member names a parameter not in ``shapes`` or does not fit its shape.
        """
        key = key or {n: n for n in shapes}
        for pg in self.groups:
            for m in pg.group.members:
                if m.param not in shapes:
                    raise PlanError(f"plan group {pg.name!r} names parameter {m.param!r}, which "
                                    f"the model does not have; apply the plan to its base model")
                shape = shapes[m.param]
                if not 0 <= m.dim < len(shape) or \
                        int(m.indices(torch.arange(pg.group.size)).max()) >= shape[m.dim]:
                    raise PlanError(f"plan group {pg.name!r}: member {m.param} dim {m.dim} does "
                                    f"not fit its shape {list(shape)}; apply the plan to its base "
                                    f"model")
        try:
            return kept_masks(((pg.group, pg.keep) for pg in self.groups), shapes,
                              key=key.__getitem__)
        except ValueError as e:
            raise PlanError(str(e)) from None

    def sliced_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """Shapes of the given parameters after slicing (tied names are not merged here)."""
        out = {n: tuple(s) for n, s in shapes.items()}
        for name, per_dim in self.masks(shapes).items():
            new = list(shapes[name])
            for dim, (mask, expert_dim) in per_dim.items():
                new[dim] = int(mask.sum(-1).max()) if expert_dim is not None else int(mask.sum())
            out[name] = tuple(new)
        return out

    @property
    def params_removed(self) -> float:
        return float(self.report["params_removed"])

    @property
    def flops_removed(self) -> float:
        return float(self.report["flops_removed"])

    def __repr__(self) -> str:
        return (f"Plan({len(self.groups)} groups, params removed {self.report['params_removed']:.0f}"
                f", flops/token removed {self.report['flops_removed']:.0f})")


# ---------------------------------------------------------------------------- constraints


#: Config keys that hold how many experts a token is routed to, in the order they are read.
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k")


def routing_top_k(model: torch.nn.Module | None) -> int:
    """Experts each token is routed to (1 for a dense model): an experts group keeps at least
    this many. The plan and the allocator both read it here, so they agree on the floor."""
    config = getattr(model, "config", None)
    for key in TOP_K_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def _priority(size: int, requested: list[int], score: torch.Tensor | None) -> list[int]:
    """All units, most important first: by score if given, else request order then index."""
    if score is not None:
        return torch.argsort(score.float(), descending=True, stable=True).tolist()
    rest = [u for u in range(size) if u not in set(requested)]
    return list(dict.fromkeys(requested)) + rest


def _select(group: Group, request: Any, score: torch.Tensor | None, top_k: int,
            repair: bool) -> torch.Tensor:
    shape = gate_shape(group)
    try:
        req = torch.as_tensor(request, dtype=torch.long)
    except (ValueError, TypeError) as e:
        raise PlanError(f"kept units for {group.name!r} must be integer indices of equal length "
                        f"per expert (fused expert tensors stay dense): {e}") from e
    if len(shape) == 2:
        if req.dim() != 2 or req.shape[0] != shape[0]:
            raise PlanError(f"group {group.name!r} is per expert: keep must have shape "
                            f"[{shape[0]}, k], got {list(req.shape)}")
        rows = [_select_row(group, r.tolist(), None if score is None else score[e], top_k, repair)
                for e, r in enumerate(req)]
        if len({len(r) for r in rows}) > 1:
            raise PlanError(f"group {group.name!r}: every expert must keep the same number of units")
        return torch.stack(rows)
    if req.dim() != 1:
        raise PlanError(f"keep for {group.name!r} must be a 1-D list of unit indices, got shape "
                        f"{list(req.shape)}")
    return _select_row(group, req.tolist(), score, top_k, repair)


def _select_row(group: Group, req: list[int], score: torch.Tensor | None, top_k: int,
                repair: bool) -> torch.Tensor:
    c, size = group.constraints, group.size
    bad = [u for u in req if not 0 <= u < size]
    if bad:
        raise PlanError(f"group {group.name!r} has {size} units; kept indices {bad[:5]} are out "
                        f"of range")
    if len(set(req)) != len(req):
        raise PlanError(f"group {group.name!r}: kept indices contain duplicates")
    if c.pinned and len(req) != size:
        raise BudgetError(f"group {group.name!r} is pinned ({c.pinned_reason or 'by the analysis'})"
                          f" and cannot shrink; leave it out of keep or unpin it")
    floor = max(c.min_units, top_k if c.removal == "mask_logit" else 1)
    if len(req) < floor:
        why = f"top-{top_k} routing" if c.removal == "mask_logit" and top_k >= c.min_units else \
            f"min_units={c.min_units}"
        raise BudgetError(f"group {group.name!r}: keeping {len(req)} of {size} units is below "
                          f"the floor of {floor} ({why}); keep more units or lower the sparsity")
    order = _priority(size, req, score)
    if c.q_per_kv and c.q_per_kv > 1:
        kept = _gqa(group, c.q_per_kv, req, order, repair)
    else:
        kept = list(req)
        if c.round_to > 1:
            target = _rounded(len(kept), c.round_to, floor, size)
            if target > len(kept):
                kept += [u for u in order if u not in set(kept)][: target - len(kept)]
            elif target < len(kept):
                rank = {u: i for i, u in enumerate(order)}
                kept = sorted(kept, key=rank.__getitem__)[:target]
    return torch.tensor(sorted(kept), dtype=torch.long)


def _rounded(k: int, multiple: int, floor: int, size: int) -> int:
    """Nearest multiple of ``multiple`` in ``[floor, size]`` (ties up); ``k`` if none exists."""
    options = [m for m in range(multiple, size + 1, multiple) if m >= floor]
    if not options:
        return k
    return min(options, key=lambda m: (abs(m - k), -m))


def _gqa(group: Group, q: int, req: list[int], order: list[int], repair: bool) -> list[int]:
    """Keep equal query heads (``q`` per kv head) per kept kv head; a kv head stays while any of
    its heads does."""
    per_kv: dict[int, list[int]] = {}
    for u in order:
        per_kv.setdefault(u // q, []).append(u)
    requested = set(req)
    live = sorted({u // q for u in req})
    counts = {h: sum(u in requested for u in per_kv[h]) for h in live}
    if len(set(counts.values())) <= 1:
        return list(req)
    if not repair:
        raise PlanError(f"group {group.name!r}: kept query heads per kv head must be equal "
                        f"(repeat_kv needs it), got {counts}; pass repair=True or fix keep")
    r = min(q, max(1, round(len(req) / len(live))))
    kept = []
    for h in live:
        heads = [u for u in per_kv[h] if u in requested] + [u for u in per_kv[h] if u not in requested]
        kept += heads[:r]
    return kept


# ------------------------------------------------------------------------------- reporting


def _validate_keep(pg: PlanGroup) -> None:
    keep, group = pg.keep, pg.group
    if keep.dtype != torch.long:
        raise PlanError(f"kept indices of {group.name!r} must be int64, got {keep.dtype}")
    if tuple(keep.shape[:-1]) != gate_shape(group)[:-1]:
        raise PlanError(f"kept indices of {group.name!r} have shape {list(keep.shape)}, expected "
                        f"{list(gate_shape(group)[:-1])} + [k]")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= group.size):
        raise PlanError(f"kept indices of {group.name!r} are out of range [0, {group.size})")
    if keep.shape[-1] > 1 and not bool((keep[..., 1:] > keep[..., :-1]).all()):
        raise PlanError(f"kept indices of {group.name!r} must be sorted and unique")
    if keep.shape[-1] == 0:
        raise PlanError(f"group {group.name!r} keeps no units; keep at least one")
    if pg.scales is not None and tuple(pg.scales.shape) != tuple(keep.shape):
        raise PlanError(f"scales of {group.name!r} have shape {list(pg.scales.shape)}, expected "
                        f"the kept indices' shape {list(keep.shape)}")


def _report(groups: list[PlanGroup], fp: dict[str, Any] | None) -> dict[str, Any]:
    """Achieved reduction: exact parameter counts when the base shapes are known (fingerprint),
    else the groups' per-unit estimates; FLOPs from ``flops_per_unit`` (an estimate)."""
    removed = sum(pg.removed_units * pg.group.params_per_unit for pg in groups)
    flops = sum(pg.removed_units * pg.group.flops_per_unit for pg in groups)
    total = fp.get("params_total") if fp is not None else None
    if fp is not None:
        shapes = {n: tuple(s) for n, s in fp["params"].items()}
        aliases = {n for names in fp.get("tied", []) for n in names[1:]}
        try:
            removed = float(removed_params(((pg.group, pg.keep) for pg in groups), shapes,
                                           key=lambda n: None if n in aliases else n))
        except (KeyError, IndexError, ValueError):
            pass  # the plan does not fit these shapes; Plan.masks reports it where it matters
    return {"params_removed": removed, "flops_removed": flops, "params_total": total,
            "params_fraction": (removed / total) if total else None,
            "groups": {pg.name: {"kept": pg.kept, "size": pg.group.size} for pg in groups}}
