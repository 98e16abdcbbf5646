"""Gates: per-unit multipliers at the consumers of each group.

A gate value ``g[u]`` scales unit ``u``'s activation. Every consumer of a unit is linear in it, so
scaling the unit where its consumer reads it (the group's *consumer* members) computes exactly the
gated activation, with no change to the model's code: the gated model is still the user's
``nn.Module`` (``generate()`` works) and the gate tensors receive gradients. A consumer site is
one of two kinds, chosen per parameter when the gates are installed:

* **on the activation** (every consumer that is the input dim of an ``nn.Linear`` or GPT-2
  ``Conv1D`` weight: ``down_proj``, ``o_proj``, ``c_proj`` ...): a forward pre-hook scales the
  module's input channels, ``linear(x * m, W)``, through :class:`ScaleChannels`, whose backward
  computes ``dL/dm = sum_tokens x * dL/d(x m)`` from the activation. With frozen weights no
  weight-sized gradient is ever formed: a backward costs the input gradient the layers below need
  anyway, plus one multiply-and-sum of the activation;
* **on the parameter** (every other consumer: fused 3-D expert tensors used by a custom op, where
  no activation carries the unit dim): a :mod:`torch.nn.utils.parametrize` parametrization
  ``W -> W * m`` on the parameter, multiplying in every gate that touches it.

Both compute the same function (``x (W m) == (x m) W`` up to the rounding order of a scale other
than 0, 1 or a power of two)::

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

All gates at 1 leave every parameter and activation bit-identical (``w * 1.0 == w``) and add no
logit mask, so outputs equal the original's exactly. Inside :meth:`GateSet.bypassed` every gate is
skipped (the dense model, the distillation teacher of mask training: no second copy of the
weights, no multiply). :meth:`GateSet.fold` multiplies the gates into the weights for good.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from prunegraph.errors import PlanError, PrunegraphError
from prunegraph.ir.groups import Group, Member

__all__ = ["GateHandle", "GateSet", "apply_gates", "remove_gates", "installed_gates",
           "unit_multiplier", "owner_of", "gate_shape", "has_gates", "linear_input_dim",
           "linear_weight",
           "ScaleChannels"]

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
    pos = _positions(member, size, v.device)
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


@functools.lru_cache(maxsize=4096)
def _positions(member: Member, size: int, device: torch.device) -> torch.Tensor:
    """A member's block indices on ``device``, made once (every gated forward reads them)."""
    return member.block_positions(size).reshape(-1).to(device)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as the tensor it is (``nn.Module``'s attribute lookup is typed
    ``Tensor | Module``); a clear error for a module without one."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def linear_input_dim(module: nn.Module) -> int | None:
    """Dim of ``module.weight`` that indexes input features, for modules computing ``x @ W``:
    ``nn.Linear`` (``[out, in]``: 1) and the ``Conv1D`` of GPT-2-style HF models (``[in, out]``:
    0, recognised by its ``nf``/``nx`` attributes); ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return 0
    return None


def _site_multiplier(gates: GateSet, entries: list[tuple[Member, str]],
                     shape: tuple[int, ...]) -> torch.Tensor:
    """The product of every gate touching one parameter, broadcasting against ``shape``."""
    mults = [unit_multiplier(member, gates.values[name], shape) for member, name in entries]
    return functools.reduce(operator.mul, mults)


class _Fold(nn.Module):
    """Parametrization ``W -> W * prod(multipliers)`` reading the live values of a GateSet."""

    def __init__(self, gates: GateSet, entries: list[tuple[Member, str]]) -> None:
        super().__init__()
        self._gates = gates  # plain attribute: the values stay owned by the GateSet
        self.entries = entries

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._gates.bypass:
            return weight
        for member, name in self.entries:
            mult = unit_multiplier(member, self._gates.values[name], weight.shape)
            weight = weight * mult.to(weight.dtype)
        return weight


class ScaleChannels(torch.autograd.Function):
    """``x * m`` over the last dim, with ``dL/dm`` reduced from the activation in float32.

    The same function as the plain product; the backward sums ``x * dL/dy`` over the tokens with a
    float32 accumulator (under bf16 autocast the product is bf16), so a gate's gradient is as
    precise as the weight-site one and costs no weight-sized tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        scale = mult.to(x.dtype)
        ctx.save_for_backward(x if mult.requires_grad else None, scale)
        ctx.mult_dtype = mult.dtype
        return x * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        grad_x = grad * scale if ctx.needs_input_grad[0] else None
        grad_m = None
        if ctx.needs_input_grad[1]:
            n = grad.shape[-1]
            grad_m = torch.mul(grad.reshape(-1, n), x.reshape(-1, n)).sum(
                0, dtype=torch.float32).to(ctx.mult_dtype)
        return grad_x, grad_m


class _ActivationSite:
    """A gate on the input channels of one linear module (see the module docstring)."""

    def __init__(self, gates: GateSet, module: nn.Module, entries: list[tuple[Member, str]],
                 input_dim: int) -> None:
        self.gates, self.module, self.entries = gates, module, entries
        self.input_dim = input_dim
        self.shape = tuple(linear_weight(module).shape)
        self.handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)

    def multiplier(self) -> torch.Tensor:
        """``[in_features]``: the input channels' multipliers."""
        return _site_multiplier(self.gates, self.entries, self.shape).reshape(-1)

    def _pre(self, _module, args, kwargs):
        if self.gates.bypass:
            return None
        if args:
            return (ScaleChannels.apply(args[0], self.multiplier()), *args[1:]), kwargs
        key = next(iter(kwargs))  # Linear(input=x): the activation is the only argument
        return args, {**kwargs, key: ScaleChannels.apply(kwargs[key], self.multiplier())}

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply the gates into the weight's input columns."""
        weight = linear_weight(self.module)
        view = [1, 1]
        view[self.input_dim] = -1
        weight.mul_(self.multiplier().to(weight.dtype).reshape(view))


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
        self.bypass = False
        self._folded: list[tuple[nn.Module, str]] = []
        self._sites: list[_ActivationSite] = []
        self._hooks: list[Any] = []

    @property
    def sites(self) -> dict[str, int]:
        """How many parameters are gated on their activation and on the parameter itself."""
        return {"activation": len(self._sites), "parameter": len(self._folded)}

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Run the model without its gates (the dense model; nothing is copied or multiplied)."""
        before, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = before

    def fold(self) -> int:
        """Multiply the current gate values into the weights and take the gates off; returns
        how many weights changed. Experts gated to exactly 0 are the caller's to refuse (their
        router mask cannot become a weight)."""
        count = 0
        with torch.no_grad():
            for module, attr in self._folded:
                if parametrize.is_parametrized(module, attr):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                    count += 1
            for site in self._sites:
                site.fold()
                count += 1
        self._folded.clear()
        self.remove()
        return count

    def remove(self) -> None:
        """Take every gate off; parameters are the original tensors again."""
        for module, attr in self._folded:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for site in self._sites:
            site.handle.remove()
        for handle in self._hooks:
            handle.remove()
        self._folded.clear()
        self._sites.clear()
        self._hooks.clear()
        if installed_gates(self.model) is self:
            delattr(self.model, _GATES_ATTR)

    def __repr__(self) -> str:
        return (f"GateSet({len(self.values)} groups on {len(self._sites)} activations and "
                f"{len(self._folded)} parameters)")


def _check_value(group: Group, value: torch.Tensor) -> None:
    want = gate_shape(group)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PlanError(f"gate values for group {group.name!r} must be a tensor of shape "
                        f"{list(want)}, got {got}")


def apply_gates(model: nn.Module, groups: list[Group],
                values: Mapping[str, torch.Tensor] | None = None, *,
                sites: str = "auto") -> GateSet:
    """Install gates for the groups named in ``values`` (all prunable groups at 1 when omitted).

    ``sites="auto"`` gates on the activation wherever one carries the unit dim and on the
    parameter elsewhere (see the module docstring); ``sites="parameter"`` puts every gate on
    its parameter (the former placement, for comparisons).

    Raises:
        PlanError: an unknown group name, a wrong value shape, a group without consumer members,
            or an experts group without a router.
        PrunegraphError: the model already carries gates (remove them first).
    """
    if installed_gates(model) is not None:
        raise PrunegraphError("the model already has gates; call remove_gates(model) before "
                              "applying new ones")
    if sites not in ("auto", "parameter"):
        raise PlanError(f"sites must be 'auto' or 'parameter', got {sites!r}")
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
        if group.constraints.removal == "mask_logit":
            _router_of(group)  # an experts group without a router fails here, before any gate

    gates = GateSet(model, {n: by_name[n] for n in values}, values)
    params = dict(model.named_parameters(remove_duplicate=False))
    targets: dict[tuple[int, str], tuple[nn.Module, str, list[tuple[Member, str]]]] = {}
    for name in values:
        for member in by_name[name].gate_site:
            if member.param not in params:
                raise PlanError(f"{member.param!r} is not a parameter of the model")
            # a parameter tied across modules (a shared block applied at several layers) is
            # gated in every module that holds it
            tied = [n for n, p in params.items() if p is params[member.param]]
            for holder in tied:
                module, attr = owner_of(model, holder)
                key = (id(module), attr)
                targets.setdefault(key, (module, attr, []))[2].append((member, name))
    try:
        for module, attr, entries in targets.values():
            input_dim = _activation_dim(module, attr, entries) if sites == "auto" else None
            if input_dim is not None:
                gates._sites.append(_ActivationSite(gates, module, entries, input_dim))
                continue
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


def _activation_dim(module: nn.Module, attr: str, entries: list[tuple[Member, str]]
                    ) -> int | None:
    """The input dim of ``module``'s weight when every gate on it scales input channels (the
    activation site applies), else None (the parameter site)."""
    dim = linear_input_dim(module) if attr == "weight" else None
    if dim is None or any(m.dim != dim or m.expert_dim is not None for m, _ in entries):
        return None
    return dim


def _router_of(group: Group) -> str:
    router = group.router or next((m.param for m in group.members if m.role == "router"), None)
    if not router:
        raise PlanError(f"experts group {group.name!r} has no router; the analysis must record it")
    return router


def _install_router_mask(model: nn.Module, gates: GateSet, name: str, router: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for holder in [n for n, p in params.items() if p is params.get(router)] or [router]:
        _install_router_mask_on(model, gates, name, holder)


def _install_router_mask_on(model: nn.Module, gates: GateSet, name: str, router: str) -> None:
    module, attr = owner_of(model, router)
    shape = getattr(module, attr).shape
    active: list[_RouterMask] = []

    def pre(_mod, _args):
        if gates.bypass:
            return
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


def has_gates(model: nn.Module) -> bool:
    """Whether ``model`` carries gates (a GateSet, or any parametrization) that slicing or saving
    would silently drop."""
    return installed_gates(model) is not None or any(
        parametrize.is_parametrized(m) for m in model.modules())


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
