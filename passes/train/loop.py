"""The training loop: any :class:`~prunegraph.passes.train.objective.Objective`, with exact resume.

``fit(state, objective, config, subdir)`` trains ``objective`` on ``state.model`` under a
:class:`~prunegraph.passes.train.config.TrainConfig`. One loop serves every method that trains
something: the gate families through the ``Train`` pass
(:class:`~prunegraph.passes.train.gate_objective.GateObjective`) and PrunePath
(``PrunePathObjective``, whose pass calls :func:`fit` itself).

Only the model parameters an objective lists in its optimizer groups train; every other model
parameter is frozen (``requires_grad=False``), so mask training leaves the weights alone. The
model runs in eval mode (no dropout), where ``Load`` put it. Each step draws ``batch_size *
grad_accum`` blocks of ``block_len`` tokens from the *calibration* split of ``source``
(:func:`prunegraph.data.blocks.text_blocks`; a seeded permutation, so step ``t`` always sees the
same blocks) and minimises, per micro-batch::

    ce_weight * CE(student) + objective.kd_weight * KL(teacher || student) + objective.penalty(step)

(``ce_weight`` is 1 unless the objective sets it; Distill's may be 0.)

The learning rate warms up linearly for ``warmup`` steps, then follows a cosine to 0 (or stays:
``lr_schedule: constant``, or an optimizer group marked ``schedule: constant``, the DDP
multipliers). An objective may restart the cosine at a step (``schedule_restart``: the gate
families' polish). The forwards run under bf16 autocast on CUDA (``autocast``).

With a run folder, ``<run>/<subdir>/`` holds ``metrics.jsonl`` (one line per step: loss, CE, KL,
the objective's penalty stats and step values, lr of its first optimizer group; rewritten every
10 steps for a live view), ``checkpoint.pt`` (:mod:`prunegraph.passes.train._resume`; written
every ``checkpoint_every`` steps to a temporary name and renamed) and, with ``plots``, the
objective's plots. A re-run with ``resume`` continues from the checkpoint and gives the same
result as an uninterrupted run. ``prunegraph run`` replaces its run folder when it starts, so to
resume a pipeline re-run put the checkpoint outside it with ``checkpoint_dir`` (a path; relative
paths are taken from the current directory). ``halt_after=N`` stops after ``N`` steps of this run
with a checkpoint (raises :class:`TrainingHalted`), to split a long run into jobs.
``keep_checkpoint=False`` deletes the checkpoint once training completes (an objective that
trains model weights checkpoints them with their optimizer state: about three times the model).

Under ``torchrun`` (:mod:`prunegraph.pipeline.distributed`) the same loop runs on every rank
through :mod:`prunegraph.passes.train.sharding`: the model is sharded with FSDP2, rank ``r`` of
``N`` takes slice ``r`` of each step's ``N * batch_size`` blocks, the gradients of replicated
trainables are averaged and the records are rank means, the checkpoint is the
``torch.distributed.checkpoint`` folder ``checkpoint.dcp`` (:mod:`._sharded_resume`), rank 0
alone writes ``metrics.jsonl`` and the plots, and the plain module comes back at the end.
``activation_checkpointing`` wraps the decoder layers the same way in a single process.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.passes.train._resume import checkpoint_path, load_checkpoint, save_checkpoint
from prunegraph.passes.train._sharded_resume import load_sharded, save_sharded, sharded_path
from prunegraph.passes.train.config import TrainConfig
from prunegraph.passes.train.objective import Objective
from prunegraph.passes.train.sharding import Sharding, needs_sharding
from prunegraph.pipeline import distributed
from prunegraph.pipeline.contract import State, progress_bar
from prunegraph.pipeline.runfolder import atomic_write_text

__all__ = ["fit", "TrainingHalted", "lr_factor", "kd_loss"]


class TrainingHalted(PrunegraphError):
    """Training stopped early on request (``halt_after``); the checkpoint lets it resume."""


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine",
              restart: int | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total`` (or 1 for
    ``schedule='constant'``). With ``restart`` the cosine ends there and a second one runs from
    1 at ``restart`` to 0 at ``total`` (Train's polish phase)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    start, end = warmup, total
    if restart is not None and restart < total:
        start, end = (restart, total) if step >= restart else (warmup, restart)
    span = max(end - start, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - start, span) / span))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
            ) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) || softmax(student / T))`` per token, averaged over
    tokens. The ``T²`` keeps the gradient's scale independent of ``T`` (Hinton et al., 2015);
    at ``T = 1`` it is the plain KL."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def fit(state: State, objective: Objective, config: TrainConfig, subdir: str = "train"
        ) -> dict[str, Any]:
    """Train ``objective`` on ``state.model`` for ``config.steps`` steps, resuming from a
    matching checkpoint in ``<run>/<subdir>/`` (or ``config.checkpoint_dir``); returns the stats.

    Raises:
        SpecError: a distillation weight without a teacher, ``halt_after`` with nowhere to keep
            the checkpoint, no tokenizer; all before any work.
        TrainingHalted: ``halt_after`` steps were run (the checkpoint is written).
    """
    if objective.kd_weight > 0 and not _has_teacher(objective):
        raise SpecError(f"pass Train: the {objective.name} objective has no teacher to "
                        f"distill from; set kd_weight=0 (got {objective.kd_weight})")
    folder = Path(state.run_dir) / subdir if state.run_dir is not None else None
    ckpt = checkpoint_path(folder, config.checkpoint_dir)
    if distributed.active():  # rank 0's checkpoint folder: the other ranks have no run folder
        ckpt = distributed.broadcast(ckpt)
    if config.halt_after is not None and ckpt is None:
        raise SpecError("pass Train: halt_after needs a run folder or checkpoint_dir to "
                        "keep the checkpoint it resumes from")
    if state.tokenizer is None:
        raise SpecError("Train needs a tokenizer for its calibration text; load a model "
                        "that ships one")
    from prunegraph.data.blocks import text_blocks

    model = state.model
    ranks = distributed.world_size()
    sharding = None
    if needs_sharding(config):
        _train_only(model, objective.param_groups())  # frozen before FSDP sees them
        sharding = Sharding(model, config, _device(model))
        sharding.wrap()
    blocks = text_blocks(state.tokenizer, config.source, "calibration", config.block_len)
    order = _order(len(blocks), config.steps * config.batch_size * config.grad_accum * ranks,
                   config.seed)
    optimizer, scheduler = _optimizer(model, objective, config)
    torch.manual_seed(config.seed)
    settings = {**objective.config(), "kd_weight": objective.kd_weight,
                **config.result_settings()}
    sharded = sharding is not None and sharding.sharded
    root = _root(model, objective) if sharded else None
    start, history = 0, []
    if ckpt is not None and config.resume:
        if sharded and sharded_path(ckpt).exists():
            start, history = load_sharded(sharded_path(ckpt), settings, objective, optimizer,
                                          scheduler, root)
        elif not sharded and ckpt.exists():
            start, history = load_checkpoint(ckpt, settings, objective, optimizer, scheduler)
        if start:
            state.log.info("Train: resuming %s at step %d from %s", objective.name, start,
                           sharded_path(ckpt) if sharded else ckpt)
    model.eval()
    t0 = time.perf_counter()
    steps = config.steps
    bar = progress_bar(state, range(start, steps), total=steps, initial=start,
                       desc=f"Train {objective.name}")
    try:
        for step in bar:
            history.append(_step(model, objective, config, blocks, order, step, optimizer,
                                 scheduler, sharding))
            bar.set_postfix({k: f"{history[-1][k]:.3f}" for k in ("loss", *objective.shown)})
            done = step + 1
            stop = (config.halt_after is not None and done - start >= config.halt_after
                    and done < steps)
            final_step = done == steps
            if ckpt is not None and (stop or (done % config.checkpoint_every == 0
                                              and not final_step)
                                     or (final_step and config.keep_checkpoint)):
                if sharded:
                    save_sharded(sharded_path(ckpt), settings, done, objective, optimizer,
                                 scheduler, history, root)
                else:
                    save_checkpoint(ckpt, settings, done, objective, optimizer, scheduler,
                                    history)
            if folder is not None and done % 10 == 0:
                _write_metrics(folder, history)  # live view for long runs
            if stop:
                if sharding is not None:  # every rank halts here: give the module back
                    sharding.unwrap()
                raise TrainingHalted(
                    f"Train stopped after step {done} of {steps} as asked (halt_after="
                    f"{config.halt_after}); run it again to resume from {ckpt}")
    finally:
        if hasattr(bar, "close"):
            bar.close()
        if folder is not None and history:
            _write_metrics(folder, history)
    if ckpt is not None and not config.keep_checkpoint:
        ckpt.unlink(missing_ok=True)  # only an interrupted run needs it
        if sharded and distributed.is_main():
            shutil.rmtree(sharded_path(ckpt), ignore_errors=True)
    if sharding is not None:
        sharding.check_replicas(sharding.replicated(_trained(optimizer)))
        sharding.unwrap()  # the user's module again, for the passes after training
    plots = folder if folder is not None and config.plots else None
    last = history[-1] if history else {}
    return {"steps": steps, "resumed_at": start,
            "tokens": steps * config.batch_size * config.grad_accum * config.block_len,
            "seconds": round(time.perf_counter() - t0, 1),
            "final_ce": last.get("ce"), "final_kl": last.get("kl"),
            **objective.finish(state, history, plots)}


def _device(model: torch.nn.Module) -> torch.device:
    """Where this process computes: its GPU in a launch, else where the model is."""
    if distributed.active():
        return distributed.device()
    return next(model.parameters()).device


def _root(model: torch.nn.Module, objective: Objective) -> torch.nn.Module:
    """One module holding every trainable tensor (the model, and the objective's own module,
    a gate family), for the sharded checkpoint."""
    module = getattr(objective, "module", None)
    if module is None:
        return model
    return torch.nn.ModuleDict({"model": model, "objective": module})


def _trained(optimizer) -> list[torch.nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _order(n_blocks: int, needed: int, seed: int) -> torch.Tensor:
    """Block indices of every micro-batch: seeded permutations of all blocks, concatenated."""
    gen = torch.Generator().manual_seed(seed)
    chunks, have = [], 0
    while have < needed:
        chunks.append(torch.randperm(n_blocks, generator=gen))
        have += n_blocks
    return torch.cat(chunks)[:needed]


def _train_only(model: torch.nn.Module, groups: list[dict[str, Any]]) -> None:
    """Freeze every model parameter the optimizer groups do not list; the listed ones train."""
    listed = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in listed)


def _optimizer(model, objective: Objective, config: TrainConfig):
    """AdamW over the objective's groups (only their model parameters left trainable) and
    the per-group warm-up + cosine/constant schedule."""
    groups = objective.param_groups()
    _train_only(model, groups)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    restart = objective.schedule_restart(config.steps)
    warmup = min(config.warmup, (config.steps if restart is None else restart) - 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [functools.partial(lr_factor, total=config.steps, warmup=warmup,
                                      schedule=g.get("schedule") or config.lr_schedule,
                                      restart=restart)
                    for g in optimizer.param_groups])
    return optimizer, scheduler


def _step(model, objective: Objective, config: TrainConfig, blocks, order, step: int, optimizer,
          scheduler, sharding: Sharding | None = None) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; returns its record. Under a launch
    rank ``r`` of ``N`` takes slice ``r`` of each ``N * batch_size`` blocks."""
    device = sharding.device if sharding is not None else next(model.parameters()).device
    ranks, rank = distributed.world_size(), distributed.rank()
    optimizer.zero_grad(set_to_none=True)
    sums = {"ce": 0.0, "kl": 0.0, "loss": 0.0}
    stats: dict[str, float] = {}
    for micro in range(config.grad_accum):
        lo = ((step * config.grad_accum + micro) * ranks + rank) * config.batch_size
        ids = blocks[order[lo:lo + config.batch_size]].to(device)
        parts, stats = _micro(model, objective, config, ids, step)
        for key, value in parts.items():
            sums[key] += value / config.grad_accum
    if sharding is not None and sharding.sharded:
        sharding.sync_grads(sharding.replicated(_trained(optimizer)))
        sums, stats = _rank_means(sums), _rank_means(stats)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {"step": step + 1, **sums, **stats, **objective.post_step(step, config.steps),
            "lr": lr}


def _rank_means(values: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a record averaged over the ranks (each saw its share of the tokens)."""
    keys = [k for k, v in values.items() if isinstance(v, float)]
    means = dict(zip(keys, distributed.all_mean([values[k] for k in keys])))
    return {k: means.get(k, v) for k, v in values.items()}


def _autocast(config: TrainConfig, device: torch.device) -> AbstractContextManager:
    if config.autocast == "off" or (config.autocast == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _has_teacher(objective: Objective) -> bool:
    return objective.teacher is not None or getattr(objective, "teacher_logits", None) is not None


def _teacher_logits(model, objective: Objective, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for ``ids``: the objective's own teacher model when it has one
    (``teacher_logits``, Distill's dense model), else ``model`` under ``objective.teacher()``."""
    own = getattr(objective, "teacher_logits", None)
    if own is not None:
        return own(ids)
    with objective.teacher():
        return model(ids).logits[:, :-1]


def _micro(model, objective: Objective, config: TrainConfig, ids: torch.Tensor, step: int
           ) -> tuple[dict[str, float], dict[str, float]]:
    """Forward(s) and backward of one micro-batch; its loss parts and penalty stats."""
    autocast = _autocast(config, ids.device)
    teacher = None
    if objective.kd_weight > 0:
        with torch.no_grad(), autocast:
            teacher = _teacher_logits(model, objective, ids)
    objective.before_forward(step, config.steps)
    with autocast:
        logits = model(ids).logits[:, :-1]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    kl = (kd_loss(logits, teacher, getattr(objective, "temperature", 1.0))
          if teacher is not None else None)
    penalty, stats = objective.penalty(step, config.steps)
    ce_weight = getattr(objective, "ce_weight", 1.0)
    data = ce_weight * ce if kl is None else ce_weight * ce + objective.kd_weight * kl
    loss = data + penalty
    (loss / config.grad_accum).backward()
    return ({"ce": float(ce.detach()), "kl": float(kl.detach()) if kl is not None else 0.0,
             "loss": float(loss.detach())}, stats)


def _write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(folder / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
