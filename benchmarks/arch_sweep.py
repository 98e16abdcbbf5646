"""Every causal-LM type of the installed transformers, end to end, on tiny random configs.

For each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (none is named here: new releases add
types), a tiny config is derived from the config class (:func:`prunegraph.data.tiny_configs.tiny_config`:
2 layers, hidden 64, 4 heads / 2 kv heads, 4 experts top-2) and run through the stages a user
meets:

1. **build**: the model builds and its forward returns logits;
2. **capture**: ``prunegraph.ir.capture`` (torch.export);
3. **analysis**: ``prunegraph.analyze`` finds groups (ops without a rule pin what they touch);
4. **sliced == gated**: a random plan over the prunable groups, the sliced model's logits equal
   the gated model's;
5. **reload**: ``save_pruned`` + ``from_pretrained`` give the sliced model's logits back.

Each type runs in its own subprocess with a timeout, so one hang or crash does not stop the
sweep. Results go to ``benchmarks/results/arch_sweep.json`` and the table to
``docs/arch-sweep.md``::

    nice -n 10 python benchmarks/arch_sweep.py                  # every type (long on 2 cores)
    python benchmarks/arch_sweep.py --types llama,mamba,bart    # a few
    python benchmarks/arch_sweep.py --one mamba                 # one, in this process, as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("built", "capture", "analysis", "sliced_equals_gated", "reload")
DOC_HEADING = "## Architecture sweep"


def _short(e: BaseException, limit: int = 300) -> str:
    text = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = text[0] if text else ""
    if first.endswith(":") and len(text) > 1:  # "validation error for ...:" says why next
        first += " " + text[1]
    return f"{type(e).__name__}: {first}"[:limit]


def _reason(r: dict) -> str:
    """A failure's reason for the table: a capture error up to its list of attempts."""
    return r.get("error", "").split(" Tried: ")[0].replace("|", "\\|").replace("\n", " ")


def _logits(model, ids):
    """The model's logits for ``ids`` without a KV cache (what capture traces too)."""
    import inspect

    import torch

    kwargs = {"input_ids": ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def _vocab(model) -> int:
    config = model.config
    for c in (config, getattr(config, "text_config", None)):
        if isinstance(getattr(c, "vocab_size", None), int):
            return int(c.vocab_size)
    emb = model.get_input_embeddings()
    return int(getattr(emb, "num_embeddings", None) or emb.weight.shape[0])


def _perturb(model, seed: int) -> None:
    """Add small noise to every weight: a router initialised to zero makes every expert tie,
    and top-k breaks ties arbitrarily, so gated and sliced models could pick different experts
    for reasons that have nothing to do with pruning."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)


def random_keep(groups, seed: int) -> dict:
    """Random kept units for every prunable group (experts keep at least their top-k)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        if not g.prunable:
            continue
        floor = max(g.constraints.min_units, 1)
        k = int(torch.randint(floor, g.size + 1, (), generator=gen))
        if k == g.size and g.size > floor:
            k -= 1  # remove something from every group
        if g.constraints.experts:
            keep[g.name] = torch.stack([torch.randperm(g.size, generator=gen)[:k]
                                        for _ in range(g.constraints.experts)])
        else:
            keep[g.name] = torch.randperm(g.size, generator=gen)[:k]
    return keep


@contextlib.contextmanager
def _quiet():
    """prunegraph's warnings (ops pinned by the fallback ...) off for one check, then back as
    they were: the CI subset runs in the test process."""
    logger = logging.getLogger("prunegraph")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def check(model_type: str, seed: int = 0, *, stages: tuple[str, ...] = STAGES) -> dict:
    """Run the stages on ``model_type``; the first failing stage records its error and stops."""
    with _quiet():
        return _check(model_type, seed, stages)


def _check(model_type: str, seed: int, stages: tuple[str, ...]) -> dict:
    import copy

    import torch

    from prunegraph.data.tiny_configs import tiny_model
    from prunegraph.ir.analysis import analyze
    from prunegraph.ir.capture import capture
    from prunegraph.plan import Plan
    from prunegraph.plan.checkpoint import from_pretrained, save_pruned
    from prunegraph.plan.gating import apply_gates

    torch.manual_seed(seed)
    result: dict = {"type": model_type, **{s: False for s in STAGES}, "seconds": {}}
    stage = "built"
    t = time.perf_counter()

    def done(name: str) -> None:
        nonlocal t
        result[name] = True
        result["seconds"][name] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()

    try:
        model = tiny_model(model_type, seed=seed)
        config = model.config
        _perturb(model, seed)
        result["class"] = type(model).__name__
        vocab = _vocab(model)
        rows = 2 * int(getattr(config, "num_codebooks", None) or 1)  # audio LMs: a row per codebook
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(min(3, vocab - 1), vocab, (rows, 7), generator=gen)
        dense = _logits(model, ids)
        result["params"] = sum(p.numel() for p in model.parameters())
        done("built")
        if "capture" not in stages:
            return result

        stage = "capture"
        graph = capture(model)
        result["capture_attempt"] = graph.meta.get("attempt")
        done("capture")

        stage = "analysis"
        analysis = analyze(model, graph=graph)
        groups = analysis.groups
        prunable = analysis.prunable()
        result["groups"] = len(groups)
        result["prunable_groups"] = len(prunable)
        result["kinds"] = sorted({g.kind for g in prunable})
        result["prunable_fraction"] = round(analysis.prunable_params() / max(1, analysis.total_params), 4)
        result["fallback_ops"] = sorted(analysis.propagation.fallback) if \
            getattr(analysis.propagation, "fallback", None) else []
        result["notes"] = list(getattr(analysis, "notes", []))[:5]
        done("analysis")
        if "sliced_equals_gated" not in stages:
            return result

        stage = "sliced_equals_gated"
        keep = random_keep(groups, seed)
        plan = Plan.from_keep(groups, keep, model=model)
        gated = copy.deepcopy(model)
        apply_gates(gated, list(groups), plan.gate_values())
        from_gated = _logits(gated, ids)
        sliced = copy.deepcopy(model)
        from prunegraph.plan.slicing import apply_plan

        stats = apply_plan(sliced, plan)
        from_sliced = _logits(sliced, ids)
        diff = float((from_sliced - from_gated).abs().max())
        scale = float(from_gated.abs().max()) or 1.0
        result["max_abs_diff"] = diff
        result["params_removed"] = stats["params_before"] - stats["params_after"]
        if not torch.allclose(from_sliced, from_gated, atol=1e-4 * max(1.0, scale), rtol=1e-4):
            raise AssertionError(f"sliced logits differ from gated ones by {diff:.3g} "
                                 f"(logits up to {scale:.3g})")
        if keep and not torch.equal(from_gated, dense):
            result["plan_changes_logits"] = True
        done("sliced_equals_gated")

        stage = "reload"
        with tempfile.TemporaryDirectory() as tmp:
            save_pruned(sliced, plan, Path(tmp) / "m")
            reloaded = from_pretrained(Path(tmp) / "m")
            again = _logits(reloaded, ids)
        if not torch.allclose(again, from_sliced, atol=1e-5 * max(1.0, scale), rtol=1e-5):
            raise AssertionError(f"reloaded logits differ from the sliced model's by "
                                 f"{float((again - from_sliced).abs().max()):.3g}")
        done("reload")
    except Exception as e:  # the sweep records every failure; it never stops on one
        result["stage_failed"] = stage
        result["error"] = _short(e)
        result["where"] = _where(e)
    return result


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        if "/prunegraph/" in f.filename or "/transformers/" in f.filename:
            return f"{f.filename.split('/site-packages/')[-1].split('/arch-sweep/')[-1]}:{f.lineno}"
    return ""


def _run_one(model_type: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model_type]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"type": model_type, **{s: False for s in STAGES}, "stage_failed": "timeout",
                "error": f"no result within {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            out["wall_s"] = round(time.perf_counter() - start, 1)
            return out
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"type": model_type, **{s: False for s in STAGES}, "stage_failed": "crash",
            "error": f"exit {proc.returncode}: {tail[:300]}"}


def summarise(results: list[dict]) -> dict:
    built = [r for r in results if r["built"]]
    counts = {s: sum(r[s] for r in results) for s in STAGES}
    passing = counts["reload"]
    return {"types": len(results), **counts,
            "pass_rate_of_built": round(passing / max(1, len(built)), 4),
            "sliced_differs": sorted(r["type"] for r in results if r.get("stage_failed") ==
                                     "sliced_equals_gated" and "differ" in r.get("error", "")),
            "with_prunable_groups": sum(1 for r in results if r.get("prunable_groups"))}


def markdown(results: list[dict], meta: dict) -> str:
    s = summarise(results)
    nice = re.match(r"nice -n (\d+) (.*)", meta["command"])
    command, at = (nice.group(2), f" at niceness {nice.group(1)}") if nice else (meta["command"], "")
    lines = [DOC_HEADING, "",
             f"Every causal-LM type of transformers {meta['transformers']} (torch {meta['torch']}) "
             f"on a tiny random config derived from its config class, {meta['machine']}, "
             f"{meta['minutes']:.0f} min{at}. Command:", "",
             "```sh", command, "```", "",
             "| types | built and ran | capture | analysis | sliced == gated | save + reload |",
             "|---|---|---|---|---|---|",
             f"| {s['types']} | {s['built']} | {s['capture']} | {s['analysis']} | "
             f"{s['sliced_equals_gated']} | {s['reload']} |", "",
             f"{s['reload']} of the {s['built']} types that build pass every stage "
             f"({100 * s['pass_rate_of_built']:.1f}%); {s['with_prunable_groups']} have prunable "
             f"groups. Sliced models that differ from the gated one: "
             f"{', '.join(s['sliced_differs']) or 'none'}.", ""]
    failing = [r for r in results if not r["reload"]]
    if failing:
        lines += ["Types that do not pass every stage:", "",
                  "| type | stage | reason |", "|---|---|---|"]
        for r in sorted(failing, key=lambda r: (STAGES.index(r["stage_failed"])
                                                if r.get("stage_failed") in STAGES else -1,
                                                r["type"])):
            lines.append(f"| {r['type']} | {r.get('stage_failed', '?')} | {_reason(r)} |")
        lines.append("")
    pinned = [r for r in results if r.get("fallback_ops")]
    if pinned:
        lines += ["Ops with no rule, pinned by the conservative fallback (the model stays correct, "
                  "those spaces are not pruned):", "",
                  "| type | prunable share of parameters | ops |", "|---|---|---|"]
        for r in sorted(pinned, key=lambda r: r["type"]):
            lines.append(f"| {r['type']} | {100 * r.get('prunable_fraction', 0):.0f}% | "
                         f"{', '.join(r['fallback_ops'])} |")
        lines.append("")
    return "\n".join(lines)


def _command_line() -> str:
    """How this run was started (niceness included), for the docs."""
    import shlex

    kept, skip = [], False
    for a in sys.argv[1:]:  # --out and --doc name paths of this machine
        if skip or a.startswith(("--out", "--doc")):
            skip = a in ("--out", "--doc")
            continue
        kept.append(shlex.quote(a))
    args = " ".join(kept)
    nice = os.nice(0)
    return (f"nice -n {nice} " if nice else "") + f"python benchmarks/arch_sweep.py {args}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--one", help="run one type in this process and print its JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per type")
    parser.add_argument("--jobs", type=int, default=1, help="types run at the same time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "arch_sweep.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "arch-sweep.md"))
    parser.add_argument("--no-doc", action="store_true", help="write the JSON only")
    parser.add_argument("--doc-from", metavar="JSON",
                        help="rewrite the docs section from a finished run's JSON (runs nothing)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the types already in OUT.partial.jsonl from an interrupted run")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check(args.one)), flush=True)
        return
    if args.doc_from:
        payload = json.loads(Path(args.doc_from).read_text())
        _write_doc(Path(args.doc), payload["results"], payload["meta"])
        return

    import torch
    import transformers

    from prunegraph.data.tiny_configs import causal_lm_types
    from prunegraph.pipeline.runfolder import atomic_write_text

    types = args.types.split(",") if args.types else causal_lm_types()
    start = time.perf_counter()
    results: list[dict] = []
    partial = Path(args.out + ".partial.jsonl")  # one line per type as it finishes
    done: dict[str, dict] = {}
    if args.resume and partial.exists():
        done = {r["type"]: r for r in map(json.loads, partial.read_text().splitlines())}
    elif partial.exists():
        partial.unlink()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        todo = [t for t in types if t not in done]
        for r in pool.map(lambda t: _run_one(t, args.timeout), todo):
            with partial.open("a") as f:
                f.write(json.dumps(r) + "\n")
            done[r["type"]] = r
            ok = "ok" if r["reload"] else f"{r.get('stage_failed')}: {r.get('error', '')[:150]}"
            print(f"{r['type']:28s} {ok}", flush=True)
    results = [done[t] for t in types if t in done]
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "minutes": (time.perf_counter() - start) / 60,
            "command": _command_line()}
    payload = {"meta": meta, "summary": summarise(results), "results": results}
    atomic_write_text(args.out, json.dumps(payload, indent=1))
    print(json.dumps(payload["summary"]))
    if not args.no_doc:
        _write_doc(Path(args.doc), results, meta)


def _write_doc(doc: Path, results: list[dict], meta: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _docs import replace_section

    from prunegraph.pipeline.runfolder import atomic_write_text

    if not doc.exists():
        atomic_write_text(doc, "# Architecture sweep\n\nWhat `benchmarks/arch_sweep.py` "
                               "measured (rewritten by each full run).\n")
    replace_section(doc, DOC_HEADING, markdown(results, meta))


if __name__ == "__main__":
    main()
