"""LoRA adapters for distillation, through ``peft``: added in place, merged back in place.

``add_lora`` wraps the chosen linear layers of the model (by default every linear layer but the
output head, peft's ``all-linear``) with rank-``r`` adapters; the model object stays the one the
pipeline holds, so the training loop runs it as it is. ``merge_lora`` folds ``B @ A * alpha / r``
into each base weight and puts the plain layers back, so the result has the parameter names and
shapes of the model before: ``Save`` writes it and ``prunegraph.from_pretrained`` reloads it
like any pruned model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["add_lora", "merge_lora", "lora_parameters"]


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = (),
             seed: int = 0):
    """Put LoRA adapters on ``model`` in place (A initialised from ``seed``, B at zero, so the
    model computes what it did); returns the peft wrapper that :func:`merge_lora` takes."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=list(targets) if targets else "all-linear")
    torch.manual_seed(seed)  # the loop seeds again from the same value before training
    with warnings.catch_warnings():  # peft asks a deprecated transformers property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, config)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters of ``model``, by name."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def merge_lora(wrapped) -> nn.Module:
    """Fold the adapters into the base weights and remove them; returns the base model (the
    same object :func:`add_lora` was given)."""
    return wrapped.merge_and_unload()
