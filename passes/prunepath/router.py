"""PrunePath routing on a MoEfied FFN: a router per MLP, top-p expert gates on the channels.

After MoEfication (``prunegraph.passes.prunepath.moefy``) every MLP channel group is ordered so that expert
``e`` owns the contiguous channels ``[e*G, min((e+1)*G, I))``. :func:`install` adds, per MLP, a
bias-free router ``Linear(H -> E)`` (zero-initialised, so routing starts uniform and every gate
starts at ``sigmoid(0) = 0.5``, as in the reference code, methods.md §3.3) and two forward
pre-hooks, so nothing is architecture-specific:

* on the MLP's first *producer* module (``gate_proj``, ``gate_up_proj``, ``c_fc``): its input is
  the FFN input ``x``; the router scores it: ``p = softmax(W_r x)``, experts are taken in
  descending ``p`` until the cumulative mass reaches ``tau`` (top-1 always kept) and each taken
  expert's gate is ``sigmoid(r_e)``, others 0;
* on the *consumer* module (``down_proj``, ``c_proj``): its input is the channel activation
  ``h``; each channel is multiplied by its expert's gate.

``mode`` says what happens to the expert whose mass crosses ``tau``:

* ``"exclusive"`` (default, the reference code): keep rank ``k`` iff the inclusive cumulative
  mass ``c_k < tau``; the selected mass stays below ``tau``. It is the default because it is the
  convention the released PrunePath checkpoints and τ values (0.5 train, 0.7/0.95 inference) were
  tuned under, and it is what the Triton kernels' ``mode="exclusive"`` computes.
* ``"inclusive"`` (standard top-p): also keep the crossing expert (``c_{k-1} < tau``).

``tau > 1`` keeps every expert (dense, sigmoid-scaled). :func:`set_tau` changes ``tau`` at any
time; :func:`active_fraction` reports the average fraction of FFN channels touched per token
since :func:`reset_stats` (every token counts; there is no padding mask). Routers are submodules
named ``<mlp>.prunepath_router``, so they are in the ``state_dict`` and saved with the model;
:func:`spec` is the JSON description that :func:`prunegraph.from_pretrained` reinstalls them from.
Routing is computed densely (every channel is computed, then scaled): the speed-up belongs to the
Triton kernels (``prunegraph.targets.triton.prunepath``), whose reference this matches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.plan.extensions import CheckpointExtension, register_extension

__all__ = [
    "MODES", "ROUTER_ATTR", "Router", "topp_gates", "install", "remove", "is_installed", "spec",
    "set_tau", "get_tau", "set_mode", "routers", "active_fraction", "reset_stats", "regularisers",
    "router_param_names", "check_tau", "check_mode", "kernel_weights", "gate_weight",
]

MODES = ("exclusive", "inclusive")
ROUTER_ATTR = "prunepath_router"


def check_tau(tau: float) -> float:
    """``tau`` as a float, or SpecError when it is not a positive mass."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise SpecError(f"PrunePath tau must be a number > 0 (a cumulative probability mass; "
                        f"> 1 keeps every expert), got {tau!r}")
    return float(tau)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise SpecError(f"PrunePath mode {mode!r} is unknown; use one of {MODES}")
    return mode


def topp_gates(logits: torch.Tensor, tau: float, mode: str = "exclusive"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token gates ``[..., E]`` (fp32, ``sigmoid(r_e)`` where selected, else 0) and the
    boolean selection. Ties in ``p`` rank the lower expert id first (stable sort), as the kernels
    do. The selection is a constant mask; gradients reach the logits through the sigmoid."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    sp, order = torch.sort(p.detach(), dim=-1, descending=True, stable=True)
    c = torch.cumsum(sp, dim=-1)
    if mode == "exclusive":
        keep_sorted = c < tau
    else:
        keep_sorted = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], dim=-1) < tau
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    gates = torch.where(keep, torch.sigmoid(logits), torch.zeros_like(logits))
    return gates, keep


class Router(nn.Module):
    """One MLP's router and routing state (``tau``, ``mode``, statistics, last regularisers)."""

    def __init__(self, hidden: int, width: int, group_size: int, tau: float = 1.05,
                 mode: str = "exclusive", device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if group_size < 1 or width < 1:
            raise SpecError(f"PrunePath needs width >= 1 and group_size >= 1, got {width}, "
                            f"{group_size}")
        self.width, self.group_size = int(width), int(group_size)
        self.experts = -(-self.width // self.group_size)
        self.weight = nn.Parameter(torch.zeros(self.experts, hidden, device=device, dtype=dtype))
        self.tau, self.mode = check_tau(tau), check_mode(mode)
        sizes = [self.group_size] * (self.experts - 1)
        sizes.append(self.width - self.group_size * (self.experts - 1))
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self._gates: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None
        self.balance: torch.Tensor | None = None
        # oracle experts (prunegraph.passes.prunepath.oracle): off unless ``observing``
        self.down_role: tuple[str, int, int] | None = None  # consumer attr, dim, offset
        self.observing, self.passthrough, self.distill_power = False, False, 1.0
        self.distill: torch.Tensor | None = None
        self.collect: list | None = None
        self._x: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.channels_touched, self.tokens = 0.0, 0
        self.oracle_tokens, self.top1_hits, self.coverage_sum = 0, 0.0, 0.0

    def route(self, x: torch.Tensor) -> None:
        """Score the FFN input; keep gates for the consumer hook and the regularisers."""
        logits = F.linear(x.float(), self.weight.float())
        gates, keep = topp_gates(logits, self.tau, self.mode)
        p = torch.softmax(logits, dim=-1).reshape(-1, self.experts)
        self.entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
        self.balance = self.experts * (p.mean(0) ** 2).sum()
        sizes = self.sizes.to(keep.device)
        with torch.no_grad():  # a device tensor: no host sync per layer on GPUs
            self.channels_touched = self.channels_touched + (
                keep.reshape(-1, self.experts).float() @ sizes.float()).sum()
            self.tokens += keep.numel() // self.experts
        self._gates = gates
        if self.observing:
            self._x, self._keep = x.detach(), keep

    def down_weight(self, consumer: nn.Module) -> torch.Tensor:
        """The MLP's down weight ``[H, I]``, read from its consumer module."""
        if self.down_role is None:
            raise PrunegraphError("this PrunePath router does not know its MLP's down weight "
                                  "(a layout without weight roles); re-run MoEfy")
        attr, dim, offset = self.down_role
        along = getattr(consumer, attr).narrow(dim, offset, self.width)
        return along if dim == 1 else along.t()

    def scale(self, h: torch.Tensor, consumer: nn.Module | None = None) -> torch.Tensor:
        """``h`` with each channel multiplied by its expert's gate (``consumer``: the module
        that reads ``h``, for the oracle terms while ``observing``)."""
        if self._gates is None:
            raise PrunegraphError("the PrunePath consumer ran before its router; the MLP's "
                                  "producer and consumer modules must run in that order")
        if h.shape[-1] != self.width:
            raise PrunegraphError(f"the PrunePath consumer input has {h.shape[-1]} channels but "
                                  f"the router was built for {self.width}; re-run MoEfy")
        gates, self._gates = self._gates, None
        if self.observing:
            from prunegraph.passes.prunepath.oracle import observe

            observe(self, h, self.down_weight(consumer))
            self._x = self._keep = None
        if self.passthrough:
            return h
        per_channel = gates.repeat_interleave(self.sizes.to(gates.device), dim=-1)
        return (h.float() * per_channel).to(h.dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, group_size={self.group_size}, width={self.width}, "
                f"tau={self.tau}, mode={self.mode}")


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as e:
        raise PrunegraphError(f"the model has no module {path!r} named by the PrunePath spec; "
                              f"the spec was made for another model") from e


def install(model: nn.Module, layers: list[dict[str, Any]], tau: float = 1.05,
            mode: str = "exclusive") -> list[Router]:
    """Add a router and the two hooks per MLP described by ``layers``.

    Each entry holds ``router`` (module path of the new router), ``producer`` and ``consumer``
    (module paths), ``width`` (channels), ``group_size`` and, for the record, ``group`` and
    ``permutation`` (the channel order MoEfy applied). Routers are created on the producer
    weight's device and dtype; with ``tau``/``mode`` as given.
    """
    check_tau(tau), check_mode(mode)
    if is_installed(model):
        raise PrunegraphError("PrunePath routers are already installed on this model; call "
                              "prunegraph.passes.prunepath.router.remove(model) first")
    for entry in layers:
        missing = {"router", "producer", "consumer", "width", "group_size"} - set(entry)
        if missing:
            raise PrunegraphError(f"PrunePath layer entry lacks {sorted(missing)}: {entry}")
        _module(model, entry["producer"]), _module(model, entry["consumer"])
    out, handles = [], []
    for entry in layers:
        producer, consumer = _module(model, entry["producer"]), _module(model, entry["consumer"])
        ref = next(producer.parameters())
        hidden = _hidden(producer, ref)
        router = Router(hidden, entry["width"], entry["group_size"], tau, mode,
                        device=ref.device, dtype=ref.dtype)
        router.down_role = _down_role(entry, consumer)
        parent_path, _, attr = entry["router"].rpartition(".")
        _module(model, parent_path).add_module(attr, router)

        def pre_producer(_mod, args, router=router):
            router.route(args[0])

        def pre_consumer(mod, args, router=router):
            return (router.scale(args[0], mod),) + tuple(args[1:])

        handles.append(producer.register_forward_pre_hook(pre_producer))
        handles.append(consumer.register_forward_pre_hook(pre_consumer))
        out.append(router)
    model._prunepath = {"layers": [dict(e) for e in layers], "routers": out, "handles": handles}
    return out


def _along(model: nn.Module, entry: dict[str, Any], role: str) -> torch.Tensor:
    """The ``role`` weight (``gate``, ``up``, ``down``) of a MoEfy layout entry, ``[I, H]`` for
    gate and up, ``[H, I]`` for down (views of the model's parameters)."""
    info = entry["weights"][role]
    p = model.get_parameter(info["param"])
    along = p.narrow(info["dim"], info["offset"], entry["width"])
    if role == "down":
        return along if info["dim"] == 1 else along.t()
    return along.movedim(info["dim"], 0)


def _down_role(entry: dict[str, Any], consumer: nn.Module) -> tuple[str, int, int] | None:
    """Where the consumer module keeps the down weight (attribute, dim along the channels,
    offset): from the layout's weight roles, else a ``Linear`` consumer's weight; None if
    neither is known."""
    info = entry.get("weights", {}).get("down")
    if info is not None and info["param"].rpartition(".")[0] == entry["consumer"]:
        return info["param"].rpartition(".")[2], info["dim"], info["offset"]
    if isinstance(consumer, nn.Linear) and consumer.in_features == entry["width"]:
        return "weight", 1, 0
    return None


def gate_weight(model: nn.Module, entry: dict[str, Any]) -> torch.Tensor:
    """The MLP's gate (first producer) weight ``[I, H]`` of a MoEfy layout entry."""
    if "gate" not in entry.get("weights", {}):
        raise PrunegraphError(f"{entry.get('group')}: the layout has no weight roles; re-run "
                              f"MoEfy")
    return _along(model, entry, "gate")


def _hidden(producer: nn.Module, ref: torch.Tensor) -> int:
    """Input features of the producer: ``in_features`` (Linear), ``nx`` (GPT-2 Conv1D)."""
    for attr in ("in_features", "nx"):
        if isinstance(getattr(producer, attr, None), int):
            return getattr(producer, attr)
    raise PrunegraphError(f"cannot read the input width of the PrunePath producer "
                          f"{type(producer).__name__}; it must be a Linear-like module with "
                          f"in_features or nx")


def is_installed(model: nn.Module) -> bool:
    return getattr(model, "_prunepath", None) is not None


def _state(model: nn.Module) -> dict[str, Any]:
    state = getattr(model, "_prunepath", None)
    if state is None:
        raise PrunegraphError("this model has no PrunePath routers; run MoEfy and PrunePath "
                              "(or load a PrunePath checkpoint with prunegraph.from_pretrained)")
    return state


def routers(model: nn.Module) -> list[Router]:
    return list(_state(model)["routers"])


def remove(model: nn.Module) -> None:
    """Remove the hooks and routers: the (permuted, dense) model again."""
    state = _state(model)
    for h in state["handles"]:
        h.remove()
    for entry in state["layers"]:
        parent_path, _, attr = entry["router"].rpartition(".")
        delattr(_module(model, parent_path), attr)
    model._prunepath = None


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the cumulative mass ``tau`` of every router (``> 1`` keeps every expert)."""
    tau = check_tau(tau)
    for r in routers(model):
        r.tau = tau


def get_tau(model: nn.Module) -> float:
    return routers(model)[0].tau


def set_mode(model: nn.Module, mode: str) -> None:
    mode = check_mode(mode)
    for r in routers(model):
        r.mode = mode


def reset_stats(model: nn.Module) -> None:
    for r in routers(model):
        r.reset_stats()


def active_fraction(model: nn.Module) -> float:
    """Average fraction of FFN channels touched per token (over all routed MLPs) since the last
    :func:`reset_stats`; ``nan`` if nothing ran."""
    rs = routers(model)
    touched = sum(float(r.channels_touched) for r in rs)
    total = sum(r.tokens * r.width for r in rs)
    return touched / total if total else float("nan")


def regularisers(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over layers of the last forward's softmax entropy and load-balance penalty
    ``E * sum_e mean_t(p_e)^2`` (methods.md §3.4)."""
    rs = routers(model)
    if any(r.entropy is None for r in rs):
        raise PrunegraphError("no forward has run through the PrunePath routers yet")
    return (torch.stack([r.entropy for r in rs]).mean(),
            torch.stack([r.balance for r in rs]).mean())


def router_param_names(model: nn.Module) -> set[str]:
    if not is_installed(model):
        return set()
    return {f"{e['router']}.weight" for e in _state(model)["layers"]}


def spec(model: nn.Module) -> dict[str, Any] | None:
    """JSON-ready description (layers, tau, mode) to reinstall the routers, or None."""
    if not is_installed(model):
        return None
    rs = routers(model)
    return {"version": 1, "tau": rs[0].tau, "mode": rs[0].mode,
            "layers": [dict(e) for e in _state(model)["layers"]]}


def kernel_weights(model: nn.Module) -> list[dict[str, Any]]:
    """Per routed SwiGLU MLP, the tensors the Triton PrunePath kernels take
    (``prunegraph.targets.triton.prunepath``): ``wr [E, H]``, ``wg``/``wu [I, H]``,
    ``wd [H, I]`` (views of the model's own weights), with ``group_size``, ``tau``, ``mode`` and
    the MLP's module path. The kernels compute SiLU-gated MLPs only."""
    out = []
    for entry, router in zip(_state(model)["layers"], routers(model)):
        roles = entry.get("weights", {})
        if "up" not in roles:
            raise PrunegraphError(f"{entry['group']} is not a gated (SwiGLU) MLP or was MoEfied "
                                  f"without weight roles; the Triton PrunePath kernels need "
                                  f"gate, up and down weights (re-run MoEfy)")
        w = {role: _along(model, entry, role) for role in roles}
        out.append({"mlp": entry["router"].rpartition(".")[0], "wr": router.weight,
                    "wg": w["gate"], "wu": w["up"], "wd": w["down"],
                    "group_size": entry["group_size"], "tau": router.tau, "mode": router.mode})
    return out


def _rebuild(model: nn.Module, described: dict[str, Any]) -> None:
    install(model, described["layers"], tau=described.get("tau", 1.05),
            mode=described.get("mode", "exclusive"))


register_extension(CheckpointExtension(name="prunepath", describe=spec,
                                       extra_params=router_param_names, rebuild=_rebuild,
                                       state_key="router"))
