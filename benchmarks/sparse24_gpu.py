"""2:4 semi-structured linears on a GPU: dense cuBLAS vs cuSPARSELt / CUTLASS, at Llama-3-8B sizes.

Three measurements, each written to the JSON as soon as it is done (a run cut short keeps what it
measured):

1. **Linears** of Llama-3-8B's shapes (weight ``[out, in]``: q/o 4096x4096, gate/up 14336x4096,
   down 4096x14336, k/v 1024x4096), bf16, at prefill token counts (2048, 8192): ``F.linear`` on the
   2:4-masked dense weight (cuBLAS) against the same weight converted by
   :func:`prunegraph.targets.sparse24.to_semi_structured`'s call
   (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt, and CUTLASS forced) and cuSPARSELt
   called directly with the transposed result and its best algorithm
   (``torch._cslt_sparse_mm_search``). Timed with CUDA-graph replays
   (``triton.testing.do_bench_cudagraph``); each sparse output is compared with the dense one.
   Ideal: 2x fewer multiply-adds (and half the weight bytes).
2. **End to end**: a stack of decoder layers of a random Llama-3-8B config (bf16), pruned 2:4 by
   magnitude with ``SparsePrune``'s code and converted with ``to_semi_structured``; prefill
   forward time (``do_bench``) dense vs 2:4 and the output difference.
3. **LEAP memory**: the same stack with LEAP logits (bf16) on every linear, one training step
   (forward, backward, AdamW): peak allocated memory against weights and logits, bytes per logit.

::

    python benchmarks/sparse24_gpu.py --out $OUT/sparse24_h200.json          # on the GPU
    python benchmarks/sparse24_gpu.py --from-json F --markdown docs/benchmarks.md
    python benchmarks/sparse24_gpu.py --smoke --out /tmp/s.json               # CPU: the logic
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

SECTION = "## 2:4 semi-structured linears on GPU (Llama-3-8B sizes)"
SHAPES = {"q/o": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336), "k/v": (1024, 4096)}
TOKENS = (2048, 8192)
_START = time.perf_counter()


def _elapsed() -> float:
    return time.perf_counter() - _START


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _bench(fn, smoke: bool, graph: bool = True) -> float:
    """Median milliseconds of ``fn``: CUDA-graph replays when ``graph`` and ``fn`` can be
    captured, else plain calls."""
    if smoke:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    import triton.testing

    if graph:
        ms = _graph_ms(fn, smoke)
        if isinstance(ms, float):
            return ms
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def _graph_ms(fn, smoke: bool) -> float | str:
    """Median milliseconds of CUDA-graph replays of ``fn``, or why it could not be captured."""
    if smoke:
        return _bench(fn, smoke)
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
    except Exception as e:  # a kernel that refuses capture
        return f"{type(e).__name__}: {e}"[:300]


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    from prunegraph.passes.sparse_masks import keep_nm

    return weight * keep_nm(weight.abs().float(), 2, 4, 1).to(weight.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def linears(device: str, smoke: bool, data: dict, out: Path) -> None:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    shapes = {k: (max(64, n // 64), max(64, m // 64)) for k, (n, m) in SHAPES.items()} \
        if smoke else SHAPES
    tokens = (64,) if smoke else TOKENS
    rows = data.setdefault("linears", [])
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n_out, n_in) in shapes.items():
        W = _two_four(torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16,
                                  generator=gen) * 0.02)
        sparse = {}
        if not smoke:
            for backend in ("cusparselt", "cutlass"):
                try:
                    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                    sparse[backend] = to_sparse_semi_structured(W)
                except Exception as e:
                    sparse[backend] = f"{type(e).__name__}: {e}"[:200]
                finally:
                    SparseSemiStructuredTensor._FORCE_CUTLASS = False
            try:
                packed = torch._cslt_compress(W)
            except Exception as e:
                packed = f"{type(e).__name__}: {e}"[:200]
        for T in tokens:
            x = torch.randn(T, n_in, device=device, dtype=torch.bfloat16, generator=gen)
            ref = F.linear(x, W)
            row = {"shape": name, "out": n_out, "in": n_in, "tokens": T}
            row["dense_ms"] = _bench(lambda: F.linear(x, W), smoke)
            flops = 2 * T * n_out * n_in
            row["dense_tflops"] = flops / row["dense_ms"] / 1e9
            for backend, Ws in sparse.items():
                if isinstance(Ws, str):
                    row[f"{backend}_error"] = Ws
                    continue
                try:
                    row[f"{backend}_rel_err"] = _rel(F.linear(x, Ws), ref)
                    row[f"{backend}_ms"] = _bench(lambda Ws=Ws: F.linear(x, Ws), smoke)
                except Exception as e:
                    row[f"{backend}_error"] = f"{type(e).__name__}: {e}"[:200]
            if not smoke and not isinstance(packed, str):
                try:
                    xt = x.t()
                    alg = 0
                    try:
                        alg = int(torch._cslt_sparse_mm_search(packed, xt))
                    except Exception as e:
                        row["cslt_search_error"] = f"{type(e).__name__}: {e}"[:120]
                    y = torch._cslt_sparse_mm(packed, xt, transpose_result=True, alg_id=alg)
                    row["cslt_direct_rel_err"] = _rel(y, ref)
                    row["cslt_direct_alg"] = alg
                    row["cslt_direct_ms"] = _bench(
                        lambda: torch._cslt_sparse_mm(packed, xt, transpose_result=True,
                                                      alg_id=alg), smoke)
                except Exception as e:
                    row["cslt_direct_error"] = f"{type(e).__name__}: {e}"[:200]
            best = min((row[k] for k in row if k.endswith("_ms") and k != "dense_ms"),
                       default=None)
            if best:
                row["speedup_best"] = row["dense_ms"] / best
            rows.append(row)
            print(name, T, {k: (round(v, 3) if isinstance(v, float) else v)
                            for k, v in row.items() if k.endswith(("_ms", "_err", "best"))},
                  flush=True)
            _write(out, data)


def eager_linears(device: str, smoke: bool, data: dict, out: Path) -> None:
    """One converted linear run as a model's forward runs it (eager, no CUDA graph), with a 2-D
    input and the 3-D ``[1, T, in]`` a decoder layer passes, next to the graph replay: where
    does the end-to-end time go?"""
    from torch.sparse import to_sparse_semi_structured

    rows = data.setdefault("eager_linears", [])
    gen = torch.Generator(device=device).manual_seed(1)
    shapes = {k: SHAPES[k] for k in ("q/o", "gate/up")}
    if smoke:
        shapes = {k: (max(64, n // 64), max(64, m // 64)) for k, (n, m) in shapes.items()}
    for name, (n_out, n_in) in shapes.items():
        W = _two_four(torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16,
                                  generator=gen) * 0.02)
        Ws = W if smoke else to_sparse_semi_structured(W)
        for T in (64,) if smoke else TOKENS:
            x = torch.randn(T, n_in, device=device, dtype=torch.bfloat16, generator=gen)
            row: dict = {"shape": name, "tokens": T}
            for dim, xx in (("2d", x), ("3d", x.unsqueeze(0))):
                row[f"dense_{dim}_eager_ms"] = _bench(lambda xx=xx: F.linear(xx, W), smoke, False)
                row[f"sparse_{dim}_eager_ms"] = _bench(lambda xx=xx: F.linear(xx, Ws), smoke,
                                                       False)
                row[f"sparse_{dim}_graph_ms"] = _graph_ms(lambda xx=xx: F.linear(xx, Ws), smoke)
            rows.append(row)
            print("eager", row, flush=True)
            _write(out, data)


def _profile_top(fn, n: int = 12) -> list[dict]:
    """The ``n`` operators with the most GPU time over three calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()

    def gpu_us(e) -> float:
        return float(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0))

    events = sorted(prof.key_averages(), key=gpu_us, reverse=True)[:n]
    return [{"op": e.key[:90], "calls": e.count // 3, "gpu_ms": gpu_us(e) / 3e3,
             "cpu_ms": e.cpu_time_total / 3e3} for e in events]


def _stack(device: str, layers: int, smoke: bool):
    from transformers import LlamaConfig, LlamaModel

    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=448,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128, rope_theta=500000.0, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(cfg).to(torch.bfloat16).eval()
    return model, cfg


def end_to_end(device: str, smoke: bool, layers: int, data: dict, out: Path) -> None:
    """The converted stack against the dense one: eager forwards (what ``model(ids)`` costs
    as written) and CUDA-graph replays of the same forwards; on the GPU, the operators with the
    most GPU time in one eager converted forward (where the eager time goes)."""
    from prunegraph.passes.sparse_prune import oneshot_masks
    from prunegraph.targets.sparse24 import to_semi_structured

    model, cfg = _stack(device, layers, smoke)
    masks, _ = oneshot_masks(model, "magnitude", 0.5, "2:4")
    res = {"layers": layers, "masked_params": masks.numel(), "runs": []}
    data["end_to_end"] = res
    tokens = (64,) if smoke else TOKENS
    inputs = {T: torch.randint(0, cfg.vocab_size, (1, T), device=device) for T in tokens}
    dense = {}

    def fwd(ids):
        return model(ids, use_cache=False)

    with torch.no_grad():
        for T, ids in inputs.items():
            dense[T] = (fwd(ids).last_hidden_state, _bench(lambda ids=ids: fwd(ids), smoke,
                                                           graph=False),
                        _graph_ms(lambda ids=ids: fwd(ids), smoke))
        if smoke:
            res["converted"] = "skipped on CPU"
            return
        report = to_semi_structured(model)
        res["converted"] = len(report["converted"])
        res["backend"] = report["backend"]
        for T, ids in inputs.items():
            y = fwd(ids).last_hidden_state
            ms = _bench(lambda ids=ids: fwd(ids), smoke, graph=False)
            graph = _graph_ms(lambda ids=ids: fwd(ids), smoke)
            run = {"tokens": T, "dense_ms": dense[T][1], "sparse_ms": ms,
                   "speedup": dense[T][1] / ms, "rel_err": _rel(y, dense[T][0]),
                   "dense_graph_ms": dense[T][2], "sparse_graph_ms": graph}
            if isinstance(graph, float) and isinstance(dense[T][2], float):
                run["graph_speedup"] = dense[T][2] / graph
            res["runs"].append(run)
            print("e2e", run, flush=True)
            _write(out, data)
        T0 = min(inputs)
        res["profile_tokens"] = T0
        res["profile"] = _profile_top(lambda: fwd(inputs[T0]))
        _write(out, data)


def leap_memory(device: str, smoke: bool, layers: int, tokens: int, checkpointing: bool,
                data: dict, out: Path) -> None:
    from prunegraph.passes.gates.leap import LeapGates, MaskSpec

    model, cfg = _stack(device, layers, smoke)
    fam = LeapGates([], 0.5, model, {"init": "magnitude", "checkpointing": checkpointing})
    fam.initialise(model)
    fam.to(device).train()
    gates = fam.install(model)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(fam.param_groups())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    logits = sum(p.numel() for p in fam.logits.values())
    ids = torch.randint(0, cfg.vocab_size, (1, 64 if smoke else tokens), device=device)
    times = []
    for step in range(3):
        t = time.perf_counter()
        gates.set(MaskSpec(25.0, 4.0, 0), step)
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            h = model(ids).last_hidden_state
        loss = h.float().pow(2).mean() + fam.penalty_terms(gates.records, step, 10)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    held = torch.cuda.memory_allocated() if device == "cuda" else 0   # + AdamW moments
    row = {"layers": layers, "tokens": int(ids.numel()), "checkpointing": checkpointing,
           "weights_gb": weights / 2 ** 30, "logits": logits,
           "logit_bytes": fam.logits_dtype.itemsize, "peak_gb": peak / 2 ** 30,
           "peak_bytes_per_logit_over_weights": (peak - weights) / logits,
           "held_bytes_per_logit_over_weights": (held - weights) / logits,
           "step_ms": times[1:]}
    data.setdefault("leap_memory", []).append(row)
    print("leap", row, flush=True)
    _write(out, data)
    gates.remove()
    del model, fam, opt, gates
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="sparse24_gpu.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, no kernels")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--full-layers", type=int, default=32,
                   help="decoder layers of the full-size LEAP memory run (Llama-3-8B: 32)")
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    p.add_argument("--budget", type=float, default=75.0,
                   help="seconds after which optional sections are skipped")
    p.add_argument("--from-json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        if args.markdown:
            from _docs import replace_section

            replace_section(Path(args.markdown), SECTION, markdown(data))
        return
    device = "cpu" if args.smoke else "cuda"
    out = Path(args.out)
    data = {"torch": torch.__version__, "command": " ".join(sys.argv[1:])}
    if device == "cuda":
        data["device"] = torch.cuda.get_device_name()
        data["cusparselt"] = bool(getattr(torch.backends, "cusparselt", None)
                                  and torch.backends.cusparselt.is_available())
    sections = [("linears", lambda: linears(device, args.smoke, data, out)),
                ("eager_linears", lambda: eager_linears(device, args.smoke, data, out)),
                ("end_to_end", lambda: end_to_end(device, args.smoke, args.layers, data, out)),
                ("leap_memory_full", lambda: leap_memory(device, args.smoke, args.full_layers,
                                                         2048, False, data, out)),
                ("leap_memory", lambda: leap_memory(device, args.smoke, 2, 2048, False, data,
                                                    out)),
                ("leap_memory_ckpt", lambda: leap_memory(device, args.smoke, 2, 2048, True, data,
                                                         out))]
    only = {x for x in args.only.split(",") if x}
    for name, run in sections:
        if only and name not in only:
            continue
        if name != "linears" and _elapsed() > args.budget:
            data.setdefault("skipped", []).append(name)
            continue
        t = time.perf_counter()
        try:
            run()
            if device == "cuda":
                torch.cuda.empty_cache()  # the section's model is gone
        except Exception as e:
            data.setdefault("errors", {})[name] = traceback.format_exc()[-1500:]
            print(name, "failed:", e, flush=True)
        data.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        _write(out, data)
    print("done in", round(_elapsed(), 1), "s", flush=True)


def _layer_linears(rows: list[dict]) -> dict[int, tuple[float, float, float]]:
    """Per token count: (dense, converted F.linear, best sparse) ms of one layer's linears."""
    count = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
    out = {}
    for T in sorted({r["tokens"] for r in rows}):
        sel = [r for r in rows if r["tokens"] == T]
        if {r["shape"] for r in sel} != set(count) or any("cusparselt_ms" not in r for r in sel):
            continue
        dense = sum(count[r["shape"]] * r["dense_ms"] for r in sel)
        conv = sum(count[r["shape"]] * r["cusparselt_ms"] for r in sel)
        best = sum(count[r["shape"]] * min(r[k] for k in r if k.endswith("_ms")
                                           and k != "dense_ms") for r in sel)
        out[T] = (dense, conv, best)
    return out


def markdown(data: dict) -> str:
    lines = [SECTION, "",
             "`benchmarks/sparse24_gpu.py` on one "
             f"{data.get('device', 'GPU')} (torch {data['torch']}, cuSPARSELt "
             f"{'available' if data.get('cusparselt') else 'absent'}). Weights are 2:4-masked "
             "bf16 `[out, in]`, inputs `[tokens, in]`; times are medians of CUDA-graph replays "
             "(ms). `sparse` is `F.linear` on `torch.sparse.to_sparse_semi_structured(W)` "
             "(what `prunegraph.targets.sparse24.to_semi_structured` installs), `cutlass` the "
             "same with CUTLASS forced, `cslt*` cuSPARSELt called directly with a transposed "
             "result and the algorithm its search picks. Ideal: 2x (half the multiply-adds). "
             "rel err = max |sparse - dense| / max |dense|.", "",
             "```", *[f"python benchmarks/sparse24_gpu.py {c}"
                      for c in data.get("commands", ["--out $OUT/sparse24_h200.json"])],
             "```", "",
             "| weight | tokens | dense ms | dense TFLOP/s | sparse ms | cutlass ms | cslt* ms "
             "| best speedup | rel err (sparse) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(r, k, fmt="{:.3f}"):
        return fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "err" \
            if f"{k.rsplit('_', 1)[0]}_error" in r else ""

    for r in data.get("linears", []):
        lines.append(f"| {r['shape']} {r['out']}x{r['in']} | {r['tokens']} | {f(r, 'dense_ms')} | "
                     f"{f(r, 'dense_tflops', '{:.0f}')} | {f(r, 'cusparselt_ms')} | "
                     f"{f(r, 'cutlass_ms')} | {f(r, 'cslt_direct_ms')} | "
                     f"{f(r, 'speedup_best', '{:.2f}x')} | {f(r, 'cusparselt_rel_err', '{:.1e}')} |")
    per_layer = _layer_linears(data.get("linears", []))
    if per_layer:
        lines += ["", "One Llama-3-8B layer's seven linears together (q, o, k, v, gate, up, down; "
                      "sums of the rows above): " + "; ".join(
                          f"{T} tokens: dense {d:.3f} ms, `F.linear` on the converted weights "
                          f"{s_:.3f} ms ({d / s_:.2f}x), best sparse call per shape {b:.3f} ms "
                          f"({d / b:.2f}x)" for T, (d, s_, b) in per_layer.items()) + "."]
    cut = next((r["cutlass_error"] for r in data.get("linears", []) if "cutlass_error" in r), None)
    if cut:
        lines += ["", f"CUTLASS: `{cut}` (torch's CUTLASS 2:4 kernels are sm8x only)."]
    eager = data.get("eager_linears")
    if eager:
        lines += ["", "One converted linear as a model's forward runs it: eager calls timed "
                      "with `do_bench` (no CUDA graph), a 2-D `[T, in]` input and the 3-D "
                      "`[1, T, in]` a decoder layer passes, next to the graph replay:", "",
                  "| weight | tokens | dense eager 2-D | sparse eager 2-D | sparse graph 2-D | "
                  "dense eager 3-D | sparse eager 3-D | sparse graph 3-D |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in eager:
            cells = [r.get(f"{w}_{d}_{m}_ms") for d in ("2d", "3d")
                     for w, m in (("dense", "eager"), ("sparse", "eager"), ("sparse", "graph"))]
            lines.append(f"| {r['shape']} | {r['tokens']} | " + " | ".join(
                f"{c:.3f}" if isinstance(c, float) else "no graph" for c in cells) + " |")
    e2e = data.get("end_to_end")
    if e2e and e2e.get("runs"):
        lines += ["", f"End to end: {e2e['layers']} decoder layers of a random Llama-3-8B config "
                      f"(bf16, batch 1, prefill; eager forwards timed with `do_bench`, and the "
                      f"same forwards captured in a CUDA graph; {e2e['converted']} linears "
                      f"converted, backend {e2e.get('backend')}):", "",
                  "| tokens | dense eager ms | 2:4 eager ms | eager speedup | dense graph ms | "
                  "2:4 graph ms | graph speedup | rel err |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in e2e["runs"]:
            dg, sg = r.get("dense_graph_ms"), r.get("sparse_graph_ms")
            gs = r.get("graph_speedup")
            lines.append(f"| {r['tokens']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | "
                         f"{r['speedup']:.2f}x | "
                         f"{f'{dg:.2f}' if isinstance(dg, float) else 'no graph'} | "
                         f"{f'{sg:.2f}' if isinstance(sg, float) else 'no graph'} | "
                         f"{f'{gs:.2f}x' if gs else ''} | {r['rel_err']:.1e} |")
        errs = {r.get("sparse_graph_ms") for r in e2e["runs"]
                if isinstance(r.get("sparse_graph_ms"), str)}
        if errs:
            lines += ["", "Graph capture of the converted forward failed: `"
                      + next(iter(errs)) + "`."]
        for h in data.get("end_to_end_history", []):
            runs = "; ".join(
                f"{r['tokens']} tokens: eager {r['sparse_ms']:.2f} ms ({r['speedup']:.2f}x)"
                + (f", graph {r['sparse_graph_ms']:.2f} ms ({r['graph_speedup']:.2f}x)"
                   if r.get("graph_speedup") else "") for r in h["runs"])
            top = ", ".join(f"`{r['op'][:40]}` {r['gpu_ms']:.2f} ms"
                            for r in h.get("profile", [])[:2])
            lines += ["", f"Earlier state of the target, {h['label']}: {runs}"
                      + (f" (most GPU time: {top})" if top else "") + "."]
        if e2e.get("profile"):
            lines += ["", f"Operators with the most GPU time in one eager converted forward "
                          f"({e2e['profile_tokens']} tokens, mean of three):", "",
                      "| operator | calls | GPU ms | CPU ms |", "|---|---:|---:|---:|"]
            for r in e2e["profile"]:
                lines.append(f"| `{r['op']}` | {r['calls']} | {r['gpu_ms']:.3f} | "
                             f"{r['cpu_ms']:.3f} |")
    mem = data.get("leap_memory")
    if mem:
        lines += ["", "LEAP mask training memory (same stack, bf16 logits on every linear, one "
                      "AdamW step at the given tokens, bf16 autocast):", "",
                  "| layers | tokens | checkpointing | weights GB | logits | peak GB | "
                  "(peak - weights) / logit | (held after the step - weights) / logit | step ms |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['layers']} | {r['tokens']} | {r['checkpointing']} | "
                         f"{r['weights_gb']:.2f} | {r['logits']:,} | {r['peak_gb']:.2f} | "
                         f"{r['peak_bytes_per_logit_over_weights']:.1f} B | "
                         f"{r.get('held_bytes_per_logit_over_weights', float('nan')):.1f} B | "
                         f"{', '.join(f'{t:.0f}' for t in r['step_ms'])} |")
    if data.get("errors"):
        lines += ["", "Sections that failed: " + ", ".join(data["errors"]) + "."]
    if data.get("skipped"):
        lines += ["", "Skipped for time: " + ", ".join(data["skipped"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
