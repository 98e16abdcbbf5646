"""Gates: per-unit multipliers folded into the consumer members of each group.

A gate value ``g[u]`` scales unit ``u``'s activation. Every consumer of a unit is linear in it, so
multiplying the columns the unit is read by (the group's *consumer* members) by ``g[u]`` computes
exactly the gated activation, with no change to the model's code: the gated model is still the
user's ``nn.Module`` (``generate()`` works) and the gate tensors receive gradients. Gates are
installed with :mod:`torch.nn.utils.parametrize` on the consumer parameters, one parametrization per
parameter multiplying in every gate that touches it::

    gates = apply_gates(model, groups, {"model.layers.0.mlp:channels": torch.ones(96)})
    gates.values["model.layers.0.mlp:channels"][:10] = 0     # channels 0..9 switched off
    model(ids)                                               # gated forward
    gates.remove()                                           # the original module again

Per-expert channel groups (members with ``expert_dim``) take values of shape ``[experts, size]``.
Experts groups (``constraints.removal == "mask_logit"``) also mask the router: a gate value of
exactly 0 removes the expert by setting its router logit to ``-inf`` (so top-k routing picks among
the others, as it will after slicing); positive values scale the expert's output through its
consumer slice. The logit mask is a hard 0/``-inf`` choice; gradients reach expert gates through the
consumer scaling.

All gates at 1 leave every parameter bit-identical (``w * 1.0 == w``) and add no logit mask, so
outputs equal the original's exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from prunegraph.errors import PlanError, PrunegraphError
from prunegraph.ir.groups import Group, Member

__all__ = ["GateHandle", "GateSet", "apply_gates", "remove_gates", "installed_gates",
           "unit_multiplier", "owner_of", "gate_shape"]

#: Where the runtime keeps a model's GateSet (one per model); read it with installed_gates().
_GATES_ATTR = "_prunegraph_gates"


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` and its attribute name there."""
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError as e:
        raise PlanError(f"the model has no module {path!r} (for parameter {name!r}); the groups "
                        f"or plan were made for another model") from e
    if not hasattr(module, attr):
        raise PlanError(f"the model has no parameter {name!r}; the groups or plan were made for "
                        f"another model")
    return module, attr


def gate_shape(group: Group) -> tuple[int, ...]:
    """Shape of a group's per-unit values: ``[size]``, or ``[experts, size]`` for per-expert units."""
    if any(m.expert_dim is not None for m in group.members):
        if group.constraints.experts is None:
            raise PlanError(f"group {group.name!r} has per-expert members but no "
                            f"constraints.experts; the analysis must record the expert count")
        return (group.constraints.experts, group.size)
    return (group.size,)


def unit_multiplier(member: Member, values: torch.Tensor, shape: torch.Size | tuple[int, ...]
                    ) -> torch.Tensor:
    """Per-index multipliers for a parameter of ``shape`` from per-unit ``values``.

    Indices the member does not own get 1. The result broadcasts against the parameter. For
    ``div > 1`` (a block shared by several units) the block takes the largest of its units' values,
    so a shared kv slice stays while any of its query heads does.
    """
    size = values.shape[-1]
    v = values
    if member.div > 1:
        v = v.reshape(*v.shape[:-1], size // member.div, member.div).amax(-1)
    pos = member.block_positions(size).reshape(-1).to(v.device)
    vals = v.repeat_interleave(member.inner, dim=-1)
    n = shape[member.dim]
    view = [1] * len(shape)
    view[member.dim] = n
    if member.expert_dim is None:
        return torch.ones(n, dtype=v.dtype, device=v.device).index_copy(0, pos, vals).reshape(view)
    experts = shape[member.expert_dim]
    if v.dim() != 2 or v.shape[0] != experts:
        raise PlanError(f"per-expert values for {member.param} must have shape [{experts}, size], "
                        f"got {tuple(values.shape)}")
    mult = torch.ones(experts, n, dtype=v.dtype, device=v.device).index_copy(1, pos, vals)
    if member.expert_dim > member.dim:
        mult = mult.T
    view[member.expert_dim] = experts
    return mult.reshape(view)


class _Fold(nn.Module):
    """Parametrization ``W -> W * prod(multipliers)`` reading the live values of a GateSet."""

    def __init__(self, gates: GateSet, entries: list[tuple[Member, str]]) -> None:
        super().__init__()
        self._gates = gates  # plain attribute: the values stay owned by the GateSet
        self.entries = entries

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for member, name in self.entries:
            mult = unit_multiplier(member, self._gates.values[name], weight.shape)
            weight = weight * mult.to(weight.dtype)
        return weight


class _RouterMask(TorchFunctionMode):
    """Adds ``-inf`` to the logits of gated-off experts inside one router's forward.

    The router computes its logits with ``F.linear`` over its weight and may select top-k in the
    same forward, so the mask must apply to that linear's output, not to the module's output.
    """

    def __init__(self, shape: torch.Size, dead: torch.Tensor) -> None:
        super().__init__()
        self.shape, self.dead, self.hits = shape, dead, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and tuple(args[1].shape) == tuple(self.shape):
            self.hits += 1
            out = out.masked_fill(self.dead.to(out.device), float("-inf"))
        return out


@runtime_checkable
class GateHandle(Protocol):
    """Any gates installed on a model (the ``gates`` state key): live ``values`` and
    ``remove()``. :class:`GateSet` for unit gates; a weight family (LEAP) installs its own."""

    values: dict[str, torch.Tensor]

    def remove(self) -> None: ...


class GateSet:
    """Gates installed on a model: live per-group ``values`` and the handles to remove them.

    Attributes:
        values: group name -> per-unit gate tensor (``[size]`` or ``[experts, size]``). Assign new
            tensors (e.g. ``nn.Parameter``) or edit in place; the next forward reads them.
        groups: group name -> :class:`Group` for the gated groups.
    """

    def __init__(self, model: nn.Module, groups: dict[str, Group],
                 values: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.groups = groups
        self.values = values
        self._folded: list[tuple[nn.Module, str]] = []
        self._hooks: list[Any] = []

    def remove(self) -> None:
        """Take every gate off; parameters are the original tensors again."""
        for module, attr in self._folded:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for handle in self._hooks:
            handle.remove()
        self._folded.clear()
        self._hooks.clear()
        if installed_gates(self.model) is self:
            delattr(self.model, _GATES_ATTR)

    def __repr__(self) -> str:
        return f"GateSet({len(self.values)} groups on {len(self._folded)} parameters)"


def _check_value(group: Group, value: torch.Tensor) -> None:
    want = gate_shape(group)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PlanError(f"gate values for group {group.name!r} must be a tensor of shape "
                        f"{list(want)}, got {got}")


def apply_gates(model: nn.Module, groups: list[Group],
                values: Mapping[str, torch.Tensor] | None = None) -> GateSet:
    """Install gates for the groups named in ``values`` (all prunable groups at 1 when omitted).

    Raises:
        PlanError: an unknown group name, a wrong value shape, a group without consumer members,
            or an experts group without a router.
        PrunegraphError: the model already carries gates (remove them first).
    """
    if installed_gates(model) is not None:
        raise PrunegraphError("the model already has gates; call remove_gates(model) before "
                              "applying new ones")
    by_name = {g.name: g for g in groups}
    if values is None:
        values = {g.name: torch.ones(gate_shape(g)) for g in groups if g.prunable}
    values = dict(values)
    for name, value in values.items():
        if name not in by_name:
            from prunegraph.pipeline.contract import nearest

            raise PlanError(f"no group named {name!r}.{nearest(name, by_name)}")
        group = by_name[name]
        _check_value(group, value)
        if not group.gate_site:
            raise PlanError(f"group {name!r} has no consumer member, so no gate can be folded "
                            f"into it; gate its consumer group instead")
        if group.constraints.removal == "mask_logit" and not _router_of(group):
            raise PlanError(f"experts group {name!r} has no router; the analysis must record it")

    gates = GateSet(model, {n: by_name[n] for n in values}, values)
    params = dict(model.named_parameters(remove_duplicate=False))
    sites: dict[tuple[int, str], tuple[nn.Module, str, list[tuple[Member, str]]]] = {}
    for name in values:
        for member in by_name[name].gate_site:
            module, attr = owner_of(model, member.param)
            if member.param not in params:
                raise PlanError(f"{member.param!r} is not a parameter of the model")
            key = (id(module), attr)
            sites.setdefault(key, (module, attr, []))[2].append((member, name))
    try:
        for module, attr, entries in sites.values():
            parametrize.register_parametrization(module, attr, _Fold(gates, entries))
            gates._folded.append((module, attr))
        for name in values:
            group = by_name[name]
            if group.constraints.removal == "mask_logit":
                _install_router_mask(model, gates, name, _router_of(group))
    except Exception:
        gates.remove()
        raise
    setattr(model, _GATES_ATTR, gates)
    return gates


def _router_of(group: Group) -> str | None:
    return group.router or next((m.param for m in group.members if m.role == "router"), None)


def _install_router_mask(model: nn.Module, gates: GateSet, name: str, router: str) -> None:
    module, attr = owner_of(model, router)
    shape = getattr(module, attr).shape
    active: list[_RouterMask] = []

    def pre(_mod, _args):
        dead = gates.values[name].detach() == 0
        if bool(dead.any()):
            mode = _RouterMask(shape, dead)
            mode.__enter__()
            active.append(mode)

    def post(_mod, _args, _out):
        if active:
            mode = active.pop()
            mode.__exit__(None, None, None)
            if mode.hits == 0:
                raise PrunegraphError(
                    f"router {router!r} computed no F.linear over its weight, so experts of "
                    f"{name!r} cannot be masked; routers must compute logits with F.linear/nn.Linear")

    gates._hooks.append(module.register_forward_pre_hook(pre))
    gates._hooks.append(module.register_forward_hook(post, always_call=True))


def installed_gates(model: nn.Module) -> GateSet | None:
    """The :class:`GateSet` installed on ``model`` by :func:`apply_gates`, or None.

    A model carries at most one set of gates; the runtime API (``remove_gates(model)``, folding)
    finds it here. Pipeline passes read ``state.gates`` instead."""
    return getattr(model, _GATES_ATTR, None)


def remove_gates(model_or_gates: nn.Module | GateSet) -> None:
    """Remove the gates of a :class:`GateSet`, or those installed on a model (no-op if none)."""
    if isinstance(model_or_gates, GateSet):
        model_or_gates.remove()
        return
    gates = installed_gates(model_or_gates)
    if gates is not None:
        gates.remove()
