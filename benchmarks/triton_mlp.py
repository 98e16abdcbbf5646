"""The Triton SwiGLU MLP against PyTorch eager (cuBLAS) at LLM sizes, on a Hopper GPU.

Default run: for each MLP shape (H = 4096 and 5120; dense widths, pruned widths that are a multiple
of 64 and odd ones) the per-shape choice exactly as ``prunegraph export triton`` makes it on the GPU
(:func:`prunegraph.targets.triton.choose.timed_plan`: each token bucket's representative count
timed with both paths as CUDA-graph replays, Triton's output checked against PyTorch's), so the
table is what an exported module runs. Reported per point: Triton, PyTorch eager, the chosen
path's time and its speed-up over eager (the target: >= 1.00 everywhere), and, at one token,
Triton's time over the bandwidth limit (weight bytes / measured memory bandwidth; target <= 1.2 at
H = 4096).

``--sweep``: time each kernel of the Triton path alone over candidate tile configs (one-token
GEMV, and the GEMM kernels at 16, 128 and 2048 tokens) on an aligned and an odd width, to choose
the table in :func:`prunegraph.targets.triton.swiglu.choose_configs`. Kernels are compiled first
in ``--jobs`` worker processes (Triton's on-disk cache is shared), then timed one at a time.

    python benchmarks/triton_mlp.py --out benchmarks/results/triton_mlp_h200.json \\
        --markdown docs/benchmarks.md
    python benchmarks/triton_mlp.py --sweep --out benchmarks/results/triton_mlp_sweep_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict

import torch
from _docs import replace_section

from prunegraph.pipeline.runfolder import atomic_write_text

SECTION = "## Triton SwiGLU MLP vs cuBLAS at LLM sizes (Hopper)"

#: (H, I, label): Llama-3-8B (H=4096, I=14336) and a 13B/14B-class MLP (H=5120, I=13824), each
#: dense, pruned by about 20% to a multiple of 64 and to an odd width, and by about 50%.
SHAPES = [(4096, 14336, "dense"), (4096, 11456, "20% x64"), (4096, 11465, "20% odd"),
          (4096, 7168, "50% x64"), (4096, 7177, "50% odd"),
          (5120, 13824, "dense"), (5120, 11072, "20% x64"), (5120, 11059, "20% odd"),
          (5120, 6912, "50% x64"), (5120, 6917, "50% odd")]


#: Where tensors go: "cuda", or "cpu" for a check of this script under TRITON_INTERPRET=1.
DEVICE = "cuda"


def _weights(H: int, I: int, dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    wg = (torch.randn(I, H, device=DEVICE, generator=g) / H**0.5).to(dtype)
    wu = (torch.randn(I, H, device=DEVICE, generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(H, I, device=DEVICE, generator=g) / I**0.5).to(dtype)
    return wg, wu, wd


def _time_us(fn, rep: int = 20) -> float:
    """Median microseconds of CUDA-graph replays over about ``rep`` ms (one wall-clock call on
    the CPU check)."""
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


# --------------------------------------------------------------------------------------------
# Default run: the export-time choice
# --------------------------------------------------------------------------------------------


def bench_choice(shapes, dtype, bandwidth: float, table=None) -> list[dict]:
    from prunegraph.targets.triton.choose import timed_plan
    from prunegraph.targets.triton.codegen import MLPShape

    rows = []
    for H, I, label in shapes:
        shape = MLPShape(f"h{H}_i{I}", H, I, dtype)
        try:
            wg, wu, wd = _weights(H, I, dtype)
            t0 = time.perf_counter()
            configs = None
            if table is not None:
                from prunegraph.targets.triton.swiglu import TileConfig, fit_config

                configs = tuple(fit_config(TileConfig(**c), H, I) for c in table)
            plan = timed_plan(shape, wg, wu, wd, timer=lambda p, s, t, fn: _time_us(fn),
                              device_name=_device_name(), capability=(9, 0), configs=configs)
            seconds = time.perf_counter() - t0
        except Exception as e:  # keep the other shapes
            traceback.print_exc()
            rows.append(dict(H=H, I=I, label=label, error=f"{type(e).__name__}: {e}"[:300]))
            continue
        weight_bytes = 3 * H * I * wg.element_size()
        for (most, tokens), c in zip(_buckets(), plan):
            row = dict(H=H, I=I, label=label, tokens=tokens, max_tokens=most, path=c.path,
                       why=c.why, triton_us=c.triton_us, torch_us=c.torch_us,
                       config=asdict(c.config), plan_seconds=seconds)
            if c.triton_us and c.torch_us:
                row["chosen_us"] = min(c.triton_us, c.torch_us)
                row["chosen_vs_torch"] = c.torch_us / row["chosen_us"]
                row["triton_vs_torch"] = c.torch_us / c.triton_us
            if tokens == 1:
                row["bandwidth_limit_us"] = 1e6 * weight_bytes / bandwidth
                if c.triton_us:
                    row["triton_over_limit"] = c.triton_us / row["bandwidth_limit_us"]
                if c.torch_us:
                    row["torch_over_limit"] = c.torch_us / row["bandwidth_limit_us"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del wg, wu, wd
    return rows


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter check)"


def _buckets():
    from prunegraph.targets.triton.swiglu import TOKEN_BUCKETS

    return TOKEN_BUCKETS


# --------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------


def _gemv(bi, bh, w):
    from prunegraph.targets.triton.swiglu import TileConfig

    return TileConfig("gemv", 1, bi, bh, w, 1, bi, bh, w, 1)


def _gemm(bt, bi, bh, w, s, group=8):
    from prunegraph.targets.triton.swiglu import TileConfig

    return TileConfig("gemm", bt, bi, bh, w, s, bi, bh, w, s, group)


def sweep_items() -> list[tuple[str, int, object]]:
    """``(kernel, tokens, config)``: for a gate/up item the config's gate/up fields are the
    candidate; for a down item its ``dh, di, dwarps, dstages`` (set from the same numbers)."""
    gemv = [_gemv(*c) for c in ((2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8),
                                (8, 512, 4), (8, 1024, 8), (16, 256, 4))]
    small = [_gemm(*c) for c in ((16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 128, 4, 4),
                                 (16, 64, 64, 4, 6))]
    mid = [_gemm(*c) for c in ((32, 64, 128, 4, 4), (64, 64, 64, 4, 5), (64, 128, 64, 4, 4),
                               (128, 128, 64, 8, 3))]
    large = [_gemm(*c) for c in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
                                 (128, 64, 64, 4, 4))]
    items = []
    for tokens, cands in ((1, gemv), (16, small), (128, mid), (2048, large)):
        for c in cands:
            items += [("gate_up", tokens, c), ("down", tokens, c)]
    return items


def _kernel_fn(kernel: str, tokens: int, cfg, H: int, I: int, tensors):
    """A closure launching one kernel of the Triton path with ``cfg``."""
    import triton

    from prunegraph.targets.triton.swiglu import GENERIC_KERNELS

    gemv_gate_up, gemv_down, gate_up, down = GENERIC_KERNELS
    x, wg, wu, wd, act, y = tensors
    I_pad = act.stride(0) if act.dim() == 2 else act.numel()
    if cfg.kind == "gemv":
        if kernel == "gate_up":
            return lambda: gemv_gate_up[(triton.cdiv(I, cfg.bi),)](
                x, wg, wu, act, I, wg.stride(0), wu.stride(0), H=H, BLOCK_I=cfg.bi,
                BLOCK_H=cfg.bh, num_warps=cfg.warps, num_stages=1)
        return lambda: gemv_down[(triton.cdiv(H, cfg.dh),)](
            act, wd, y, I, wd.stride(0), H=H, BLOCK_H=cfg.dh, BLOCK_I=cfg.di,
            num_warps=cfg.dwarps, num_stages=1)
    T, bt = tokens, cfg.bt
    if kernel == "gate_up":
        return lambda: gate_up[(triton.cdiv(T, bt) * triton.cdiv(I, cfg.bi),)](
            x, wg, wu, act, T, I, x.stride(0), wg.stride(0), wu.stride(0), I_pad, H=H,
            BLOCK_T=bt, BLOCK_I=cfg.bi, BLOCK_H=cfg.bh, GROUP_T=cfg.group, UPCAST=False,
            DOT_PRECISION="tf32", num_warps=cfg.warps, num_stages=cfg.stages)
    return lambda: down[(triton.cdiv(T, bt) * triton.cdiv(H, cfg.dh),)](
        act, wd, y, T, I, I_pad, wd.stride(0), y.stride(0), H=H, BLOCK_T=bt, BLOCK_H=cfg.dh,
        BLOCK_I=cfg.di, GROUP_T=cfg.group, UPCAST=False, DOT_PRECISION="tf32",
        num_warps=cfg.dwarps, num_stages=cfg.dstages)


def _tensors(H, I, tokens, dtype, weights):
    wg, wu, wd = weights
    I_pad = -(-I // 64) * 64
    x = torch.randn(tokens, H, device=DEVICE).to(dtype)
    act = torch.randn(I_pad, device=DEVICE).to(dtype) if tokens == 1 else \
        torch.randn(tokens, I_pad, device=DEVICE).to(dtype)
    y = torch.empty(tokens, H, device=DEVICE, dtype=dtype)
    return x, wg, wu, wd, act, y


def _compile_worker(args) -> int:
    """Launch each item once (compiles into the shared cache); returns how many failed."""
    global DEVICE
    H, I, dtype_name, items, DEVICE = args
    dtype = getattr(torch, dtype_name)
    weights = _weights(H, I, dtype)
    failed = 0
    for kernel, tokens, cfg in items:
        try:
            tensors = _tensors(H, I, tokens, dtype, weights)
            if kernel == "full":  # the table the default run times (cfg: a --table or None)
                from prunegraph.targets.triton.swiglu import (
                    TileConfig,
                    choose_configs,
                    fit_config,
                    swiglu,
                )

                configs = (tuple(fit_config(TileConfig(**c), H, I) for c in cfg) if cfg else
                           choose_configs(H, I, dtype, (9, 0)))
                swiglu(tensors[0], *weights, configs=configs)
            else:
                _kernel_fn(kernel, tokens, cfg, H, I, tensors)()
        except Exception:  # noqa: BLE001 - the timing pass reports it
            failed += 1
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return failed


def precompile(shapes, items, dtype, jobs: int) -> float:
    """Compile in ``jobs`` processes: each launches its share of ``items`` once per shape."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    work = [(H, I, str(dtype).removeprefix("torch."), items[k::jobs], DEVICE)
            for H, I in shapes for k in range(jobs) if items[k::jobs]]
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(jobs, len(work))) as pool:
        pool.map(_compile_worker, work)
    return time.perf_counter() - t0


def sweep(dtype, jobs: int, shapes=((4096, 14336), (4096, 11465))) -> list[dict]:
    from prunegraph.targets.triton.swiglu import swiglu, swiglu_reference

    items = sweep_items()
    if jobs > 1:
        print(f"precompiled in {precompile(shapes, items, dtype, jobs):.1f}s", flush=True)
    rows = []
    for H, I in shapes:
        weights = _weights(H, I, dtype)
        cache = {}
        for kernel, tokens, cfg in items:
            row = dict(H=H, I=I, tokens=tokens, kernel=kernel, config=asdict(cfg))
            try:
                if tokens not in cache:
                    cache[tokens] = _tensors(H, I, tokens, dtype, weights)
                fn = _kernel_fn(kernel, tokens, cfg, H, I, cache[tokens])
                fn()
                row["us"] = _time_us(fn, rep=10)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
        for tokens in sorted({t for _, t, _ in items}):  # eager per kernel, for scale
            x = cache[tokens][0]
            wg, wu, wd = weights
            ref = swiglu_reference(x, wg, wu, wd)
            for kernel in ("gate_up", "down"):
                best = min((r for r in rows if r["H"] == H and r["I"] == I and
                            r["tokens"] == tokens and r["kernel"] == kernel and "us" in r),
                           key=lambda r: r["us"], default=None)
                if best:
                    print(f"H={H} I={I} T={tokens} {kernel}: best {best['us']:.1f} us "
                          f"{best['config']}", flush=True)
            rows.append(dict(H=H, I=I, tokens=tokens, kernel="eager_total",
                             us=_time_us(lambda: swiglu_reference(x, wg, wu, wd))))
            y = swiglu(x, wg, wu, wd)
            rows.append(dict(H=H, I=I, tokens=tokens, kernel="triton_default_total",
                             us=_time_us(lambda: swiglu(x, wg, wu, wd)),
                             err=(y.float() - ref.float()).abs().max().item()))
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
        del weights, cache
    return rows


def pick_table(rows: list[dict]) -> list[dict]:
    """Per token bucket, the config whose gate/up and down kernels are fastest summed over the
    swept shapes (aligned and odd widths); GEMM kernels of one bucket share the token block."""
    from prunegraph.targets.triton.swiglu import TOKEN_BUCKETS

    def total(kernel, tokens, key):
        shapes = {(r["H"], r["I"]) for r in rows}
        best = {}
        for r in rows:
            if r["kernel"] != kernel or r["tokens"] != tokens or "us" not in r:
                continue
            best.setdefault(key(r["config"]), {})[(r["H"], r["I"])] = (r["us"], r["config"])
        return {k: (sum(u for u, _ in v.values()), next(iter(v.values()))[1])
                for k, v in best.items() if set(v) == shapes}

    table = []
    for _, tokens in TOKEN_BUCKETS:
        up = total("gate_up", tokens, lambda c: (c["bt"], c["bi"], c["bh"], c["warps"],
                                                 c["stages"], c["group"]))
        down = total("down", tokens, lambda c: (c["bt"], c["dh"], c["di"], c["dwarps"],
                                                c["dstages"], c["group"]))
        if not up or not down:
            raise RuntimeError(f"the sweep has no complete candidates for {tokens} tokens")
        bts = {k[0] for k in up} & {k[0] for k in down}
        bt = min(bts, key=lambda b: min(v[0] for k, v in up.items() if k[0] == b)
                 + min(v[0] for k, v in down.items() if k[0] == b))
        u = min((v for k, v in up.items() if k[0] == bt), key=lambda v: v[0])[1]
        d = min((v for k, v in down.items() if k[0] == bt), key=lambda v: v[0])[1]
        table.append(dict(u, dh=d["dh"], di=d["di"], dwarps=d["dwarps"], dstages=d["dstages"]))
    return table


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    cmd = "python benchmarks/triton_mlp.py " + " ".join(result["argv"])
    limit = result.get("limit_TBps", result["copy_TBps"])
    lines = [SECTION, "", f"`{cmd}`", "",
             f"{result['device']}, torch {result['torch']}, triton {result['triton']}, "
             f"{result['dtype']}. Medians of CUDA-graph replays (µs) as `prunegraph export "
             f"triton` times them on the GPU to choose each shape's path per token bucket; "
             f"*chosen* is what the exported module runs, *x eager* its speed-up over PyTorch "
             f"eager (cuBLAS), *Triton x eager* the Triton kernels' alone. At one token, *TB/s* "
             f"is the weight bytes (3·H·I) Triton reads per second and */ limit* its time over "
             f"the bandwidth limit at {limit:.2f} TB/s.", "",
             "| H | I | width | tokens | Triton | eager | chosen | x eager | Triton x eager | "
             "TB/s | / limit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['H']} | {r['I']} | {r['label']} | | | | error: "
                         f"{r['error'][:60]} | | | | |")
            continue
        tbs = lim = ""
        if r["tokens"] == 1 and r.get("triton_us"):
            tbs = f"{3 * r['H'] * r['I'] * 2 / r['triton_us'] / 1e6:.2f}"
            lim = f"{r['triton_us'] * limit * 1e6 / (3 * r['H'] * r['I'] * 2):.2f}"
        tri = f"{r['triton_us']:.1f}" if r.get("triton_us") else "n/a"
        ratio = f"{r['triton_vs_torch']:.2f}" if "triton_vs_torch" in r else ""
        chosen = f"{r.get('chosen_us', r.get('torch_us') or 0):.1f} ({r['path']})"
        xe = f"{r['chosen_vs_torch']:.2f}" if "chosen_vs_torch" in r else "1.00"
        lines.append(f"| {r['H']} | {r['I']} | {r['label']} | {r['tokens']} | {tri} | "
                     f"{r['torch_us']:.1f} | {chosen} | {xe} | {ratio} | {tbs} | {lim} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--sweep", action="store_true", help="tile sweep instead of the table")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="worker processes that compile the sweep's kernels first")
    ap.add_argument("--shapes", default=None, help="H:I list (default: the SHAPES table)")
    ap.add_argument("--table", default=None,
                    help="a --sweep result: time the export choice with the tile table it picked "
                         "instead of choose_configs'")
    ap.add_argument("--limit-tbps", type=float, default=None,
                    help="bandwidth limit for the one-token column (default: the best measured)")
    ap.add_argument("--interpret-check", action="store_true",
                    help="run this script's logic on tiny shapes on the CPU interpreter")
    args = ap.parse_args()
    global DEVICE
    if args.interpret_check:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SystemExit("--interpret-check needs TRITON_INTERPRET=1 in the environment")
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/triton_mlp.py needs a CUDA GPU")
    import triton

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpu_timing import copy_bandwidth

    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    result = dict(device=_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(),
                  dtype=args.dtype, argv=sys.argv[1:])
    bandwidth = copy_bandwidth() if DEVICE == "cuda" else {"best": 1e12}
    result["bandwidth_TBps"] = {k: v / 1e12 for k, v in bandwidth.items()}
    result["copy_TBps"] = result["bandwidth_TBps"]["best"]
    if args.limit_tbps:
        result["limit_TBps"] = args.limit_tbps
    if args.sweep:
        result["rows"] = sweep(dtype, args.jobs, ((64, 96), (64, 77)) if args.interpret_check
                               else ((4096, 14336), (4096, 11465)))
        result["table"] = pick_table(result["rows"])
        print("picked table:", *map(json.dumps, result["table"]), sep="\n  ", flush=True)
    else:
        shapes = SHAPES if not args.interpret_check else [(64, 96, "a"), (48, 77, "odd")]
        if args.shapes:
            shapes = [(int(h), int(i), "") for h, i in (s.split(":") for s in
                                                         args.shapes.split(","))]
        table = None
        if args.table:
            with open(args.table) as f:
                table = json.load(f)["table"]
            result["table"] = table
        if args.jobs > 1:
            items = [("full", tokens, table) for _, tokens in _buckets()]
            classes = {(H, I % 16 == 0): (H, I) for H, I, _ in shapes}  # one per binary set
            seconds = precompile(list(classes.values()), items, dtype, args.jobs)
            print(f"precompiled in {seconds:.1f}s", flush=True)
        result["rows"] = bench_choice(shapes, dtype,
                                      result.get("limit_TBps", result["copy_TBps"]) * 1e12, table)
    result["seconds"] = time.time() - t0
    atomic_write_text(args.out, json.dumps(result, indent=1))
    if not args.sweep:
        text = markdown(result)
        print(text)
        if args.markdown:
            replace_section(args.markdown, SECTION, text)


if __name__ == "__main__":
    main()
