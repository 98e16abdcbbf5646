"""The ``Train`` pass: mask-only training of any gate family, with exact resume.

Weights are frozen (``requires_grad=False``; the optimizer holds only the family's gates and
dual variables). Each step draws ``batch_size * grad_accum`` blocks of ``block_len`` tokens from
the *calibration* split of ``source`` (a seeded permutation, so step ``t`` always sees the same
blocks) and minimises::

    CE(student) + kd_weight * KL(teacher || student) + family.penalty(step)

The teacher is the same model with every gate at 1 (one extra forward under ``no_grad``, no extra
weights). The learning rate warms up linearly for ``warmup`` steps, then follows a cosine to 0
(or stays, for an optimizer group the family marks ``schedule: constant``: the DDP
multipliers). On CUDA the forwards run under bf16 autocast.

With a run folder, ``<run>/train/`` holds ``metrics.jsonl`` (one line per step: loss, CE, KL,
penalty, expected and achieved sparsity, multipliers, lr), ``checkpoint.pt`` (gates, duals,
optimizer, scheduler, RNG states, step; written every ``checkpoint_every`` steps to a temporary
name and renamed) and the plots (:mod:`prunegraph.passes._train_plots`). A re-run with
``resume=True`` continues from the checkpoint and gives the same result as an uninterrupted run.
``prunegraph run`` replaces its run folder when it starts, so to resume a pipeline re-run put the
checkpoint outside it with ``checkpoint_dir`` (a path; relative paths are taken from the current
directory).
``halt_after=N`` stops after ``N`` steps of this run with a checkpoint (raises
:class:`TrainingHalted`), to split a long run into jobs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.pass_infra import Pass, PassResult, State, progress_bar, register_pass

__all__ = ["Train", "TrainingHalted", "lr_factor", "kd_loss"]


class TrainingHalted(PrunegraphError):
    """Training stopped early on request (``halt_after``); the checkpoint lets it resume."""


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total`` (or 1 for
    ``schedule='constant'``)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


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
    from prunegraph.text import load_documents, split_documents, token_blocks

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


@register_pass
@dataclass(frozen=True)
class Train(Pass):
    """Train the gates of ``state.gate_family`` for ``steps`` optimizer steps (see module doc)."""

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

    def validate(self) -> None:
        for key, low in (("steps", 1), ("batch_size", 1), ("block_len", 2), ("grad_accum", 1),
                         ("warmup", 0), ("checkpoint_every", 1)):
            if getattr(self, key) < low:
                raise SpecError(f"pass Train: {key} must be >= {low}, got {getattr(self, key)}")
        if self.kd_weight < 0:
            raise SpecError(f"pass Train: kd_weight must be >= 0, got {self.kd_weight}")
        if self.halt_after is not None and self.halt_after < 1:
            raise SpecError(f"pass Train: halt_after must be >= 1 or null, got {self.halt_after}")

    # -- data --------------------------------------------------------------------------------

    def _blocks(self, tokenizer) -> torch.Tensor:
        if tokenizer is None:
            raise SpecError("Train needs a tokenizer for its calibration text; load a model "
                            "that ships one")
        return calibration_stream(tokenizer, self.source, self.block_len)

    def _config(self, family) -> dict[str, Any]:
        return {"family": family.name, "sparsity": family.sparsity, "budget": family.budget,
                "scope": family.scope, "groups": [g.name for g in family.groups],
                **{k: getattr(self, k) for k in ("steps", "batch_size", "block_len",
                                                  "grad_accum", "warmup", "kd_weight", "seed",
                                                  "source")}}

    # -- run ---------------------------------------------------------------------------------

    def run(self, state: State) -> PassResult:
        model, family, gates = state.model, state.gate_family, state.gates
        device = next(model.parameters()).device
        for p in model.parameters():
            p.requires_grad_(False)
        family.to(device)
        blocks = self._blocks(state.tokenizer)
        per_step = self.batch_size * self.grad_accum
        order = _order(len(blocks), self.steps * per_step, self.seed)

        optimizer = torch.optim.AdamW(family.param_groups(), betas=(0.9, 0.999), eps=1e-8)
        warmup = min(self.warmup, self.steps - 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [functools.partial(lr_factor, total=self.steps, warmup=warmup,
                                          schedule=g.get("schedule", "cosine"))
                        for g in optimizer.param_groups])
        torch.manual_seed(self.seed)

        folder = Path(state.run_dir) / "train" if state.run_dir is not None else None
        ckpt_dir = Path(self.checkpoint_dir) if self.checkpoint_dir else folder
        ckpt = ckpt_dir / "checkpoint.pt" if ckpt_dir is not None else None
        config = self._config(family)
        history: list[dict[str, Any]] = []
        start = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if self.resume and ckpt.exists():
                start, history = self._load(ckpt, config, family, optimizer, scheduler)
                state.log.info("Train: resuming at step %d from %s", start, ckpt)
        ones = {n: torch.ones_like(v) for n, v in family.final_values().items()}
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else nullcontext())
        model.eval()
        family.train()
        target = family.target_sparsity()
        reached = next((h["step"] for h in history if h["achieved_sparsity"] >= target - 5e-3),
                       None)
        t0 = time.perf_counter()
        bar = progress_bar(state, range(start, self.steps), total=self.steps, initial=start,
                           desc=f"Train {family.name}")
        halted = False
        try:
            for step in bar:
                optimizer.zero_grad(set_to_none=True)
                ce_sum = kl_sum = 0.0
                for micro in range(self.grad_accum):
                    lo = (step * self.grad_accum + micro) * self.batch_size
                    ids = blocks[order[lo:lo + self.batch_size]].to(device)
                    teacher = None
                    if self.kd_weight > 0:
                        gates.values.update(ones)
                        with torch.no_grad(), autocast:
                            teacher = model(ids).logits[:, :-1]
                    gates.values.update(family.forward_values(step, self.steps))
                    with autocast:
                        logits = model(ids).logits[:, :-1]
                    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                         ids[:, 1:].reshape(-1))
                    loss = ce
                    if teacher is not None:
                        kl = kd_loss(logits, teacher)
                        loss = loss + self.kd_weight * kl
                        kl_sum += float(kl.detach())
                    (loss / self.grad_accum).backward()
                    ce_sum += float(ce.detach())
                penalty, pstats = family.penalty(step, self.steps)
                penalty.backward()
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                optimizer.step()
                scheduler.step()
                family.post_step()
                record = {"step": step + 1, "ce": ce_sum / self.grad_accum,
                          "kl": kl_sum / self.grad_accum,
                          "loss": (ce_sum + self.kd_weight * kl_sum) / self.grad_accum
                          + pstats["penalty"],
                          "achieved_sparsity": family.achieved_sparsity(),
                          **pstats, **family.schedule(step, self.steps),
                          "lr": lrs.get("gates", 0.0)}
                history.append(record)
                if reached is None and record["achieved_sparsity"] >= target - 5e-3:
                    reached = step + 1
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                sparsity=f"{record['achieved_sparsity']:.3f}",
                                lam=f"{next(v for k, v in pstats.items() if k.startswith('l1_')):.2f}")
                done = step + 1
                stop = self.halt_after is not None and done - start >= self.halt_after \
                    and done < self.steps
                if ckpt is not None and (done % self.checkpoint_every == 0 or stop
                                         or done == self.steps):
                    self._save(ckpt, config, done, family, optimizer, scheduler, history)
                if folder is not None and done % 10 == 0:
                    self._write_metrics(folder, history)  # live view for long runs
                if stop:
                    halted = True
                    break
        finally:
            if hasattr(bar, "close"):
                bar.close()
            if folder is not None and history:
                self._write_metrics(folder, history)
        if halted:
            raise TrainingHalted(f"Train stopped after step {history[-1]['step']} of "
                                 f"{self.steps} as asked (halt_after={self.halt_after}); run the "
                                 f"pipeline again with the same run folder to resume")
        family.eval()
        final = family.final_values()
        gates.values.update({n: v.detach() for n, v in final.items()})
        state.trained_gates = final
        seconds = time.perf_counter() - t0
        last = history[-1] if history else {}
        stats = {"family": family.name, "steps": self.steps, "resumed_at": start,
                 "tokens": self.steps * per_step * self.block_len,
                 "seconds": round(seconds, 1), "target_sparsity": round(target, 6),
                 "achieved_sparsity": round(family.achieved_sparsity(), 6),
                 "expected_sparsity": round(last.get("expected_sparsity", float("nan")), 6),
                 "steps_to_target": reached,
                 "final_ce": last.get("ce"), "final_kl": last.get("kl")}
        state.metrics.setdefault("train", {}).update(stats)
        if folder is not None and self.plots:
            from prunegraph.passes._train_plots import write_plots

            write_plots(folder, history, family, final)
        state.log.info("Train: %s %d steps, achieved sparsity %.3f (target %.3f), %s", family.name,
                       self.steps, stats["achieved_sparsity"], target,
                       f"target reached at step {reached}" if reached else "target not reached")
        return PassResult(state, modified=True, stats=stats)

    # -- checkpoints ---------------------------------------------------------------------------

    def _save(self, path, config, step, family, optimizer, scheduler, history) -> None:
        _atomic_save({"config": config, "step": step, "family": family.state_dict(),
                      "family_extra": family.extra_state(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                      "cuda_rng": (torch.cuda.get_rng_state_all()
                                   if torch.cuda.is_available() else None),
                      "history": history}, path)

    def _load(self, path, config, family, optimizer, scheduler):
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise PrunegraphError(f"training checkpoint {path} is corrupt or truncated ({e}); "
                                  f"delete it to start over, or pass resume=false") from e
        if data.get("config") != config:
            old = data.get("config") or {}
            diff = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
            raise PrunegraphError(f"training checkpoint {path} was made with other settings "
                                  f"({', '.join(diff)} differ); use another run folder, delete "
                                  f"the checkpoint, or pass resume=false")
        family.load_state_dict(data["family"])
        family.load_extra_state(data["family_extra"])
        optimizer.load_state_dict(data["optimizer"])
        scheduler.load_state_dict(data["scheduler"])
        torch.set_rng_state(data["torch_rng"])
        if data.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(data["cuda_rng"])
        return int(data["step"]), list(data["history"])

    @staticmethod
    def _write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
        path = folder / "metrics.jsonl"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        os.replace(tmp, path)
