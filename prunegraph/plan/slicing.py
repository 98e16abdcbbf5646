"""Physical slicing: apply a :class:`~prunegraph.plan.plan.Plan` to the user's module, in place.

For every plan group, scales are first folded into the consumer members, then every member is
index-selected along its dim: per expert for ``expert_dim`` members (``[E, k]`` kept indices), kv
members keep the kv heads that still have query heads (``div``), routers drop expert rows. The
selection of each (parameter, dim) is one boolean mask built from all members touching it, so
fused tensors (``qkv_proj``, ``gate_up_proj``) and tied parameters (one ``Parameter`` under two
names) are sliced once; the new ``Parameter`` replaces the old one everywhere it was held.

The module attributes that forward reads are then rewritten from two small tables:
:data:`SHAPE_ATTRIBUTES` (per module class, from the new weight shapes) and
:data:`LAYER_ATTRIBUTES` (per group kind, from the kept counts), applied on the modules owning
member parameters and their parents, and on a per-module copy of their ``config`` when the module
keeps one (Phi-3 attention reads ``self.config.num_attention_heads``). An attribute is rewritten
only if its current value equals the group's unpruned quantity, so unrelated attributes of the
same name are never touched. Per-layer widths can therefore all differ.

``structural=True`` changes shapes only (no scale folding): :func:`prunegraph.from_pretrained`
uses it on a ``meta``-device model to rebuild a pruned architecture with no model code.

This lives in the core because checkpoint loading needs it; the ``Slice`` pass
(``prunegraph.passes.slice``) wraps it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunegraph.errors import PlanError, PreconditionError
from prunegraph.ir.groups import Group
from prunegraph.plan.gating import has_gates, owner_of, unit_multiplier
from prunegraph.plan.plan import Plan, PlanGroup

__all__ = ["apply_plan", "LAYER_ATTRIBUTES", "SHAPE_ATTRIBUTES", "CONFIG_FIELDS", "config_updates",
           "per_layer_updates"]

#: Quantities of a plan group, as ``(unpruned, pruned)``.
_QUANTITIES: dict[str, Callable[[PlanGroup], tuple[int, int]]] = {
    "units": lambda pg: (pg.group.size, pg.kept),
    "q_heads": lambda pg: (pg.group.size, pg.kept),
    "kv_heads": lambda pg: (pg.group.size // (pg.group.constraints.q_per_kv or 1),
                            pg.kv_kept() or pg.kept),
    "q_per_kv": lambda pg: (pg.group.constraints.q_per_kv or 1,
                            pg.kept // (pg.kv_kept() or pg.kept)),
    "q_width": lambda pg: (pg.group.size * _head_dim(pg.group), pg.kept * _head_dim(pg.group)),
}

#: group kind -> [(attribute names, quantity)]: per-layer attributes that forward reads.
LAYER_ATTRIBUTES: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "heads": [(("num_heads", "num_attention_heads", "n_head", "n_heads", "o_groups", "n_groups"),
               "q_heads"),
              (("num_key_value_heads", "num_kv_heads", "n_kv_heads"), "kv_heads"),
              (("num_key_value_groups",), "q_per_kv"),
              (("split_size", "all_head_size", "embed_dim", "hidden_size", "v_dim", "qk_dim"),
               "q_width")],
    "channels": [(("intermediate_size", "ffn_dim", "time_step_rank"), "units")],
    "shared_expert_channels": [(("intermediate_size",), "units")],
    "experts": [(("num_experts", "num_local_experts"), "units")],
    "expert_channels": [(("intermediate_dim", "intermediate_size", "moe_intermediate_size"),
                         "units")],
}

#: group kind -> [(config field names, quantity)]: model-level fields of a uniform plan.
CONFIG_FIELDS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "heads": [(("num_attention_heads", "n_head"), "q_heads"),
              (("num_key_value_heads",), "kv_heads")],
    "channels": [(("intermediate_size", "n_inner", "ffn_dim"), "units")],
    "shared_expert_channels": [(("shared_expert_intermediate_size",), "units")],
    "experts": [(("num_experts", "num_local_experts", "n_routed_experts"), "units")],
    "expert_channels": [(("moe_intermediate_size", "intermediate_size"), "units")],
}

#: module class name -> {attribute: (parameter, dim)}: shape attributes read back from weights.
SHAPE_ATTRIBUTES: dict[str, dict[str, tuple[str, int]]] = {
    "Linear": {"out_features": ("weight", 0), "in_features": ("weight", 1)},
    "Conv1D": {"nx": ("weight", 0), "nf": ("weight", 1)},
    "Embedding": {"num_embeddings": ("weight", 0), "embedding_dim": ("weight", 1)},
}


def _head_dim(group: Group) -> int:
    return group.constraints.head_dim or group.members[0].inner


def apply_plan(model: nn.Module, plan: Plan, *, structural: bool = False,
               check: bool = True) -> dict[str, Any]:
    """Slice ``model`` in place to ``plan``; returns counts (parameters before/after, sliced).

    Args:
        structural: change shapes only (no scale folding), e.g. on a ``meta`` model.
        check: verify the plan's fingerprint against the model first.

    Raises:
        PreconditionError: the model still carries gates.
        PlanError: the plan belongs to another model or names missing parameters; nothing has been
            changed when it is raised.
    """
    if has_gates(model):
        raise PreconditionError("the model has gates or parametrizations on it; remove them "
                                "(prunegraph.plan.gating.remove_gates(model)) before slicing")
    if check and plan.fingerprint is not None:
        plan.check_model(model)
    named = dict(model.named_parameters(remove_duplicate=False))
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for name, p in named.items():
        holders.setdefault(id(p), []).append(owner_of(model, name))
    before = sum(p.numel() for p in model.parameters())

    shapes = {n: tuple(p.shape) for n, p in named.items()}
    by_key = plan.masks(shapes, key={n: id(p) for n, p in named.items()})  # validates first
    masks = by_key
    if not structural:
        with torch.no_grad():
            for pg in plan.groups:
                if pg.scales is not None:
                    full = pg.full_values()
                    for m in pg.group.gate_site:
                        w = named[m.param]
                        mult = unit_multiplier(m, full.to(w.device), w.shape)
                        w.mul_(mult.to(w.dtype, copy=False))

    touched: set[int] = set()
    for pid, per_dim in masks.items():
        param = next(p for p in named.values() if id(p) == pid)
        kept = param.detach()
        for dim, (mask, expert_dim) in sorted(per_dim.items(), key=lambda kv: kv[1][1] is None):
            kept = _select(kept, dim, mask, expert_dim)
        if tuple(kept.shape) == tuple(param.shape):
            continue
        new = nn.Parameter(kept.contiguous(), requires_grad=param.requires_grad)
        for module, attr in holders[pid]:
            module._parameters[attr] = new
            touched.add(id(module))
    modules = {id(m): m for m in model.modules()}
    for mid in touched:
        _shape_attributes(modules[mid])
    rewritten = _layer_attributes(model, plan)
    eager = _runtime_fallbacks(model, touched, modules)
    after = sum(p.numel() for p in model.parameters())
    return {"params_before": before, "params_after": after,
            "parameters_sliced": len(masks), "attributes_rewritten": rewritten,
            "experts_eager": eager}


# ---------------------------------------------------------------------------------- masks


def _select(w: torch.Tensor, dim: int, mask: torch.Tensor, expert_dim: int | None) -> torch.Tensor:
    if expert_dim is None:
        return w.index_select(dim, mask.nonzero().squeeze(1).to(w.device))
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise PlanError("per-expert kept counts differ between experts; fused expert tensors "
                        "need the same count in every expert")
    experts, k = mask.shape[0], int(counts[0])
    idx = mask.nonzero()[:, 1].reshape(experts, k)
    moved = w.movedim((expert_dim, dim), (0, 1))
    index = idx.reshape(experts, k, *([1] * (moved.dim() - 2))).expand(experts, k, *moved.shape[2:])
    return torch.gather(moved, 1, index.to(w.device)).movedim((0, 1), (expert_dim, dim))


# ----------------------------------------------------------------------------- attributes


def _shape_attributes(module: nn.Module) -> None:
    table = SHAPE_ATTRIBUTES.get(type(module).__name__)
    for attr, (pname, dim) in (table or {}).items():
        p = getattr(module, pname, None)
        if p is not None and hasattr(module, attr):
            setattr(module, attr, int(p.shape[dim]))
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        # a depthwise conv (one filter per channel, SSM causal convs) keeps groups = channels
        depthwise = module.groups == module.in_channels == module.out_channels
        module.out_channels = int(module.weight.shape[0])
        module.groups = module.out_channels if depthwise else module.groups
        module.in_channels = int(module.weight.shape[1]) * module.groups


def _layer_attributes(model: nn.Module, plan: Plan) -> int:
    """Rewrite per-layer attributes from :data:`LAYER_ATTRIBUTES`; returns how many changed."""
    parent_of = {id(child): mod for mod in model.modules() for child in mod.children()}
    count = 0
    for pg in plan.groups:
        rules = LAYER_ATTRIBUTES.get(pg.group.kind, [])
        if not rules:
            continue
        modules: dict[int, nn.Module] = {}
        for m in pg.group.members:
            owner, _ = owner_of(model, m.param)
            modules[id(owner)] = owner
            parent = parent_of.get(id(owner))
            if parent is not None and parent is not model:
                modules[id(parent)] = parent
        for module in modules.values():
            changes = {}
            for names, quantity in rules:
                old, new = _QUANTITIES[quantity](pg)
                for attr in names:
                    value = module.__dict__.get(attr)
                    if type(value) is int and value == old and old != new:
                        setattr(module, attr, new)
                        count += 1
                    cfg = module.__dict__.get("config")
                    if cfg is not None and type(getattr(cfg, attr, None)) is int \
                            and getattr(cfg, attr) == old and old != new \
                            and not isinstance(getattr(type(cfg), attr, None), property):
                        changes[attr] = new
            if changes:
                cfg = copy.copy(module.__dict__["config"])
                for attr, new in changes.items():
                    setattr(cfg, attr, new)
                module.config = cfg
                count += len(changes)
    return count


def grouped_mm_aligned(module: nn.Module) -> bool:
    """Whether every 3-D (fused expert) parameter of ``module`` has 16-byte-aligned row widths.

    Grouped GEMM kernels (``torch._grouped_mm``, cuBLAS) need it; pruned expert widths may break it.
    """
    for p in module.parameters(recurse=False):
        if p.dim() == 3 and any(s * p.element_size() % 16 for s in p.shape[1:]):
            return False
    return True


def _runtime_fallbacks(model: nn.Module, touched: set[int], modules: dict[int, nn.Module]) -> int:
    """Switch sliced fused-expert modules with unaligned widths to the eager experts loop.

    HF's ``@use_experts_implementation`` modules dispatch on ``self.config._experts_implementation``;
    the switch goes to a per-module config copy, so other layers keep the fast kernel.
    """
    count = 0
    for mid in touched:
        module = modules[mid]
        cfg = module.__dict__.get("config")
        impl = getattr(cfg, "_experts_implementation", None)
        if cfg is not None and impl not in (None, "eager") and not grouped_mm_aligned(module):
            cfg = copy.copy(cfg)
            cfg._experts_implementation = "eager"
            module.config = cfg
            count += 1
    return count


def config_updates(plan: Plan, config: Any) -> dict[str, int]:
    """Config fields a *uniform* plan changes (every group of a kind agrees), from CONFIG_FIELDS.

    A field changes only if its current value equals the groups' unpruned quantity. The caller
    must still verify that the config builds the sliced shapes (groups may not cover every layer).
    """
    proposals: dict[str, set[int]] = {}
    for pg in plan.groups:
        for names, quantity in CONFIG_FIELDS.get(pg.group.kind, []):
            old, new = _QUANTITIES[quantity](pg)
            for attr in names:
                if type(getattr(config, attr, None)) is int and getattr(config, attr) == old:
                    proposals.setdefault(attr, set()).add(new)
    return {k: next(iter(v)) for k, v in proposals.items() if len(v) == 1}


def per_layer_updates(plan: Plan, config: Any) -> dict[int, dict[str, int]]:
    """Per decoder layer, the config fields (from CONFIG_FIELDS) whose pruned value differs from
    the config's: ``{3: {"intermediate_size": 1216, "num_attention_heads": 6}, ...}``.

    The form of transformers' ``per_layer_config`` (a sparse mapping of layer overrides); groups
    outside a decoder layer are left out.
    """
    out: dict[int, dict[str, int]] = {}
    for pg in plan.groups:
        if pg.group.layer is None:
            continue
        for names, quantity in CONFIG_FIELDS.get(pg.group.kind, []):
            old, new = _QUANTITIES[quantity](pg)
            for attr in names:
                if type(getattr(config, attr, None)) is int and getattr(config, attr) == old \
                        and new != old:
                    out.setdefault(int(pg.group.layer), {})[attr] = new
                    break
    return dict(sorted(out.items()))
