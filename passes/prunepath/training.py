"""The ``PrunePath`` and ``TauSweep`` passes: routers on the MoEfied MLPs, two-stage training,
and a τ sweep from one checkpoint (methods.md §3).

``PrunePath`` installs a router per MLP of ``moe_layout``
(:mod:`prunegraph.passes.prunepath.router`), gives it a starting point and a target
(:mod:`prunegraph.passes.prunepath.oracle`) and trains in two stages, as in the reference code
(§3.4):

1. the first ``warmup_steps`` at ``warmup_tau`` (> 1: every expert on, gates ``sigmoid(r_e)``),
   so the FFN weights absorb the initial 0.5 gate scale and the router starts to learn;
2. the rest of ``train.steps`` at ``train_tau`` (sparse routing); with ``train_tau_max`` each
   sparse step draws its τ uniformly from ``[train_tau, train_tau_max]`` instead (seeded by step
   and ``train.seed``, so resumable). That is not in the reference code: training at one τ fits
   the weights to that sparsity, and the checkpoint is meant to serve every τ set after loading.

The loss is next-token cross-entropy on the calibration split plus ``entropy`` × the mean
router entropy (sparsity pressure) plus ``load_balance`` × ``E Σ_e mean(p_e)²`` plus
``distill`` × ``KL(q || p)``, where ``q ∝ n_e^distill_power`` and ``n_e`` is the norm of expert
``e``'s part of the dense FFN output for that token (the *oracle experts*; on the router only).

The router is not learned from zero as in the reference code, where on SmolLM2 it stayed near
uniform (docs/benchmarks.md): ``router_init: fit`` (default) first sets each router to the ridge
regression of the oracle's logits ``distill_power · log n_e`` on the FFN input, over
``init_blocks`` calibration blocks run through the dense model; ``centroid`` sets row ``e`` to
the mean gate row of its channels (scaled to the same spread). ``router_init: zero`` with
``distill: 0`` is the reference behaviour, kept for comparison. Every training forward also
measures the routers against the oracle: per step, ``top1`` (the router's most probable expert
is the token's largest-norm expert) and ``coverage`` (the selected experts' norm mass over that
of the oracle's same number of experts), in ``metrics.jsonl`` and the stage summaries; before and
after training, ``router_probe`` evaluates entropy, top-1 agreement and coverage at ``tau`` on
``probe_blocks`` held-out blocks of 512 tokens. With ``train.steps = 0`` nothing is fit or
probed. Router and
model weights (all of them, the FFNs included) are trained with AdamW in two parameter groups:
``router_lr`` / ``router_decay`` (1e-3 / 1e-2) and ``lr`` / 0 (1e-4), the released values.
``train_scope: router`` freezes the model weights (only the routers learn).

Both stages are one run of the generic training loop (:func:`prunegraph.passes.train.loop.fit`)
with :class:`PrunePathObjective`, which switches τ at step ``warmup_steps``. The loop's settings
are nested under ``train`` (a :class:`~prunegraph.passes.train.config.TrainConfig`; a mapping
there is merged onto PrunePath's defaults: ``steps: 100``, no learning-rate ``warmup``, no
plots, ``keep_checkpoint: false``)::

    - PrunePath: {warmup_steps: 50, train_tau: 0.5, train: {steps: 100, batch_size: 4}}

So PrunePath gets that loop's seeded calibration stream, ``grad_accum``, learning-rate schedule
(``train.warmup`` linear steps, then ``train.lr_schedule``: a cosine to 0 over both stages, or
``constant``), bf16 autocast on CUDA, ``<run>/prunepath/metrics.jsonl`` and exact resume from
``<run>/prunepath/checkpoint.pt`` (``train.checkpoint_dir``, ``checkpoint_every``, ``resume``,
``halt_after`` as in Train). The checkpoint holds every trained tensor (routers and, with
``train_scope: all``, the model weights) and their AdamW moments: about three times the model's
size, so it is deleted once training completes unless ``train.keep_checkpoint: true``. There is
no distillation: the model being fine-tuned is no fixed teacher, and the reference code has
none. With ``train.steps = 0`` the pass only installs the routers.

The training settings were flat parameters before (``steps`` then counted the sparse stage
only, ``lr_warmup`` was ``train.warmup``); a spec (or an older run folder's ``spec.yaml``) that
still uses them runs the same, with a warning that gives the new spelling.

``state.metrics["prunepath"]["stages"]`` summarises each stage (first, last and mean
cross-entropy, last router entropy, mean fraction of FFN channels touched per token, mean top-1
agreement, coverage and distillation term); ``router_init``/``init_r2`` and ``router_probe``
(``init``, ``trained``) sit beside it.
After the pass, ``state.model`` is still the user's module, with its ``requires_grad`` flags:
``prunegraph.passes.prunepath.router.set_tau(model, 0.7)`` changes τ at any time, ``Save`` writes it and
``prunegraph.from_pretrained`` rebuilds it with its routers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from prunegraph.errors import SpecError
from prunegraph.passes.prunepath import router as pp
from prunegraph.passes.prunepath.oracle import distill_loss, init_routers, oracle_stats, probe
from prunegraph.passes.prunepath.router import active_fraction, reset_stats, set_tau
from prunegraph.passes.train.config import TrainConfig, check_settings
from prunegraph.passes.train.loop import fit
from prunegraph.passes.train.objective import load_trained, trained_state
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["PrunePath", "TauSweep", "PrunePathObjective", "TRAINING", "set_tau",
           "active_fraction", "sweep"]

_LOG = logging.getLogger(__name__)

STAGES = ("warmup", "sparse")

#: PrunePath's training defaults: 50 dense + 50 sparse steps, no learning-rate warm-up, no plots,
#: and the weight-sized checkpoint deleted once training completes.
TRAINING = TrainConfig(steps=100, warmup=0, keep_checkpoint=False, plots=False)

#: PrunePath's former flat training parameters -> their setting in ``train`` (specs only).
_MOVED = {"steps": "steps", "batch_size": "batch_size", "block_len": "block_len",
          "grad_accum": "grad_accum", "lr_warmup": "warmup", "lr_schedule": "lr_schedule",
          "source": "source", "seed": "seed", "checkpoint_every": "checkpoint_every",
          "resume": "resume", "halt_after": "halt_after", "checkpoint_dir": "checkpoint_dir",
          "keep_checkpoint": "keep_checkpoint"}


class PrunePathObjective:
    """PrunePath as a training objective (:class:`prunegraph.passes.train.objective.Objective`):
    routers and model weights in two AdamW groups, the routing regularisers of each forward as
    the penalty, and τ set by stage before every forward. ``spec`` is the :class:`PrunePath`
    pass whose settings it trains with."""

    name = "prunepath"
    teacher = None
    kd_weight = 0.0
    shown = ("tau", "active_fraction", "top1")

    #: Every trained tensor is the model's (no module of its own to checkpoint).
    module = None

    def __init__(self, model: nn.Module, spec: PrunePath) -> None:
        self.model, self.spec = model, spec
        self._names = pp.router_param_names(model)
        self.routers = pp.routers(model)  # modules stay (sharding replaces only parameters)
        for r in self.routers:  # oracle terms every training forward (distillation, stats)
            r.observing, r.distill_power = True, spec.distill_power
        reset_stats(model)

    # The trained tensors are looked up when asked, not kept: the loop may shard the model
    # (FSDP replaces its parameters) and gives the plain ones back after training.

    @property
    def router_weights(self) -> list[nn.Parameter]:
        return [r.weight for r in self.routers]

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters()
                if self.spec.train_scope == "all" or n in self._names}

    @property
    def base(self) -> list[nn.Parameter]:
        router_ids = {id(w) for w in self.router_weights}
        return [p for p in self.params.values() if id(p) not in router_ids]

    def stage(self, step: int) -> tuple[str, float]:
        """The stage of ``step`` and its τ."""
        s = self.spec
        if step < s.warmup_steps:
            return STAGES[0], s.warmup_tau
        if s.train_tau_max is None:
            return STAGES[1], s.train_tau
        u = random.Random(s.train.seed * 1_000_003 + step).random()
        return STAGES[1], s.train_tau + (s.train_tau_max - s.train_tau) * u

    def config(self) -> dict[str, Any]:
        keys = ("mode", "warmup_steps", "warmup_tau", "train_tau", "train_tau_max", "lr",
                "router_lr", "router_decay", "entropy", "load_balance", "train_scope",
                "router_init", "init_blocks", "distill", "distill_power")
        return {"objective": self.name, "routers": sorted(pp.router_param_names(self.model)),
                **{k: getattr(self.spec, k) for k in keys}}

    def param_groups(self) -> list[dict[str, Any]]:
        """Routers and model weights; both follow ``train.lr_schedule``."""
        s = self.spec
        groups = [{"params": self.router_weights, "lr": s.router_lr,
                   "weight_decay": s.router_decay, "name": "router"}]
        if self.base:
            groups.append({"params": self.base, "lr": s.lr, "weight_decay": 0.0,
                           "name": "model"})
        return groups

    def schedule_restart(self, total: int) -> None:
        return None  # one schedule over both stages

    def before_forward(self, step: int, total: int) -> None:
        set_tau(self.model, self.stage(step)[1])

    def penalty(self, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        h, b = pp.regularisers(self.model)
        d = distill_loss(self.routers)
        return (self.spec.entropy * h + self.spec.load_balance * b + self.spec.distill * d,
                {"entropy": float(h.detach()), "balance": float(b.detach()),
                 "distill": float(d.detach())})

    def post_step(self, step: int, total: int) -> dict[str, Any]:
        """The step's stage, τ, fraction of FFN channels touched and agreement with the oracle
        experts (top-1, coverage; statistics restart)."""
        label, tau = self.stage(step)
        frac = active_fraction(self.model)
        oracle = oracle_stats(self.routers)
        reset_stats(self.model)
        return {"stage": label, "tau": tau, "active_fraction": frac, **oracle}

    def state_dict(self) -> dict[str, Any]:
        return trained_state(self.params)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_trained(self.params, state)

    def finish(self, state: State, history: list[dict[str, Any]],
               plots: Path | None) -> dict[str, Any]:
        """Per-stage summaries (``stages``) from the step records."""
        for r in self.routers:
            r.observing, r.distill = False, None
        stages = [_summary(label, rows) for label in STAGES
                  if (rows := [h for h in history if h["stage"] == label])]
        for s in stages:
            state.log.info("PrunePath %s: %s", s["stage"], s)
        return {"stages": stages}


def _nest_flat_training(params: dict[str, Any], where: str) -> dict[str, Any]:
    """PrunePath's parameters with the former flat training settings moved into ``train``
    (the former ``steps`` counted the sparse stage; ``train.steps`` counts both)."""
    prefix = f"{where}: " if where else ""
    train = params.get("train") or {}
    if not isinstance(train, dict):
        raise SpecError(f"{prefix}PrunePath.train must be a mapping of training settings, got "
                        f"{type(train).__name__} {train!r}")
    train = dict(train)
    moved = [k for k in params if k in _MOVED]
    for key in moved:
        value = params[key]
        if key == "steps" and isinstance(value, int) and not isinstance(value, bool):
            warmup = params.get("warmup_steps", PrunePath.warmup_steps)
            value = value + warmup if isinstance(warmup, int) else value
        target = _MOVED[key]
        if target in train and train[target] != value:
            raise SpecError(f"{prefix}PrunePath gives train.{target} twice: {train[target]!r} "
                            f"under train and {params[key]!r} as the former flat {key!r}; "
                            f"keep only train.{target}")
        train[target] = value
    out = {k: v for k, v in params.items() if k not in _MOVED}
    out["train"] = train
    _LOG.warning("%sPrunePath's training settings %s now sit under `train`: reading them as "
                 "train: {%s} (train.steps counts both stages, warmup_steps plus the former "
                 "steps); write them there", prefix, ", ".join(moved),
                 ", ".join(f"{k}: {v}" for k, v in train.items()))
    return out


def _summary(label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    ce = [r["ce"] for r in rows]
    taus = [r["tau"] for r in rows]
    tau = taus[0] if min(taus) == max(taus) else [round(min(taus), 4), round(max(taus), 4)]
    return {"stage": label, "steps": len(rows), "tau": tau,
            "loss_first": round(ce[0], 4), "loss_last": round(ce[-1], 4),
            "loss_mean": round(sum(ce) / len(ce), 4),
            "entropy_last": round(rows[-1]["entropy"], 4),
            "active_fraction": round(sum(r["active_fraction"] for r in rows) / len(rows), 4),
            **{f"{k}_mean": round(sum(r[k] for r in rows) / len(rows), 4)
               for k in ("top1", "coverage", "distill") if k in rows[0]}}


@register_pass
@dataclass(frozen=True)
class PrunePath(Pass):
    """Install PrunePath routers on the MoEfied MLPs, start them at ``router_init`` and train
    them (dense warm-up for the first ``warmup_steps``, then sparse at ``train_tau``; distilled
    toward the oracle experts with weight ``distill``) with the training loop under ``train``;
    ``tau`` is the τ left set afterwards."""

    name = "PrunePath"
    requires = ("model", "moe_layout")
    provides = ("router",)
    collective = True  # under torchrun every rank trains its share (sharded with FSDP)

    tau: float = 0.7
    mode: Literal["exclusive", "inclusive"] = "exclusive"
    warmup_steps: int = 50
    warmup_tau: float = 1.05
    train_tau: float = 0.5
    train_tau_max: float | None = None
    lr: float = 1e-4
    router_lr: float = 1e-3
    router_decay: float = 1e-2
    entropy: float = 3e-4
    load_balance: float = 1e-3
    train_scope: Literal["all", "router"] = "all"
    router_init: Literal["zero", "centroid", "fit"] = "fit"
    init_blocks: int = 16
    distill: float = 1.0
    distill_power: float = 1.0
    probe_blocks: int = 2
    train: TrainConfig = TRAINING

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", TrainConfig.nested(self.train, TRAINING,
                                                             "PrunePath.train"))
        super().__post_init__()

    @classmethod
    def from_params(cls, params, *, where: str = "") -> Pass:
        """As for any pass; the former flat training parameters are read into ``train`` (with a
        warning giving the new spelling), so older specs and run folders still run."""
        if isinstance(params, dict) and any(k in _MOVED for k in params):
            params = _nest_flat_training(params, where)
        return super().from_params(params, where=where)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "train": self.train.to_dict()}

    @classmethod
    def parameter_help(cls, full: bool) -> list[str]:
        """The nested training settings with PrunePath's defaults (``prunegraph passes``)."""
        if not full:
            return ["train holds the training loop's settings; `prunegraph passes PrunePath` "
                    "lists them"]
        return TrainConfig.describe("train.", TRAINING)

    def validate(self) -> None:
        for key in ("tau", "warmup_tau", "train_tau"):
            try:
                pp.check_tau(getattr(self, key))
            except SpecError as e:
                raise SpecError(f"PrunePath.{key}: {e}") from None
        if self.train_tau_max is not None and not self.train_tau <= self.train_tau_max <= 1.0:
            raise SpecError(f"PrunePath.train_tau_max must lie in [train_tau, 1] (a range of "
                            f"sparse-stage τ), got {self.train_tau_max} with train_tau "
                            f"{self.train_tau}")
        check_settings(self.train, "PrunePath.train.", min_steps=0)
        if not 0 <= self.warmup_steps <= self.train.steps:
            raise SpecError(f"PrunePath.warmup_steps must lie in [0, train.steps] (the dense "
                            f"stage is the start of the run), got {self.warmup_steps} with "
                            f"train.steps {self.train.steps}")
        for key in ("lr", "router_lr", "router_decay", "entropy", "load_balance", "distill",
                    "init_blocks", "probe_blocks"):
            if getattr(self, key) < 0:
                raise SpecError(f"PrunePath.{key} must be >= 0, got {getattr(self, key)}")
        if self.router_init != "zero" and self.init_blocks < 1:
            raise SpecError(f"PrunePath.router_init {self.router_init!r} reads calibration "
                            f"tokens: init_blocks must be >= 1, got {self.init_blocks}")
        if not self.distill_power > 0:
            raise SpecError(f"PrunePath.distill_power must be > 0 (the target is proportional "
                            f"to the experts' output norms to this power), got "
                            f"{self.distill_power}")

    def run(self, state: State) -> PassResult:
        model = state.model
        total_steps = self.train.steps
        if total_steps and state.get("tokenizer") is None:
            raise SpecError("PrunePath training needs a tokenizer for its text; load a model "
                            "with one, or set train.steps=0")
        pp.install(model, state.moe_layout, tau=self.warmup_tau, mode=self.mode)
        start = time.perf_counter()
        init, probes = {}, {}
        if total_steps:
            init = self._init(state)
            probes["init"] = self._probe(state)
        trained = self._train(state) if total_steps else {}
        if total_steps:
            probes["trained"] = self._probe(state)
        set_tau(model, self.tau)
        reset_stats(model)
        model.eval()
        state.router = pp.spec(model)
        record = {"experts": pp.routers(model)[0].experts, "mode": self.mode, "tau": self.tau,
                  "train_tokens": trained.get("tokens", 0),
                  "resumed_at": trained.get("resumed_at", 0), **init,
                  "router_probe": {k: v for k, v in probes.items() if v},
                  "stages": trained.get("stages", []),
                  "seconds": round(time.perf_counter() - start, 1)}
        state.metrics["prunepath"] = record
        return PassResult(state, modified=True,
                          stats={k: v for k, v in record.items() if k != "stages"})

    def _init(self, state: State) -> dict[str, Any]:
        """The routers' starting weights (``router_init``), from ``init_blocks`` calibration
        blocks of the training source (a seeded draw) run through the dense FFNs."""
        from prunegraph.data.blocks import text_blocks

        model = state.model
        blocks = None
        if self.router_init != "zero":
            blocks = text_blocks(state.tokenizer, self.train.source, "calibration",
                                 self.train.block_len, self.init_blocks, seed=self.train.seed)
        gates = [pp.gate_weight(model, e) for e in state.moe_layout] if (
            self.router_init == "centroid") else [None] * len(state.moe_layout)
        summary = init_routers(model, pp.routers(model), gates, self.router_init, blocks,
                               self.train.batch_size, self.distill_power)
        state.log.info("PrunePath: routers initialised: %s", summary)
        return summary

    def _probe(self, state: State) -> dict[str, float]:
        """Router quality on ``probe_blocks`` held-out blocks at ``tau`` (entropy, top-1
        agreement and coverage of the oracle experts); empty when ``probe_blocks`` is 0."""
        if not self.probe_blocks:
            return {}
        from prunegraph.data.blocks import text_blocks

        blocks = text_blocks(state.tokenizer, self.train.source, "evaluation", 512,
                             self.probe_blocks)
        before = pp.get_tau(state.model)
        set_tau(state.model, self.tau)
        try:
            out = probe(state.model, pp.routers(state.model), blocks, self.train.batch_size)
        finally:
            set_tau(state.model, before)
        state.log.info("PrunePath router probe at tau %s: %s", self.tau, out)
        return {"tau": self.tau, **out}

    def _train(self, state: State) -> dict[str, Any]:
        """Both stages as one run of the loop; the model's ``requires_grad`` flags are given
        back (the loop freezes what it does not train)."""
        flags = [(p, p.requires_grad) for p in state.model.parameters()]
        try:
            return fit(state, PrunePathObjective(state.model, self), self.train,
                       subdir="prunepath")
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def sweep(model: nn.Module, blocks: torch.Tensor, taus: list[float], batch_size: int = 4,
          progress: bool = False, ood: dict[str, torch.Tensor] | None = None
          ) -> list[dict[str, float]]:
    """Held-out perplexity and active FFN fraction at each τ (and ``ppl_<name>`` on each
    out-of-domain set of blocks in ``ood``); τ is restored afterwards."""
    from prunegraph.passes.evaluation.metrics import perplexity

    before = pp.get_tau(model)
    rows = []
    try:
        for tau in taus:
            set_tau(model, tau)
            reset_stats(model)
            ppl = perplexity(model, blocks, batch_size, progress)
            rows.append({"tau": float(tau), "ppl": round(ppl, 4),
                         "active_fraction": round(active_fraction(model), 4)})
            for name, other in (ood or {}).items():
                rows[-1][f"ppl_{name}"] = round(perplexity(model, other, batch_size, progress),
                                                4)
    finally:
        set_tau(model, before)
        reset_stats(model)
    return rows


@register_pass
@dataclass(frozen=True)
class TauSweep(Pass):
    """Evaluate one PrunePath checkpoint at several τ: ``metrics["sweep"]`` gets
    ``{"tau", "ppl", "active_fraction"}`` per τ (held-out split, ``ppl_blocks`` × ``seq_len``),
    and ``ppl_<source>`` for each of ``ood_sources`` (out-of-domain text such as ``austen``)."""

    name = "TauSweep"
    requires = ("model", "tokenizer", "router")  # from PrunePath, or Load of a PrunePath folder
    provides = ()

    taus: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    ppl_blocks: int = 16
    seq_len: int = 512
    source: str = "wikipedia"
    ood_sources: tuple[str, ...] = ()
    batch_size: int = 4

    def validate(self) -> None:
        from prunegraph.data.text import source_key

        keys = [source_key(s) for s in (self.source, *self.ood_sources)]
        if len(set(keys)) != len(keys):
            raise SpecError(f"TauSweep: the text sources {[self.source, *self.ood_sources]} "
                            f"repeat one; name each source once")
        if not self.taus:
            raise SpecError("TauSweep.taus is empty; give at least one τ, e.g. [0.5, 0.7, 0.9]")
        for t in self.taus:
            pp.check_tau(t)
        for key, low in (("ppl_blocks", 1), ("seq_len", 2), ("batch_size", 1)):
            if getattr(self, key) < low:
                raise SpecError(f"TauSweep.{key} must be >= {low}, got {getattr(self, key)}")

    def run(self, state: State) -> PassResult:
        from prunegraph.data.blocks import text_blocks
        from prunegraph.data.text import source_key

        blocks = text_blocks(state.tokenizer, self.source, "evaluation", self.seq_len,
                             self.ppl_blocks)
        ood = {source_key(s): text_blocks(state.tokenizer, s, "evaluation", self.seq_len,
                                          self.ppl_blocks) for s in self.ood_sources}
        rows = sweep(state.model, blocks, list(self.taus), self.batch_size, bool(state.progress),
                     ood)
        state.metrics["sweep"] = rows
        for r in rows:
            state.log.info("TauSweep: tau=%.2f ppl=%.3f active=%.3f", r["tau"], r["ppl"],
                           r["active_fraction"])
        falling = all(a["ppl"] >= b["ppl"] for a, b in zip(rows, rows[1:]))
        return PassResult(state, modified=False,
                          stats={"points": len(rows), "ppl_falls_with_tau": falling,
                                 "ppl_min": min(r["ppl"] for r in rows) if rows else math.nan})
