"""The ``Distill`` pass: recover a sliced model by distilling the dense one into it.

Every anchor with good quality after structured pruning trains the pruned model afterwards
(LLM-Pruner: LoRA; Sheared-LLaMA: continued pre-training; Minitron: distillation). ``Distill``
does the last, with the project's training loop (:func:`prunegraph.passes.train.loop.fit`:
seeded calibration stream, warm-up and cosine, bf16 autocast on CUDA, ``metrics.jsonl``, a loss
plot, checkpoints and exact resume), whose settings it nests under ``train``::

    - Slice
    - Distill: {mode: full, lr: 1.0e-4, train: {steps: 60, batch_size: 4, block_len: 256}}
    - Save: {path: model}

The teacher is the dense model reloaded from where ``Load`` found it, in its dtype, frozen
(:mod:`prunegraph.passes.distill.teacher`, which says why it is a second model and not a cache);
``teacher`` names another source (needed when the pipeline loaded a pruned folder), and
``teacher_device: cpu`` keeps it off the accelerator. The loss (:mod:`.objective`) is
``kd_weight`` x the logit KL at ``temperature`` (x T²), plus ``ce_weight`` x next-token
cross-entropy (0 by default: the teacher's whole distribution carries more than the one
observed token), plus ``hidden_weight`` x the normalised MSE of the residual stream after every
layer whose width the slice kept. ``mode: full`` trains every weight but the embeddings and the
output head (``train_embeddings: true`` adds them); ``mode: lora`` trains rank-``lora_rank``
adapters (peft) on every linear layer but the head (or ``lora_targets``) and merges them into
the weights at the end, so the result has the sliced model's names and shapes: ``Save`` writes
it and ``prunegraph.from_pretrained`` reloads it. ``lr`` defaults to 1e-4 for ``full`` and 1e-3
for ``lora``.

With a run folder, ``<run>/distill/`` holds ``metrics.jsonl``, ``loss.png`` and, while a run is
unfinished, ``checkpoint.pt`` (the trained tensors with their AdamW moments: for ``full`` about
three times the model, so deleted once done unless ``train.keep_checkpoint``).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prunegraph.errors import SpecError
from prunegraph.passes.distill.losses import matching_layers
from prunegraph.passes.distill.objective import DistillObjective
from prunegraph.passes.distill.teacher import load_teacher, teacher_source
from prunegraph.passes.train.config import TrainConfig, check_settings
from prunegraph.passes.train.loop import fit
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Distill", "TRAINING"]

#: Distill's training defaults: 100 steps with 10 of warm-up, the weight-sized checkpoint
#: deleted once training completes.
TRAINING = TrainConfig(steps=100, warmup=10, keep_checkpoint=False)

_DEFAULT_LR = {"full": 1e-4, "lora": 1e-3}


@register_pass
@dataclass(frozen=True)
class Distill(Pass):
    """Distil the dense teacher into the (sliced) model, training all its weights or LoRA
    adapters merged back at the end; the loop's settings are under ``train``."""

    name = "Distill"
    requires = ("model", "tokenizer")
    provides = ()

    mode: Literal["full", "lora"] = "full"
    lr: float | None = None
    weight_decay: float = 0.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    train_embeddings: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ()
    teacher: str = ""
    teacher_device: Literal["auto", "cpu"] = "auto"
    train: TrainConfig = TRAINING

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", TrainConfig.nested(self.train, TRAINING,
                                                             "Distill.train"))
        super().__post_init__()

    def params(self) -> dict[str, Any]:
        return {**super().params(), "train": self.train.to_dict()}

    @classmethod
    def parameter_help(cls, full: bool) -> list[str]:
        """The nested training settings with Distill's defaults (``prunegraph passes``)."""
        if not full:
            return ["train holds the training loop's settings; `prunegraph passes Distill` "
                    "lists them"]
        return TrainConfig.describe("train.", TRAINING)

    def validate(self) -> None:
        check_settings(self.train, "Distill.train.", min_steps=1)
        for key in ("weight_decay", "kd_weight", "ce_weight", "hidden_weight"):
            if getattr(self, key) < 0:
                raise SpecError(f"Distill.{key} must be >= 0, got {getattr(self, key)}")
        if self.lr is not None and self.lr <= 0:
            raise SpecError(f"Distill.lr must be > 0 (or null for the mode's default), got "
                            f"{self.lr}")
        if self.temperature <= 0:
            raise SpecError(f"Distill.temperature must be > 0, got {self.temperature}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise SpecError("Distill: kd_weight and ce_weight are both 0, so nothing would be "
                            "learned; set kd_weight > 0 (distillation) or ce_weight > 0")
        if self.hidden_weight > 0 and self.kd_weight == 0:
            raise SpecError("Distill: hidden_weight > 0 reads the teacher's forward, which runs "
                            "only with kd_weight > 0; set kd_weight > 0 too")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise SpecError(f"Distill: lora_rank must be >= 1 and lora_alpha > 0, got "
                            f"{self.lora_rank} and {self.lora_alpha}")
        if self.lora_targets and self.mode != "lora":
            raise SpecError("Distill.lora_targets applies to mode: lora only")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.mode]

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must have been made with to be resumed."""
        keys = ("mode", "weight_decay", "kd_weight", "ce_weight", "temperature",
                "hidden_weight", "train_embeddings", "lora_rank", "lora_alpha")
        return {**{k: getattr(self, k) for k in keys}, "lr": self.learning_rate,
                "lora_targets": list(self.lora_targets)}

    def run(self, state: State) -> PassResult:
        from torch.nn.utils import parametrize

        model = state.model
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            raise SpecError("Distill: the model still carries gates; run it after Slice (or "
                            "Finalize + Slice), on the sliced model")
        if state.get("tokenizer") is None:
            raise SpecError("Distill needs a tokenizer for its training text; load a model "
                            "that ships one")
        spec, dtype = teacher_source(state, self.teacher)
        device = next(model.parameters()).device
        teacher_device = torch.device("cpu") if self.teacher_device == "cpu" else device
        start = time.perf_counter()
        teacher = load_teacher(state, spec, dtype, teacher_device)
        try:
            layers = self._check_widths(model, teacher, device, teacher_device)
            stats = self._train(state, teacher, layers, spec)
        finally:
            del teacher
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        record = {"mode": self.mode, "teacher": spec, "teacher_device": str(teacher_device),
                  "lr": self.learning_rate, **stats, "train_seconds": stats["seconds"],
                  "seconds": round(time.perf_counter() - start, 1)}  # teacher loading included
        state.metrics["distill"] = record
        state.log.info("Distill (%s): KL %.4f -> %.4f over %d steps (%d tokens)", self.mode,
                       record.get("kl_first") or 0.0, record.get("kl_last") or 0.0,
                       record["steps"], record["tokens"])
        return PassResult(state, modified=True, stats=record)

    def _check_widths(self, student: nn.Module, teacher: nn.Module, device: torch.device,
                      teacher_device: torch.device) -> list[int]:
        """Refuse a teacher whose vocabulary differs (before any training); the hidden states
        whose widths match, when the hidden term is on."""
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            s = student(ids.to(device), output_hidden_states=self.hidden_weight > 0)
            t = teacher(ids.to(teacher_device), output_hidden_states=self.hidden_weight > 0)
        if s.logits.shape[-1] != t.logits.shape[-1]:
            raise SpecError(f"Distill: the student has {s.logits.shape[-1]} logits per token and "
                            f"the teacher {t.logits.shape[-1]}; distillation needs the same "
                            f"vocabulary (leave the vocab group unpruned)")
        if self.hidden_weight <= 0:
            return []
        layers = matching_layers(s.hidden_states, t.hidden_states)
        if not layers:
            raise SpecError("Distill: hidden_weight > 0, but no layer of the student has the "
                            "teacher's hidden width or the layer counts differ (the slice "
                            "removed hidden channels or layers); set hidden_weight: 0")
        return layers

    def _train(self, state: State, teacher: nn.Module, layers: list[int], spec: str
               ) -> dict[str, Any]:
        """One run of the loop; LoRA adapters are merged and every ``requires_grad`` flag is
        given back afterwards."""
        model = state.model
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        wrapped = None
        if self.mode == "lora":
            from prunegraph.passes.distill.lora import add_lora, lora_parameters

            wrapped = add_lora(model, self.lora_rank, self.lora_alpha, self.lora_targets,
                               seed=self.train.seed)
            params = lora_parameters(model)
        else:
            params = self._full_parameters(model)
        objective = DistillObjective(
            model, teacher, params, lr=self.learning_rate, weight_decay=self.weight_decay,
            kd_weight=self.kd_weight, ce_weight=self.ce_weight, temperature=self.temperature,
            hidden_weight=self.hidden_weight, hidden_layers=layers,
            settings={**self.settings(), "teacher": spec})
        try:
            stats = fit(state, objective, self.train, subdir="distill")
        finally:
            objective.close()
            if wrapped is not None:
                from prunegraph.passes.distill.lora import merge_lora

                state.model = merge_lora(wrapped)
            for n, p in state.model.named_parameters():
                p.requires_grad_(flags.get(n, False))
        stats["trained_params"] = sum(p.numel() for p in params.values())
        return stats

    def _full_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Every weight of the model, the embeddings and output head only if asked."""
        skip: set[int] = set()
        if not self.train_embeddings:
            for get in ("get_input_embeddings", "get_output_embeddings"):
                module = getattr(model, get, lambda: None)()
                if module is not None:
                    skip.update(id(p) for p in module.parameters())
        return {n: p for n, p in model.named_parameters() if id(p) not in skip}
