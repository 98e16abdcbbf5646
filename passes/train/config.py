"""The training configuration: how the loop trains, whatever it trains.

:class:`TrainConfig` holds every setting of :func:`prunegraph.passes.train.loop.fit` (length,
batches, data, learning-rate shape, seed, autocast, checkpoints, plots); what is trained and its
loss are the objective's (:mod:`prunegraph.passes.train.objective`). A pass that trains takes one
instead of copying its fields:

* ``Train`` *is* one: its flat parameters are these fields (``Train: {steps: 200, batch_size:
  4}``), plus the gate objective's ``kd_weight`` and ``polish_steps``;
* ``PrunePath`` nests one under ``train`` (``PrunePath: {warmup_steps: 50, train: {steps: 100,
  batch_size: 4}}``), with its own defaults (no learning-rate warm-up, no plots, checkpoint
  deleted once done); a mapping there is merged onto those defaults
  (:meth:`TrainConfig.nested`).

The model trains where it is (``Load``'s device); ``autocast: auto`` runs the forwards in bf16
on CUDA and in float32 elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import coerce_param, nearest, type_name

__all__ = ["TrainConfig", "TrainFields", "check_settings", "AUTOCAST", "LR_SCHEDULES"]

LR_SCHEDULES = ("cosine", "constant")
AUTOCAST = ("auto", "bf16", "off")

#: Settings a resumed run must share with the run that wrote the checkpoint (the rest only say
#: where and how often to checkpoint, and may change between the two).
RESULT_KEYS = ("steps", "batch_size", "block_len", "grad_accum", "warmup", "lr_schedule", "seed",
               "source", "autocast")


@dataclass(frozen=True)
class TrainFields:
    """The fields of :class:`TrainConfig` alone, for a pass whose parameters they are
    (``Train``); documented there."""

    steps: int = 200
    batch_size: int = 4
    block_len: int = 128
    grad_accum: int = 1
    warmup: int = 20
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    source: str = "wikipedia"
    autocast: Literal["auto", "bf16", "off"] = "auto"
    checkpoint_every: int = 50
    resume: bool = True
    halt_after: int | None = None
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = True
    plots: bool = True


@dataclass(frozen=True, repr=False)
class TrainConfig(TrainFields):
    """Settings of one training run (see the module docstring).

    Attributes:
        steps: optimizer steps in all (every stage or phase of the objective included).
        batch_size: blocks per micro-batch.
        block_len: tokens per block.
        grad_accum: micro-batches per optimizer step.
        warmup: steps of linear learning-rate warm-up.
        lr_schedule: after the warm-up, ``cosine`` to 0 at ``steps`` or ``constant``; for every
            optimizer group that does not set its own (the DDP multipliers do).
        seed: seeds the order of the blocks and torch's RNG.
        source: the text source; the loop draws from its calibration split.
        autocast: ``auto`` (bf16 on CUDA, float32 elsewhere), ``bf16`` or ``off``.
        checkpoint_every: steps between checkpoints (with a run folder or ``checkpoint_dir``).
        resume: continue from a matching checkpoint.
        halt_after: stop after this many steps of this run, with a checkpoint.
        checkpoint_dir: where the checkpoint lives instead of the run folder.
        keep_checkpoint: keep the checkpoint once training completes.
        plots: write the objective's plots next to ``metrics.jsonl``.
    """

    def __post_init__(self) -> None:
        values = _coerced(self.to_dict(), "TrainConfig.")
        for key, value in values.items():
            if value is not getattr(self, key):
                object.__setattr__(self, key, value)
        check_settings(self, "TrainConfig.", min_steps=0)

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(TrainFields))

    @classmethod
    def of(cls, obj: TrainFields) -> TrainConfig:
        """The configuration held by ``obj``'s fields (a ``Train`` pass)."""
        return cls(**{k: getattr(obj, k) for k in cls.field_names()})

    @classmethod
    def nested(cls, value: TrainConfig | Mapping[str, Any] | None, defaults: TrainConfig,
               where: str) -> TrainConfig:
        """``value`` as a configuration: a mapping is merged onto ``defaults`` (a pass's own
        defaults), an unknown key is a :class:`SpecError` naming the nearest settings."""
        if value is None:
            return defaults
        if isinstance(value, TrainConfig):
            return value
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be a mapping of training settings, got "
                            f"{type(value).__name__} {value!r}")
        known = cls.field_names()
        for key in value:
            if key not in known:
                raise SpecError(f"{where} has no setting {key!r}.{nearest(str(key), known)} "
                                f"Its settings: {', '.join(known)}.")
        merged = _coerced({**defaults.to_dict(), **value}, f"{where}.")
        check_settings(SimpleNamespace(**merged), f"{where}.", min_steps=0)
        return cls(**merged)

    def __repr__(self) -> str:
        """The settings that differ from the defaults (``TrainConfig(steps=100, warmup=0)``)."""
        base = TrainFields()
        changed = [f"{k}={getattr(self, k)!r}" for k in self.field_names()
                   if getattr(self, k) != getattr(base, k)]
        return f"TrainConfig({', '.join(changed)})"

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as plain data (the spec form)."""
        return {k: getattr(self, k) for k in self.field_names()}

    def result_settings(self) -> dict[str, Any]:
        """The settings a checkpoint must have been made with to be resumed."""
        return {k: getattr(self, k) for k in RESULT_KEYS}

    @classmethod
    def describe(cls, prefix: str = "", defaults: TrainConfig | None = None) -> list[str]:
        """One ``name: type = default`` line per setting (for ``prunegraph passes``)."""
        hints = _hints()
        base = defaults or cls()
        return [f"{prefix}{k}: {type_name(hints[k])} = {getattr(base, k)!r}"
                for k in cls.field_names()]


def check_settings(obj: Any, prefix: str, min_steps: int = 1) -> None:
    """Raise :class:`SpecError` for a setting of ``obj`` out of range, the message starting with
    ``prefix`` (``"pass Train: "``, ``"PrunePath.train."``); a pass that must train asks for
    ``min_steps=1``."""
    for key, low in (("steps", min_steps), ("batch_size", 1), ("block_len", 2),
                     ("grad_accum", 1), ("warmup", 0), ("checkpoint_every", 1)):
        if getattr(obj, key) < low:
            raise SpecError(f"{prefix}{key} must be >= {low}, got {getattr(obj, key)}")
    if obj.halt_after is not None and obj.halt_after < 1:
        raise SpecError(f"{prefix}halt_after must be >= 1 or null, got {obj.halt_after}")


def _coerced(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` checked against the fields' types (ints widened to floats, as for pass
    parameters); a :class:`SpecError` naming the setting otherwise."""
    hints = _hints()
    out = {}
    for key, value in values.items():
        try:
            out[key] = coerce_param(value, hints[key])
        except TypeError:
            raise SpecError(f"{prefix}{key} expects {type_name(hints[key])}, got "
                            f"{type(value).__name__} {value!r}") from None
    return out


def _hints() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(TrainFields)
