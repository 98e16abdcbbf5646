"""Training as parts: a configuration, a loop, objectives, and the ``Train`` pass.

* :mod:`.config`: :class:`TrainConfig`, every setting of a run (passes nest it or take its
  fields);
* :mod:`.loop`: :func:`fit`, the loop (data stream, schedule, autocast, checkpoints and exact
  resume through :mod:`._resume`, ``metrics.jsonl``, the plots hook);
* :mod:`.objective`: the :class:`Objective` protocol, what the loop trains;
* :mod:`.gate_objective`: :class:`GateObjective`, any gate family as an objective;
* :mod:`.train_pass`: the ``Train`` pass (gate families);
* :mod:`.plots`: the gate families' training plots.

PrunePath's objective lives with its pass (:mod:`prunegraph.passes.prunepath.training`).
"""

from prunegraph.passes.train.config import TrainConfig
from prunegraph.passes.train.gate_objective import GateObjective
from prunegraph.passes.train.loop import TrainingHalted, fit, kd_loss, lr_factor
from prunegraph.passes.train.objective import Objective
from prunegraph.passes.train.train_pass import Train

__all__ = ["GateObjective", "Objective", "Train", "TrainConfig", "TrainingHalted", "fit",
           "kd_loss", "lr_factor"]
