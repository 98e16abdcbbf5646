"""Distillation as a training objective: the sliced student learns the dense teacher.

:class:`DistillObjective` plugs into the training loop
(:func:`prunegraph.passes.train.loop.fit`) like the gate families and PrunePath do. Per
micro-batch the loop minimises::

    ce_weight * CE(student) + kd_weight * T² KL(teacher/T || student/T) + hidden_weight * H

where the teacher is another model (:meth:`teacher_logits`; :mod:`.teacher`) and ``H`` is the
normalised hidden-state MSE over the layers whose widths match (:mod:`.losses`), read from the
forward the loop just ran (the student is asked for its hidden states by a forward pre-hook, so
the loop's ``model(ids)`` stays as it is). What trains is every weight of the student
(``mode: full``; the embeddings and output head only with ``train_embeddings``) or LoRA
adapters (``mode: lora``; :mod:`.lora`). The checkpoint holds the trained tensors, so a resumed
run ends bit-exactly where an uninterrupted one does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunegraph.passes.distill.losses import hidden_loss
from prunegraph.passes.train.objective import load_trained, trained_state
from prunegraph.pipeline.contract import State

__all__ = ["DistillObjective"]


class DistillObjective:
    """See the module docstring. ``params`` are the student's tensors that train (by name);
    ``settings`` the values a resumed run must share (the pass's)."""

    name = "distill"
    teacher = None  # the teacher is another model: teacher_logits
    shown = ("kl",)

    def __init__(self, student: nn.Module, teacher: nn.Module, params: dict[str, nn.Parameter],
                 *, lr: float, weight_decay: float = 0.0, kd_weight: float = 1.0,
                 ce_weight: float = 0.0, temperature: float = 1.0, hidden_weight: float = 0.0,
                 hidden_layers: list[int] | None = None, settings: dict[str, Any] | None = None
                 ) -> None:
        self.student, self.teacher_model = student, teacher
        self.params = params
        self.lr, self.weight_decay = lr, weight_decay
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.temperature, self.hidden_weight = float(temperature), float(hidden_weight)
        self.hidden_layers = list(hidden_layers or [])
        self.settings = dict(settings or {})
        self._teacher_hidden: tuple[torch.Tensor, ...] | None = None
        self._student_hidden: tuple[torch.Tensor, ...] | None = None
        self._hooks: list[Any] = []
        if self.hidden_weight > 0:
            if not self.hidden_layers:
                raise ValueError("hidden_weight > 0 needs the layers whose widths match")
            self._hooks = [
                student.register_forward_pre_hook(_ask_hidden_states, with_kwargs=True),
                student.register_forward_hook(self._keep_student_hidden)]

    # -- the teacher ---------------------------------------------------------------------

    @torch.no_grad()
    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``ids`` on the student's device (its hidden states kept for
        :meth:`penalty` when the hidden term is on)."""
        device = next(self.teacher_model.parameters()).device
        out = self.teacher_model(ids.to(device), output_hidden_states=self.hidden_weight > 0)
        if self.hidden_weight > 0:
            self._teacher_hidden = tuple(h.to(ids.device) for h in out.hidden_states)
        return out.logits[:, :-1].to(ids.device)

    def _keep_student_hidden(self, module, args, output) -> None:
        self._student_hidden = output.hidden_states

    # -- the Objective protocol ------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, "trained": sorted(self.params), **self.settings}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.params.values()), "lr": self.lr,
                 "weight_decay": self.weight_decay, "name": "student"}]

    def schedule_restart(self, total: int) -> None:
        return None

    def before_forward(self, step: int, total: int) -> None:
        self._student_hidden = None

    def penalty(self, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The hidden-state term of the forward just run (zero without it)."""
        if self.hidden_weight <= 0:
            return torch.zeros(()), {}
        if self._student_hidden is None or self._teacher_hidden is None:
            raise RuntimeError("Distill's hidden-state term found no hidden states of this step")
        h = hidden_loss(self._student_hidden, self._teacher_hidden, self.hidden_layers)
        self._student_hidden = self._teacher_hidden = None
        return self.hidden_weight * h, {"hidden": float(h.detach())}

    def post_step(self, step: int, total: int) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return trained_state(self.params)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_trained(self.params, state)

    def finish(self, state: State, history: list[dict[str, Any]],
               plots: Path | None) -> dict[str, Any]:
        """The first and last KL and CE, and the loss plot."""
        self.close()
        if plots is not None and history:
            write_loss_plot(plots / "loss.png", history)
        first, last = (history[0], history[-1]) if history else ({}, {})
        return {"kl_first": first.get("kl"), "kl_last": last.get("kl"),
                "ce_first": first.get("ce"), "ce_last": last.get("ce"),
                **({"hidden_last": last.get("hidden")} if self.hidden_weight > 0 else {})}

    def close(self) -> None:
        """Remove the hooks on the student."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _ask_hidden_states(module, args, kwargs):
    return args, {**kwargs, "output_hidden_states": True}


def write_loss_plot(path: Path, history: list[dict[str, Any]]) -> Path:
    """KL, CE (and the hidden-state term) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prunegraph.atomic import atomic_write

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("kl", "ce", "hidden"):
        if key in history[0]:
            ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title("Distill: losses")
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
