"""The ``Train`` pass and its loop: any training objective, with exact resume.

One loop serves every method that trains something: the gate families (DDP, hard-concrete,
through :class:`GateObjective`) and PrunePath (``PrunePathObjective`` in
:mod:`prunegraph.passes.prunepath.training`, whose pass calls :meth:`Train.fit`). What a method must
provide is the :class:`Objective` protocol below; the loop knows nothing else about it.

Only the model parameters an objective lists in its optimizer groups train; every other model
parameter is frozen (``requires_grad=False``), so mask training leaves the weights alone. The
model runs in eval mode (no dropout). Each step draws ``batch_size * grad_accum`` blocks of
``block_len`` tokens from the *calibration* split of ``source`` (a seeded permutation, so step
``t`` always sees the same blocks) and minimises, per micro-batch::

    CE(student) + kd_weight * KL(teacher || student) + objective.penalty(step)

The teacher exists only where the objective has one (the gate families: the same model with
every gate at 1, one extra forward under ``no_grad``, no extra weights); ``kd_weight > 0`` with
an objective that has none is a SpecError. The learning rate warms up linearly for ``warmup``
steps, then follows a cosine to 0 (or stays, for an optimizer group marked ``schedule:
constant``: the DDP multipliers). On CUDA the forwards run under bf16 autocast.

``polish_steps=N`` (gate families; 0, the published methods, by default) ends the run with N
steps under the exact plan Finalize will make: the removed units are held at 0 and the kept gates
train on without the budget terms, on a fresh cosine (see :class:`GateObjective`). Without it the
gates rarely reach the budget inside a short run and Finalize's cut is the first time the model
runs without the last units; with it, the gated model at the end of training *is* the finalized
one. On SmolLM2 at 20% removed it took DDP from 1.37x to 1.30x of dense perplexity on the same
1M tokens (docs/benchmarks.md).

With a run folder, ``<run>/train/`` (the ``subdir`` of :meth:`Train.fit`) holds
``metrics.jsonl`` (one line per step: loss, CE, KL, the objective's penalty stats and step
values, lr of its first optimizer group), ``checkpoint.pt`` (the objective's state, optimizer,
scheduler, RNG states, step; written every ``checkpoint_every`` steps to a temporary name and
renamed) and, for gate families, the plots (:mod:`prunegraph.passes.train.plots`). A re-run
with ``resume=True`` continues from the checkpoint and gives the same result as an
uninterrupted run. ``prunegraph run`` replaces its run folder when it starts, so to resume a
pipeline re-run put the checkpoint outside it with ``checkpoint_dir`` (a path; relative paths
are taken from the current directory). ``halt_after=N`` stops after ``N`` steps of this run
with a checkpoint (raises :class:`TrainingHalted`), to split a long run into jobs.
``keep_checkpoint=False`` deletes the checkpoint once training completes (an objective that
trains model weights checkpoints them with their optimizer state: about three times the model).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, progress_bar, register_pass
from prunegraph.pipeline.runfolder import atomic_write_text

__all__ = ["Train", "TrainingHalted", "Objective", "GateObjective", "lr_factor", "kd_loss"]


class TrainingHalted(PrunegraphError):
    """Training stopped early on request (``halt_after``); the checkpoint lets it resume."""


class Objective(Protocol):
    """What :meth:`Train.fit` trains. For step ``t`` of ``total`` the loop runs, per
    micro-batch: the teacher forward under ``teacher()`` (only with ``kd_weight > 0``),
    ``before_forward(t, total)``, the student forward, ``penalty(t, total)`` (after the forward,
    so it may read that forward's activations) and the backward; then the optimizer step and
    ``post_step(t, total)``."""

    name: str
    #: A context in which the model is its own teacher, or None (no distillation possible).
    teacher: Callable[[], AbstractContextManager] | None
    #: Keys of a step's record shown on the progress bar.
    shown: tuple[str, ...]

    def config(self) -> dict[str, Any]:
        """Settings a checkpoint must have been made with to be resumed."""

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups (``params``, ``lr``, ``name``, optional ``schedule``: ``cosine`` or
        ``constant``); the first group's lr is logged. Model parameters listed here train,
        every other model parameter is frozen."""

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

    def finish(self, state: State, history: list[dict[str, Any]],
               plots: Path | None) -> dict[str, Any]:
        """Put the result into ``state`` (plots into ``plots`` if given); the pass stats."""


class GateObjective:
    """A gate family (:class:`~prunegraph.passes.gates.GateFamily`) as a Train objective: its
    gates and dual variables train, its Lagrangian budget terms are the penalty, and the
    teacher is the model with every gate at 1. Only the family's public methods are called.

    With ``polish_steps`` the run has two phases. The *search* (the first ``total -
    polish_steps`` steps, over which the family anneals) is the method as published. At the
    start of the *polish* the family's values are turned into the exact plan Finalize would make
    (``topk``, :func:`~prunegraph.passes.finalize.plan_from_values`); from then on the removed
    units are held at 0 and the kept gates train on without the budget terms, so they learn to
    make up for the units that the search left small but not yet at 0. Still only gates train."""

    def __init__(self, family, gates, polish_steps: int = 0, model=None) -> None:
        self.family, self.gates = family, gates
        self.name = family.name
        self.ones = {n: torch.ones_like(v) for n, v in family.final_values().items()}
        self.shown = ("achieved_sparsity", f"l1_{family.constraints[0].name}")
        self.polish_steps, self.model = polish_steps, model
        self.mask: dict[str, torch.Tensor] | None = None

    def config(self) -> dict[str, Any]:
        fam = self.family
        return {"family": fam.name, "sparsity": fam.sparsity, "budget": fam.budget,
                "scope": fam.scope, "groups": [g.name for g in fam.groups]}

    def param_groups(self) -> list[dict[str, Any]]:
        return self.family.param_groups()

    @contextmanager
    def teacher(self) -> Iterator[None]:
        """Every gate at 1: the dense model (the student's values are set again after)."""
        self.gates.values.update(self.ones)
        yield

    def _search(self, step: int, total: int) -> tuple[int, int, bool]:
        """``(step, total)`` of the search phase, and whether ``step`` is in the polish."""
        search = total - self.polish_steps
        return min(step, search), search, step >= search

    def _polish_mask(self) -> dict[str, torch.Tensor]:
        from prunegraph.passes.finalize import plan_from_values

        final = self.family.final_values()
        values = {n: v.detach().float().cpu() for n, v in final.items()}
        planned = plan_from_values(self.family, values, "topk", model=self.model).gate_values()
        # on the gates' device and dtype once, so the per-forward multiply moves nothing
        return {n: (planned[n] != 0).to(v.device, v.dtype) for n, v in final.items()}

    def _masked(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mask is None:
            return values
        return {n: v * self.mask[n].to(v.device, v.dtype) for n, v in values.items()}

    def before_forward(self, step: int, total: int) -> None:
        step, search, polishing = self._search(step, total)
        if polishing and self.mask is None:
            self.mask = self._polish_mask()
        self.gates.values.update(self._masked(self.family.forward_values(step, search)))

    def penalty(self, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        step, search, polishing = self._search(step, total)
        if not polishing:
            return self.family.penalty(step, search)
        with torch.no_grad():  # the mask meets the budget exactly: only the stats are kept
            _, stats = self.family.penalty(step, search)
        return torch.zeros(()), {**stats, "penalty": 0.0,
                                 "expected_sparsity": self._achieved()}

    def _achieved(self) -> float:
        return 1.0 - self.family.kept_fraction(self._masked(self.family.final_values()))

    def post_step(self, step: int, total: int) -> dict[str, Any]:
        step, search, polishing = self._search(step, total)
        self.family.post_step()
        return {"achieved_sparsity": self._achieved(), **self.family.schedule(step, search),
                "polish": polishing}

    def state_dict(self) -> dict[str, Any]:
        return {"family": self.family.state_dict(), "extra": self.family.extra_state(),
                "mask": self.mask}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.family.load_state_dict(state["family"])
        self.family.load_extra_state(state["extra"])
        self.mask = state.get("mask")

    def finish(self, state: State, history: list[dict[str, Any]],
               plots: Path | None) -> dict[str, Any]:
        """Install the final gate values (``state.trained_gates``) and report the budget."""
        fam = self.family
        fam.eval()
        final = self._masked(fam.final_values())
        self.gates.values.update({n: v.detach() for n, v in final.items()})
        state.trained_gates = final
        target = fam.target_sparsity()
        search_end = (history[-1]["step"] if history else 0) - self.polish_steps
        reached = next((h["step"] for h in history[:max(search_end, 0)]
                        if h["achieved_sparsity"] >= target - 5e-3), None)  # by the search
        last = history[-1] if history else {}
        stats = {"family": fam.name, "target_sparsity": round(target, 6),
                 "achieved_sparsity": round(self._achieved(), 6),
                 "expected_sparsity": round(last.get("expected_sparsity", float("nan")), 6),
                 "steps_to_target": reached}
        if plots is not None:
            from prunegraph.passes.train.plots import write_plots

            write_plots(plots, history, fam, final)
        how = f"target reached at step {reached}" if reached else "target not reached"
        if self.polish_steps:
            how = (f"{how} by the search; the last {self.polish_steps} steps polished under "
                   f"the exact plan")
        state.log.info("Train: %s achieved sparsity %.3f (target %.3f), %s", fam.name,
                       stats["achieved_sparsity"], target, how)
        return stats


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


def kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per token, averaged over tokens (temperature 1)."""
    s = F.log_softmax(student.float(), dim=-1)
    t = F.log_softmax(teacher.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _order(n_blocks: int, needed: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    chunks, have = [], 0
    while have < needed:
        chunks.append(torch.randperm(n_blocks, generator=gen))
        have += n_blocks
    return torch.cat(chunks)[:needed]


_BLOCKS: dict[tuple[int, str, int], tuple[Any, torch.Tensor]] = {}


def calibration_stream(tokenizer, source: str, block_len: int) -> torch.Tensor:
    """Every ``block_len`` block of the calibration split of ``source`` (cached per tokenizer:
    benchmarks train several families in one process)."""
    from prunegraph.data.text import load_documents, split_documents, token_blocks

    key = (id(tokenizer), source, block_len)
    hit = _BLOCKS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    calibration, _ = split_documents(load_documents(source))
    blocks = token_blocks(tokenizer, calibration, block_len, None)
    _BLOCKS.clear()
    _BLOCKS[key] = (tokenizer, blocks)
    return blocks


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _train_only(model: torch.nn.Module, groups: list[dict[str, Any]]) -> None:
    """Freeze every model parameter the optimizer groups do not list; the listed ones train."""
    listed = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in listed)


@register_pass
@dataclass(frozen=True)
class Train(Pass):
    """Train the gates of ``state.gate_family`` for ``steps`` optimizer steps (see module doc);
    :meth:`fit` runs the same loop for any :class:`Objective`."""

    name = "Train"
    requires = ("model", "tokenizer", "gates", "gate_family")
    provides = ("trained_gates",)

    steps: int = 200
    batch_size: int = 4
    block_len: int = 128
    grad_accum: int = 1
    warmup: int = 20
    kd_weight: float = 2.0
    seed: int = 0
    source: str = "wikipedia"
    checkpoint_every: int = 50
    resume: bool = True
    halt_after: int | None = None
    plots: bool = True
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = True
    polish_steps: int = 0

    def validate(self) -> None:
        for key, low in (("steps", 1), ("batch_size", 1), ("block_len", 2), ("grad_accum", 1),
                         ("warmup", 0), ("checkpoint_every", 1)):
            if getattr(self, key) < low:
                raise SpecError(f"pass Train: {key} must be >= {low}, got {getattr(self, key)}")
        if self.kd_weight < 0:
            raise SpecError(f"pass Train: kd_weight must be >= 0, got {self.kd_weight}")
        if not 0 <= self.polish_steps < self.steps:
            raise SpecError(f"pass Train: polish_steps must be >= 0 and below steps "
                            f"({self.steps}), got {self.polish_steps}")
        if self.halt_after is not None and self.halt_after < 1:
            raise SpecError(f"pass Train: halt_after must be >= 1 or null, got {self.halt_after}")

    def run(self, state: State) -> PassResult:
        device = next(state.model.parameters()).device
        family = state.gate_family.to(device).train()
        make = getattr(family, "objective", None)  # a family with its own objective (LEAP)
        objective = (make(state.gates, polish_steps=self.polish_steps, model=state.model)
                     if make is not None else
                     GateObjective(family, state.gates, polish_steps=self.polish_steps,
                                   model=state.model))
        stats = self.fit(state, objective)
        state.metrics.setdefault("train", {}).update(stats)
        return PassResult(state, modified=True, stats=stats)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, state: State, objective: Objective, subdir: str = "train") -> dict[str, Any]:
        """Train ``objective`` on ``state.model`` for ``steps`` steps, resuming from a matching
        checkpoint in ``<run>/<subdir>/`` (or ``checkpoint_dir``); returns the stats."""
        if self.kd_weight > 0 and objective.teacher is None:
            raise SpecError(f"pass Train: the {objective.name} objective has no teacher to "
                            f"distill from; set kd_weight=0 (got {self.kd_weight})")
        folder = Path(state.run_dir) / subdir if state.run_dir is not None else None
        ckpt = self._checkpoint_path(folder)
        if self.halt_after is not None and ckpt is None:
            raise SpecError("pass Train: halt_after needs a run folder or checkpoint_dir to "
                            "keep the checkpoint it resumes from")
        model = state.model
        blocks = self._blocks(state.tokenizer)
        order = _order(len(blocks), self.steps * self.batch_size * self.grad_accum, self.seed)
        optimizer, scheduler = self._optimizer(model, objective)
        torch.manual_seed(self.seed)
        config = {**objective.config(), **{k: getattr(self, k) for k in (
            "steps", "batch_size", "block_len", "grad_accum", "warmup", "kd_weight", "seed",
            "source", "polish_steps")}}
        start, history = 0, []
        if ckpt is not None and self.resume and ckpt.exists():
            start, history = self._load(ckpt, config, objective, optimizer, scheduler)
            state.log.info("Train: resuming %s at step %d from %s", objective.name, start, ckpt)
        model.eval()
        t0 = time.perf_counter()
        bar = progress_bar(state, range(start, self.steps), total=self.steps, initial=start,
                           desc=f"Train {objective.name}")
        try:
            for step in bar:
                history.append(self._step(model, objective, blocks, order, step,
                                          optimizer, scheduler))
                bar.set_postfix({k: f"{history[-1][k]:.3f}" for k in ("loss", *objective.shown)})
                done = step + 1
                stop = (self.halt_after is not None and done - start >= self.halt_after
                        and done < self.steps)
                final_step = done == self.steps
                if ckpt is not None and (stop or (done % self.checkpoint_every == 0
                                                  and not final_step)
                                         or (final_step and self.keep_checkpoint)):
                    self._save(ckpt, config, done, objective, optimizer, scheduler, history)
                if folder is not None and done % 10 == 0:
                    self._write_metrics(folder, history)  # live view for long runs
                if stop:
                    raise TrainingHalted(
                        f"Train stopped after step {done} of {self.steps} as asked (halt_after="
                        f"{self.halt_after}); run it again to resume from {ckpt}")
        finally:
            if hasattr(bar, "close"):
                bar.close()
            if folder is not None and history:
                self._write_metrics(folder, history)
        if ckpt is not None and not self.keep_checkpoint:
            ckpt.unlink(missing_ok=True)  # only an interrupted run needs it
        plots = folder if folder is not None and self.plots else None
        last = history[-1] if history else {}
        return {"steps": self.steps, "resumed_at": start,
                "tokens": self.steps * self.batch_size * self.grad_accum * self.block_len,
                "seconds": round(time.perf_counter() - t0, 1),
                "final_ce": last.get("ce"), "final_kl": last.get("kl"),
                **objective.finish(state, history, plots)}

    def _optimizer(self, model, objective: Objective):
        """AdamW over the objective's groups (only their model parameters left trainable) and
        the per-group warm-up + cosine/constant schedule."""
        groups = objective.param_groups()
        _train_only(model, groups)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        warmup = min(self.warmup, self.steps - self.polish_steps - 1)
        restart = self.steps - self.polish_steps if self.polish_steps else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [functools.partial(lr_factor, total=self.steps, warmup=warmup,
                                          schedule=g.get("schedule", "cosine"), restart=restart)
                        for g in optimizer.param_groups])
        return optimizer, scheduler

    def _step(self, model, objective: Objective, blocks, order, step: int, optimizer,
              scheduler) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its record."""
        device = next(model.parameters()).device
        optimizer.zero_grad(set_to_none=True)
        sums = {"ce": 0.0, "kl": 0.0, "loss": 0.0}
        for micro in range(self.grad_accum):
            lo = (step * self.grad_accum + micro) * self.batch_size
            ids = blocks[order[lo:lo + self.batch_size]].to(device)
            parts, stats = self._micro(model, objective, ids, step)
            for key, value in parts.items():
                sums[key] += value / self.grad_accum
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        return {"step": step + 1, **sums, **stats, **objective.post_step(step, self.steps),
                "lr": lr}

    def _micro(self, model, objective: Objective, ids: torch.Tensor, step: int
               ) -> tuple[dict[str, float], dict[str, float]]:
        """Forward(s) and backward of one micro-batch; its loss parts and penalty stats."""
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ids.device.type == "cuda"
                    else nullcontext())
        teacher = None
        if self.kd_weight > 0:
            with objective.teacher(), torch.no_grad(), autocast:
                teacher = model(ids).logits[:, :-1]
        objective.before_forward(step, self.steps)
        with autocast:
            logits = model(ids).logits[:, :-1]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                             ids[:, 1:].reshape(-1))
        kl = kd_loss(logits, teacher) if teacher is not None else None
        penalty, stats = objective.penalty(step, self.steps)
        loss = ce + penalty if kl is None else ce + self.kd_weight * kl + penalty
        (loss / self.grad_accum).backward()
        return ({"ce": float(ce.detach()), "kl": float(kl.detach()) if kl is not None else 0.0,
                 "loss": float(loss.detach())}, stats)

    # -- data and files ------------------------------------------------------------------------

    def _blocks(self, tokenizer) -> torch.Tensor:
        if tokenizer is None:
            raise SpecError("Train needs a tokenizer for its calibration text; load a model "
                            "that ships one")
        return calibration_stream(tokenizer, self.source, self.block_len)

    def _checkpoint_path(self, folder: Path | None) -> Path | None:
        """Where the checkpoint lives (folders created); None without a run folder."""
        ckpt_dir = Path(self.checkpoint_dir) if self.checkpoint_dir else folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if ckpt_dir is None:
            return None
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        return ckpt_dir / "checkpoint.pt"

    def _save(self, path, config, step, objective, optimizer, scheduler, history) -> None:
        _atomic_save({"config": config, "step": step, "objective": objective.state_dict(),
                      "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                      "cuda_rng": (torch.cuda.get_rng_state_all()
                                   if torch.cuda.is_available() else None),
                      "history": history}, path)

    def _load(self, path, config, objective, optimizer, scheduler):
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise PrunegraphError(f"training checkpoint {path} is corrupt or truncated ({e}); "
                                  f"delete it to start over, or pass resume=false") from e
        if data.get("config") != config or "objective" not in data:
            old = data.get("config") or {}
            diff = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
            why = f"other settings ({', '.join(diff)} differ)" if diff else "an older version"
            raise PrunegraphError(f"training checkpoint {path} was made with {why}; use another "
                                  f"run folder, delete the checkpoint, or pass resume=false")
        objective.load_state_dict(data["objective"])
        optimizer.load_state_dict(data["optimizer"])
        scheduler.load_state_dict(data["scheduler"])
        torch.set_rng_state(data["torch_rng"])
        if data.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(data["cuda_rng"])
        return int(data["step"]), list(data["history"])

    @staticmethod
    def _write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
        atomic_write_text(folder / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
