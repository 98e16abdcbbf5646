"""GPU benchmark of the PrunePath kernels at real FFN sizes (issue 12's kernel table).

Decode (T = 1, 8, 32 tokens) and prefill (2,048 tokens) of
:class:`~prunegraph.targets.triton.prunepath.PrunePathFFN` against, in the same run, the dense
SwiGLU FFN through cuBLAS (PyTorch eager: three GEMMs) and the ideal: the bytes of the active
experts' rows (plus the router) over the copy bandwidth measured at the start (decode), the FLOPs
of the active pairs over the bf16 matrix rate (prefill). Shapes: H=4096, I=14336 (Llama-3-8B) and
H=5120, I=25600, experts of G=128 channels, bf16.

* **Routing is set, not learned**: the first 32 hidden coordinates of each token are a one-hot
  "class"; router row ``e`` holds ``a = 1.375`` at the coordinates of the classes that choose
  ``e`` and 0 elsewhere, so a token's logits are exactly ``a`` for its class's ``k`` experts and
  0 for the rest, and ``tau`` (exclusive mode) is put halfway between the mass of ``k`` and of
  ``k + 1`` experts: every token selects exactly ``k`` experts (checked). Decode tokens share one
  class (``shared``: the union is ``k`` experts) or, in ``independent`` rows, each has its own
  random set (the union grows with T). Prefill tokens cycle through 32 classes.
* **Caches**: decode is timed over ``layers`` independent copies of the FFN called in turn (32
  for H=4096, like Llama-3-8B; 24 for H=5120), so that even one active expert per layer
  (3 MB) does not stay in the 60 MB L2 between calls; the time per layer is reported. Prefill
  uses one layer (its weights are 6x the L2).
* **Stages**: at T = 1 the router alone and router + gate/up are timed too (the later kernels
  left out), giving each stage's time by difference; prefill times routing, routing + schedule,
  and the down GEMM alone.
* **Tiles**: a one-knob-at-a-time sweep of the T = 1 tiles (H=4096, 30% and one expert), of the
  T > 1 tiles (T = 32, 30%) and of the prefill tiles (30%) picks the tiles used for the tables;
  all variants are in the JSON.

Every timed configuration is checked first against the fp64 PyTorch reference (relative error
``|y - ref| / |ref|`` in the JSON and tables). Times are medians of CUDA-graph replays
(``triton.testing.do_bench_cudagraph``), in microseconds.

    python benchmarks/prunepath_kernels.py --out benchmarks/results/prunepath_kernels.json
    python benchmarks/prunepath_kernels.py --render benchmarks/results/prunepath_kernels.json \\
        --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback
from pathlib import Path

import torch

SECTION = "## PrunePath kernels at real FFN sizes (GPU)"
SHAPES = (("4096x14336", 4096, 14336, 128, 32), ("5120x25600", 5120, 25600, 128, 24))
SMOKE_SHAPES = (("64x200", 64, 200, 16, 2), ("80x96", 80, 96, 8, 2))
FRACTIONS = (0.1, 0.2, 0.3, 0.45, 0.6)
PREFILL_FRACTIONS = (0.1, 0.3, 0.5, 0.9)
TOKENS = (1, 8, 32)
PREFILL_TOKENS = 2048
LOGIT = 1.375  # exact in bf16
CLASSES = 32
BF16_TFLOPS = 790.0  # measured bf16 matrix rate on this kind of machine (KINDS.md)
DECODE_SWEEP = (("gu_c", (2, 8)), ("gu_h", ("/2", "x2")), ("gu_programs", ("/2",)),
                ("down_k", ("/2", "x2")), ("down_h", ("/2", "x2")), ("down_splits", ("/2", "x2")),
                ("down_warps", (4,)), ("gu_prefetch", (False,)), ("down_prefetch", (False,)))
BATCHED_SWEEP = (("gu_c_dot", (32,)), ("gu_h_dot", (64, 256)), ("down_k_dot", (64,)),
                 ("down_h_dot", (256,)), ("down_splits_dot", ("x2",)))
PREFILL_SWEEP = ((64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
                 (128, 64, 64, 4, 3))


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


SMOKE = {"on": False}  # --smoke: tiny shapes on the CPU interpreter, to check the script itself


def bench_us(fn, rep: int) -> float:
    import triton.testing

    if SMOKE["on"]:
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (bytes read plus written)."""
    import triton.testing

    if SMOKE["on"]:
        return 1e9
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                 return_mode="median")
    return 2 * 2 * 1024**3 / (ms * 1e-3)


def launch_floor(device, rep: int) -> float:
    """µs of three back-to-back launches of a one-store kernel in a CUDA graph: the floor of
    the one-token pipeline's three launches before any memory traffic."""
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(ptr):
        tl.store(ptr + tl.program_id(0), tl.program_id(0))

    buf = torch.zeros(256, dtype=torch.int32, device=device)

    def three():
        for _ in range(3):
            _touch[(132,)](buf)

    return bench_us(lambda: [three() for _ in range(32)], rep) / 32


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# Set routing
# --------------------------------------------------------------------------------------------


def router_for(E: int, H: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    """``wr [E, H]`` (bf16): class ``c``'s ``k`` experts (a random set) get logit ``LOGIT``."""
    wr = torch.zeros(E, H, dtype=torch.bfloat16, device=device)
    for c in range(CLASSES):
        chosen = torch.randperm(E, generator=gen)[:k]
        wr[chosen.to(device), c] = LOGIT
    return wr


def tokens_for(T: int, H: int, classes: list[int], gen: torch.Generator, device) -> torch.Tensor:
    x = torch.randn(T, H, generator=gen).to(device=device, dtype=torch.bfloat16)
    x[:, :CLASSES] = 0
    x[torch.arange(T), torch.tensor(classes)] = 1.0
    return x


def tau_for(k: int, E: int) -> float:
    """Halfway between the mass of the ``k`` raised experts and of ``k + 1`` (exclusive mode:
    exactly ``k`` are kept; ``tau`` above 1 when ``k == E``)."""
    if k >= E:
        return 1.05
    z = k * math.exp(LOGIT) + (E - k)
    return (k * math.exp(LOGIT) + 0.5) / z


# --------------------------------------------------------------------------------------------
# One FFN shape
# --------------------------------------------------------------------------------------------


class Shape:
    """``layers`` FFNs of random bf16 weights in the decode layout, sharing one router."""

    def __init__(self, name, H, I, G, layers, device, seed=0):
        from prunegraph.targets.triton.prunepath import PrunePathFFN

        self.name, self.H, self.I, self.G, self.E = name, H, I, G, -(-I // G)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.wr = torch.zeros(self.E, H, dtype=torch.bfloat16, device=device)
        self.weights, self.ffns = [], []
        for _ in range(layers):
            wg = torch.randn(I, H, generator=gen, device=device, dtype=torch.bfloat16) / H**0.5
            wu = torch.randn(I, H, generator=gen, device=device, dtype=torch.bfloat16) / H**0.5
            wd_t = torch.randn(I, H, generator=gen, device=device, dtype=torch.bfloat16) / I**0.5
            self.weights.append((wg, wu, wd_t.t()))  # wd [H, I], column-major: packed
            self.ffns.append(PrunePathFFN(self.wr, wg, wu, wd_t.t(), G, pack=False,
                                          dense_above=None))
        self._ref = None

    def reference_weights(self):
        if self._ref is None:
            self._ref = tuple(w.double() for w in self.weights[0])
        return self._ref

    def set_router(self, k: int, seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        self.wr.copy_(router_for(self.E, self.H, k, gen, self.wr.device))
        return tau_for(k, self.E)

    def active_bytes(self, experts: int, T: int) -> int:
        """Weight bytes one call must read (the union experts' rows, the router) plus x, y."""
        return 2 * (3 * experts * self.G * self.H + self.E * self.H + 2 * T * self.H)

    def free(self):
        self.weights, self.ffns, self._ref = [], [], None


def dense_ffn(x, weights):
    from prunegraph.targets.triton.swiglu import swiglu_reference

    return swiglu_reference(x, *weights)


def all_layers(shape: Shape, fn):
    def run():
        for i in range(len(shape.ffns)):
            fn(i)
    return run


def check_decode(shape: Shape, x, tau, k_expected, union_expected=None) -> dict:
    from prunegraph.targets.triton.prunepath import prunepath_ffn_reference

    ffn = shape.ffns[0]
    sel = ffn.route(x, tau)
    counts = sel.count.tolist()
    out = {"experts_per_token": counts[0] if len(set(counts)) == 1 else counts,
           "union_experts": int(sel.union_count[0])}
    if any(c != k_expected for c in counts):
        out["selection_error"] = f"expected {k_expected} experts per token, got {counts}"
    y = ffn(x, tau)
    wg, wu, wd = shape.reference_weights()
    ref = prunepath_ffn_reference(x.double(), shape.wr.double(), wg, wu, wd, tau, shape.G)
    out["rel_err"] = rel_err(y, ref)
    out["deterministic"] = bool(torch.equal(ffn(x, tau), y))
    return out


def bench_decode(shape: Shape, T: int, k: int, routing: str, bw: float, rep: int, seed: int,
                 stages: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tau = shape.set_router(k, seed)
    classes = [0] * T if routing == "shared" else list(range(T))
    x = tokens_for(T, shape.H, classes, gen, shape.wr.device)
    row = dict(kind="decode", shape=shape.name, H=shape.H, I=shape.I, G=shape.G, E=shape.E, T=T,
               routing=routing, k=k, fraction=k / shape.E, tau=tau, layers=len(shape.ffns))
    row.update(check_decode(shape, x, tau, k))
    row["union_fraction"] = row["union_experts"] / shape.E
    L = len(shape.ffns)
    row["us"] = bench_us(all_layers(shape, lambda i: shape.ffns[i](x, tau)), rep) / L
    if stages:
        for stage in ("router", "gate_up"):
            row[f"{stage}_stage_cum_us"] = bench_us(all_layers(
                shape, lambda i: shape.ffns[i].decode(x, tau, stages=stage)), rep) / L
    row["bw_limit_us"] = shape.active_bytes(row["union_experts"], T) / bw * 1e6
    return row


def bench_dense(shape: Shape, T: int, rep: int) -> float:
    x = torch.randn(T, shape.H, device=shape.wr.device, dtype=torch.bfloat16)
    return bench_us(all_layers(shape, lambda i: dense_ffn(x, shape.weights[i])), rep) / len(
        shape.ffns)


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def _override(shape: Shape, knob: str, value, base) -> dict:
    if value == "x2":
        return {knob: 2 * getattr(base, knob)}
    if value == "/2":
        return {knob: max(1, getattr(base, knob) // 2)}
    return {knob: value}


def sweep_decode(shape: Shape, bw: float, rep: int, log, T: int, knobs, fractions,
                 fixed: dict) -> tuple[dict, list[dict]]:
    """One knob at a time around ``fixed`` (on top of the defaults), at ``T`` tokens and the
    given fractions (0: one expert); returns ``fixed`` plus the combined best knobs (kept only if
    the combination beats ``fixed``) and the rows."""
    from prunegraph.targets.triton.prunepath_decode import choose_decode_blocks

    device = shape.wr.device
    base = choose_decode_blocks(shape.H, shape.I, shape.G, shape.E, device, **fixed)
    ks = [max(1, round(f * shape.E)) for f in fractions]

    def measure(overrides) -> list[float]:
        blocks = choose_decode_blocks(shape.H, shape.I, shape.G, shape.E, device,
                                      **{**fixed, **overrides})
        for f in shape.ffns:
            f.set_decode_blocks(blocks)
        out = []
        for k in ks:
            row = bench_decode(shape, T, k, "shared", bw, rep, seed=7, stages=False)
            if row["rel_err"] > 2e-2 or "selection_error" in row:
                raise RuntimeError(f"variant {overrides} is wrong: {row}")
            out.append(row["us"])
        return out

    rows = []
    default = measure({})
    rows.append(dict(kind="sweep_decode", T=T, overrides=fixed, us=default, ks=ks))
    log(rows[-1])
    n = len(ks)
    best: dict = {}
    for knob, values in knobs:
        score = {None: float(n)}
        for v in values:
            ov = _override(shape, knob, v, base)
            try:
                t = measure(ov)
                rows.append(dict(kind="sweep_decode", T=T, overrides={**fixed, **ov}, us=t,
                                 ks=ks))
                score[json.dumps(ov)] = sum(a / b for a, b in zip(t, default))
            except Exception as e:
                rows.append(dict(kind="sweep_decode", T=T, overrides={**fixed, **ov},
                                 error=f"{type(e).__name__}: {e}"[:300]))
            log(rows[-1])
        pick = min(score, key=score.get)
        if pick is not None and score[pick] < n * 0.985:  # a 1.5% gain at least
            best.update(json.loads(pick))
    chosen = dict(fixed)
    if best:
        try:
            t = measure(best)
            rows.append(dict(kind="sweep_decode", T=T, overrides={**fixed, **best}, us=t, ks=ks,
                             combined=True))
            log(rows[-1])
            if sum(a / b for a, b in zip(t, default)) < n:
                chosen.update(best)
        except Exception as e:
            rows.append(dict(kind="sweep_decode", T=T, overrides={**fixed, **best},
                             error=str(e)[:300]))
    blocks = choose_decode_blocks(shape.H, shape.I, shape.G, shape.E, device, **chosen)
    for f in shape.ffns:
        f.set_decode_blocks(blocks)
    return chosen, rows


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------


def bench_prefill(shape: Shape, k: int, rep: int, blocks, seed: int, log) -> dict:
    import torch.nn.functional as F

    from prunegraph.targets.triton import prunepath_prefill as pre
    from prunegraph.targets.triton.prunepath import prunepath_ffn_reference

    T = PREFILL_TOKENS
    gen = torch.Generator().manual_seed(seed)
    tau = shape.set_router(k, seed)
    x = tokens_for(T, shape.H, [t % CLASSES for t in range(T)], gen, shape.wr.device)
    ffn = shape.ffns[0]
    ffn.prefill_blocks = blocks
    wg, wu, wd = shape.weights[0]
    row = dict(kind="prefill", shape=shape.name, H=shape.H, I=shape.I, G=shape.G, E=shape.E,
               T=T, k=k, fraction=k / shape.E, tau=tau, blocks=repr(blocks))
    sel = pre.select_tokens(pre.router_logits(x, shape.wr), tau, False)
    counts = sel.count.unique().tolist()
    if counts != [k]:
        row["selection_error"] = f"expected {k} experts per token, got counts {counts}"
    y = ffn.prefill(x, tau, path="grouped")
    ref = prunepath_ffn_reference(x.double(), shape.wr.double(), *shape.reference_weights(), tau,
                                  shape.G)
    row["rel_err"] = rel_err(y, ref)
    row["rel_err_masked_kernel_gates"] = rel_err(ffn.prefill(x, tau, path="masked"), ref)
    del ref
    row["grouped_us"] = bench_us(lambda: ffn.prefill(x, tau, path="grouped"), rep)
    row["masked_gates_us"] = bench_us(lambda: ffn.prefill(x, tau, path="masked"), rep)
    try:
        row["dense_masked_path_us"] = bench_us(
            lambda: prunepath_ffn_reference(x, shape.wr, wg, wu, wd, tau, shape.G), rep)
    except Exception as e:  # the reference path in a CUDA graph
        row["dense_masked_graph_error"] = f"{type(e).__name__}: {e}"[:200]
        import triton.testing
        row["dense_masked_path_us"] = 1e3 * triton.testing.do_bench(
            lambda: prunepath_ffn_reference(x, shape.wr, wg, wu, wd, tau, shape.G),
            return_mode="median")

    def route():
        return pre.select_tokens(pre.router_logits(x, shape.wr), tau, False)

    row["route_us"] = bench_us(route, rep)
    row["route_schedule_us"] = bench_us(
        lambda: pre.grouped_schedule(route().selected_gates, blocks.block_m), rep)
    act = torch.randn(T, shape.I, device=x.device, dtype=x.dtype)
    row["down_us"] = bench_us(lambda: F.linear(act, wd), rep)
    row["zero_act_us"] = bench_us(lambda: torch.zeros_like(act), rep)
    row["grouped_gate_up_us"] = (row["grouped_us"] - row["route_schedule_us"] - row["down_us"]
                                 - row["zero_act_us"])
    flops_active = 2 * T * k * shape.G * shape.H * 3
    row["flop_limit_us"] = flops_active / (BF16_TFLOPS * 1e12) * 1e6
    row["flop_limit_dense_down_us"] = (2 * T * k * shape.G * shape.H * 2
                                       + 2 * T * shape.I * shape.H) / (BF16_TFLOPS * 1e12) * 1e6
    log(row)
    return row


def sweep_prefill(shape: Shape, rep: int, log) -> tuple[object, list[dict]]:
    from prunegraph.targets.triton.prunepath import PrefillBlocks

    rows, best, best_t = [], PrefillBlocks(), float("inf")
    k = round(0.3 * shape.E)
    for m, n, kk, w, s in PREFILL_SWEEP:
        blocks = PrefillBlocks(m, n, kk, w, s)
        try:
            tau = shape.set_router(k, 11)
            x = tokens_for(PREFILL_TOKENS, shape.H, [t % CLASSES for t in range(PREFILL_TOKENS)],
                           torch.Generator().manual_seed(11), shape.wr.device)
            ffn = shape.ffns[0]
            ffn.prefill_blocks = blocks
            t = bench_us(lambda: ffn.prefill(x, tau, path="grouped"), rep)
            rows.append(dict(kind="sweep_prefill", blocks=repr(blocks), us=t, k=k))
            if t < best_t:
                best, best_t = blocks, t
        except Exception as e:
            rows.append(dict(kind="sweep_prefill", blocks=repr(blocks),
                             error=f"{type(e).__name__}: {e}"[:300]))
        log(rows[-1])
    return best, rows


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def run(args) -> dict:
    import triton

    from prunegraph.targets.triton.prunepath import PrefillBlocks

    device = torch.device("cpu" if SMOKE["on"] else "cuda")
    shapes = SMOKE_SHAPES if SMOKE["on"] else SHAPES
    result = dict(device="cpu (smoke)" if SMOKE["on"] else torch.cuda.get_device_name(),
                  torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(), rows=[],
                  command="python benchmarks/prunepath_kernels.py --out "
                          "benchmarks/results/prunepath_kernels.json")
    t0 = time.time()

    def save():
        result["seconds"] = time.time() - t0
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    def log(row):
        print(json.dumps(row), flush=True)

    bw = copy_bandwidth(device)
    result["copy_GBps"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    result["launch_floor_us"] = launch_floor(device, args.rep)
    print(f"three dependent empty launches: {result['launch_floor_us']:.1f} us", flush=True)
    shape_prefill_blocks = PrefillBlocks()
    for si, (name, H, I, G, layers) in enumerate(shapes):
        if args.shapes and name not in args.shapes.split(","):
            continue
        shape = Shape(name, H, I, G, layers if not args.quick else 4, device, seed=si)
        E = shape.E
        if si == 0 and not args.no_sweep:
            chosen, rows = sweep_decode(shape, bw, args.rep, log, 1, DECODE_SWEEP, (0.3, 0), {})
            result["rows"] += rows
            chosen, rows = sweep_decode(shape, bw, args.rep, log, 32, BATCHED_SWEEP, (0.3,),
                                        chosen)
            result["rows"] += rows
            result["decode_overrides"] = chosen
            save()
        elif "decode_overrides" in result:
            from prunegraph.targets.triton.prunepath_decode import choose_decode_blocks
            blocks = choose_decode_blocks(H, I, G, E, device, **result["decode_overrides"])
            for f in shape.ffns:
                f.set_decode_blocks(blocks)
        result.setdefault("decode_blocks", {})[name] = repr(shape.ffns[0].decode_blocks)
        for T in TOKENS:
            dense = dict(kind="dense", shape=name, T=T, us=bench_dense(shape, T, args.rep),
                         bw_limit_us=shape.active_bytes(E, T) / bw * 1e6)
            log(dense)
            result["rows"].append(dense)
            ks = [max(1, round(f * E)) for f in FRACTIONS] + [1]
            for k in ks:
                try:
                    row = bench_decode(shape, T, k, "shared", bw, args.rep, seed=100 + k,
                                       stages=T == 1)
                    row["dense_us"] = dense["us"]
                except Exception as e:
                    row = dict(kind="decode", shape=name, T=T, k=k,
                               error=f"{type(e).__name__}: {e}"[:300])
                    traceback.print_exc()
                log(row)
                result["rows"].append(row)
            if T > 1:
                k = round(0.1 * E)
                try:
                    row = bench_decode(shape, T, k, "independent", bw, args.rep, seed=200 + T,
                                       stages=False)
                    row["dense_us"] = dense["us"]
                except Exception as e:
                    row = dict(kind="decode", shape=name, T=T, k=k, routing="independent",
                               error=f"{type(e).__name__}: {e}"[:300])
                    traceback.print_exc()
                log(row)
                result["rows"].append(row)
            save()
        if not args.no_prefill:
            if si == 0 and not args.no_sweep:
                blocks, rows = sweep_prefill(shape, args.rep, log)
                result["rows"] += rows
                result["prefill_blocks"] = repr(blocks)
                shape_prefill_blocks = blocks
            xd = torch.randn(PREFILL_TOKENS, H, device=device, dtype=torch.bfloat16)
            dense = dict(kind="dense", shape=name, T=PREFILL_TOKENS,
                         us=bench_us(lambda: dense_ffn(xd, shape.weights[0]), args.rep))
            log(dense)
            result["rows"].append(dense)
            for f in PREFILL_FRACTIONS:
                k = max(1, round(f * E))
                try:
                    row = bench_prefill(shape, k, args.rep, shape_prefill_blocks, 300 + k, log)
                    row["dense_us"] = dense["us"]
                except Exception as e:
                    row = dict(kind="prefill", shape=name, k=k,
                               error=f"{type(e).__name__}: {e}"[:300])
                    traceback.print_exc()
                    log(row)
                result["rows"].append(row)
            save()
        shape.free()
        torch.cuda.empty_cache()
    save()
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(v, nd=1):
    return "" if v is None else f"{v:.{nd}f}"


def markdown(result: dict, command: str) -> str:
    rows = [r for r in result["rows"] if "error" not in r]
    errors = [r for r in result["rows"] if "error" in r]
    out = [SECTION, "",
           f"{result['device']}, torch {result['torch']}, triton {result['triton']}, bf16; "
           f"copy bandwidth measured in the same run: {result['copy_GBps']:.0f} GB/s; three "
           f"dependent launches of an empty kernel: {result.get('launch_floor_us', 0):.1f} µs. "
           f"Medians of "
           f"CUDA-graph replays, µs per FFN (decode: per layer, over "
           f"{', '.join(str(s[4]) + ' layers at H=' + str(s[1]) for s in SHAPES)} called in "
           f"turn). Routing set so that every token selects exactly the stated experts; experts "
           f"of G=128 channels. Tiles: the sweep's picks (every variant and the tiles of each "
           f"table are in the JSON).", "",
           "```", command, "```", "",
           "**Decode, one token.** Target: PrunePath time <= (active fraction + 0.1) x dense "
           "cuBLAS; one active expert under 15 µs. Bandwidth limit: bytes of the active experts' "
           "rows and the router over the copy bandwidth. Stages from variants that leave the "
           "later kernels out.", "",
           "| FFN (H x I) | active experts | fraction | PrunePath | dense cuBLAS | x dense | "
           "target | met | bandwidth limit | router | gate/up | down | rel. error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "decode" or r["T"] != 1:
            continue
        one = r["k"] == 1
        target = 15.0 if one else (r["fraction"] + 0.1) * r["dense_us"]
        router = r.get("router_stage_cum_us")
        gu = r.get("gate_up_stage_cum_us")
        out.append(
            f"| {r['shape']} | {r['k']} of {r['E']} | {r['fraction']:.3f} | {_f(r['us'])} | "
            f"{_f(r['dense_us'])} | {r['us'] / r['dense_us']:.2f} | "
            f"{'< 15' if one else _f(target)} | {'yes' if r['us'] <= target else 'no'} | "
            f"{_f(r['bw_limit_us'])} | {_f(router)} | "
            f"{_f(gu - router if gu and router else None)} | "
            f"{_f(r['us'] - gu if gu else None)} | {r['rel_err']:.1e} |")
    out += ["", "**Batched decode** (the union of the tokens' experts is streamed once; "
            "`shared`: all tokens select the same experts, `independent`: each its own random "
            "set, so the union grows with T):", "",
            "| FFN | T | routing | experts per token | union fraction | PrunePath | dense cuBLAS | "
            "x dense | bandwidth limit (union) | rel. error |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "decode" or r["T"] == 1:
            continue
        out.append(f"| {r['shape']} | {r['T']} | {r['routing']} | {r['k']} | "
                   f"{r['union_fraction']:.2f} | {_f(r['us'])} | {_f(r['dense_us'])} | "
                   f"{r['us'] / r['dense_us']:.2f} | {_f(r['bw_limit_us'])} | "
                   f"{r['rel_err']:.1e} |")
    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        out += ["", f"**Prefill, {PREFILL_TOKENS} tokens.** Target: the grouped path faster than "
                "the dense masked path (`prunepath_ffn_reference`, what the runtime used before: "
                "every channel computed, then masked) at active fraction <= 0.5. FLOP limit: the "
                f"active pairs' FLOPs at {BF16_TFLOPS:.0f} TFLOP/s (all three projections "
                "sparse; with the dense down GEMM used here, the second number).", "",
                "| FFN | fraction | grouped | dense masked path | grouped / masked | "
                "masked with kernel gates | dense cuBLAS FFN | FLOP limit (sparse / dense down) "
                "| routing | schedule | grouped gate/up | down GEMM | rel. error |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pre:
            out.append(
                f"| {r['shape']} | {r['fraction']:.2f} | {_f(r['grouped_us'], 0)} | "
                f"{_f(r['dense_masked_path_us'], 0)} | "
                f"{r['grouped_us'] / r['dense_masked_path_us']:.2f} | "
                f"{_f(r['masked_gates_us'], 0)} | {_f(r['dense_us'], 0)} | "
                f"{_f(r['flop_limit_us'], 0)} / {_f(r['flop_limit_dense_down_us'], 0)} | "
                f"{_f(r['route_us'], 0)} | {_f(r['route_schedule_us'] - r['route_us'], 0)} | "
                f"{_f(r['grouped_gate_up_us'], 0)} | {_f(r['down_us'], 0)} | "
                f"{r['rel_err']:.1e} |")
    if errors:
        out += ["", "Rows that failed: " + "; ".join(
            f"{r['kind']} {r.get('shape', '')} k={r.get('k', '')}: {r['error'][:80]}"
            for r in errors)]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="where to write the JSON results (GPU run)")
    ap.add_argument("--render", help="a JSON written by a GPU run: print (or --markdown) its "
                                     "tables, no GPU needed")
    ap.add_argument("--markdown", help="docs/benchmarks.md: replace this benchmark's section")
    ap.add_argument("--rep", type=int, default=10, help="ms of replays per measurement")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    ap.add_argument("--quick", action="store_true", help="4 layers per shape (L2 may help)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter "
                    "(TRITON_INTERPRET=1), to check this script without a GPU")
    args = ap.parse_args()
    if args.smoke:
        global PREFILL_TOKENS
        SMOKE["on"], PREFILL_TOKENS = True, 40
    if args.render:
        result = json.loads(Path(args.render).read_text())
        command = result.get("command", "")
    else:
        if not args.out:
            raise SystemExit("give --out (GPU run) or --render JSON")
        if not torch.cuda.is_available() and not args.smoke:
            raise SystemExit("benchmarks/prunepath_kernels.py needs a CUDA GPU (or --render)")
        result = run(args)
        command = result["command"]
    text = markdown(result, command)
    print(text)
    if args.markdown:
        from _docs import replace_section

        replace_section(Path(args.markdown), SECTION, text)


if __name__ == "__main__":
    main()
