"""Learned gates (DDP, hard-concrete) vs one-shot criteria on SmolLM2-135M, at equal budgets.

For each budget (fraction of decoder parameters removed) the same pipeline pieces a user runs
are used: ``Prune`` for the one-shot criteria (magnitude, wanda, taylor), and
``Gate -> Train -> Finalize(topk)`` for the learned families, trained on the same number of
tokens (``steps x batch_size x block_len`` of the Wikipedia excerpt's calibration split); then
``Slice`` and the same evaluation for all: held-out perplexity (evaluation articles, 512-token
blocks) and zero-shot accuracy on two BIG-bench tasks. Training time and the step at which the
gates first reach the target sparsity are recorded. The model is loaded and analysed once::

    python benchmarks/learned_vs_oneshot.py --steps 200 --out benchmarks/results/learned_vs_oneshot.json \\
        --markdown docs/benchmarks.md --plots docs/img

On CUDA the training forwards run in bf16 autocast; evaluation is float32 everywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _docs import replace_section

from prunegraph.data.blocks import text_blocks
from prunegraph.data.models import load_model
from prunegraph.data.tasks import load_task
from prunegraph.ir.analysis import analyze
from prunegraph.passes.evaluation.evaluate import count_params
from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity
from prunegraph.passes.finalize import Finalize
from prunegraph.passes.gates.insert import Gate
from prunegraph.passes.prune import Prune
from prunegraph.passes.slice import Slice
from prunegraph.passes.train import Train
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.runfolder import atomic_write_text

ONESHOT = ("magnitude", "wanda", "taylor")
LEARNED = ("ddp", "hard_concrete")
SECTION = "## Learned gates vs one-shot pruning (SmolLM2-135M)"


def evaluate(model, tokenizer, blocks, tasks, limit, batch_size) -> dict:
    out = {"params": count_params(model), "ppl": perplexity(model, blocks, batch_size, False)}
    for name, task in tasks.items():
        out[name] = multiple_choice(model, tokenizer, task, limit=limit,
                                    batch_size=max(8, batch_size), progress=False)["acc"]
    return out


def run_method(base, tokenizer, groups, method, sparsity, args, device, run_dir,
               held_out) -> dict:
    model = copy.deepcopy(base).to(device)
    state = State(model=model, tokenizer=tokenizer, groups=groups)
    state.run_dir = run_dir
    start = time.perf_counter()
    info: dict = {}
    if method in ONESHOT:
        Prune(criterion=method, sparsity=sparsity, calib_blocks=args.calib_blocks,
              block_len=args.block_len)(state)
    else:
        family = method.split("+")[0]
        lr = args.lr_ddp if family == "ddp" else args.lr_hc
        opts = {"lr_l1": args.lr_l1, "lr_l2": args.lr_l2, "lr_l3": args.lr_l3,
                "dual_schedule": args.dual_schedule}
        if method == "ddp":
            opts["mu_T"] = args.mu_T
        Gate(family=family, sparsity=sparsity, lr=lr, seed=args.seed, options=opts)(state)
        result = Train(steps=args.steps, batch_size=args.batch_size, block_len=args.block_len,
                       warmup=max(1, args.steps // 10), kd_weight=args.kd_weight,
                       seed=args.seed, checkpoint_every=max(args.steps, 1), resume=False,
                       polish_steps=args.polish_steps)(state)
        info = {k: result.stats[k] for k in ("steps_to_target", "achieved_sparsity",
                                              "target_sparsity", "tokens")}
        info["polish_steps"] = args.polish_steps
        # the gated model as training left it, before Finalize cuts to the exact budget
        eval_start = time.perf_counter()
        info["ppl_before_finalize"] = perplexity(state.model, held_out, 4, False)
        start += time.perf_counter() - eval_start  # an evaluation, not the method's time
        Finalize(mode="topk")(state)
        info["gate_mass_cut"] = state.metrics["finalize"]["gate_mass_cut"]
        history = [json.loads(x) for x in (Path(run_dir) / "train" / "metrics.jsonl")
                   .read_text().splitlines()]
        info["curve"] = [[h["step"], round(h["achieved_sparsity"], 4), round(h["ce"], 4)]
                         for h in history]
    seconds = time.perf_counter() - start
    Slice()(state)
    info["seconds"] = round(seconds, 1)
    info["params_removed"] = state.plan.report["params_removed"]
    return info, state.model


def markdown(results: dict, command: str) -> str:
    tasks = results["tasks"]
    dense = results["dense"]
    head = ("| sparsity | method | params | held-out ppl | ppl / dense | "
            + " | ".join(tasks) + " | time (s) | steps to target |")
    polish = {r["settings"].get("polish_steps", 0) for rows in results["runs"].values()
              for r in rows.values() if "settings" in r}
    polish_note = (f" (the last {polish.pop()} of them the polish phase)"
                   if len(polish) == 1 and 0 not in polish else "")
    lines = [SECTION, "", f"Device: {results['device']}; torch {results['torch']}. "
             f"Learned gates: {results['steps']} steps{polish_note} x {results['batch_size']} x "
             f"{results['block_len']} tokens = {results['tokens']:,} calibration tokens each; "
             f"one-shot criteria: {results['calib_blocks']} x {results['block_len']} calibration "
             f"tokens. Perplexity on {results['ppl_tokens']:,} held-out tokens (512-token blocks); "
             f"tasks: accuracy on {results['limit']} examples each.", "",
             "```", command, "```", "", head,
             "|" + "---|" * (7 + len(tasks))]
    lines.append(f"| 0 | dense | {dense['params']:,} | {dense['ppl']:.2f} | 1.00 | "
                 + " | ".join(f"{dense[t]:.3f}" for t in tasks) + " | | |")
    for sp, rows in results["runs"].items():
        best = min(rows.values(), key=lambda r: r["ppl"])["ppl"]
        for method, r in rows.items():
            ppl = f"**{r['ppl']:.2f}**" if r["ppl"] == best else f"{r['ppl']:.2f}"
            lines.append(f"| {sp} | {method} | {r['params']:,} | {ppl} | "
                         f"{r['ppl'] / dense['ppl']:.2f} | "
                         + " | ".join(f"{r[t]:.3f}" for t in tasks)
                         + f" | {r['seconds']} | {r.get('steps_to_target') or '—'} |")
    lines += ["", "![held-out perplexity](img/learned_vs_oneshot_ppl.png)",
              "![sparsity during training](img/learned_vs_oneshot_sparsity.png)", ""]
    return "\n".join(lines)


def plots(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    sps = list(results["runs"])
    methods = list(dict.fromkeys(m for rows in results["runs"].values() for m in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar([j + i * width for j in range(len(sps))],
               [results["runs"][s].get(m, {}).get("ppl", float("nan")) for s in sps], width,
               label=m)
    ax.axhline(results["dense"]["ppl"], color="k", ls="--", lw=1, label="dense")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sps))],
                  [f"{float(s):.0%} removed" for s in sps])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=7)
    fig.savefig(folder / "learned_vs_oneshot_ppl.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for s in sps:
        for m, r in results["runs"][s].items():
            if r.get("curve"):
                ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]],
                        label=f"{m} {float(s):.0%}")
        ax.axhline(next((r["target_sparsity"] for r in results["runs"][s].values()
                         if "target_sparsity" in r), 0), color="grey", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("achieved sparsity of the gated pool")
    ax.legend(fontsize=7)
    fig.savefig(folder / "learned_vs_oneshot_sparsity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--methods", nargs="+", default=list(LEARNED + ONESHOT))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-len", type=int, default=128)
    ap.add_argument("--calib-blocks", type=int, default=32)
    ap.add_argument("--kd-weight", type=float, default=2.0)
    ap.add_argument("--lr-ddp", type=float, default=0.05)
    ap.add_argument("--lr-hc", type=float, default=0.1)
    ap.add_argument("--lr-l1", type=float, default=0.2, help="multiplier learning rates")
    ap.add_argument("--lr-l2", type=float, default=0.4)
    ap.add_argument("--lr-l3", type=float, default=0.02)
    ap.add_argument("--mu-T", dest="mu_T", type=float, default=0.1, help="DDP's final mu")
    ap.add_argument("--dual-schedule", default="constant", choices=("constant", "cosine"))
    ap.add_argument("--polish-steps", type=int, default=0,
                    help="Train's polish phase: the last N of --steps train the kept gates "
                         "under the exact final mask")
    ap.add_argument("--tag", default="",
                    help="suffix for the learned methods' names in the table (a variant)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine result files of separate runs (e.g. one per GPU) into --out, "
                         "--markdown and --plots; nothing is run")
    ap.add_argument("--tasks", nargs="+", default=["winowhy", "cause_and_effect_one_sentence"])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--ppl-blocks", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--groups", default=None,
                    help="groups JSON (a list of Group.to_dict()) instead of analysing here, "
                         "e.g. where torch.export of the model fails on an older torch")
    ap.add_argument("--out", default="benchmarks/results/learned_vs_oneshot.json")
    ap.add_argument("--markdown", default=None, help="append/replace the section in this file")
    ap.add_argument("--plots", default=None, help="folder for the plots")
    args = ap.parse_args()
    command = "python " + " ".join(["benchmarks/learned_vs_oneshot.py"] + sys.argv[1:])
    if args.merge:
        results = merge([json.loads(Path(f).read_text()) for f in args.merge])
        results["command"] = "\n".join([*(r for r in results.pop("commands") if r), command])
        write(results, results["command"], args)
        return
    device = torch.device(args.device)
    base, tokenizer = load_model(args.model)
    if args.groups:
        from prunegraph.ir.groups import Group

        groups = [Group.from_dict(d) for d in json.loads(Path(args.groups).read_text())]
    else:
        groups = analyze(base).groups
    blocks = text_blocks(tokenizer, "wikipedia", "evaluation", 512, args.ppl_blocks)
    tasks = {t: load_task(t) for t in args.tasks}
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or "cpu", "torch": torch.__version__,
               "steps": args.steps, "batch_size": args.batch_size, "block_len": args.block_len,
               "tokens": args.steps * args.batch_size * args.block_len,
               "calib_blocks": args.calib_blocks, "limit": args.limit, "tasks": args.tasks,
               "ppl_tokens": int(blocks.numel()), "runs": {}}
    dense = copy.deepcopy(base).to(device)
    results["dense"] = evaluate(dense, tokenizer, blocks, tasks, args.limit, 4)
    del dense
    print("dense", results["dense"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for sp in args.sparsities:
            rows = results["runs"].setdefault(str(sp), {})
            for method in args.methods:
                run_dir = Path(tmp) / f"{method}-{sp}"
                info, model = run_method(base, tokenizer, groups, method, sp, args, device,
                                         run_dir, blocks)
                info.update(evaluate(model, tokenizer, blocks, tasks, args.limit, 4))
                if method in LEARNED:
                    info["settings"] = {k: getattr(args, k) for k in (
                        "lr_l1", "lr_l2", "lr_l3", "dual_schedule", "kd_weight", "mu_T",
                        "polish_steps")}
                    info["settings"]["lr"] = args.lr_ddp if method == "ddp" else args.lr_hc
                rows[method + args.tag if method in LEARNED else method] = info
                print(sp, method, {k: v for k, v in info.items() if k != "curve"}, flush=True)
                del model
                atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    results["command"] = command
    write(results, command, args)


def merge(parts: list[dict]) -> dict:
    """One result from several runs of this script (same model, data and evaluation)."""
    keys = ("steps", "batch_size", "block_len", "ppl_tokens", "limit", "tasks")
    for p in parts[1:]:
        diff = [k for k in keys if p[k] != parts[0][k]]
        if diff:
            raise SystemExit(f"cannot merge runs that differ in {', '.join(diff)}")
    out = {k: v for k, v in parts[0].items() if k not in ("runs", "command")}
    out["commands"] = [p.get("command") for p in parts]
    out["runs"] = {}
    for p in parts:
        for sp, rows in p["runs"].items():
            out["runs"].setdefault(sp, {}).update(rows)
    return out


def write(results: dict, command: str, args) -> None:
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    if args.plots:
        plots(results, Path(args.plots))
    if args.markdown:
        replace_section(Path(args.markdown), SECTION, markdown(results, command))
    print(markdown(results, command))


if __name__ == "__main__":
    main()
