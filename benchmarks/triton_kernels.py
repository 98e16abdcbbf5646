"""GPU benchmark of the Triton target's kernels (not a test; needs CUDA).

1. Fused pruned SwiGLU MLP (the codegen-generated module) vs PyTorch eager and ``torch.compile``
   for SmolLM2-135M's MLP (H=576, I=1536) and pruned widths (I=1229, 768), at decode (T=1) and
   prefill token counts.
2. PrunePath decode (router and expert kernels) at several tau vs the dense FFN (eager and
   the fused Triton decode kernel), E=48 experts of G=32 channels (I=1536). The kernel table at
   real FFN sizes is ``benchmarks/prunepath_kernels.py``.

3. A sweep of the PrunePath expert split (``--sweep``). The SwiGLU tile table is swept at LLM
   sizes by ``benchmarks/triton_mlp.py --sweep``.

Every timed kernel is first checked against the PyTorch reference (max abs error in the JSON).
Times are medians in microseconds of CUDA-graph replays (``triton.testing.do_bench_cudagraph``):
at these sizes (H=576) one MLP is a few us of GPU work, so launch and Python overhead would
otherwise dominate; ``*_launch_us`` fields give plain ``do_bench`` times including launches.

    python benchmarks/triton_kernels.py --out triton_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import traceback

import torch


def _bench(fn, graph: bool = False) -> float:
    import triton.testing

    if graph:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def bench_swiglu(dtype, shapes, tokens, compile_: bool, out_dir: str) -> list[dict]:
    from prunegraph.targets.triton.codegen import MLPShape, load_module, write_module
    from prunegraph.targets.triton.swiglu import swiglu_reference

    specs = [MLPShape(name, H, I, dtype) for name, H, I in shapes]
    mod = load_module(write_module(specs, os.path.join(out_dir, "bench_mlps.py")))
    rows = []
    for name, H, I in shapes:
        run = mod.LAYERS[name]["run"]
        g = torch.Generator(device="cuda").manual_seed(0)
        wg = (torch.randn(I, H, device="cuda", generator=g) / H**0.5).to(dtype)
        wu = (torch.randn(I, H, device="cuda", generator=g) / H**0.5).to(dtype)
        wd = (torch.randn(H, I, device="cuda", generator=g) / I**0.5).to(dtype)
        for T in tokens:
            row = dict(kind="swiglu", layer=name, H=H, I=I, T=T, dtype=str(dtype))
            try:
                x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
                ref = swiglu_reference(x.double(), wg.double(), wu.double(), wd.double())
                row["max_err_triton"] = _err(run(x, wg, wu, wd), ref)
                row["max_err_eager"] = _err(swiglu_reference(x, wg, wu, wd), ref)
                row["triton_launch_us"] = _bench(lambda: run(x, wg, wu, wd))
                row["eager_launch_us"] = _bench(lambda: swiglu_reference(x, wg, wu, wd))
                row["triton_us"] = _bench(lambda: run(x, wg, wu, wd), graph=True)
                row["eager_us"] = _bench(lambda: swiglu_reference(x, wg, wu, wd), graph=True)
                weight_bytes = 3 * H * I * wg.element_size()
                row["triton_weight_GBps"] = weight_bytes / (row["triton_us"] * 1e3)
                row["triton_TFLOPs"] = 6 * T * H * I / (row["triton_us"] * 1e6)
                if compile_:
                    torch._dynamo.reset()
                    fn = torch.compile(swiglu_reference, dynamic=False)
                    fn(x, wg, wu, wd)
                    row["compile_launch_us"] = _bench(lambda: fn(x, wg, wu, wd))
                    try:
                        row["compile_us"] = _bench(lambda: fn(x, wg, wu, wd), graph=True)
                    except Exception as e:
                        row["compile_graph_error"] = f"{type(e).__name__}: {e}"[:200]
            except Exception as e:  # keep the other rows
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_prunepath(dtype, H, E, G, taus, logit_std, n_tokens) -> list[dict]:
    from prunegraph.targets.triton.prunepath import (
        pack_prunepath_weights,
        prunepath_ffn,
        prunepath_ffn_reference,
        router_select,
    )
    from prunegraph.targets.triton.swiglu import swiglu, swiglu_reference

    I = E * G
    g = torch.Generator(device="cuda").manual_seed(1)
    wr = (torch.randn(E, H, device="cuda", generator=g) * logit_std / H**0.5).to(dtype)
    wg = (torch.randn(I, H, device="cuda", generator=g) / H**0.5).to(dtype)
    wu = (torch.randn(I, H, device="cuda", generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(H, I, device="cuda", generator=g) / I**0.5).to(dtype)
    wr, wg, wu, wd_cm = pack_prunepath_weights(wr, wg, wu, wd)
    xs = [torch.randn(1, H, device="cuda", generator=g).to(dtype) for _ in range(n_tokens)]

    def per_token(fn):
        def loop():
            for x in xs:
                fn(x)
        return loop

    rows = []
    dense = dict(kind="dense_ffn_decode", H=H, I=I, dtype=str(dtype))
    dense["eager_graph_us"] = _bench(per_token(lambda x: swiglu_reference(x, wg, wu, wd)),
                                     graph=True) / n_tokens
    dense["triton_graph_us"] = _bench(per_token(lambda x: swiglu(x, wg, wu, wd)),
                                      graph=True) / n_tokens
    rows.append(dense)
    print(json.dumps(dense), flush=True)
    for tau in taus:
        for mode in ("exclusive", "inclusive"):
            row = dict(kind="prunepath_decode", H=H, E=E, G=G, tau=tau, mode=mode,
                       logit_std=logit_std, dtype=str(dtype))
            try:
                counts = [int(router_select(x, wr, tau, mode).count[0]) for x in xs]
                row["mean_active_experts"] = statistics.mean(counts)
                row["active_fraction"] = row["mean_active_experts"] / E
                errs = []
                for x in xs[:4]:
                    ref = prunepath_ffn_reference(x.double(), wr.double(), wg.double(),
                                                  wu.double(), wd.double(), tau, G, mode)
                    errs.append(_err(prunepath_ffn(x, wr, wg, wu, wd_cm, tau, G, mode), ref))
                row["max_err"] = max(errs)
                row["triton_graph_us"] = _bench(
                    per_token(lambda x: prunepath_ffn(x, wr, wg, wu, wd_cm, tau, G, mode)),
                    graph=True) / n_tokens
                row["router_only_graph_us"] = _bench(
                    per_token(lambda x: router_select(x, wr, tau, mode)), graph=True) / n_tokens
                row["speedup_vs_dense_triton"] = dense["triton_graph_us"] / row["triton_graph_us"]
                row["speedup_vs_dense_eager"] = dense["eager_graph_us"] / row["triton_graph_us"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sweep_blocks(dtype) -> list[dict]:
    """Time the PrunePath expert kernel over ``channels_per_program`` (checked against the
    reference first). The SwiGLU tiles are swept by ``benchmarks/triton_mlp.py --sweep``."""
    import itertools

    from prunegraph.targets.triton.prunepath import (
        pack_prunepath_weights,
        prunepath_ffn,
        prunepath_ffn_reference,
    )
    from prunegraph.targets.triton.prunepath_decode import choose_decode_blocks

    rows = []
    g = torch.Generator(device="cuda").manual_seed(2)
    # PrunePath expert split
    H, E, G = 576, 48, 32
    wr = (torch.randn(E, H, device="cuda", generator=g) * 3 / H**0.5).to(dtype)
    wg = (torch.randn(E * G, H, device="cuda", generator=g) / H**0.5).to(dtype)
    wu = (torch.randn(E * G, H, device="cuda", generator=g) / H**0.5).to(dtype)
    wd = (torch.randn(H, E * G, device="cuda", generator=g) / (E * G)**0.5).to(dtype)
    wr, wg, wu, wd = pack_prunepath_weights(wr, wg, wu, wd)
    x1 = torch.randn(1, H, device="cuda", generator=g).to(dtype)
    for tau, cpp in itertools.product((0.7, 1.05), (4, 8, 32)):
        row = dict(kind="sweep_prunepath", tau=tau, channels_per_program=cpp)
        blocks = choose_decode_blocks(H, E * G, G, E, x1.device, gu_c=cpp)
        try:
            ref = prunepath_ffn_reference(x1.double(), wr.double(), wg.double(), wu.double(),
                                          wd.double(), tau, G)
            row["max_err"] = _err(prunepath_ffn(x1, wr, wg, wu, wd, tau, G,
                                                decode_blocks=blocks), ref)
            row["us"] = _bench(lambda: prunepath_ffn(x1, wr, wg, wu, wd, tau, G,
                                                     decode_blocks=blocks), graph=True)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "us" in r:
            groups.setdefault((r["kind"], r.get("I"), r.get("T"), r.get("tau")), []).append(r)
    for key, rs in groups.items():
        rs.sort(key=lambda r: r["us"])
        print(f"best {key}:", *[json.dumps(r) for r in rs[:3]], sep="\n  ", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | shape | T / tau | triton us | eager us | compile us | note |",
             "|---|---|---|---|---|---|---|"]

    def f(v):
        return "" if v is None else f"{v:.1f}"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | | | | | | error: {r['error'][:60]} |")
        elif r["kind"] == "swiglu":
            lines.append(f"| swiglu | H={r['H']} I={r['I']} | T={r['T']} | {f(r['triton_us'])} | "
                         f"{f(r['eager_us'])} | {f(r.get('compile_us'))} | "
                         f"err={r['max_err_triton']:.2g} |")
        elif r["kind"].startswith("sweep"):
            continue
        elif r["kind"] == "dense_ffn_decode":
            lines.append(f"| dense FFN decode | H={r['H']} I={r['I']} | T=1 | "
                         f"{f(r['triton_graph_us'])} | {f(r['eager_graph_us'])} | | cuda graph |")
        else:
            lines.append(f"| prunepath decode ({r['mode']}) | E={r['E']} G={r['G']} | "
                         f"tau={r['tau']} | {f(r['triton_graph_us'])} | | | "
                         f"{r['mean_active_experts']:.1f} experts, "
                         f"{r['speedup_vs_dense_triton']:.2f}x vs dense triton |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", default="1,16,512,2048", help="token counts for the MLP")
    ap.add_argument("--taus", default="0.3,0.5,0.7,0.9,1.05")
    ap.add_argument("--logit-std", type=float, default=3.0,
                    help="std of the random router's logits (peakier -> fewer experts)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--sweep", action="store_true", help="also sweep block sizes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/triton_kernels.py needs a CUDA GPU")
    import triton

    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    shapes = [("smollm2_mlp", 576, 1536), ("pruned_80pct", 576, 1229),
              ("pruned_50pct", 576, 768)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_swiglu(dtype, shapes, [int(t) for t in args.tokens.split(",")],
                            not args.no_compile, tmp)
    rows += bench_prunepath(dtype, 576, 48, 32, [float(t) for t in args.taus.split(",")],
                            args.logit_std, n_tokens=8)
    if args.sweep:
        rows += sweep_blocks(dtype)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(),
                  seconds=time.time() - t0, rows=rows)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp_out, args.out)
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
