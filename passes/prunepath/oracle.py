"""What the router should predict: each expert's share of the dense FFN output, per token.

The reference router (methods.md §3.3) starts at zero and learns only through the ``sigmoid``
of the experts it selected and a small entropy term; on SmolLM2 it stayed near uniform
(docs/benchmarks.md). This module gives it a target to follow, as MoEfication's learned router
does: the *oracle experts* of a token are those whose part of the dense FFN output is largest,

    n_e(x) = || W_down[:, e] h_e(x) ||,   h = act(W_gate x) * (W_up x)  (every channel, ungated)

computed from each expert's ``G x G`` Gram matrix ``W_down[:, e]^T W_down[:, e]`` (``T E G^2``
work instead of the ``T I H`` of the per-expert outputs). The target distribution is
``q_e ∝ n_e^power``, so top-p at τ over ``q`` keeps the fewest experts whose output-norm share
(to that power) reaches τ.

Three uses, switched per router (:mod:`~prunegraph.passes.prunepath.router` calls
:func:`observe` from its consumer hook while ``router.observing``):

* **distillation**: ``KL(q || softmax(W_r x))`` per token, on the router only (``x`` and ``h``
  are detached), kept in ``router.distill`` for the training objective;
* **statistics**: top-1 agreement (the router's most probable expert is the oracle's first) and
  coverage (the selected experts' norm mass over that of the oracle's same number of experts,
  1 = the oracle's choice), accumulated on the device like the active fraction;
* **initialisation** (:func:`init_routers`): from calibration tokens run through the dense FFNs,
  ``fit`` solves a ridge regression of ``power * log n_e`` (centred per token) on ``x``, which is
  the distillation target's logits in closed form; ``centroid`` sets row ``e`` to the mean of its
  channels' gate rows (the expert's mean pre-activation), scaled so that its logits spread like
  those targets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunegraph.errors import PrunegraphError, SpecError

__all__ = ["INITS", "expert_output_norms", "oracle_logits", "observe", "observing",
           "init_routers", "oracle_stats", "distill_loss", "probe"]

#: Router initialisations: the reference's zeros, gate-row centroids, a fit to the oracle.
INITS = ("zero", "centroid", "fit")

_EPS = 1e-6


def _padded(t: torch.Tensor, width: int, experts: int, group: int) -> torch.Tensor:
    """``t [..., width]`` zero-padded to ``experts * group`` and viewed ``[..., E, G]``."""
    pad = experts * group - width
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], experts, group)


def expert_output_norms(h: torch.Tensor, wd: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., E]``: the norm of each expert's part of ``h @ wd^T`` (``h [..., I]``, ``wd [H, I]``,
    expert ``e`` = channels ``[e*G, (e+1)*G)``, a smaller last one allowed), in fp32."""
    width = h.shape[-1]
    if wd.shape[-1] != width:
        raise PrunegraphError(f"down weight has {wd.shape[-1]} input channels, the activation "
                              f"{width}")
    experts = -(-width // group_size)
    w = _padded(wd.detach().float(), width, experts, group_size)          # [H, E, G]
    gram = torch.einsum("heg,hek->egk", w, w)                              # [E, G, G]
    hv = _padded(h.detach().float(), width, experts, group_size)           # [..., E, G]
    sq = torch.einsum("...eg,egk,...ek->...e", hv, gram, hv)
    return sq.clamp_min(0).sqrt()


def oracle_logits(norms: torch.Tensor, power: float) -> torch.Tensor:
    """Logits of the target ``q ∝ norms^power``, centred per token."""
    z = power * torch.log(norms.clamp_min(_EPS * norms.amax(-1, keepdim=True).clamp_min(_EPS)))
    return z - z.mean(-1, keepdim=True)


def observe(router: nn.Module, h: torch.Tensor, wd: torch.Tensor) -> None:
    """Oracle norms of this forward (``h`` ungated), then the distillation term, the statistics
    and, while calibrating, the collected ``(x, target logits)``. Called by the router's consumer
    hook with the MLP's down weight ``wd [H, I]``; ``router._x`` is the detached FFN input and
    ``router._keep`` the selection."""
    norms = expert_output_norms(h, wd, router.group_size).reshape(-1, router.experts)
    x = router._x.reshape(-1, router._x.shape[-1])
    target = oracle_logits(norms, router.distill_power)
    if router.collect is not None:
        router.collect.append((x.float().cpu(), target.cpu()))
        return
    logp = F.log_softmax(F.linear(x.float(), router.weight.float()), dim=-1)
    q = torch.softmax(target, dim=-1)
    router.distill = (q * (torch.log(q.clamp_min(1e-20)) - logp)).sum(-1).mean()
    with torch.no_grad():
        keep = router._keep.reshape(-1, router.experts)
        hits = (logp.argmax(-1) == norms.argmax(-1)).float().sum()
        k = keep.sum(-1, keepdim=True)
        best = torch.sort(norms, dim=-1, descending=True).values.cumsum(-1)
        oracle_mass = best.gather(-1, k - 1).squeeze(-1)
        chosen = (norms * keep).sum(-1)
        coverage = (chosen / oracle_mass.clamp_min(1e-20)).sum()
        router.oracle_tokens = router.oracle_tokens + norms.shape[0]
        router.top1_hits = router.top1_hits + hits
        router.coverage_sum = router.coverage_sum + coverage


@contextlib.contextmanager
def observing(routers: list[nn.Module], power: float | None = None) -> Iterator[None]:
    """Routers compute the oracle terms (:func:`observe`) inside; ``power`` sets the target's."""
    before = [(r.observing, r.distill_power) for r in routers]
    for r in routers:
        r.observing = True
        if power is not None:
            r.distill_power = float(power)
    try:
        yield
    finally:
        for r, (flag, p) in zip(routers, before):
            r.observing, r.distill_power = flag, p


def distill_loss(routers: list[nn.Module]) -> torch.Tensor:
    """Mean over layers of the last forward's ``KL(q || p)``."""
    if any(r.distill is None for r in routers):
        raise PrunegraphError("no observed forward has run through the PrunePath routers")
    return torch.stack([r.distill for r in routers]).mean()


def oracle_stats(routers: list[nn.Module]) -> dict[str, float]:
    """Top-1 agreement and coverage since the statistics were reset (``nan`` if nothing was
    observed), over all layers' tokens."""
    tokens = sum(float(r.oracle_tokens) for r in routers)
    if not tokens:
        return {"top1": math.nan, "coverage": math.nan}
    return {"top1": sum(float(r.top1_hits) for r in routers) / tokens,
            "coverage": sum(float(r.coverage_sum) for r in routers) / tokens}


# --------------------------------------------------------------------------------------------
# Initialisation and held-out probes
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _calibrate(model: nn.Module, routers: list[nn.Module], blocks: torch.Tensor,
               batch_size: int, power: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per router, the FFN inputs ``x [N, H]`` and target logits ``[N, E]`` of ``blocks``, run
    through the dense model (the routers pass ``h`` through unscaled meanwhile)."""
    device = next(model.parameters()).device
    for r in routers:
        r.collect, r.passthrough = [], True
    try:
        with observing(routers, power):
            for i in range(0, len(blocks), batch_size):
                model(input_ids=blocks[i:i + batch_size].to(device))
        return [(torch.cat([x for x, _ in r.collect]), torch.cat([z for _, z in r.collect]))
                for r in routers]
    finally:
        for r in routers:
            r.collect, r.passthrough = None, False


def _ridge(x: torch.Tensor, z: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W [E, H]`` minimising ``||x W^T - z||^2 + lam ||W||^2``, ``lam = ridge * mean diag``."""
    x64, z64 = x.double(), z.double()
    gram = x64.T @ x64
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, x64.T @ z64).T


def _centroids(router: nn.Module, gate: torch.Tensor) -> torch.Tensor:
    """``[E, H]``: the mean gate row of each expert's channels."""
    w = _padded(gate.detach().float().T, router.width, router.experts, router.group_size)
    return w.sum(-1).T / router.sizes.to(w.device).float()[:, None]


def init_routers(model: nn.Module, routers: list[nn.Module], gates: list[torch.Tensor],
                 method: str, blocks: torch.Tensor | None, batch_size: int = 4,
                 power: float = 1.0, ridge: float = 1e-3) -> dict[str, Any]:
    """Set every router's weight by ``method`` (:data:`INITS`); ``gates[i]`` is router ``i``'s
    gate weight ``[I, H]``. ``fit`` and ``centroid`` read ``blocks`` (calibration tokens).
    Returns a summary (fit: the mean R^2 of the regression)."""
    if method not in INITS:
        raise SpecError(f"PrunePath router_init {method!r} is unknown; use one of {INITS}")
    if method == "zero":
        for r in routers:
            r.weight.data.zero_()
        return {"router_init": method}
    if blocks is None or len(blocks) == 0:
        raise SpecError(f"router_init {method!r} needs calibration tokens (init_blocks >= 1)")
    data = _calibrate(model, routers, blocks, batch_size, power)
    r2 = []
    for r, gate, (x, z) in zip(routers, gates, data):
        if method == "fit":
            w = _ridge(x, z, ridge)
        else:
            c = _centroids(r, gate).double().cpu()
            raw = x.double() @ c.T
            raw = raw - raw.mean(-1, keepdim=True)
            scale = float(z.double().std()) / max(float(raw.std()), 1e-12)
            w = c * scale
        pred = x.double() @ w.T
        r2.append(1.0 - float(((pred - z) ** 2).sum()) / max(float((z ** 2).sum()), 1e-30))
        r.weight.data.copy_(w.to(r.weight.dtype))
    return {"router_init": method, "init_tokens": int(data[0][0].shape[0]),
            "init_r2": round(sum(r2) / len(r2), 4)}


@torch.no_grad()
def probe(model: nn.Module, routers: list[nn.Module], blocks: torch.Tensor,
          batch_size: int = 4) -> dict[str, float]:
    """Router quality on ``blocks`` at the routers' current τ: mean entropy (and that of a
    uniform router), top-1 agreement with the oracle (and chance, ``1/E``), coverage, active
    fraction. The routers' statistics are reset before and after."""
    from prunegraph.passes.prunepath.router import active_fraction, reset_stats

    device = next(model.parameters()).device
    reset_stats(model)
    entropy, n = 0.0, 0
    with observing(routers):
        for i in range(0, len(blocks), batch_size):
            model(input_ids=blocks[i:i + batch_size].to(device))
            entropy += sum(float(r.entropy) for r in routers) / len(routers)
            n += 1
    stats = oracle_stats(routers)
    experts = routers[0].experts
    out = {"entropy": round(entropy / max(n, 1), 4),
           "uniform_entropy": round(math.log(experts), 4),
           "top1": round(stats["top1"], 4), "top1_chance": round(1.0 / experts, 4),
           "coverage": round(stats["coverage"], 4),
           "active_fraction": round(active_fraction(model), 4)}
    reset_stats(model)
    for r in routers:
        r.distill = None
    return out
