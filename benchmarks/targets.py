"""Targets on CPU: dense and 20%-pruned SmolLM2-135M under PyTorch eager, fused, and onnxruntime.

For each model, in one run: prefill latency on one 512-token sequence of real text (batch 1,
``use_cache=False``), greedy decode tokens/s (``generate`` with the KV cache, 64 new tokens after
a 16-token prompt, prompt prefill included), each the median of ``--reps`` repetitions after one
warm-up; and output agreement with eager on the prefill input (max |logit difference|, argmax
agreement; for fused also whether the greedy tokens are identical). onnxruntime runs the exported
logits graph (no past key/values), so its decode is not measured.

    python benchmarks/targets.py --out benchmarks/results/targets.json --docs docs/benchmarks.md
    python benchmarks/targets.py --run runs/oneshot   # reuse the pruned model a run saved

The pruned model is ``Pipeline([Load('smollm2-135m'), Analyze(), Prune(criterion='wanda',
sparsity=0.2), Slice()])`` unless ``--run`` names a run folder with ``model/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _docs import replace_section

from prunegraph.pipeline.runfolder import atomic_write_text

MODEL = "smollm2-135m"
SECTION = "## Targets on CPU: eager, fused, onnxruntime (SmolLM2-135M)"


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _inputs(tokenizer, length: int) -> torch.Tensor:
    from prunegraph.data.text import load_documents, token_blocks

    return token_blocks(tokenizer, load_documents("wikipedia"), block_len=length, n_blocks=1)


def _models(run: str | None):
    """(dense, pruned, tokenizer, graph of the dense model or None, pruning info)."""
    from prunegraph.data.models import load_model

    dense, tokenizer = load_model(MODEL)
    if run:
        from prunegraph.targets.onnx import load_run_or_model

        pruned, _ = load_run_or_model(run)
        return dense, pruned, tokenizer, None, {"source": run}
    from prunegraph.passes.analyze import Analyze
    from prunegraph.passes.prune import Prune
    from prunegraph.passes.slice import Slice
    from prunegraph.pipeline.load import Load
    from prunegraph.pipeline.pipeline import Pipeline

    t = time.perf_counter()
    state = Pipeline([Load(MODEL), Analyze(), Prune(criterion="wanda", sparsity=0.2),
                      Slice()], initial=()).run(progress=False)
    info = {"source": "Pipeline([Load('smollm2-135m'), Analyze(), Prune(criterion='wanda', "
                      "sparsity=0.2), Slice()])", "seconds": round(time.perf_counter() - t, 1)}
    return dense, state.model, tokenizer, state.graph, info


@torch.no_grad()
def _measure_torch(model, ids, prompt, new_tokens: int, reps: int) -> dict:
    mask = torch.ones_like(ids)
    prefill, prefill_all = _median_time(
        lambda: model(input_ids=ids, attention_mask=mask, use_cache=False), reps)

    def decode():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    dec, dec_all = _median_time(decode, reps)
    return {"prefill_ms": 1000 * prefill, "prefill_ms_all": [1000 * t for t in prefill_all],
            "decode_tok_s": new_tokens / dec, "decode_s_all": dec_all,
            "logits": model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
            "tokens": decode()}


def _agreement(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"max_abs_logit_diff": float((logits.float() - ref.float()).abs().max()),
            "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}


def bench_model(label: str, model, graph, ids, prompt, args, workdir: Path) -> dict:
    import onnxruntime as ort

    from prunegraph.passes.fuse import fuse
    from prunegraph.targets.onnx import export_onnx, run_onnx

    params = sum(p.numel() for p in model.parameters())
    out: dict = {"params": params}
    print(f"[{label}] eager", flush=True)
    eager = _measure_torch(model, ids, prompt, args.new_tokens, args.reps)
    ref, ref_tokens = eager.pop("logits"), eager.pop("tokens")
    out["eager"] = eager

    print(f"[{label}] fused", flush=True)
    fused_model = copy.deepcopy(model)
    t = time.perf_counter()
    report = fuse(fused_model, graph)
    fuse_s = time.perf_counter() - t
    fused = _measure_torch(fused_model, ids, prompt, args.new_tokens, args.reps)
    logits, tokens = fused.pop("logits"), fused.pop("tokens")
    fused.update(_agreement(logits, ref), sets_fused=len(report["fused"]),
                 fuse_seconds=round(fuse_s, 1),
                 greedy_tokens_identical=bool(torch.equal(tokens, ref_tokens)))
    out["fused"] = fused
    del fused_model

    print(f"[{label}] onnx export", flush=True)
    path = workdir / f"{label}.onnx"
    export = export_onnx(model, path, overwrite=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prefill, prefill_all = _median_time(lambda: run_onnx(path, feed, session), args.reps)
    out["onnxruntime"] = {
        "prefill_ms": 1000 * prefill, "prefill_ms_all": [1000 * t for t in prefill_all],
        "decode_tok_s": None, "decode_note": "not measured: the export has no past-key/value "
                                             "decode graph",
        **_agreement(run_onnx(path, feed, session), ref),
        "export_seconds": export["export_seconds"], "export_check": {
            k: export[k] for k in ("check_shape", "max_abs_diff", "tolerance")},
        "file_mb": round(export["bytes"] / 2**20, 1)}
    return out


def _markdown(result: dict) -> str:
    rows = [f"| model | params | target | prefill {result['prefill_len']} tok (ms) | decode (tok/s) | "
            "max abs logit diff vs eager | argmax agreement |",
            "|---|---|---|---|---|---|---|"]
    for label, m in result["models"].items():
        for target in ("eager", "fused", "onnxruntime"):
            r = m[target]
            dec = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "not measured"
            diff = f"{r['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in r else "(reference)"
            agree = f"{100 * r['argmax_agreement']:.2f}%" if "argmax_agreement" in r else "-"
            rows.append(f"| {label} | {m['params'] / 1e6:.1f}M | {target} | {r['prefill_ms']:.0f} "
                        f"| {dec} | {diff} | {agree} |")
    env = result["environment"]
    return "\n".join([
        SECTION, "",
        "```",
        result.get("command", "python benchmarks/targets.py --out benchmarks/results/targets.json "
                              "--docs docs/benchmarks.md"),
        "```", "",
        f"CPU, {env['torch_threads']} torch/onnxruntime threads, float32, median of "
        f"{result['reps']} repetitions after a warm-up; torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}. **Timings were taken on a shared machine** ({env['cpus']} cores "
        f"used by several people at once; 1-minute load average {env['load_average_start'][0]:.1f}"
        f" at the start, {env['load_average_end'][0]:.1f} at the end), so treat them as rough; "
        "the agreement columns do not depend on load.", "",
        f"Pruned model: {result['pruning']['source']}. Prefill: one {result['prefill_len']}-token "
        f"sequence, batch 1, no cache. Decode: greedy `generate` with the KV cache, "
        f"{result['new_tokens']} new tokens after a {result['prompt_len']}-token prompt "
        "(prompt prefill included). onnxruntime runs the exported logits graph (no past "
        "key/values), so its decode is not measured. Agreement is on the prefill logits; the "
        "fused model's greedy tokens are identical to eager's: "
        + ", ".join(f"{k} {'yes' if m['fused']['greedy_tokens_identical'] else 'no'}"
                    for k, m in result["models"].items()) + ".", "",
        *rows, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run folder (with model/) holding the pruned model")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default torch's)")
    p.add_argument("--out", default="benchmarks/results/targets.json")
    p.add_argument("--docs", default=None, help="append/replace the section in this markdown file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime
    import transformers

    dense, pruned, tokenizer, graph, info = _models(args.run)
    ids = _inputs(tokenizer, args.prefill_len)
    prompt = ids[:, : args.prompt_len]
    command = " ".join(["python benchmarks/targets.py", *sys.argv[1:]])
    result = {"command": command, "model": MODEL, "reps": args.reps, "prefill_len": args.prefill_len,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "pruning": info,
              "environment": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                              "transformers": transformers.__version__,
                              "torch_threads": torch.get_num_threads(),
                              "cpu": platform.processor() or platform.machine(),
                              "cpus": os.cpu_count(), "shared_machine": True,
                              "load_average_start": os.getloadavg()},
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # the pruned model's structure is the dense one's: one captured graph serves both
        for label, model in (("dense", dense), ("pruned-20%", pruned)):
            result["models"][label] = bench_model(label, model, graph, ids, prompt, args,
                                                  Path(tmp))
    result["environment"]["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    section = _markdown(result)
    print(section)
    if args.docs:
        replace_section(Path(args.docs), SECTION, section)


if __name__ == "__main__":
    main()
