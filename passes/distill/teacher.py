"""The dense teacher of a distillation: reloaded from where the pipeline loaded the model.

After ``Slice`` the student has lost the weights the teacher needs, so the teacher is a real
second model. It is loaded from the same source and in the same dtype as ``Load`` loaded the
model (``state.model_source``), or from a spec the user names, frozen (``requires_grad=False``,
eval mode) and checked against the plan's record of its base model, so that a wrong teacher is
refused before any training. It lives on the student's device, or on the CPU
(``teacher_device: cpu``) when the accelerator has no room for it: each teacher forward then
runs there and only its logits (and hidden states) move.

Why not cache the teacher's top-k logits and drop the model: the cache grows with the training
tokens (20M tokens x top-64 x 6 bytes is 7.7 GB, and a resumed run needs it again), it cannot
serve the hidden-state term, and a top-k KL is another loss whose effect would need its own
measurement. The teacher's forward costs about a third of a student step (no backward), so at
the sizes prunegraph runs today keeping the model is the simpler and exact choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunegraph.errors import PlanError, SpecError
from prunegraph.pipeline.contract import State

__all__ = ["teacher_source", "load_teacher"]


def teacher_source(state: State, teacher: str, who: str = "Distill.teacher"
                   ) -> tuple[str, str]:
    """``(model spec, dtype name)`` of the dense model: ``teacher`` if given, else the model
    ``Load`` loaded. ``who`` is the setting that names another one (``Distill.teacher``,
    ``Reconstruct.dense``). Raises :class:`SpecError` when there is none to reload."""
    source: dict[str, Any] | None = state.get("model_source")
    dtype = source["dtype"] if source else str(next(state.model.parameters()).dtype
                                               ).removeprefix("torch.")
    if teacher:
        return teacher, dtype
    pass_name = who.split(".")[0]
    if source is None:
        raise SpecError(f"{pass_name}: no dense model to reload: the pipeline did not start "
                        f"with Load (state.model_source is missing); name the dense model with "
                        f"{who} (a spec as Load takes it, e.g. smollm2-135m)")
    if source.get("pruned"):
        raise SpecError(f"{pass_name}: the pipeline loaded {source['model']!r}, a pruned "
                        f"folder, which is not the dense model; name the dense model it was "
                        f"pruned from with {who} (e.g. smollm2-135m)")
    return source["model"], dtype


def load_teacher(state: State, spec: str, dtype: str, device: torch.device,
                 who: str = "Distill.teacher") -> nn.Module:
    """The frozen dense model on ``device``, checked against ``state.plan``'s base model when
    there is a plan. Raises :class:`SpecError` when it is another model."""
    from prunegraph.data.models import load_model

    model, _ = load_model(spec, dtype=getattr(torch, dtype), tokenizer=False)
    plan = state.get("plan")
    if plan is not None and plan.fingerprint is not None:
        try:
            plan.check_model(model)
        except PlanError as e:
            raise SpecError(f"{who.split('.')[0]}: {spec!r} is not the dense model the plan was "
                            f"made from ({e}); name that model with {who}") from None
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
