"""LEAP as a Train objective (:class:`~prunegraph.passes.train.objective.Objective`).

``Train`` uses it in place of the generic
:class:`~prunegraph.passes.train.gate_objective.GateObjective`, which sets every gate's value
before each forward: LEAP's masks are never held for the whole model, each layer builds its own
inside its forward.

Per micro-batch ``before_forward`` sets the annealed ``(alpha, tau)`` and the noise seed (a
function of the family's seed, the step and the micro-batch, so a resumed run draws the same
noise and activation checkpointing recomputes the same masks); ``penalty`` reads the masks of
that forward (:meth:`LeapGates.penalty_terms`). The teacher is the model with every mask at 1.

**Polish** (``Train.polish_steps``; off by default, as in the paper): the last steps train the
logits under the exact budget Finalize will cut to. Each step centres the masks on the exact
top-k threshold of the current logits (``P - shift > 0`` keeps exactly the budget: global, per
block, or 2 of every 4), holds ``alpha``/``tau`` at their final values and drops the budget and
magnitude terms, on a fresh cosine. Weights near the cut can still trade places; the deterministic
mask the model trains with is the one Finalize makes.

Plots (``<run>/train/``): ``loss.png``, ``sparsity.png`` (expected sparsity of the soft masks and
the ``P > 0`` sparsity against the target) and ``schedule.png`` (``alpha``, ``tau``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from prunegraph.passes.gates.leap import LeapGates, LeapMasks, MaskSpec, mix_seed

__all__ = ["LeapObjective"]


class LeapObjective:
    """See the module docstring."""

    shown = ("expected_sparsity", "threshold_sparsity")

    def __init__(self, family: LeapGates, gates: LeapMasks, kd_weight: float = 0.0,
                 polish_steps: int = 0) -> None:
        self.family, self.gates, self.polish_steps = family, gates, polish_steps
        self.kd_weight = float(kd_weight)
        self.name = family.name
        self._step, self._micro = -1, 0

    def config(self) -> dict[str, Any]:
        return {**self.family.config(), "polish_steps": self.polish_steps}

    def param_groups(self) -> list[dict[str, Any]]:
        return self.family.param_groups()

    def schedule_restart(self, total: int) -> int | None:
        """The polish starts a second cosine."""
        return total - self.polish_steps if self.polish_steps else None

    def teacher(self):
        """Every mask at 1: the dense model."""
        return self.gates.at_one()

    def _search(self, step: int, total: int) -> tuple[int, int, bool]:
        search = total - self.polish_steps
        return min(step, search), search, step >= search

    def before_forward(self, step: int, total: int) -> None:
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        s, search, polishing = self._search(step, total)
        sched = self.family.schedule(s, search)
        f = self.family
        if self._micro == 0:  # the logits change once per step: so does the polish's cut
            self.gates.shifts = f.exact_shift() if polishing and f.nm is None else {}
        self.gates.set(MaskSpec(sched["alpha"], sched["tau"], 0, f.nm),
                       mix_seed(f.seed * 65_537 + step, self._micro))

    def penalty(self, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        s, search, polishing = self._search(step, total)
        if not polishing:
            return self.family.penalty_terms(self.gates.records, s, search)
        with torch.no_grad():
            _, stats = self.family.penalty_terms(self.gates.records, search, search)
        return torch.zeros(()), {**stats, "penalty": 0.0}

    def post_step(self, step: int, total: int) -> dict[str, Any]:
        s, search, polishing = self._search(step, total)
        return {"threshold_sparsity": self.family.threshold_sparsity(),
                **self.family.schedule(s, search), "polish": polishing}

    def state_dict(self) -> dict[str, Any]:
        return {"logits": {k: v.detach().clone() for k, v in self.family.logits.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state["logits"].items():
                self.family.logits[k].copy_(v)

    def finish(self, state, history: list[dict[str, Any]], plots: Path | None) -> dict[str, Any]:
        """Hand the logits on (``state.trained_gates``) and report the budget."""
        f = self.family
        state.trained_gates = {n: f.logit(n).detach() for n in f.linears}
        last = history[-1] if history else {}
        stats = {"family": f.name, "pattern": f.pattern,
                 "target_sparsity": round(f.target_sparsity(), 6),
                 "expected_sparsity": round(last.get("expected_sparsity", float("nan")), 6),
                 "threshold_sparsity": round(f.threshold_sparsity(), 6),
                 "logit_params": sum(f.numel.values())}
        if plots is not None and history:
            write_leap_plots(plots, history, f)
        state.log.info("Train: leap expected sparsity %.3f, P > 0 sparsity %.3f (target %.3f)",
                       stats["expected_sparsity"], stats["threshold_sparsity"],
                       stats["target_sparsity"])
        return stats


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def write_leap_plots(folder: Path, history: list[dict[str, Any]], family: LeapGates
                     ) -> list[Path]:
    """``loss.png``, ``sparsity.png`` and ``schedule.png`` of a LEAP run (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    polish = next((h["step"] for h in history if h.get("polish")), None)
    out = []

    def finish(fig, ax, name: str, title: str) -> None:
        if polish is not None:
            ax.axvline(polish, color="tab:red", ls=":", lw=1, label="polish starts")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.set_title(f"leap ({family.pattern}): {title}")
        _save(fig, folder / name)
        plt.close(fig)
        out.append(folder / name)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "ce", "kl"):
        ax.plot(steps, [h[key] for h in history], label=key)
    finish(fig, ax, "loss.png", "training loss")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["expected_sparsity"] for h in history], label="expected (1 - mean M)")
    ax.plot(steps, [h["threshold_sparsity"] for h in history], label="P > 0 rule")
    ax.axhline(family.target_sparsity(), color="k", ls="--", lw=1, label="target")
    ax.set_ylabel("sparsity of the masked weights")
    finish(fig, ax, "sparsity.png", "sparsity")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["alpha"] for h in history], label="alpha")
    ax.set_ylabel("alpha")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["tau"] for h in history], color="tab:orange", label="tau")
    ax2.set_ylabel("tau")
    finish(fig, ax, "schedule.png", "anneal")
    return out
