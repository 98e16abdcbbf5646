"""Weight pruning on SmolLM2-135M: LEAP vs Wanda vs SparseGPT vs magnitude at equal sparsity.

Settings: 50% and 60% unstructured, and 2:4 (50%), of every decoder linear's weights (embeddings
and ``lm_head`` dense). Each method runs through the passes a user runs: ``SparsePrune`` for the
one-shot methods (the same calibration blocks for Wanda, SparseGPT and LEAP's Wanda
initialisation) and ``Gate(family: leap) -> Train -> Finalize(topk)`` with the budget of
``examples/leap-smollm2.yaml`` (its Gate and Train settings are read from the file, so the
benchmark measures the example). Then the same evaluation for all: held-out perplexity (the
evaluation articles, 512-token blocks) and accuracy on the four bundled BIG-bench tasks (first
``--limits`` examples of each). Rows are written to the JSON as they finish and a re-run skips
rows already there with the same settings, so methods can run as separate jobs::

    python benchmarks/unstructured.py --methods magnitude,wanda,sparsegpt
    python benchmarks/unstructured.py --methods leap --markdown docs/benchmarks.md

``METHOD+reconstruct`` (``wanda+reconstruct``, ``leap+reconstruct``) runs ``METHOD`` and then
the ``Reconstruct`` pass (SparseGPT's weight update under that mask); after a LEAP row of the
same setting it reuses that row's mask instead of training again. ``--leap-set`` changes the
example's settings (``--leap-set Gate.options.prior_strength=10 --leap-set Train.steps=2000``)
and ``--leap-label`` names such a variant's rows (``leap-long``, ``leap-long+reconstruct``).

Times are CPU seconds of this process (``time.process_time``) and wall seconds; on a shared
machine only the first are comparable between rows. ``peak_rss_mb`` is the process's peak
resident memory at the end of the row (LEAP: ``train_rss_per_logit`` is the growth of the peak
over training divided by the number of logits, in bytes).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _docs import replace_section

from prunegraph.atomic import atomic_write_text
from prunegraph.data.blocks import text_blocks
from prunegraph.data.models import load_model
from prunegraph.data.tasks import load_task
from prunegraph.data.text import load_documents, split_documents, token_blocks
from prunegraph.errors import SpecError
from prunegraph.passes import Finalize, Gate, Reconstruct, SparsePrune, Train
from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.runfolder import to_json
from prunegraph.pipeline.spec import apply_overrides, parse_entry

SECTION = "## Weight pruning: LEAP vs one-shot (SmolLM2-135M)"
ONESHOT = ("magnitude", "wanda", "sparsegpt")
SETTINGS = ("0.5", "0.6", "2:4")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "leap-smollm2.yaml"
LIMITS = "winowhy=40,cause_and_effect_one_sentence=51,goal_inference=20,timedial=8"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def example_passes(path: Path, overrides: list[str] = ()) -> dict:
    """The example's ``Gate``, ``Train`` and ``Finalize`` settings after ``overrides`` (the
    syntax of ``prunegraph run --set``: ``Gate.options.prior_strength=3``)."""
    try:
        spec = apply_overrides(yaml.safe_load(path.read_text()), list(overrides),
                               where=str(path))
        entries = [parse_entry(e) for e in spec["passes"]]
    except SpecError as e:
        raise SystemExit(f"--leap-set: {e}") from None
    return {name: dict(params or {}) for name, params in entries
            if name in ("Gate", "Train", "Finalize")}


def evaluate(model, tok, blocks, tasks, limits, ood=None) -> dict:
    out = {"ppl": perplexity(model, blocks, 4, False)}
    if ood is not None:
        out["ppl_austen"] = perplexity(model, ood, 4, False)
    for name, task in tasks.items():
        out[name] = multiple_choice(model, tok, task, limit=limits[name], batch_size=8,
                                    progress=False)["acc"]
    out["mean_acc"] = sum(out[n] for n in tasks) / len(tasks)
    return out


def prune(model, tok, method: str, setting: str, args, leap: dict, run_dir: Path,
          cache: dict) -> dict:
    """Prune ``model`` in place by ``method`` (see the module docstring); ``cache`` keeps each
    row's masks and stats for its ``+reconstruct`` row."""
    pattern = "2:4" if setting == "2:4" else "unstructured"
    sparsity = 0.5 if setting == "2:4" else float(setting)
    state = State(model=model, tokenizer=tok, groups=[], run_dir=run_dir)
    base, _, post = method.partition("+")
    if post:
        if post != "reconstruct":
            raise SystemExit(f"unknown method suffix +{post} (reconstruct is the one there is)")
        if (setting, base) in cache:  # the row ran before (a LEAP row is not trained twice)
            cache[setting, base][0].apply_(model)
        else:
            prune(model, tok, base, setting, args, leap, run_dir, cache)
        state.masks, info = cache[setting, base]
        t = time.perf_counter()
        r = Reconstruct(calib_blocks=args.calib_blocks, block_len=args.calib_len,
                        dense="smollm2-135m")(state)
        return {**info, "reconstruct_seconds": round(time.perf_counter() - t, 1),
                "reconstruct_forwards": r.stats["forwards"]}
    if base in ONESHOT:
        r = SparsePrune(method=base, sparsity=sparsity, pattern=pattern,
                        calib_blocks=args.calib_blocks, block_len=args.calib_len)(state)
        cache[setting, method] = (r.state.masks, {"achieved_sparsity":
                                                  r.stats["achieved_sparsity"]})
        return cache[setting, method][1]
    gate = dict(leap["Gate"])
    opts = dict(gate.pop("options", {}) or {}, pattern=pattern,
                calib_blocks=args.calib_blocks, block_len=args.calib_len)
    gate.update(family="leap", sparsity=sparsity, options=opts)
    state = Gate(**gate)(state).state
    rss0 = _rss_mb()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train = dict(leap["Train"], checkpoint_every=10_000, resume=False, plots=False)
    if args.leap_steps:
        ratio = args.leap_steps / train["steps"]
        train["polish_steps"] = round(train.get("polish_steps", 0) * ratio)
        train["steps"] = args.leap_steps
    t = Train(**train)(state)
    rss1 = _rss_mb()
    f = Finalize(**leap.get("Finalize", {}))(state)
    logits = t.stats["logit_params"]
    info = {"achieved_sparsity": f.stats["achieved_sparsity"], "train_steps": train["steps"],
            "polish_steps": train.get("polish_steps", 0),
            "train_tokens": t.stats["tokens"], "train_seconds": t.stats["seconds"],
            "final_ce": t.stats["final_ce"], "threshold_sparsity": t.stats["threshold_sparsity"],
            "logit_params": logits,
            "train_rss_per_logit": round((rss1 - rss0) * 2 ** 20 / logits, 2)}
    if model.device.type == "cuda":
        info["train_peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    init = state.metrics.get("gate", {}).get("init_sparsity")
    if init is not None:
        info["init_sparsity"] = init
    cache[setting, method] = (state.masks, info)
    return info


def is_leap(method: str) -> bool:
    return method.split("+")[0] not in (*ONESHOT, "dense")


def key(row: dict) -> str:
    return f"{row['setting']}|{row['method']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt,leap")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--ppl-blocks", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--limits", default=LIMITS, help="per-task example limits, name=n,...")
    p.add_argument("--leap-steps", type=int, default=0,
                   help="override the example's Train.steps (polish scaled alike); 0 = as is")
    p.add_argument("--leap-set", action="append", default=[], metavar="PASS.KEY=VALUE",
                   help="change one of the example's settings, as prunegraph run --set does")
    p.add_argument("--leap-label", default="leap",
                   help="the method name of LEAP's rows (a variant made with --leap-set)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu",
                   help="where every method runs (cuda: LEAP trains under bf16 autocast)")
    p.add_argument("--out", default="benchmarks/results/unstructured.json")
    p.add_argument("--markdown", default=None)
    p.add_argument("--redo", action="store_true", help="recompute rows already in --out")
    p.add_argument("--also", action="append", default=[],
                   help="another result JSON whose rows join the markdown table (a job that "
                        "ran other methods in parallel)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    settings = [s for s in args.settings.split(",") if s]
    limits = {k: int(v) for k, v in (x.split("=") for x in args.limits.split(","))}
    leap = example_passes(EXAMPLE, args.leap_set)
    methods = [args.leap_label + m[4:] if m.startswith("leap") else m for m in methods]
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    config = {"calib_blocks": args.calib_blocks, "calib_len": args.calib_len, "ood": "austen",
              "ppl_blocks": args.ppl_blocks, "seq_len": args.seq_len, "limits": limits}
    leap_config = {"example": leap, "leap_steps": args.leap_steps}
    rows = {key(r): r for r in data["rows"] if r.get("config") == config
            and (r["method"].split("+")[0] != args.leap_label
                 or r.get("leap_config") == leap_config)}
    stale = [key(r) for r in data["rows"] if key(r) not in rows]
    if stale:
        print(f"recomputing rows made with other settings: {', '.join(stale)}", flush=True)
    cache: dict = {}
    model0, tok = load_model("smollm2-135m")
    model0.to(args.device)
    base = {n: p.detach().clone() for n, p in model0.state_dict().items()}
    _, held = split_documents(load_documents("wikipedia"))
    blocks = token_blocks(tok, held, args.seq_len, args.ppl_blocks)
    ood = text_blocks(tok, "austen", "evaluation", args.seq_len, args.ppl_blocks)
    tasks = {n: load_task(n) for n in limits}
    todo = [("dense", "dense")] if "dense" in methods else []
    todo += [(s, m) for s in settings for m in methods if m != "dense"]
    command = "python benchmarks/unstructured.py " + " ".join(sys.argv[1:])
    data.setdefault("machine", "")
    data.setdefault("command", command)
    for setting, method in todo:
        k = f"{setting}|{method}"
        if k in rows and not args.redo:
            print(f"{k}: have it", flush=True)
            continue
        model0.load_state_dict(base)
        c0, w0 = time.process_time(), time.perf_counter()
        info = {}
        with tempfile.TemporaryDirectory() as tmp:
            if method != "dense":
                info = prune(model0, tok, method, setting, args, leap, Path(tmp), cache)
        prune_cpu = time.process_time() - c0
        metrics = evaluate(model0, tok, blocks, tasks, limits, ood)
        row = {"setting": setting, "method": method, **metrics, **info,
               "prune_cpu_s": round(prune_cpu, 1),
               "cpu_s": round(time.process_time() - c0, 1),
               "wall_s": round(time.perf_counter() - w0, 1), "peak_rss_mb": round(_rss_mb()),
               "threads": torch.get_num_threads(), "config": config,
               **({"leap_config": leap_config} if is_leap(method) else {})}
        rows[k] = row
        print(k, {x: row[x] for x in ("ppl", "mean_acc", "cpu_s")}, flush=True)
        where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                 else f"{platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads")
        data = {"machine": f"{where}, torch {torch.__version__}",
                "command": command, "rows": list(rows.values())}
        atomic_write_text(out, to_json(data))
    if args.markdown:
        data["commands"] = data.get("commands") or [data["command"]]
        for other in args.also:
            more = json.loads(Path(other).read_text())
            have = {key(r) for r in data["rows"]}
            data["rows"] += [r for r in more["rows"] if key(r) not in have]
            data["commands"].append(more.get("command", ""))
        replace_section(Path(args.markdown), SECTION, markdown(data))


def markdown(data: dict) -> str:
    rows = {key(r): r for r in data["rows"]}
    dense = rows.get("dense|dense")
    tasks = list(next(iter(data["rows"]))["config"]["limits"])
    lim = next(iter(data["rows"]))["config"]["limits"]
    short = {"winowhy": "winowhy", "cause_and_effect_one_sentence": "c&e",
             "goal_inference": "goal", "timedial": "timedial"}
    cpu = data["machine"].endswith("+cpu")  # process CPU seconds mean little beside a GPU
    lines = [SECTION, "",
             "Every decoder linear of the real SmolLM2-135M masked (106.2M weights; embeddings "
             "and lm_head dense); perplexity on the held-out Wikipedia articles (the "
             "calibration and training text's domain) and on Jane Austen's novels (another "
             "domain), "
             f"{next(iter(data['rows']))['config']['ppl_blocks']} x "
             f"{next(iter(data['rows']))['config']['seq_len']} tokens each, and accuracy on the "
             "BIG-bench tasks (first n examples: "
             + ", ".join(f"{short.get(t, t)} {lim[t]}" for t in tasks) + "). "
             "One-shot methods and LEAP's initialisation share the calibration blocks; `leap` "
             "trains with the budget of `examples/leap-smollm2.yaml`, other LEAP rows with the "
             "settings listed under the table. `+reconstruct`: the same mask, then the "
             "`Reconstruct` pass (SparseGPT's weight update under that mask)."
             + (" CPU seconds of the process (pruning + evaluation) are comparable between "
                "rows; wall time is not (shared machine)." if cpu else ""), "",
             "```", *[c if c.startswith("python") else f"python benchmarks/{c}"
                      for c in data.get("commands", [data["command"]]) if c],
             "```", "", f"Machine: {data['machine']}.", "",
             "| setting | method | ppl wiki | x dense | ppl austen | x dense | "
             + " | ".join(short.get(t, t) for t in tasks)
             + " | mean acc | sparsity |" + (" prune CPU s |" if cpu else ""),
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|"
             + ("---:|" if cpu else "")]
    order = ["dense"] + [s for s in SETTINGS]
    seen = list(dict.fromkeys(r["method"] for r in data["rows"]))
    methods = ["dense", *[m for x in ONESHOT for m in (x, f"{x}+reconstruct")],
               *[m for m in seen if is_leap(m)]]
    for setting in order:
        for method in methods:
            r = rows.get(f"{setting}|{method}")
            if r is None:
                continue
            ratio = f"{r['ppl'] / dense['ppl']:.2f}" if dense else ""
            oa = r.get("ppl_austen")
            ood = (f"{oa:.2f} | {oa / dense['ppl_austen']:.2f}"
                   if oa is not None and dense and dense.get("ppl_austen") else " | ")
            sp = r.get("achieved_sparsity")
            lines.append(f"| {setting if setting != 'dense' else '-'} | {method} | "
                         f"{r['ppl']:.2f} | {ratio} | {ood} | "
                         + " | ".join(f"{r[t]:.2f}" for t in tasks)
                         + f" | {r['mean_acc']:.3f} | {'' if sp is None else f'{sp:.3f}'} |"
                         + (f" {r['prune_cpu_s']:.0f} |" if cpu else ""))
    lines.append("")
    for label in [m for m in seen if is_leap(m) and "+" not in m]:
        r = next(r for r in data["rows"] if r["method"] == label)
        ex = r["leap_config"]["example"]
        gate, train = ex["Gate"], ex["Train"]
        opts = gate.get("options", {})
        gpu = (f", {r['train_peak_gpu_gb']} GB of GPU memory at the peak"
               if "train_peak_gpu_gb" in r else "")
        lines.append(
            f"- {label}: {r['train_steps']} steps ({r['polish_steps']} of them polish) of "
            f"{train.get('batch_size')} x {train.get('block_len')} tokens "
            f"({r['train_tokens']:,} in all), lr {gate.get('lr')}, prior strength "
            f"{opts.get('prior_strength')}, kd_weight {train.get('kd_weight')}; "
            f"{r['logit_params']:,} logits; {r['train_seconds']:.0f} s of training{gpu}; "
            f"the process's peak resident memory grew by {r['train_rss_per_logit']} bytes per "
            f"logit.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
