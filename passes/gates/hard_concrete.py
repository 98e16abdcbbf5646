"""Hard-concrete L0 gates (Louizos et al. 2018; the CoFi / Sheared-LLaMA baseline DDP improves on).

One ``log_alpha`` per unit. In training the gate is *sampled*::

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)        beta = 2/3
    z = clamp(s * (r - l) + l, 0, 1)                              (l, r) = (-0.1, 1.1)

At evaluation (and for :meth:`final_values`) it is deterministic:
``z = clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)``. The retention score the budget penalty
uses is the probability that the gate is nonzero,
``P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))`` (the expected L0 norm).

``log_alpha`` starts at ``log(init_keep / (1 - init_keep))``; the default ``init_keep=0.95``
gives a deterministic gate of exactly 1 (``1.2 * 0.95 - 0.1 > 1``), so the evaluated gated model
starts as the dense model. Noise comes from the family's own seeded generator, saved in
checkpoints, so training is deterministic and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prunegraph.errors import SpecError
from prunegraph.passes.gates.registry import register_family
from prunegraph.passes.gates.units import LagrangianOptions, UnitGates

__all__ = ["HardConcreteGates", "HardConcreteOptions", "deterministic_gate",
           "nonzero_probability"]

LIMITS = (-0.1, 1.1)
EPS = 1e-6


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    l, r = LIMITS
    return (torch.sigmoid(log_alpha) * (r - l) + l).clamp(0.0, 1.0)


def nonzero_probability(log_alpha: torch.Tensor, beta: float) -> torch.Tensor:
    l, r = LIMITS
    return torch.sigmoid(log_alpha - beta * math.log(-l / r))


@dataclass(frozen=True)
class HardConcreteOptions(LagrangianOptions):
    """Hard-concrete's options: the temperature ``beta`` of the relaxed sample and the initial
    keep probability (0.95: every evaluation gate starts at exactly 1)."""

    temperature: float = 2.0 / 3.0
    init_keep: float = 0.95

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0:
            raise SpecError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.init_keep < 1.0:
            raise SpecError(f"init_keep must be in (0, 1), got {self.init_keep}")


@register_family
class HardConcreteGates(UnitGates):
    """Hard-concrete L0 gates (the CoFi / Sheared-LLaMA baseline): sampled while
    ``self.training`` (the Train pass sets it), deterministic otherwise."""

    name = "hard_concrete"
    options_type = HardConcreteOptions
    default_lr = 0.1

    @property
    def beta(self) -> float:
        return self.options.temperature

    def init_gates(self) -> None:
        keep = self.options.init_keep
        a = math.log(keep / (1.0 - keep))
        for g in self.groups:
            self.gates[self.key(g.name)] = nn.Parameter(torch.full(self.shapes[g.name], a))

    def forward_values(self, step: int, total: int) -> dict[str, torch.Tensor]:
        out = {}
        for g in self.groups:
            la = self.tensor(g.name)
            if not self.training:
                out[g.name] = deterministic_gate(la)
                continue
            u = torch.rand(la.shape, generator=self.generator).clamp(EPS, 1 - EPS).to(la.device)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
            l, r = LIMITS
            out[g.name] = (s * (r - l) + l).clamp(0.0, 1.0)
        return out

    def retention(self, step: int, total: int) -> dict[str, torch.Tensor]:
        return {g.name: nonzero_probability(self.tensor(g.name), self.beta) for g in self.groups}

    @torch.no_grad()
    def post_step(self) -> None:
        for p in self.gates.values():
            p.clamp_(-10.0, 10.0)

    @torch.no_grad()
    def final_values(self) -> dict[str, torch.Tensor]:
        return {g.name: deterministic_gate(self.tensor(g.name)).detach().clone()
                for g in self.groups}
