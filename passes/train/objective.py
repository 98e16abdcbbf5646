"""What the training loop trains: the :class:`Objective` protocol.

The loop (:func:`prunegraph.passes.train.loop.fit`) knows nothing about a method but this. For
step ``t`` of ``total`` it runs, per micro-batch: the teacher forward under ``teacher()`` (only
when ``kd_weight > 0``), ``before_forward(t, total)``, the student forward, ``penalty(t, total)``
(after the forward, so it may read that forward's activations) and the backward of::

    ce_weight * CE(student) + kd_weight * KL(teacher || student) + penalty

then the optimizer step and ``post_step(t, total)``. Three members are optional, with the
loop's defaults: ``ce_weight`` (1), ``temperature`` of the KL (1, see
:func:`~prunegraph.passes.train.loop.kd_loss`) and ``teacher_logits(ids)``, the logits of a
teacher that is another model (Distill's dense model, :mod:`prunegraph.passes.distill`); without
it the teacher is the model itself under ``teacher()``. Objectives so far:
:class:`~prunegraph.passes.train.gate_objective.GateObjective` (any gate family: DDP,
hard-concrete), ``PrunePathObjective`` (:mod:`prunegraph.passes.prunepath.training`) and
``DistillObjective`` (:mod:`prunegraph.passes.distill.objective`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from prunegraph.pipeline.contract import State

__all__ = ["Objective", "load_trained", "trained_state"]


class Objective(Protocol):
    """A method as the loop sees it; see the module docstring."""

    name: str
    #: A context in which the model is its own teacher, or None (no distillation possible,
    #: unless the objective has ``teacher_logits``).
    teacher: Callable[[], AbstractContextManager] | None
    #: Weight of ``KL(teacher || student)``; must be 0 without a teacher.
    kd_weight: float
    #: Keys of a step's record shown on the progress bar.
    shown: tuple[str, ...]
    #: Model parameters are looked up when needed (``param_groups``, ``state_dict``), never
    #: kept from construction: the loop may replace them while sharding the model.

    def config(self) -> dict[str, Any]:
        """Settings a checkpoint must have been made with to be resumed."""

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups (``params``, ``lr``, ``name``, optional ``schedule``: ``cosine`` or
        ``constant``, else the configuration's ``lr_schedule``); the first group's lr is logged.
        Model parameters listed here train, every other model parameter is frozen."""

    def schedule_restart(self, total: int) -> int | None:
        """The step where the learning-rate cosine starts again (a second phase), or None."""

    def before_forward(self, step: int, total: int) -> None:
        """Set up the student forward of ``step`` (gate values, τ)."""

    def penalty(self, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's loss term for the micro-batch just run, and stats for the record."""

    def post_step(self, step: int, total: int) -> dict[str, Any]:
        """After the optimizer step (projections); values for the step's record."""

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer that an exact resume needs (trained tensors, RNG)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into the live tensors (the optimizer holds them)."""

    # Optional, for runs sharded over several ranks (:mod:`prunegraph.passes.train.sharding`):
    #   module: nn.Module | None, the objective's trained tensors outside the model (a gate
    #     family), saved with the model's by torch.distributed.checkpoint;
    #   extra_state() -> dict / load_extra_state(dict): everything else an exact resume needs
    #     (RNG, masks), written by rank 0. Objectives without them train only model tensors.

    def finish(self, state: State, history: list[dict[str, Any]],
               plots: Path | None) -> dict[str, Any]:
        """Put the result into ``state`` (plots into ``plots`` if given); the pass stats."""


def trained_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``state_dict`` of an objective that trains named tensors: detached, not copied (the
    checkpoint is written as soon as it is taken, and a copy of trained model weights would
    double their memory)."""
    return {"params": {n: t.detach() for n, t in tensors.items()}}


@torch.no_grad()
def load_trained(tensors: Mapping[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Copy :func:`trained_state`'s tensors back into the live ones (the optimizer holds them)."""
    for n, value in state["params"].items():
        tensors[n].copy_(value)
