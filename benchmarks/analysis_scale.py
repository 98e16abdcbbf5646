"""Capture + analysis time and peak memory, from a real 135M model to 30B-class meta configs.

Each model runs in its own subprocess so peak memory (ru_maxrss) is its own. Capture is the
``torch.export`` trace itself, the baseline in the same run; analysis is what prunegraph adds
on top of it (dimension propagation over every node, then grouping).

    python benchmarks/analysis_scale.py --out benchmarks/results/analysis_scale.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from prunegraph.pipeline.runfolder import atomic_write_text

MODELS = ["smollm2-135m", "meta:llama-3-8b", "meta:qwen3-32b", "meta:qwen3-30b-a3b"]
TARGETS = {"smollm2-135m": 10.0, "meta:llama-3-8b": 30.0, "meta:qwen3-32b": 30.0, "meta:qwen3-30b-a3b": 30.0}


def measure(spec: str) -> dict:
    import torch

    from prunegraph.data.models import load_model
    from prunegraph.ir.analysis import analyze
    from prunegraph.ir.analysis.report import summary

    t0 = time.perf_counter()
    model, _ = load_model(spec, tokenizer=False)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    analysis = analyze(model)
    end_to_end = time.perf_counter() - t1
    info = summary(analysis)
    return {
        "model": spec,
        "params": info["total_params"],
        "prunable_params": info["prunable_params"],
        "groups": info["groups"],
        "load_s": round(load_s, 2),
        "capture_s": analysis.seconds["capture"],
        "analysis_s": analysis.seconds["analysis"],
        "capture_plus_analysis_s": round(end_to_end, 2),
        "target_s": TARGETS.get(spec),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/analysis_scale.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    rows = []
    for spec in args.models.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"model": spec, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": f"{platform.machine()} {platform.processor()} cpus={__import__('os').cpu_count()}",
            "command": "python benchmarks/analysis_scale.py", "rows": rows}
    atomic_write_text(out, json.dumps(data, indent=1))
    print("| model | params | groups | capture s | analysis s | total s (target) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error']} |")
            continue
        groups = ", ".join(f"{n} {k}" for k, n in sorted(r["groups"].items()))
        print(f"| {r['model']} | {r['params']:,} | {groups} | {r['capture_s']} | {r['analysis_s']} | "
              f"{r['capture_plus_analysis_s']} (< {r['target_s']}) | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
