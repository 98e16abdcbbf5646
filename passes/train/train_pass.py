"""The ``Train`` pass: train the gates of ``state.gate_family`` with the training loop.

Its parameters are the training configuration's (``TrainConfig``, :mod:`.config`: ``steps``,
``batch_size``, ``block_len``, ``grad_accum``, ``warmup``, ``lr_schedule``, ``seed``,
``source``, ``autocast``, checkpointing, ``plots``) plus the gate objective's
(:class:`~prunegraph.passes.train.gate_objective.GateObjective`): ``kd_weight``, the weight of
``KL(dense || gated)``, ``polish_steps``, the last steps trained under the exact plan
Finalize will make (0, the published methods, by default), and ``round_to``, the widths that
plan keeps (give Finalize the same; both default to ``auto``)::

    - Train: {steps: 240, polish_steps: 40, batch_size: 4, block_len: 128, kd_weight: 2.0}

With a run folder, ``<run>/train/`` gets ``metrics.jsonl``, the checkpoint and the plots
(``loss.png``, ``sparsity.png``, ``kept_per_layer.png``, ``head_gates.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prunegraph.errors import SpecError
from prunegraph.passes.train.config import TrainConfig, TrainFields, check_settings
from prunegraph.passes.train.gate_objective import GateObjective
from prunegraph.passes.train.loop import fit
from prunegraph.pipeline.contract import Pass, PassResult, State, declare_key, register_pass

__all__ = ["Train"]


declare_key("trained_gates", "builtins.dict",
            "final gate values after training: group name -> tensor (or a family's own form)")

@register_pass
@dataclass(frozen=True)
class Train(Pass, TrainFields):
    """Train the gates of ``state.gate_family`` for ``steps`` optimizer steps (frozen weights,
    distilled from the ungated model); see :mod:`prunegraph.passes.train.loop` for the loop."""

    name = "Train"
    requires = ("model", "tokenizer", "gates", "gate_family")
    provides = ("trained_gates",)
    collective = True  # under torchrun every rank trains its share (sharded with FSDP)

    kd_weight: float = 2.0
    polish_steps: int = 0
    round_to: int | Literal["auto", "latency"] = "auto"

    def validate(self) -> None:
        from prunegraph.plan.widths import check_round_to

        check_round_to(self.round_to, "pass Train: round_to")
        check_settings(self, "pass Train: ", min_steps=1)
        if self.kd_weight < 0:
            raise SpecError(f"pass Train: kd_weight must be >= 0, got {self.kd_weight}")
        if not 0 <= self.polish_steps < self.steps:
            raise SpecError(f"pass Train: polish_steps must be >= 0 and below steps "
                            f"({self.steps}), got {self.polish_steps}")

    @property
    def config(self) -> TrainConfig:
        """The training configuration these parameters make."""
        return TrainConfig.of(self)

    def run(self, state: State) -> PassResult:
        device = next(state.model.parameters()).device
        family = state.gate_family.to(device).train()
        make = getattr(family, "objective", None)  # a family with its own objective (LEAP)
        kw = dict(kd_weight=self.kd_weight, polish_steps=self.polish_steps, model=state.model)
        objective = (make(state.gates, **kw) if make is not None
                     else GateObjective(family, state.gates, round_to=self.round_to, **kw))
        stats = fit(state, objective, self.config)
        state.metrics.setdefault("train", {}).update(stats)
        return PassResult(state, modified=True, stats=stats)
