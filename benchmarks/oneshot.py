"""One-shot structured pruning of SmolLM2-135M: quality and CPU speed, dense vs pruned, one run.

For each criterion (magnitude, wanda, taylor) and each budget (fraction of decoder parameters
removed), prune with the same code as the ``Prune`` pass, slice, and measure:

* held-out perplexity (evaluation articles of the built-in Wikipedia excerpt, 512-token blocks);
* zero-shot accuracy on two BIG-bench tasks (lm-eval's acc / acc_norm);
* parameter count;
* CPU latency of a 512-token prefill (batch 1) and greedy decode throughput (KV cache),
  measured interleaved with the dense model in the same process, reported as ratios.

The model is loaded and analysed once; scores are computed once per criterion and reused for both
budgets. Results go to JSON and a markdown table printed for ``docs/benchmarks.md``::

    python benchmarks/oneshot.py --out benchmarks/results/oneshot.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from prunegraph.data.blocks import text_blocks
from prunegraph.data.models import load_model
from prunegraph.data.tasks import load_task
from prunegraph.ir.analysis import analyze
from prunegraph.passes.allocate import allocate
from prunegraph.passes.evaluation.evaluate import count_params
from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity
from prunegraph.passes.importance import score_groups
from prunegraph.pipeline.runfolder import atomic_write_text
from prunegraph.plan.plan import Plan
from prunegraph.plan.slicing import apply_plan


def prefill_seconds(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=0)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - prompt.shape[1]) / elapsed


def speed(models: dict[str, torch.nn.Module], reps: int, prefill_len: int, new_tokens: int) -> dict:
    """Median prefill latency and decode throughput, models interleaved rep by rep."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, prefill_len), generator=gen)
    prompt = ids[:, :32]
    times = {k: {"prefill": [], "decode": []} for k in models}
    for m in models.values():  # warm-up
        prefill_seconds(m, ids)
        decode_tokens_per_s(m, prompt, 8)
    for _ in range(reps):
        for name, m in models.items():
            times[name]["prefill"].append(prefill_seconds(m, ids))
            times[name]["decode"].append(decode_tokens_per_s(m, prompt, new_tokens))
    return {k: {"prefill_s": statistics.median(v["prefill"]),
                "decode_tok_s": statistics.median(v["decode"])} for k, v in times.items()}


def quality(model, tokenizer, blocks, tasks, limit) -> dict:
    out = {"params": count_params(model), "ppl": perplexity(model, blocks, 4, progress=False)}
    for name, task in tasks.items():
        r = multiple_choice(model, tokenizer, task, limit=limit, batch_size=16, progress=False)
        out[name] = {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/oneshot.json")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--criteria", default="magnitude,wanda,taylor")
    parser.add_argument("--sparsities", default="0.2,0.5")
    parser.add_argument("--tasks", default="winowhy,goal_inference")
    parser.add_argument("--limit", type=int, default=200, help="examples per task")
    parser.add_argument("--ppl-blocks", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_model(args.model)
    groups = analyze(model).groups
    blocks = text_blocks(tokenizer, "wikipedia", "evaluation", args.seq_len, args.ppl_blocks)
    calib = text_blocks(tokenizer, "wikipedia", "calibration", 128, args.calib_blocks)
    tasks = {t: load_task(t) for t in args.tasks.split(",")}

    rows = [{"name": "dense", "criterion": None, "sparsity": 0.0,
             **quality(model, tokenizer, blocks, tasks, args.limit)}]
    print(json.dumps(rows[-1]), flush=True)
    pruned: dict[str, torch.nn.Module] = {}
    for criterion in args.criteria.split(","):
        t0 = time.perf_counter()
        scores = score_groups(model, groups, criterion, blocks=None if criterion == "magnitude" else calib,
                              batch_size=4, progress=False)
        score_s = time.perf_counter() - t0
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            keep = allocate(groups, scores, sparsity, model=model, scope="decoder", strategy="global")
            plan = Plan.from_keep(groups, keep, model=model, scores=scores)
            small = copy.deepcopy(model)
            apply_plan(small, plan)
            name = f"{criterion}@{sparsity:.0%}"
            row = {"name": name, "criterion": criterion, "sparsity": sparsity,
                   "removed_fraction_of_decoder": keep.stats["sparsity"], "score_s": round(score_s, 1),
                   **quality(small, tokenizer, blocks, tasks, args.limit)}
            rows.append(row)
            pruned[name] = small
            print(json.dumps(row), flush=True)

    # Speed: every pruned model against the dense one, interleaved, in this process.
    timing = speed({"dense": model, **pruned}, args.reps, args.seq_len, args.new_tokens)
    dense_t = timing["dense"]
    for row in rows:
        t = timing[row["name"]]
        row.update(prefill_s=round(t["prefill_s"], 4), decode_tok_s=round(t["decode_tok_s"], 2),
                   prefill_speedup=round(dense_t["prefill_s"] / t["prefill_s"], 3),
                   decode_speedup=round(t["decode_tok_s"] / dense_t["decode_tok_s"], 3))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": f"{platform.machine()} cpus={torch.get_num_threads()} threads",
            "torch": torch.__version__, "args": vars(args),
            "command": "python benchmarks/oneshot.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
            "rows": rows}
    atomic_write_text(out, json.dumps(data, indent=1))
    names = list(tasks)
    print(f"| model | params | ppl | {' | '.join(f'{t} acc / acc_norm' for t in names)} | "
          "prefill 512 (s) | speed-up | decode tok/s | speed-up |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|---|---|")
    for r in rows:
        accs = " | ".join(f"{r[t]['acc']:.3f} / {r[t]['acc_norm']:.3f}" for t in names)
        print(f"| {r['name']} | {r['params']:,} | {r['ppl']:.2f} | {accs} | {r['prefill_s']:.3f} | "
              f"{r['prefill_speedup']:.2f}x | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
