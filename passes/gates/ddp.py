"""DDP gates (Deterministic Differentiable Pruning, methods.md §1).

One latent ``z`` per unit, initialised ``N(1, init_std)`` (``init_std=0.01`` as in the reference
code; ``init_std=0`` starts every gate at exactly 1, so the gated model *is* the dense model).

* forward gate ``m = ReLU(z)`` with a straight-through gradient (identity), so a gate at 0 still
  learns and gates above 1 rescale a unit;
* retention score, used only by the penalty:
  ``s = clamp(1.2 * sigmoid((ReLU(z) - mu_t) * 2.4 / mu_t) - 0.1, 0, 1)``, the clamp also
  straight-through; ``s(0) ~ 0`` and ``s(2 mu_t) ~ 1``;
* ``mu_t = mu0 - (mu0 - muT) * sqrt(t / T)``: ``mu0 = 0.5``; ``muT = 0.1`` by default (the
  released code; the paper says 0.05, pass ``mu_T=0.05`` for it);
* after every optimizer step ``z`` is clamped at ``-0.1`` so pruned units can come back.

The final value is ``ReLU(z)``: units with ``z <= 0`` are removed, kept units keep their value
as a scale folded into the consumers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prunegraph.errors import SpecError
from prunegraph.passes.gates.registry import register_family
from prunegraph.passes.gates.units import LagrangianOptions, UnitGates

__all__ = ["DDPGates", "DDPOptions", "ste_relu", "ste_clamp", "mu_schedule", "retention_score"]

C0 = 2.4
STRETCH = (-0.1, 1.1)
Z_MIN = -0.1


def ste_relu(z: torch.Tensor) -> torch.Tensor:
    """``relu(z)`` forward, identity gradient."""
    return z + (torch.relu(z) - z).detach()


def ste_clamp(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``clamp(x, low, high)`` forward, identity gradient."""
    return x + (x.clamp(low, high) - x).detach()


def mu_schedule(step: int, total: int, mu0: float = 0.5, muT: float = 0.1) -> float:
    """Square-root annealing ``mu0 -> muT`` over ``total`` steps."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return mu0 - (mu0 - muT) * math.sqrt(progress)


def retention_score(z: torch.Tensor, mu: float) -> torch.Tensor:
    """DDP's retention score of latent ``z`` at annealing level ``mu``."""
    l, r = STRETCH
    v = torch.sigmoid((ste_relu(z) - mu) * C0 / mu)
    return ste_clamp(v * (r - l) + l, 0.0, 1.0)


@dataclass(frozen=True)
class DDPOptions(LagrangianOptions):
    """DDP's options: the annealing ``mu0 -> mu_T`` of the retention score and the spread of the
    initial latents (``init_std=0``: every gate starts at exactly 1)."""

    mu0: float = 0.5
    mu_T: float = 0.1
    init_std: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mu_T <= self.mu0:
            raise SpecError(f"DDP needs 0 < mu_T <= mu0, got mu0={self.mu0}, mu_T={self.mu_T}")
        if self.init_std < 0:
            raise SpecError(f"init_std must be >= 0, got {self.init_std}")


@register_family
class DDPGates(UnitGates):
    """Deterministic Differentiable Pruning: ReLU gates with a straight-through gradient, an
    annealed retention score for the budget, ``z`` clamped at -0.1 after each step."""

    name = "ddp"
    options_type = DDPOptions
    default_lr = 2e-2

    def init_gates(self) -> None:
        std = self.options.init_std
        for g in self.groups:
            z = 1.0 + std * torch.randn(self.shapes[g.name], generator=self.generator)
            self.gates[self.key(g.name)] = nn.Parameter(z)

    def mu(self, step: int, total: int) -> float:
        return mu_schedule(step, total, self.options.mu0, self.options.mu_T)

    def schedule(self, step: int, total: int) -> dict[str, float]:
        return {"mu": self.mu(step, total)}

    def forward_values(self, step: int, total: int) -> dict[str, torch.Tensor]:
        return {g.name: ste_relu(self.tensor(g.name)) for g in self.groups}

    def retention(self, step: int, total: int) -> dict[str, torch.Tensor]:
        mu = self.mu(step, total)
        return {g.name: retention_score(self.tensor(g.name), mu) for g in self.groups}

    @torch.no_grad()
    def post_step(self) -> None:
        for p in self.gates.values():
            p.clamp_(min=Z_MIN)

    @torch.no_grad()
    def final_values(self) -> dict[str, torch.Tensor]:
        return {g.name: torch.relu(self.tensor(g.name)).detach().clone() for g in self.groups}
