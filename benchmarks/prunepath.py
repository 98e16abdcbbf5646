"""PrunePath τ sweep on SmolLM2-135M next to static MLP-channel pruning (one-shot and DDP).

PrunePath side: held-out perplexity and the average fraction of FFN channels touched per token at
each τ, from one trained checkpoint (the passes of ``examples/prunepath-smollm2.yaml``): read from
a finished run folder with ``--from-run``, or trained here with ``--train`` (the example's passes
in-process, with the groups of ``--groups FILE`` instead of ``Analyze`` where ``torch.export``
fails, e.g. on an older torch; ``--save DIR`` keeps the trained model for
``prunegraph.from_pretrained``).

Static side, at the FFN fraction of each τ point, only the MLP ``channels`` groups pruned and the
same number of channels kept in every layer:

* ``wanda``: one-shot Wanda scores (activation × weight), no training;
* ``ddp``: DDP gates on the channels (``Gate(budget="units", scope="group")``, so the per-layer
  quota matches the one-shot rows), trained mask-only with ``Train`` for ``--ddp-steps`` steps of
  the PrunePath batch shape, ``Finalize(mode="topk")``, ``Slice``. On CUDA the points train in
  ``--ddp-workers`` processes at once (one step is launch-bound, so they share the GPU well).

Every model is evaluated on the same held-out blocks in float32 (the ``Train`` forwards run under
bf16 autocast on CUDA). The JSON is rewritten after every point. A GPU run::

    python benchmarks/prunepath.py --train --groups benchmarks/results/smollm2-groups.json \\
        --warmup-steps 300 --steps 300 --batch-size 8 --block-len 256 --ddp-steps 300 \\
        --ppl-blocks 32 --save runs/prunepath-gpu/model --out benchmarks/results/prunepath.json \\
        --plot docs/img/prunepath.png --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from _docs import replace_section

from prunegraph.pipeline.runfolder import atomic_write_text

MODEL = "smollm2-135m"
TAUS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
STATIC = ("wanda", "ddp")
OOD = ("austen",)  # out-of-domain text, evaluated next to the held-out Wikipedia blocks
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "prunepath-smollm2.yaml"
SECTION = "## PrunePath: τ sweep from one checkpoint vs static MLP-channel pruning (SmolLM2-135M)"
START = time.perf_counter()


def say(text: str) -> None:
    """A progress line, stamped like the pipeline's log lines (worker processes print too)."""
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


@functools.lru_cache(maxsize=1)
def load(name: str):
    """The dense model and tokenizer, on the CPU, loaded once per process (never mutated)."""
    from prunegraph.data.models import load_model

    return load_model(name)


def held_out(tokenizer, seq_len: int, n_blocks: int, source: str = "wikipedia") -> torch.Tensor:
    from prunegraph.data.blocks import text_blocks

    return text_blocks(tokenizer, source, "evaluation", seq_len, n_blocks)


def ood_ppl(model, tokenizer, seq_len: int, n_blocks: int) -> dict:
    """``{"ppl_austen": ...}``: perplexity on the out-of-domain held-out text."""
    from prunegraph.passes.evaluation.metrics import perplexity

    return {f"ppl_{s}": round(perplexity(model, held_out(tokenizer, seq_len, n_blocks, s), 4,
                                         progress=False), 4) for s in OOD}


def load_groups(path: Path | None, model) -> list:
    """Groups from a JSON list of ``Group.to_dict()``, or from the analysis of ``model``."""
    from prunegraph.ir.groups import Group

    if path is None:
        from prunegraph.ir.analysis import analyze

        return analyze(model).groups
    return [Group.from_dict(d) for d in json.loads(path.read_text())]


# ------------------------------------------------------------------------------ PrunePath side


def load_spec(path: Path, sets: list[str] | tuple = ()):
    """A spec with every pass it names registered (by importing the passes and targets
    packages, which works without the installed entry points too; ``Save`` is a target's)."""
    import prunegraph.passes  # noqa: F401  (registers the passes)
    import prunegraph.targets  # noqa: F401  (registers the target passes: Save)
    from prunegraph.pipeline.spec import load_spec as load

    return load(path, sets)


def example_passes(args) -> tuple[list, int]:
    """The example's passes with this run's overrides, minus ``Load`` and ``Analyze`` (the model
    and groups come from here) and ``Save`` unless ``--save`` is given; and the spec's seed."""
    example = next(p for p in load_spec(EXAMPLE).pipeline.passes if p.pass_name() == "PrunePath")
    warmup = args.warmup_steps if args.warmup_steps is not None else example.warmup_steps
    sparse = args.steps if args.steps is not None else example.train.steps - example.warmup_steps
    train = {**example.train.to_dict(), "steps": warmup + sparse}  # both stages
    train.update({k: getattr(args, k) for k in ("batch_size", "block_len")
                  if getattr(args, k) is not None})
    sets = [f"PrunePath.warmup_steps={warmup}", f"PrunePath.train={json.dumps(train)}"]
    sets += [f"{p}.{k}={v}" for p in ("Evaluate", "TauSweep")
             for k, v in (("ppl_blocks", args.ppl_blocks), ("seq_len", args.seq_len))]
    sets.append(f"TauSweep.taus={args.taus}")
    sets.append("Evaluate.gen_prompts=0")  # perplexity only: generation checks are not compared
    sets.append(f"TauSweep.ood_sources={json.dumps(list(OOD))}")
    sets += [f"PrunePath.{kv}" for kv in args.pp_set]
    if args.save is not None:
        sets.append(f"Save.path={args.save.resolve()}")
    spec = load_spec(EXAMPLE, sets)
    drop = {"Load", "Analyze"} | (set() if args.save is not None else {"Save"})
    return [p for p in spec.pipeline.passes if p.pass_name() not in drop], spec.seed


def train_prunepath(args, groups, device: torch.device) -> dict:
    """Run the example's passes in-process on a copy of the dense model."""
    from prunegraph.pipeline.contract import State
    from prunegraph.pipeline.pipeline import Pipeline

    passes, seed = example_passes(args)
    base, tok = load(MODEL)
    state = State(model=copy.deepcopy(base).to(device), tokenizer=tok, groups=groups)
    say("PrunePath: " + " -> ".join(p.pass_name() for p in passes))
    state = Pipeline(passes, initial=("model", "tokenizer", "groups")).run(
        state, progress=False, seed=seed)
    params = next(p for p in passes if p.pass_name() == "PrunePath").params()
    return points(state.metrics, params, run=None, saved=state.get("saved_model"))


def from_run(run: Path) -> dict:
    """The metrics of a finished run folder of the example."""
    metrics = json.loads((run / "metrics.json").read_text())
    passes = load_spec(run / "spec.yaml").pipeline.passes
    params = next(p for p in passes if p.pass_name() == "PrunePath").params()
    return points(metrics, params, run=str(run), saved=metrics.get("model_dir"))


def flat_params(params: dict) -> dict:
    """PrunePath's parameters with its training settings flat and ``steps`` the sparse stage
    (as results written before the settings moved under ``train`` hold them)."""
    if "train" not in params:
        return params
    train = params["train"]
    return {**params, **train, "steps": train["steps"] - params["warmup_steps"]}


def points(metrics: dict, params: dict, run: str | None, saved: str | None) -> dict:
    training = metrics["prunepath"]
    return {"run": run, "saved_model": saved, "dense": metrics.get("dense", {}),
            "moefy": metrics.get("moefy", {}), "sweep": metrics["sweep"], "params": params,
            "train_tokens": training["train_tokens"], "training": training}


# ------------------------------------------------------------------------------- static side


def wanda_points(model, tokenizer, groups, fractions, blocks, calib_blocks: int, write
                 ) -> list[dict]:
    """One-shot Wanda pruning of the MLP channels only, uniform per layer, at each fraction
    (gates at 0/1 on ``model``, removed after each point)."""
    from prunegraph.data.blocks import text_blocks
    from prunegraph.passes.evaluation.metrics import perplexity
    from prunegraph.passes.importance import score_groups
    from prunegraph.plan.gating import apply_gates

    channels = [g for g in groups if g.kind == "channels"]
    calib = text_blocks(tokenizer, "wikipedia", "calibration", 128, calib_blocks)
    scores = score_groups(model, channels, "wanda", blocks=calib, progress=False)
    device = next(model.parameters()).device
    rows = []
    for f in fractions:
        keep = {g.name: top_mask(scores[g.name], max(1, round(f * g.size))).to(device)
                for g in channels}
        gates = apply_gates(model, channels, keep)
        try:
            ppl = perplexity(model, blocks, 4, progress=False)
            ood = ood_ppl(model, tokenizer, blocks.shape[1], len(blocks))
        finally:
            gates.remove()
        kept = sum(int(v.sum()) for v in keep.values())
        rows.append({"fraction": f, "ffn_fraction": round(kept / sum(g.size for g in channels), 4),
                     "ppl": round(ppl, 4), **ood})
        say(f"static wanda f={f:.3f}: ppl {ppl:.3f}")
        write(rows)
    return rows


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 gate values keeping the ``k`` best-scored units."""
    keep = torch.zeros(scores.numel())
    keep[torch.topk(scores, k).indices] = 1.0
    return keep


def ddp_point(fraction: float, group_dicts: list[dict], cfg: dict) -> dict:
    """DDP gates on the MLP channels at keep ratio ``fraction`` (same quota in every layer),
    trained, finalized to exactly that quota, sliced and evaluated."""
    from prunegraph.ir.groups import Group
    from prunegraph.passes.evaluation.metrics import perplexity
    from prunegraph.passes.finalize import Finalize
    from prunegraph.passes.gates.insert import Gate
    from prunegraph.passes.slice import Slice
    from prunegraph.passes.train import Train
    from prunegraph.pipeline.contract import State

    say(f"static ddp f={fraction:.3f}: training on {cfg['device']}")
    base, tok = load(MODEL)
    groups = [Group.from_dict(d) for d in group_dicts]
    state = State(model=copy.deepcopy(base).to(cfg["device"]), tokenizer=tok, groups=groups)
    t0 = time.perf_counter()
    Gate(family="ddp", sparsity=1.0 - fraction, budget="units", scope="group",
         kinds=("channels",), lr=cfg["lr"], seed=cfg["seed"],
         options={"lr_l1": cfg["lr_l1"]})(state)
    steps = cfg["steps"]
    train = Train(steps=steps, batch_size=cfg["batch_size"], block_len=cfg["block_len"],
                  warmup=max(1, steps // 10), seed=cfg["seed"], checkpoint_every=steps,
                  resume=False, plots=False)(state).stats
    Finalize(mode="topk")(state)
    seconds = time.perf_counter() - t0
    plan = [pg for pg in state.plan.groups if pg.group.kind == "channels"]
    kept, total = sum(pg.kept for pg in plan), sum(pg.group.size for pg in plan)
    Slice()(state)
    ppl = perplexity(state.model, held_out(tok, cfg["seq_len"], cfg["ppl_blocks"]), 4,
                     progress=False)
    ood = ood_ppl(state.model, tok, cfg["seq_len"], cfg["ppl_blocks"])
    return {"fraction": fraction, "ffn_fraction": round(kept / total, 4), "ppl": round(ppl, 4),
            **ood,
            "device": cfg["device"],
            "train_tokens": train["tokens"], "train_seconds": round(seconds, 1),
            "gates_at_zero": train["achieved_sparsity"],
            "steps_to_target": train["steps_to_target"],
            "gate_mass_cut": round(state.metrics["finalize"]["gate_mass_cut"], 4)}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def ddp_points(fractions, groups, cfg: dict, write, pool: bool = False) -> list[dict]:
    """:func:`ddp_point` at every fraction, in ``cfg["workers"]`` spawned processes when > 1
    (or ``pool``), spread over the GPUs when ``cfg["device"]`` is ``cuda`` on a host with
    several."""
    group_dicts = [g.to_dict() for g in groups]
    devices = spread(cfg["device"])
    jobs = [(f, {**cfg, "device": devices[i % len(devices)]}) for i, f in enumerate(fractions)]
    rows: list[dict] = []

    def done(row: dict) -> None:
        rows.append(row)
        rows.sort(key=lambda r: r["fraction"])
        say(f"static ddp f={row['fraction']:.3f}: ppl {row['ppl']:.3f} "
            f"({row['train_seconds']} s training)")
        write(rows)

    if cfg["workers"] <= 1 and not pool:
        for f, job in jobs:
            done(ddp_point(f, group_dicts, job))
        return rows
    threads = max(1, (os.cpu_count() or 1) // cfg["workers"])
    with ProcessPoolExecutor(cfg["workers"], mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        for fut in as_completed([pool.submit(ddp_point, f, group_dicts, job)
                                 for f, job in jobs]):
            done(fut.result())
    return rows


def spread(device: str) -> list[str]:
    """``cuda`` on a host of several GPUs: each of them; else ``device`` alone."""
    count = torch.cuda.device_count() if device == "cuda" else 0
    return [f"cuda:{i}" for i in range(count)] if count > 1 else [device]


# ---------------------------------------------------------------------------------- results


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pp = result["prunepath"]["sweep"]
    ax.plot([r["active_fraction"] for r in pp], [r["ppl"] for r in pp], "o-",
            label="PrunePath (one checkpoint, τ sweep)")
    for r in pp:
        ax.annotate(f"τ={r['tau']}", (r["active_fraction"], r["ppl"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    styles = {"wanda": ("s--", "static one-shot (Wanda)"), "ddp": ("^-.", "static DDP (trained)")}
    for name, rows in result["static"].items():
        if rows:
            ax.plot([r["ffn_fraction"] for r in rows], [r["ppl"] for r in rows], styles[name][0],
                    label=styles[name][1] + ", MLP channels only")
    dense = result["prunepath"]["dense"].get("ppl")
    if dense:
        ax.axhline(dense, color="gray", lw=0.8, ls=":", label=f"dense ({dense:.1f})")
    ax.set_xlabel("FFN channels touched per token (fraction)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    moefy = result["prunepath"]["moefy"]
    ax.set_title(f"SmolLM2-135M, {moefy.get('experts')} experts × "
                 f"{moefy.get('group_size')} channels per MLP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.rename(path)


def matched(rows: list[dict], fraction: float) -> str:
    """The ppl of the static row at ``fraction`` (within 2e-3), else a dash."""
    near = [r for r in rows if abs(r["ffn_fraction"] - fraction) < 2e-3]
    return f"{near[0]['ppl']:.2f}" if near else "—"


def markdown(result: dict) -> str:
    """The docs section: setup facts, command, table, plot (the reading is written by hand)."""
    pp, st = result["prunepath"], result["static"]
    dense = pp["dense"].get("ppl")
    ood = [s for s in OOD if all(f"ppl_{s}" in r for r in pp["sweep"])]
    lines = [SECTION, "", setup_line(result), "", method_line(result), "",
             "```", result["command"], "```", "",
             "| τ | FFN channels touched / token | PrunePath ppl | "
             + "".join(f"PrunePath ppl {s} | " for s in ood)
             + "static one-shot ppl | static DDP ppl |",
             "|---|---|---|" + "---|" * len(ood) + "---|---|"]
    if dense:
        lines.append(f"| dense | 1.000 | {dense:.2f} | "
                     + "".join(f"{pp['dense'].get(f'ppl_{s}', float('nan')):.2f} | "
                               for s in ood) + f"{dense:.2f} | {dense:.2f} |")
    for r in pp["sweep"]:
        f = r["active_fraction"]
        lines.append(f"| {r['tau']} | {f:.3f} | {r['ppl']:.2f} | "
                     + "".join(f"{r[f'ppl_{s}']:.2f} | " for s in ood)
                     + f"{matched(st['wanda'], f)} | {matched(st['ddp'], f)} |")
    if result.get("comparisons"):
        lines += ["", "At each static row's FFN fraction (PrunePath interpolated log-linearly "
                  "between the two τ points around it):", "",
                  "| static | FFN fraction | static ppl | PrunePath ppl | "
                  + "".join(f"static ppl {s} | PrunePath ppl {s} | " for s in OOD),
                  "|---|---|---|---|" + "---|---|" * len(OOD)]
        for c in result["comparisons"]:
            cells = [c["static"], f"{c['ffn_fraction']:.3f}"]
            for key in ("ppl", *(f"ppl_{s}" for s in OOD)):
                cells += [_num(c.get(f"static_{key}")), _num(c.get(f"prunepath_{key}"))]
            lines.append("| " + " | ".join(cells) + " |")
    probe = pp.get("training", {}).get("router_probe")
    if probe:
        lines += ["", router_line(pp["training"])]
    lines += ["", "![PrunePath τ sweep](img/prunepath.png)", ""]
    return "\n".join(lines)


def _num(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def router_line(training: dict) -> str:
    """The routers against the oracle experts, before and after training."""
    probe = training["router_probe"]
    parts = []
    for label, p in probe.items():
        parts.append(f"{label}: entropy {p['entropy']:.2f} (uniform {p['uniform_entropy']:.2f}), "
                     f"top-1 agreement {p['top1']:.3f} (chance {p['top1_chance']:.3f}), "
                     f"coverage {p['coverage']:.3f} at {p['active_fraction']:.3f} active")
    init = training.get("router_init", "zero")
    r2 = f", R² {training['init_r2']}" if "init_r2" in training else ""
    return (f"Routers (`router_init: {init}`{r2}), on held-out tokens at τ "
            f"{next(iter(probe.values()))['tau']}: " + "; ".join(parts) + ".")


def setup_line(result: dict) -> str:
    """Device, precision, wall time and the training tokens of each side."""
    pp, st, ddp = result["prunepath"], result["static"], result["ddp"]
    sides = [f"PrunePath {pp['train_tokens']:,} (one checkpoint for every τ)"]
    if st["ddp"]:
        sides.append(f"static DDP {ddp['train_tokens']:,} per fraction")
    if st["wanda"]:
        sides.append(f"static one-shot 0 (Wanda scores from {result['calib_blocks']} × 128 "
                     f"calibration tokens)")
    precision = ("training forwards under bf16 autocast (the `Train` loop), evaluation in "
                 "float32" if result["device_type"] == "cuda" else "float32 throughout")
    gpus = f" on {ddp['gpus']} GPUs" if ddp["gpus"] > 1 else ""
    return (f"Device: {result['device']}; torch {result['torch']}; {precision}. Training "
            f"tokens: " + "; ".join(sides) + f". Whole run {result['seconds']:.0f} s, the "
            f"static DDP points trained {ddp['workers']} at a time{gpus}.")


def method_line(result: dict) -> str:
    """The settings of each side."""
    pp, ddp = result["prunepath"], result["ddp"]
    p, moefy = flat_params(pp["params"]), pp["moefy"]
    text = (f"MoEfy: {moefy.get('experts')} experts × {moefy.get('group_size')} channels per "
            f"MLP (balanced k-means on the gate rows). PrunePath: {p['warmup_steps']} dense "
            f"warm-up steps at τ {p['warmup_tau']}, then {p['steps']} sparse steps at τ "
            f"{p['train_tau']}, batches of "
            f"{p['batch_size']} × {p['block_len']} calibration tokens, router lr "
            f"{p['router_lr']}, model lr {p['lr']}, entropy {p['entropy']}, load balance "
            f"{p['load_balance']}, {p['mode']} mode, trained weights: {p['train_scope']}, "
            f"router init {p.get('router_init', 'zero')}, distillation {p.get('distill', 0)}"
            + (f" (power {p['distill_power']})" if p.get("distill") else "")
            + (f", {p['lr_schedule']} lr schedule" if "lr_schedule" in p else "") + ". Static "
            "rows prune only the MLP channels, the same number in every layer.")
    if result["static"]["ddp"]:
        text += (" Static DDP: gates on the MLP channels (budget `units`, scope `group`), "
                 f"{ddp['steps']} mask-only steps (KD from the ungated model) of "
                 f"{ddp['batch_size']} × {ddp['block_len']} tokens, gate lr {ddp['lr']}, then "
                 f"`Finalize(mode=topk)` and `Slice`.")
    return text + (f" Perplexity on {result['ppl_tokens']:,} held-out tokens "
                   f"({result['seq_len']}-token blocks).")


# ------------------------------------------------------------------------------------- main


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-run", type=Path, default=None,
                      help="a finished run folder of examples/prunepath-smollm2.yaml")
    mode.add_argument("--train", action="store_true",
                      help="run the example's passes here (MoEfy, PrunePath, TauSweep)")
    ap.add_argument("--groups", type=Path, default=None,
                    help="groups JSON (a list of Group.to_dict()) instead of analysing here")
    ap.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                    help="PrunePath and DDP batch (default: the example's)")
    ap.add_argument("--block-len", dest="block_len", type=int, default=None,
                    help="PrunePath and DDP block length (default: the example's)")
    ap.add_argument("--taus", type=floats, default=None,
                    help=f"comma-separated τ of the sweep (--train only; default {TAUS})")
    ap.add_argument("--save", type=Path, default=None, help="save the PrunePath model here")
    ap.add_argument("--static", type=lambda s: [] if s == "none" else s.split(","),
                    default=list(STATIC),
                    help="comma-separated static baselines: wanda, ddp (or none)")
    ap.add_argument("--static-taus", type=floats, default=None,
                    help="only these τ points get static twins (default: every τ of the sweep)")
    ap.add_argument("--static-fractions", type=floats, default=None,
                    help="static rows at these FFN fractions instead of the sweep's; with "
                         "--train on CUDA the DDP points then train while PrunePath does, and "
                         "PrunePath's perplexity there is interpolated between sweep points")
    ap.add_argument("--pp-set", dest="pp_set", action="append", default=[],
                    metavar="KEY=VALUE",
                    help="a PrunePath parameter for this run (repeatable), e.g. "
                         "router_init=zero, distill=0 (the reference router) or "
                         'train_tau_max=0.95')
    ap.add_argument("--ddp-steps", type=int, default=300)
    ap.add_argument("--ddp-lr", type=float, default=0.05)
    ap.add_argument("--ddp-lr-l1", dest="ddp_lr_l1", type=float, default=0.2,
                    help="learning rate of DDP's budget multiplier lambda1")
    ap.add_argument("--ddp-workers", type=int, default=None,
                    help="processes training DDP points at once (default: one per point on "
                         "CUDA, 1 on the CPU)")
    ap.add_argument("--ppl-blocks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-blocks", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prunepath.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/prunepath.png"))
    ap.add_argument("--markdown", type=Path, default=None,
                    help="replace this benchmark's section of this file (docs/benchmarks.md)")
    args = ap.parse_args()
    unknown = set(args.static) - set(STATIC)
    if unknown:
        ap.error(f"--static: unknown baseline(s) {sorted(unknown)}; choose from {list(STATIC)}")
    if args.from_run is not None and (args.warmup_steps is not None or args.steps is not None
                                      or args.save is not None):
        ap.error("--warmup-steps, --steps and --save apply to --train only")
    if args.from_run is not None and args.taus is not None:
        ap.error("--taus applies to --train only: a finished run's sweep has its own τ")
    args.taus = args.taus or TAUS
    if args.static_fractions is not None and args.static_taus is not None:
        ap.error("--static-fractions and --static-taus choose the static rows two ways; give one")
    if args.from_run is not None and args.pp_set:
        ap.error("--pp-set applies to --train only: a finished run has its own settings")
    bad = [kv for kv in args.pp_set if "=" not in kv]
    if bad:
        ap.error(f"--pp-set takes KEY=VALUE, got {bad}")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def interpolated(sweep: list[dict], fraction: float, key: str) -> float | None:
    """PrunePath's ``key`` perplexity at ``fraction``, log-linear between the two sweep points
    around it (None outside the sweep's range)."""
    rows = sorted((r for r in sweep if key in r), key=lambda r: r["active_fraction"])
    for a, b in zip(rows, rows[1:]):
        fa, fb = a["active_fraction"], b["active_fraction"]
        if fa <= fraction <= fb and fb > fa:
            w = (fraction - fa) / (fb - fa)
            return round(math.exp((1 - w) * math.log(a[key]) + w * math.log(b[key])), 4)
    near = [r for r in rows if abs(r["active_fraction"] - fraction) < 2e-3]
    return near[0][key] if near else None


def comparisons(result: dict) -> list[dict]:
    """Every static row next to PrunePath at the same FFN fraction (interpolated), in-domain
    and out-of-domain."""
    sweep = result["prunepath"]["sweep"]
    out = []
    for name, rows in result["static"].items():
        for r in rows:
            row = {"static": name, "ffn_fraction": r["ffn_fraction"]}
            for key in ("ppl", *(f"ppl_{s}" for s in OOD)):
                if key in r:
                    row[f"static_{key}"] = r[key]
                    row[f"prunepath_{key}"] = interpolated(sweep, r["ffn_fraction"], key)
            out.append(row)
    return out


def ddp_config(args, prunepath_params: dict, fractions: list[float]) -> dict:
    """The static DDP settings: PrunePath's batch shape unless given, one worker process per
    point on CUDA unless given."""
    prunepath_params = flat_params(prunepath_params)
    batch = args.batch_size or prunepath_params["batch_size"]
    block = args.block_len or prunepath_params["block_len"]
    on_cuda = args.device.startswith("cuda")
    workers = args.ddp_workers or (len(fractions) if on_cuda else 1)
    return {"steps": args.ddp_steps, "batch_size": batch, "block_len": block,
            "train_tokens": args.ddp_steps * batch * block, "lr": args.ddp_lr,
            "lr_l1": args.ddp_lr_l1, "seed": args.seed, "device": args.device,
            "workers": workers,
            "gpus": len(spread(args.device)) if on_cuda else 0,
            "seq_len": args.seq_len, "ppl_blocks": args.ppl_blocks}


def main() -> None:
    args = parse_args()
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("prunegraph").setLevel(logging.INFO)  # pass progress, flushed per line
    device = torch.device(args.device)
    base, tok = load(MODEL)
    groups = load_groups(args.groups, base)
    result = {"model": MODEL, "device": device_name(device), "device_type": device.type,
              "torch": torch.__version__, "seq_len": args.seq_len,
              "calib_blocks": args.calib_blocks, "static": {"wanda": [], "ddp": []},
              "command": "python " + " ".join(sys.argv)}
    lock = threading.Lock()

    def write(key: str | None = None, rows: list | None = None) -> None:
        with lock:
            if key is not None:
                result["static"][key] = list(rows)
            result["seconds"] = round(time.perf_counter() - START, 1)
            if "prunepath" in result:
                result["comparisons"] = comparisons(result)
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    early = None  # DDP at fixed fractions trains beside PrunePath on CUDA
    if (args.train and args.static_fractions and "ddp" in args.static
            and device.type == "cuda"):
        params = next(p for p in example_passes(args)[0]
                      if p.pass_name() == "PrunePath").params()
        result["ddp"] = ddp_config(args, params, args.static_fractions)
        failed: list[BaseException] = []

        def train_static() -> None:
            try:
                ddp_points(args.static_fractions, groups, result["ddp"],
                           lambda rows: write("ddp", rows), pool=True)  # its own process
            except BaseException as e:  # noqa: BLE001 - raised again after the join
                failed.append(e)

        early = threading.Thread(target=train_static)
        early.start()
        say(f"static ddp: {len(args.static_fractions)} point(s) training beside PrunePath")
    pp = train_prunepath(args, groups, device) if args.train else from_run(args.from_run)
    for r in pp["sweep"]:
        say(f"PrunePath tau={r['tau']}: ppl {r['ppl']:.3f}, active {r['active_fraction']:.3f}"
            + "".join(f", {s} {r[f'ppl_{s}']:.3f}" for s in OOD if f"ppl_{s}" in r))
    fractions = args.static_fractions or [
        r["active_fraction"] for r in pp["sweep"] if r["active_fraction"] < 1
        and (args.static_taus is None or r["tau"] in args.static_taus)]
    blocks = held_out(tok, args.seq_len, args.ppl_blocks)
    result.update({
        "ppl_tokens": int(blocks.numel()), "prunepath": pp,
        "ddp": result.get("ddp") or ddp_config(args, pp["params"], fractions),
        "ppl_falls_as_tau_rises": all(a["ppl"] >= b["ppl"]
                                      for a, b in zip(pp["sweep"], pp["sweep"][1:])),
        **{f"ppl_{s}_falls_as_tau_rises": all(a[f"ppl_{s}"] >= b[f"ppl_{s}"]
                                              for a, b in zip(pp["sweep"], pp["sweep"][1:]))
           for s in OOD if all(f"ppl_{s}" in r for r in pp["sweep"])}})
    write()
    if "wanda" in args.static:
        wanda_points(copy.deepcopy(base).to(device), tok, groups, fractions, blocks,
                     args.calib_blocks, lambda rows: write("wanda", rows))
    if early is not None:
        early.join()
        if failed:
            raise failed[0]
    elif "ddp" in args.static:
        ddp_points(fractions, groups, result["ddp"], lambda rows: write("ddp", rows))
    write()
    if args.markdown is not None:
        replace_section(args.markdown, SECTION, markdown(result))
    plot(result, args.plot)
    say(f"done; wrote {args.out}")


if __name__ == "__main__":
    main()
