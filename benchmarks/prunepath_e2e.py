"""End-to-end decode speed of PrunePath against the dense model, next to the ideal (issue 12).

Greedy decoding with a static KV cache, every decode step replayed from one CUDA graph
(:class:`_gpu_timing.GreedyDecoder`), so the host does not hide the kernels. Models, random bf16
weights (speed only; nothing is downloaded):

* ``llama-3-8b``: the Llama-3-8B configuration (H 4096, I 14336, 32 layers unless ``--layers``),
  experts of 128 channels (112 per MLP);
* ``smollm2-135m``: SmolLM2-135M's configuration (H 576, I 1536, 30 layers), experts of 32
  channels (48 per MLP, as ``examples/prunepath-smollm2.yaml``).

Each model is measured dense (its own HF MLPs through cuBLAS), then with PrunePath routers on
every MLP (``Analyze``, then :func:`~prunegraph.passes.prunepath.moefy.contiguous_layout`: experts
are consecutive channel blocks, no clustering on random weights) running the Triton decode and
prefill kernels (:func:`~prunegraph.targets.triton.runner.install_prunepath_mlps`).

**Routing is set, not learned.** Every router is zero, so each token's softmax is uniform and
ties rank the lower expert id first: with τ = (k + 0.5) / E (exclusive mode) every token of
every layer selects exactly experts ``0 .. k-1``, k = 25% and 50% of E (checked on the kernels'
own selection). All tokens of a batch choose the same experts, so at batch 8 the union the
kernels stream is also k experts (the kernel table of ``benchmarks/prunepath_kernels.py`` shows
independent routing, where the union grows).

**Ideal**: the ratio of bytes one decode step reads, dense over PrunePath: every weight but the
input embedding (the output head included), the static K/V cache of the batch, and for
PrunePath the active experts' gate, up and down rows instead of the whole MLP, plus the routers.
``x ideal`` = speed-up / ideal speed-up. Also reported: the steps' time against those bytes at
the copy bandwidth measured in the same run.

``--compile`` also times the models with the whole decode step compiled by ``torch.compile``
(inductor) before capture: HF's decode step runs dozens of small kernels per layer (norms,
rotary embedding, cache writes, residual adds), about 4 ms of an 8B step that no weight
reduction shrinks (``gpu_speed`` section of docs/benchmarks.md); fusing them shows how much of
the ideal the FFN kernels themselves reach. The PrunePath FFNs enter the compiled graph as one
custom operator each (``as_op``).

Each PrunePath configuration is also checked: the logits of one decode-shaped forward through
the kernels against the routers' masked PyTorch path (relative error), and, over the whole
greedy run, how many generated tokens equal the masked path's.

GPU (one H200): ``--quick`` about 2 minutes; the full run about 5::

    python benchmarks/prunepath_e2e.py --quick --out benchmarks/results/prunepath_e2e.json \\
        --markdown docs/benchmarks.md

Dry run of the logic on the CPU (tiny shapes, Triton interpreter, a few minutes)::

    TRITON_INTERPRET=1 python benchmarks/prunepath_e2e.py --dry-run --out /tmp/pp_e2e.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
from _docs import replace_section
from _gpu_timing import (
    GreedyDecoder,
    copy_bandwidth,
    decode_bytes,
    no_host_sync,
    use_graph_attention,
)
from torch import nn

from prunegraph.pipeline.runfolder import atomic_write_text

SECTION = "## PrunePath end-to-end decode with a static cache and CUDA graphs (GPU)"
#: model -> (config name, experts' channels)
MODELS = {"llama-3-8b": ("meta:llama-3-8b", 128), "smollm2-135m": ("meta:smollm2-135m", 32)}
DRY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=256)
DRY_GROUP = 16
START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {text}", flush=True)


# --------------------------------------------------------------------------------------------
# Models and routing
# --------------------------------------------------------------------------------------------


def build(name: str, args, device: str, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """The model of random weights and its experts' size."""
    from transformers import AutoModelForCausalLM

    from prunegraph.data.models import load_config

    spec, group = MODELS[name]
    config = load_config(spec)
    if args.dry_run:
        for key, value in DRY_SHAPE.items():
            setattr(config, key, value)
        group = DRY_GROUP
    if args.layers and not args.dry_run and name == "llama-3-8b":
        config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), group


def layout(model: nn.Module, group: int) -> list[dict]:
    from prunegraph.passes.analyze import Analyze
    from prunegraph.passes.prunepath.moefy import contiguous_layout
    from prunegraph.pipeline.contract import State

    groups = Analyze()(State(model=model, tokenizer=None)).state.groups
    return contiguous_layout(list(groups), group)


def set_routing(model: nn.Module, k: int) -> float:
    """Zero routers and the τ at which every token keeps exactly ``k`` experts (exclusive)."""
    from prunegraph.passes.prunepath import router as pp

    experts = pp.routers(model)[0].experts
    with torch.no_grad():
        for r in pp.routers(model):
            r.weight.zero_()
    tau = (k + 0.5) / experts if k < experts else 1.05
    pp.set_tau(model, tau)
    return tau


def check_selection(model: nn.Module, k: int, batch: int) -> dict:
    """The kernels' own selection on random inputs: ``k`` experts for every token."""
    from prunegraph.passes.prunepath import router as pp
    from prunegraph.targets.triton.prunepath import router_select

    r = pp.routers(model)[0]
    x = torch.randn(batch, r.weight.shape[1], device=r.weight.device, dtype=r.weight.dtype)
    sel = router_select(x, r.weight, r.tau, r.mode)
    counts = sorted(set(sel.count.tolist()))
    first = sorted(sel.ids[0, :k].tolist())
    return {"experts_selected": counts, "selection_ok": counts == [k]
            and first == list(range(k))}


# --------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------


def mlp_weight_bytes(model: nn.Module, entries: list[dict]) -> list[int]:
    """Per routed MLP: bytes of its gate, up and down weights (its channels only)."""
    out = []
    for e in entries:
        total = 0
        for info in e["weights"].values():
            p = model.get_parameter(info["param"])
            total += p.numel() // p.shape[info["dim"]] * e["width"] * p.element_size()
        out.append(total)
    return out


def prunepath_bytes(dense: int, mlp: list[int], fraction: float, routers: int) -> int:
    """The dense step's bytes with each MLP read at ``fraction`` of its channels, plus the
    routers' weights."""
    return int(dense - sum(mlp) * (1 - fraction) + routers)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def decode(model: nn.Module, batch: int, args, prompt: torch.Tensor, compile: str | None,
           check_sync: bool = False) -> dict:
    """Median decode tokens/s over ``args.reps`` greedy runs (after a warm-up run)."""
    decoder = GreedyDecoder(model, batch, args.prompt_len, args.new_tokens, compile=compile)
    try:
        if check_sync:
            with torch.no_grad():
                decoder.prefill(prompt)
                with no_host_sync():
                    decoder.step()
        tokens, _ = decoder.generate(prompt)  # warm-up: compiles, captures
        times = [decoder.generate(prompt)[1] for _ in range(args.reps)]
        sec = statistics.median(times)
        return {"tok_s": batch * args.new_tokens / sec, "ms_per_step": 1e3 * sec / args.new_tokens,
                "ms_per_step_all": [round(1e3 * t / args.new_tokens, 4) for t in times],
                "compile_seconds": round(decoder.compile_seconds, 1),
                "tokens": tokens[:, args.prompt_len:].cpu()}
    finally:
        decoder.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()


@torch.no_grad()
def logits_error(model: nn.Module, ids: torch.Tensor) -> float:
    """Relative error of one decode-shaped forward's logits (``ids [B, 1]``, no cache) through
    the kernels against the routers' masked PyTorch path."""
    from prunegraph.targets.triton.runner import own_forwards

    kernels = model(input_ids=ids, use_cache=False).logits.double()
    with own_forwards(model):
        masked = model(input_ids=ids, use_cache=False).logits.double()
    return float((kernels - masked).norm() / masked.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def run_model(name: str, args, device: str, bw: float | None, save) -> dict:
    from prunegraph.passes.prunepath import router as pp
    from prunegraph.targets.triton.runner import install_prunepath_mlps, uninstall

    t0 = time.perf_counter()
    model, group = build(name, args, device, torch.bfloat16 if device == "cuda" else
                         torch.float32)
    use_graph_attention(model)
    entries = layout(model, group)
    say(f"{name}: built and analysed in {time.perf_counter() - t0:.1f}s "
        f"({len(model.model.layers)} layers, {len(entries)} routed MLPs)")
    cache_len = args.prompt_len + args.new_tokens
    mlp = mlp_weight_bytes(model, entries)
    E = -(-entries[0]["width"] // group)
    entry = {"model": name, "layers": len(model.model.layers), "hidden": model.config.hidden_size,
             "intermediate": entries[0]["width"], "group_size": group, "experts": E,
             "rows": [], "setup_seconds": round(time.perf_counter() - t0, 1)}
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=gen).to(device)
               for b in args.batches}
    backend = ("inductor" if not args.dry_run else "eager") if (
        args.compile and name in args.compile_models) else None

    def add(row: dict) -> None:
        tokens = row.pop("tokens", None)
        entry["rows"].append(row)
        save(entry)
        say(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items() if k != "ms_per_step_all"))
        return tokens

    # dense: the HF step, then (within the budget) the compiled step at --compile-batches
    dense = {}
    plan = [(None, b) for b in args.batches]
    if backend is not None and not over_budget(args):
        plan += [(backend, b) for b in args.compile_batches]
    for compile, b in plan:
        r = decode(model, b, args, prompts[b], compile, check_sync=args.dry_run)
        r.update(config="dense", compiled=bool(compile), batch=b, fraction=1.0,
                 gbytes=decode_bytes(model, b, cache_len) / 1e9)
        if bw:
            r["bw_ms_per_step"] = r["gbytes"] * 1e9 / bw * 1e3
        dense[compile, b] = r
        add(dict(r))
    pp.install(model, entries, tau=1.05)
    router_bytes = sum(r.weight.numel() * r.weight.element_size() for r in pp.routers(model))
    install_prunepath_mlps(model, max_grid_tokens=16, as_op=backend is not None)
    # PrunePath: every fraction with the HF step, then the compiled twins of the dense rows
    runs = [(f, None, b) for f in args.fractions for b in args.batches]
    runs += [(f, c, b) for f in args.compile_fractions for c, b in dense if c is not None]
    checked = {}
    for fraction, compile, b in runs:
        k = max(1, round(fraction * E))
        tau = set_routing(model, k)
        if k not in checked:
            checked[k] = {**check_selection(model, k, max(args.batches)),
                          "logits_rel_err": logits_error(model, prompts[max(args.batches)][:, :1])}
        r = decode(model, b, args, prompts[b], compile, check_sync=args.dry_run)
        d = dense[compile, b]
        gbytes = prunepath_bytes(decode_bytes(model, b, cache_len) - router_bytes, mlp, k / E,
                                 router_bytes) / 1e9
        r.update(config="prunepath", compiled=bool(compile), batch=b, fraction=k / E,
                 experts=k, tau=tau, gbytes=gbytes, **checked[k])
        r["speedup"] = r["tok_s"] / d["tok_s"]
        r["ideal"] = d["gbytes"] / gbytes
        r["of_ideal"] = r["speedup"] / r["ideal"]
        if bw:
            r["bw_ms_per_step"] = gbytes * 1e9 / bw * 1e3
        if compile is None:
            r["tokens_equal_masked"] = tokens_equal_masked(model, b, args, prompts[b],
                                                           r["tokens"])
        add(r)
    uninstall(model)
    pp.remove(model)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    save(entry)
    return entry


def tokens_equal_masked(model, batch: int, args, prompt, tokens) -> int | None:
    """How many greedy tokens (the first run's, from the start) the routers' masked PyTorch path
    reproduces: the kernels accumulate in another order, so bf16 argmax ties may differ after a
    while. Only with ``--check-tokens`` (one more eager run)."""
    if not args.check_tokens:
        return None
    from prunegraph.targets.triton.runner import own_forwards

    with own_forwards(model):
        ref = decode(model, batch, args, prompt, None)["tokens"]
    same = (ref == tokens).all(0).tolist() + [False]
    return same.index(False)


def over_budget(args) -> bool:
    """Compiled rows are not started once the run has used ``--compile-budget`` seconds (a
    started dense compiled row always gets its PrunePath twins)."""
    late = time.perf_counter() - START > args.compile_budget
    if late:
        say(f"skipping the compiled rows: {time.perf_counter() - START:.0f}s > --compile-budget")
    return late


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = [SECTION, "", setup_line(result), "", "```", result["command"], "```", ""]
    for m in result["models"]:
        lines += [f"**{m['model']}** ({m['layers']} layers, H {m['hidden']}, I "
                  f"{m['intermediate']}, {m['experts']} experts of {m['group_size']} channels)",
                  "", "| step | batch | configuration | active FFN | tok/s | ms / step | "
                  "bandwidth ms / step | speed-up | ideal | x ideal | logits rel. err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            step = "compiled" if r["compiled"] else "HF eager"
            cfg = "dense" if r["config"] == "dense" else f"PrunePath k={r['experts']}"
            speed = (f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['of_ideal']:.0%}"
                     if "speedup" in r else " | | ")
            err = f"{r['logits_rel_err']:.1e}" if "logits_rel_err" in r else ""
            bw = f"{r['bw_ms_per_step']:.2f}" if "bw_ms_per_step" in r else ""
            lines.append(f"| {step} | {r['batch']} | {cfg} | {r['fraction']:.2f} | "
                         f"{r['tok_s']:.0f} | {r['ms_per_step']:.2f} | {bw} | {speed} | {err} |")
        lines.append("")
    return "\n".join(lines)


def setup_line(result: dict) -> str:
    bw = result.get("bandwidth")
    bw_text = (f"; copy bandwidth measured in the same run: {bw['best'] / 1e9:.0f} GB/s"
               if bw else "")
    return (f"{result['device']}, torch {result['torch']}, triton {result['triton']}, "
            f"transformers {result['transformers']}, {result['dtype']}{bw_text}. Greedy decode "
            f"of {result['new_tokens']} tokens after a {result['prompt_len']}-token prompt, "
            f"static KV cache, each step one CUDA-graph replay; medians of {result['reps']} runs. "
            f"`HF eager`: the model's own modules in the graph; `compiled`: the step compiled by "
            f"torch.compile (inductor) first. PrunePath: zero routers, τ = (k + 0.5) / E, so "
            f"every token (and the batch's union) selects exactly experts 0..k-1. Ideal: dense "
            f"bytes per step over PrunePath's (weights but the input embedding, active experts "
            f"only, routers, K/V cache).")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    ap.add_argument("--layers", type=int, default=None,
                    help="Llama-3-8B layers (default: all 32)")
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.25, 0.5])
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the steps compiled by torch.compile (default on)")
    ap.add_argument("--compile-models", type=lambda s: s.split(","), default=["llama-3-8b"],
                    help="models whose compiled steps are timed (default: llama-3-8b)")
    ap.add_argument("--compile-batches", type=lambda s: [int(x) for x in s.split(",")],
                    default=None, help="batches of the compiled rows (default: --batches)")
    ap.add_argument("--compile-fractions", type=lambda s: [float(x) for x in s.split(",")],
                    default=None, help="PrunePath fractions of the compiled rows (default: "
                                       "--fractions)")
    ap.add_argument("--compile-budget", type=float, default=1e9,
                    help="do not start the compiled rows after this many seconds of the run")
    ap.add_argument("--check-tokens", action="store_true",
                    help="also decode through the masked PyTorch path and count equal tokens")
    ap.add_argument("--quick", action="store_true",
                    help="64-token prompt, 64 new tokens, 3 runs; compiled rows only for "
                         "Llama-3-8B at batch 1 and 50%%, not started after 60 s")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU (set TRITON_INTERPRET=1): checks the logic")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/prunepath_e2e.json")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens, args.reps = 64, 64, 3
        args.compile_budget = min(args.compile_budget, 60.0)
        args.compile_batches = args.compile_batches or [1]
        args.compile_fractions = args.compile_fractions or [0.5]
    if args.dry_run:
        args.prompt_len, args.new_tokens, args.reps, args.check_tokens = 6, 4, 1, True
        args.batches = [1, 3]
        args.compile_models = list(MODELS)
    args.compile_batches = args.compile_batches or args.batches
    args.compile_fractions = args.compile_fractions or args.fractions
    unknown = set(args.models) - set(MODELS)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from {list(MODELS)}")
    if any(not 0 < f <= 1 for f in args.fractions):
        ap.error("--fractions must lie in (0, 1]")
    if args.device == "cpu" and not args.dry_run:
        ap.error("the timings need a GPU; on the CPU use --dry-run (with TRITON_INTERPRET=1)")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry-run runs the Triton kernels on the CPU interpreter: set TRITON_INTERPRET=1")
    return args


def main() -> None:
    args = parse_args()
    import transformers
    import triton

    device = args.device
    if args.compile:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 64  # one entry per decoder alive at once
    result = {"device": torch.cuda.get_device_name() if device == "cuda"
              else f"CPU ({platform.machine()}, dry run)",
              "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__,
              "dtype": "bfloat16" if device == "cuda" else "float32",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
              "command": "python " + " ".join(sys.argv), "models": [], "errors": []}
    bw = None
    if device == "cuda":
        result["bandwidth"] = copy_bandwidth()
        bw = result["bandwidth"]["best"]
        say(f"copy bandwidth {bw / 1e9:.0f} GB/s")

    def save(entry: dict | None = None) -> None:
        if entry is not None and entry not in result["models"]:
            result["models"].append(entry)
        result["seconds"] = round(time.perf_counter() - START, 1)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    for name in args.models:
        try:
            run_model(name, args, device, bw, save)
        except Exception as e:  # noqa: BLE001 - keep the other model's rows
            traceback.print_exc()
            result["errors"].append(f"{name}: {type(e).__name__}: {e}"[:500])
            save()
    save()
    if args.markdown:
        replace_section(args.markdown, SECTION, markdown(result))
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
