"""Mask training: the ``Train`` pass, its loop and the objectives that plug into it."""

from prunegraph.passes.train.loop import (
    GateObjective,
    Objective,
    Train,
    TrainingHalted,
    kd_loss,
    lr_factor,
)

__all__ = ["GateObjective", "Objective", "Train", "TrainingHalted", "kd_loss", "lr_factor"]
