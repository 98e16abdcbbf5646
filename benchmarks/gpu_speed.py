"""End-to-end speed of pruned models against the dense model they came from, next to the ideal.

Models: the full Llama-3-8B configuration (32 layers, from prunegraph's ``meta:llama-3-8b``
LlamaConfig, random bf16 weights: nothing is downloaded) and SmolLM2-135M (random weights of its
config on the GPU, the real weights on the CPU). Each is pruned by prunegraph's own pipeline
pieces: ``Analyze`` on the model, then ``Prune`` (one-shot ``magnitude`` scores, ``global``
allocation across layers and between heads and channels, so widths differ per layer) to each
``--sparsities`` fraction of the decoder's parameters, once per ``--round-to`` (``1``: the exact
widths the allocator gave before ``auto`` became the default; ``auto``: the default, the multiple
prunegraph's width table gives for the device and dtype, 64 on CUDA in bf16; ``latency``: widths on
the fast side of the GEMM latency steps measured on this device, cached under the user's cache
folder; an integer: multiples of it), and sliced with ``apply_plan``. Quality does not matter
here: the weights are random.

Measured in one run, dense and every pruned variant the same way (:mod:`_gpu_timing`):

* prefill latency of each ``--prefill`` shape (``BxS``), no cache, last logits only; CUDA-graph
  replays on the GPU;
* greedy decode tokens/s at each ``--batches`` size: ``--new-tokens`` steps after a
  ``--prompt-len`` prompt, static KV cache, one CUDA graph per step on the GPU.

``--triton 0.2:1,0.2:auto`` also measures those variants with the MLPs exported by ``prunegraph
export triton`` (the Triton-or-PyTorch plan timed per shape on this GPU) and installed.

Ideal speed-ups, from the models' shapes: prefill, the FLOP ratio (2 x tokens x linear weights of
the decoder, causal attention scores and values, the last token's logits); decode, the ratio of
bytes read per step (every weight but the input embedding, plus the static K/V cache of the
batch). ``x ideal`` is speed-up / ideal speed-up.

GPU (one H200: about 3 minutes; today's exact widths, ``auto`` and ``latency`` in one run)::

    python benchmarks/gpu_speed.py --round-to 1,auto,latency \\
        --out benchmarks/results/gpu_speed_h200.json --markdown docs/benchmarks.md

CPU half (SmolLM2-135M with its real weights, float32; prefill 512 tokens, greedy decode; also
times SwiGLU MLP widths to find the channel multiple the CPU runs fastest, and prunes to that
multiple too). The variants are timed in interleaved rounds (``--rounds``, medians), since the
load of a shared CPU drifts; one intra-op thread is steadier there::

    python benchmarks/gpu_speed.py --device cpu --threads 1 --out benchmarks/results/cpu_speed.json \\
        --markdown docs/benchmarks.md

Dry run of the GPU path's logic on the CPU (tiny shapes, seconds)::

    python benchmarks/gpu_speed.py --device cpu --dry-run --out /tmp/gpu_speed_dry.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time

import torch
from _docs import replace_section
from _gpu_timing import (
    GreedyDecoder,
    copy_bandwidth,
    decode_bytes,
    no_host_sync,
    time_prefill,
    use_graph_attention,
)
from torch import nn

from prunegraph.pipeline.runfolder import atomic_write_text

GPU_SECTION = "## End-to-end speed of pruned models on the GPU (Llama-3-8B, SmolLM2)"
CPU_SECTION = "## End-to-end speed of pruned models on the CPU (SmolLM2-135M)"


# --------------------------------------------------------------------------------------------
# Models and pruning
# --------------------------------------------------------------------------------------------


def build_model(name: str, device: str, dtype: torch.dtype, real: bool, layers: int | None,
                vocab: int | None) -> nn.Module:
    """The named model: real SmolLM2 weights when ``real``, else random weights of the config
    (built on ``device`` directly). ``layers``/``vocab`` shrink the config for dry runs."""
    from transformers import AutoModelForCausalLM

    from prunegraph.data.models import load_config, load_model

    if real:
        model, _ = load_model(name, dtype=dtype)
        return model.to(device).eval()
    config = load_config(name if name.startswith(("random:", "meta:")) else f"meta:{name}")
    if layers:
        config.num_hidden_layers = layers
    if vocab:
        config.vocab_size = vocab
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prune_plans(model: nn.Module, sparsities, round_tos) -> tuple[dict, dict, dict]:
    """``{(sparsity, round_to): plan}`` from Analyze + Prune(magnitude, global), timings, and
    ``{(sparsity, round_to): what Prune resolved round_to to}`` (its ``metrics["prune"]
    ["widths"]``: the multiple, device, dtype, and under ``latency`` the measured GEMM times)."""
    from prunegraph.passes.analyze import Analyze
    from prunegraph.passes.prune import Prune
    from prunegraph.pipeline.contract import State

    t0 = time.perf_counter()
    state = Analyze()(State(model=model, tokenizer=None)).state
    seconds = {"analyze": time.perf_counter() - t0}
    plans, resolved = {}, {}
    t0 = time.perf_counter()
    for s in sparsities:
        for r in round_tos:
            t1 = time.perf_counter()
            state = Prune(criterion="magnitude", sparsity=s, round_to=r,
                          strategy="global")(state).state
            plans[(s, r)] = state.plan
            resolved[(s, r)] = {k: v for k, v in state.metrics["prune"]["widths"].items()
                                if k != "source"}
            resolved[(s, r)]["prune_seconds"] = time.perf_counter() - t1
    seconds["prune"] = time.perf_counter() - t0
    return plans, seconds, resolved


def variant_name(s: float, r, resolved: dict) -> str:
    """``pruned 0.2 round_to=auto (64)``: a named round_to shows the multiple it resolved to."""
    label = f"{r} ({resolved['multiple']})" if isinstance(r, str) else str(r)
    return f"pruned {s:g} round_to={label}"


def sliced_copy(model: nn.Module, plan) -> nn.Module:
    from prunegraph.plan.slicing import apply_plan

    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned


# --------------------------------------------------------------------------------------------
# Shapes: widths, FLOPs, bytes
# --------------------------------------------------------------------------------------------


def _layers(model: nn.Module):
    return model.model.layers


def widths(model: nn.Module) -> dict:
    """Per-layer MLP widths and attention heads, summarised."""
    mlp = [layer.mlp.up_proj.out_features for layer in _layers(model)]
    attn = [layer.self_attn for layer in _layers(model)]
    hd = attn[0].head_dim
    q = [a.q_proj.out_features // hd for a in attn]
    kv = [a.k_proj.out_features // hd for a in attn]
    return {"mlp_min": min(mlp), "mlp_max": max(mlp), "mlp_mean": statistics.mean(mlp),
            "mlp_multiple_of_64": sum(w % 64 == 0 for w in mlp),
            "mlp_multiple_of_8": sum(w % 8 == 0 for w in mlp), "layers": len(mlp),
            "q_heads": sum(q), "kv_heads": sum(kv), "mlp_widths": mlp}


def decoder_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _layers(model).parameters())


def _linear_weights(model: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in _layers(model).modules()
               if isinstance(m, nn.Linear))


def prefill_flops(model: nn.Module, batch: int, seq: int) -> float:
    """Matmul FLOPs of a prompt forward: decoder linears, causal attention (QK^T and PV over
    the lower triangle), and the last token's logits."""
    attn = sum(layer.self_attn.q_proj.out_features for layer in _layers(model))
    head = model.get_output_embeddings().weight.numel()
    return (2 * batch * seq * _linear_weights(model) + 2 * batch * seq * (seq + 1) * attn
            + 2 * batch * head)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model: nn.Module, args, device: str, check_sync: bool = False) -> dict:
    """Prefill latency and decode tokens/s of ``model``, with the shape quantities."""
    use_graph_attention(model)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(1)
    row: dict = {"decoder_params": decoder_params(model), "widths": widths(model)}
    for shape in args.prefill:
        b, s = shape
        ids = torch.randint(3, vocab, (b, s), generator=gen).to(device)
        row[f"prefill_{b}x{s}_ms"] = 1e3 * time_prefill(model, ids, reps=args.reps)
        row[f"prefill_{b}x{s}_gflop"] = prefill_flops(model, b, s) / 1e9
        _sync(device)
    for batch in args.batches:
        prompt = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).to(device)
        decoder = GreedyDecoder(model, batch, args.prompt_len, args.new_tokens)
        if check_sync:  # the step a CUDA graph would capture reads nothing on the host
            with torch.no_grad():
                decoder.prefill(prompt)
                with no_host_sync():
                    decoder.step()
            row["decode_step_host_sync_free"] = True
        _, seconds = decoder.generate(prompt)
        row[f"decode_b{batch}_tok_s"] = batch * args.new_tokens / seconds
        row[f"decode_b{batch}_ms_per_step"] = 1e3 * seconds / args.new_tokens
        row[f"decode_b{batch}_gbytes"] = decode_bytes(
            model, batch, args.prompt_len + args.new_tokens) / 1e9
        decoder.close()
        _sync(device)
    return row


def measure_interleaved(models: dict[str, nn.Module], args, device: str) -> dict[str, dict]:
    """The same quantities as :func:`measure` for several models, timed in ``args.rounds``
    interleaved rounds (each round times every model once, in a rotated order) and reduced to
    medians: on a shared CPU the load drifts over minutes, and interleaving spreads the drift over
    every model instead of biasing whichever ran during a busy spell."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    names = list(models)
    vocab = next(iter(models.values())).config.vocab_size
    prompts = {(b, s): torch.randint(3, vocab, (b, s), generator=gen) for b, s in args.prefill}
    decode_prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=gen)
                      for b in args.batches}
    rows, decoders, times = {}, {}, {n: {} for n in names}
    for n, m in models.items():
        use_graph_attention(m)
        rows[n] = {"decoder_params": decoder_params(m), "widths": widths(m)}
        for b, s in args.prefill:
            rows[n][f"prefill_{b}x{s}_gflop"] = prefill_flops(m, b, s) / 1e9
        for b in args.batches:
            decoders[n, b] = GreedyDecoder(m, b, args.prompt_len, args.new_tokens)
            rows[n][f"decode_b{b}_gbytes"] = decode_bytes(
                m, b, args.prompt_len + args.new_tokens) / 1e9
        with torch.no_grad():  # the step a CUDA graph would capture reads nothing on the host
            d = decoders[n, args.batches[0]]
            d.prefill(decode_prompts[args.batches[0]])
            with no_host_sync():
                d.step()
        rows[n]["decode_step_host_sync_free"] = True
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            for (b, s), ids in prompts.items():
                times[n].setdefault(f"prefill_{b}x{s}", []).append(
                    time_prefill(models[n], ids, reps=1))
            for b in args.batches:
                _, seconds = decoders[n, b].generate(decode_prompts[b])
                times[n].setdefault(f"decode_b{b}", []).append(seconds)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for n in names:
        for b, s in args.prefill:
            key = f"prefill_{b}x{s}"
            rows[n][f"{key}_ms"] = 1e3 * statistics.median(times[n][key])
            rows[n][f"{key}_ms_all"] = [1e3 * t for t in times[n][key]]
        for b in args.batches:
            sec = statistics.median(times[n][f"decode_b{b}"])
            rows[n][f"decode_b{b}_tok_s"] = b * args.new_tokens / sec
            rows[n][f"decode_b{b}_ms_per_step"] = 1e3 * sec / args.new_tokens
            rows[n][f"decode_b{b}_ms_per_step_all"] = [1e3 * t / args.new_tokens
                                                      for t in times[n][f"decode_b{b}"]]
    return rows


def compare(dense: dict, pruned: dict, args) -> dict:
    """Speed-ups of ``pruned`` over ``dense`` and the ideal speed-ups beside them."""
    out = {}
    for b, s in args.prefill:
        key = f"prefill_{b}x{s}"
        speed = dense[f"{key}_ms"] / pruned[f"{key}_ms"]
        ideal = dense[f"{key}_gflop"] / pruned[f"{key}_gflop"]
        out[key] = {"speedup": speed, "ideal": ideal, "of_ideal": speed / ideal}
    for batch in args.batches:
        key = f"decode_b{batch}"
        speed = pruned[f"{key}_tok_s"] / dense[f"{key}_tok_s"]
        ideal = dense[f"{key}_gbytes"] / pruned[f"{key}_gbytes"]
        out[key] = {"speedup": speed, "ideal": ideal, "of_ideal": speed / ideal}
    return out


def install_triton(model: nn.Module, folder: str, device: str) -> dict:
    """Export the model's MLPs with ``prunegraph export triton`` (the Triton-or-PyTorch plan
    timed per distinct shape and token bucket on this GPU, CUDA-graph medians over ~3 ms each)
    and install the generated launchers; returns how many shapes took each path per bucket."""
    from prunegraph.targets.triton.export import export_triton
    from prunegraph.targets.triton.runner import install_triton_mlps

    timer = None
    if device == "cuda":
        import triton.testing

        def timer(path, shape, tokens, fn):
            return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=3, return_mode="median")
    t0 = time.perf_counter()
    report = export_triton(model, folder, overwrite=True, timer=timer)
    seconds = time.perf_counter() - t0
    layers = json.loads(open(os.path.join(folder, "layers.json")).read())["layers"]
    install_triton_mlps(model, list(layers), os.path.join(folder, "kernels.py"))
    counts = [dict(triton=0, torch=0) for _ in next(iter(report["paths"].values()))]
    for paths in report["paths"].values():
        for k, p in enumerate(paths):
            counts[k][p] += 1
    return {"export_seconds": seconds, "distinct_shapes": report["distinct_shapes"],
            "paths_per_bucket": counts}


def run_interleaved(name, model, plans, seconds, resolved, args, device, save) -> dict:
    """Every variant in memory at once, timed by :func:`measure_interleaved`."""
    models = {"dense": model}
    for (s, r), plan in plans.items():
        models[variant_name(s, r, resolved[(s, r)])] = sliced_copy(model, plan)
    rows = measure_interleaved(models, args, device)
    dense = rows.pop("dense")
    variants = [{"config": "dense", **dense}]
    for ((s, r), _), (config, row) in zip(plans.items(), rows.items()):
        row.update(config=config, sparsity=s, round_to=r, round_to_resolved=resolved[(s, r)],
                   removed_fraction=1 - row["decoder_params"] / dense["decoder_params"],
                   vs_dense=compare(dense, row, args))
        variants.append(row)
    entry = {"model": name, "seconds": seconds, "variants": variants, "rounds": args.rounds}
    save(entry)
    return entry


def run_model(name: str, args, device: str, dtype: torch.dtype, save=lambda entry: None) -> dict:
    """Dense and every pruned variant of one model; ``save(entry)`` after each (partial runs
    keep what they measured)."""
    t0 = time.perf_counter()
    model = build_model(name, device, dtype, real=args.real_weights, layers=args.layers,
                        vocab=args.vocab)
    built = time.perf_counter() - t0
    plans, seconds, resolved = prune_plans(model, args.sparsities, args.round_to)
    seconds["build"] = built
    print(f"{name}: built in {built:.1f}s, analyze {seconds['analyze']:.1f}s, "
          f"prune {seconds['prune']:.1f}s", flush=True)
    if args.rounds > 1:
        return run_interleaved(name, model, plans, seconds, resolved, args, device, save)
    dense = measure(model, args, device, check_sync=args.check_sync)
    print(json.dumps({k: v for k, v in dense.items() if k != "widths"}), flush=True)
    variants = [{"config": "dense", **dense}]
    entry = {"model": name, "seconds": seconds, "variants": variants}
    save(entry)
    for (s, r), plan in plans.items():
        pruned = None
        try:
            pruned = sliced_copy(model, plan)
            kinds = [] if args.only_triton else [""]
            if (s, r) in args.triton:
                kinds.append(" + Triton MLPs")
            for kind in kinds:
                extra = {}
                if kind:
                    extra["triton"] = install_triton(pruned, os.path.join(
                        args.kernel_dir, f"{name}_{s:g}_{r}"), device)
                row = measure(pruned, args, device)
                row.update(config=variant_name(s, r, resolved[(s, r)]) + kind, sparsity=s,
                           round_to=r, round_to_resolved=resolved[(s, r)],
                           removed_fraction=1 - row["decoder_params"] / dense["decoder_params"],
                           vs_dense=compare(dense, row, args), **extra)
                print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
                variants.append(row)
        except Exception as e:  # noqa: BLE001 - keep the other variants
            import traceback

            traceback.print_exc()
            entry.setdefault("errors", []).append(f"{s} {r}: {type(e).__name__}: {e}"[:300])
        save(entry)
        del pruned
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return entry


# --------------------------------------------------------------------------------------------
# CPU: which width multiple the SwiGLU GEMMs want
# --------------------------------------------------------------------------------------------


def sweep_widths(bases: range, offsets=(0, 1, 2, 4, 8, 16, 32)) -> list[int]:
    """Widths ``base + offset`` for 64-aligned bases: every multiple class (odd, 2, 4, ... 64,
    and 128 where the base is one) appears several times in the same range."""
    return sorted({b + o for b in bases for o in offsets})


def cpu_width_sweep(H: int, widths_: list[int], tokens: tuple[int, ...], rounds: int) -> dict:
    """Median time of a SwiGLU MLP (``H`` -> ``I`` -> ``H``, float32) at every width over
    ``rounds`` rounds (each round times every width once, in a shuffled order), and the time per
    channel of widths that are multiples of 1, 2, 4, ... relative to all widths."""
    import random

    from prunegraph.targets.triton.swiglu import swiglu_reference

    gen = torch.Generator().manual_seed(0)
    top = max(widths_)
    wg, wu = torch.randn(top, H, generator=gen), torch.randn(top, H, generator=gen)
    wd = torch.randn(H, top, generator=gen)
    weights = {I: (wg[:I].contiguous(), wu[:I].contiguous(), wd[:, :I].contiguous())
               for I in widths_}
    shuffle = random.Random(0)
    out = {}
    for T in tokens:
        x = torch.randn(T, H, generator=gen)
        times: dict[int, list[float]] = {I: [] for I in widths_}
        for _ in range(rounds):
            order = list(widths_)
            shuffle.shuffle(order)
            for I in order:
                swiglu_reference(x, *weights[I])  # warm
                t0 = time.perf_counter()
                swiglu_reference(x, *weights[I])
                times[I].append(time.perf_counter() - t0)
        per_width = {I: statistics.median(ts) for I, ts in times.items()}
        per_channel = {I: t / I for I, t in per_width.items()}
        base = statistics.mean(per_channel.values())
        by_multiple = {}
        for m in (1, 2, 4, 8, 16, 32, 64, 128):
            sel = [c for I, c in per_channel.items() if I % m == 0]
            if sel:
                by_multiple[m] = base / statistics.mean(sel)
        out[T] = {"us": {I: 1e6 * t for I, t in per_width.items()},
                  "speed_per_channel_vs_all_widths": by_multiple}
    return out


def wanted_multiple(sweep: dict, tolerance: float = 0.02) -> int:
    """The smallest multiple whose widths are within ``tolerance`` of the fastest multiple's
    speed per channel, at the largest token count measured (the GEMM-bound case)."""
    rel = sweep[max(sweep)]["speed_per_channel_vs_all_widths"]
    best = max(rel.values())
    return min(m for m, v in rel.items() if v >= best * (1 - tolerance))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}"


def markdown(result: dict, args) -> str:
    cuda = result["device"] != "cpu"
    cmd = "python benchmarks/gpu_speed.py " + " ".join(result["argv"])
    lines = [GPU_SECTION if cuda else CPU_SECTION, "",
             f"`{cmd}`", "",
             f"{result['device_name']}, torch {result['torch']}, transformers "
             f"{result['transformers']}, {result['dtype']}. Pruned by `Analyze` + `Prune("
             f"criterion=magnitude, strategy=global)` to each sparsity of the decoder's "
             f"parameters, widths exact (`round_to=1`), multiples of the given number, `auto` "
             f"(the default: the width table's multiple for this device and dtype, in brackets) "
             f"or `latency` (the widths on the fast side of GEMM latency steps measured here); "
             f"{'random weights' if not args.real_weights else 'real weights'}. Prefill: one "
             f"prompt forward (no cache, last logits){' as CUDA-graph replays' if cuda else ''}; "
             f"decode: greedy, static KV cache, {args.new_tokens} steps after a "
             f"{args.prompt_len}-token prompt{', one CUDA graph per step' if cuda else ''}. "
             f"Ideal: FLOP ratio (prefill), ratio of bytes read per step (decode: weights "
             f"and the K/V cache). Each cell: speed-up over dense / ideal speed-up.", ""]
    if cuda and "bandwidth_TBps" in result:
        bw = result["bandwidth_TBps"]
        lines += ["Measured memory bandwidth: " + ", ".join(
            f"{v:.2f} TB/s {k.replace('_', ' ')}" for k, v in bw.items() if k != "best") + ".",
            ""]
    for m in result["models"]:
        keys = [f"prefill_{b}x{s}" for b, s in args.prefill] + \
               [f"decode_b{b}" for b in args.batches]
        dense = m["variants"][0]
        head = ["configuration", "decoder params", "MLP widths"] + \
               [k.replace("_", " ") for k in keys]
        lines += [f"**{m['model']}**", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        abs_cells = [f"{dense[f'{k}_ms']:.1f} ms" if k.startswith("prefill")
                     else f"{dense[f'{k}_tok_s']:.0f} tok/s" for k in keys]
        w = dense["widths"]
        lines.append(f"| dense | {dense['decoder_params'] / 1e6:,.1f} M | {w['mlp_min']} | "
                     + " | ".join(abs_cells) + " |")
        for err in m.get("errors", []):
            lines.append(f"| error: {err[:100]} |" + " |" * (len(head) - 1))
        for v in m["variants"][1:]:
            w = v["widths"]
            cells = []
            for k in keys:
                c = v["vs_dense"][k]
                cells.append(f"{_fmt(c['speedup'])}x / {_fmt(c['ideal'])}x "
                             f"({100 * c['of_ideal']:.0f}%)")
            lines.append(f"| {v['config']} | {v['decoder_params'] / 1e6:,.1f} M | "
                         f"{w['mlp_min']}-{w['mlp_max']} ({w['mlp_multiple_of_64']}/"
                         f"{w['layers']} x64) | " + " | ".join(cells) + " |")
        lines.append("")
    if "cpu_widths" in result:
        cw = result["cpu_widths"]
        lines += [f"SwiGLU MLP on this CPU (H={cw['hidden']}, float32, {len(cw['widths'])} widths "
                  f"{cw['widths'][0]}-{cw['widths'][-1]}: 64-aligned bases plus 1, 2, 4, ... 32): "
                  f"speed per channel of widths that are a multiple of m, relative to all widths "
                  f"(medians of {args.rounds} shuffled rounds):", "",
                  "| tokens | " + " | ".join(f"m={m}" for m in cw["multiples"]) + " |",
                  "|---|" + "---|" * len(cw["multiples"])]
        for T, row in cw["sweep"].items():
            rel = {int(m): v for m, v in row["speed_per_channel_vs_all_widths"].items()}
            cells = (_fmt(rel[m], 3) if m in rel else "" for m in cw["multiples"])
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
        lines += ["", f"Width multiple the CPU wants (smallest within 2% of the best, at "
                  f"{max(cw['sweep'])} tokens): **{cw['wanted_multiple']}**.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        b, _, s = item.partition("x")
        out.append((int(b), int(s)))
    return out


def _round_to(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in text.split(",")]


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default=None,
                    help="comma list (default: llama-3-8b,smollm2-135m on cuda, smollm2-135m "
                         "on cpu)")
    ap.add_argument("--sparsities", default=None, help="default 0.2,0.5 (cuda) / 0.2 (cpu)")
    ap.add_argument("--round-to", default=None,
                    help="comma list of Prune round_to values: integers (1: exact widths), auto "
                         "(the default of Prune), latency (measured GEMM steps); on the cpu also "
                         "'measured': the width multiple the CPU sweep found (default 1,auto,"
                         "latency on cuda, 1,auto on the cpu)")
    ap.add_argument("--prefill", default=None, help="BxS list (default 1x2048,8x512 / 1x512)")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,32 / 1)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 / 64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=None, help="prefill repetitions (median)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds over all variants (default 1 on cuda: each variant "
                         "timed in turn; 5 on the cpu, whose load drifts)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    ap.add_argument("--triton", default="",
                    help="sparsity:round_to pairs (e.g. 0.2:1,0.2:auto) also measured with the "
                         "generated Triton MLPs installed (export-time plan per shape)")
    ap.add_argument("--only-triton", action="store_true",
                    help="measure those pruned variants with Triton MLPs only (not with cuBLAS)")
    ap.add_argument("--kernel-dir", default="/tmp/prunegraph_gpu_speed_kernels",
                    help="where the generated Triton modules are written")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes of the GPU path's logic (2-layer configs, short runs)")
    ap.add_argument("--no-width-sweep", action="store_true", help="cpu: skip the width sweep")
    ap.add_argument("--threads", type=int, default=None,
                    help="cpu: torch intra-op threads (1 is steadier on a shared, loaded machine)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown", default=None, help="write the section into this file")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    args.models = (args.models or ("llama-3-8b,smollm2-135m" if cuda else "smollm2-135m"))
    args.models = args.models.split(",")
    args.sparsities = [float(s) for s in (args.sparsities or ("0.2,0.5" if cuda else "0.2"))
                       .split(",")]
    args.round_to = _round_to(args.round_to or ("1,auto,latency" if cuda else "1,auto"))
    args.triton = {(float(a), _round_to(b)[0]) for a, b in
                   (p.split(":") for p in args.triton.split(",") if p)}
    args.prefill = _shapes(args.prefill or ("1x2048,8x512" if cuda else "1x512"))
    args.batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1")).split(",")]
    args.new_tokens = args.new_tokens or (256 if cuda else 32)
    args.reps = args.reps or (5 if cuda else 3)
    args.rounds = args.rounds or (1 if cuda else 5)
    args.real_weights = not cuda and not args.dry_run
    if args.dry_run:
        args.layers = args.layers or 2
        args.vocab = args.vocab or 512
        args.prefill = [(1, 64), (2, 16)]
        args.new_tokens = min(args.new_tokens, 8)
        args.prompt_len = 16
        args.reps = 1
        args.rounds = min(args.rounds, 2)
    args.check_sync = not cuda
    return args


def main(argv=None) -> None:
    args = parse(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu (or --dry-run)")
    dtype = torch.bfloat16 if device == "cuda" or args.dry_run else torch.float32
    import transformers

    t0 = time.time()
    result = {"device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch."),
              "python": platform.python_version(), "argv": args.argv,
              "device_name": (torch.cuda.get_device_name() if device == "cuda" else
                              f"CPU {platform.processor() or platform.machine()}, "
                              f"{torch.get_num_threads()} thread(s) (shared machine)")}
    if hasattr(os, "getloadavg"):
        result["load_average_start"] = os.getloadavg()
    if device == "cuda":
        result["bandwidth_TBps"] = {k: v / 1e12 for k, v in copy_bandwidth().items()}
    if device == "cpu" and not args.no_width_sweep:
        H = 576 if not args.dry_run else 64
        span = sweep_widths(range(1152, 1409, 64) if not args.dry_run else range(64, 129, 64))
        sweep = cpu_width_sweep(H, span, (1, 512) if not args.dry_run else (1, 16),
                                rounds=args.rounds if not args.dry_run else 1)
        result["cpu_widths"] = {"hidden": H, "widths": span,
                                "multiples": [1, 2, 4, 8, 16, 32, 64, 128], "sweep": sweep,
                                "wanted_multiple": wanted_multiple(sweep)}
        print("cpu width multiple:", result["cpu_widths"]["wanted_multiple"], flush=True)
    if "measured" in args.round_to:
        if "cpu_widths" not in result:
            raise SystemExit("--round-to measured needs the cpu width sweep (--device cpu, "
                             "without --no-width-sweep)")
        multiple = result["cpu_widths"]["wanted_multiple"]
        args.round_to = list(dict.fromkeys(multiple if r == "measured" else r
                                           for r in args.round_to))
    result["models"] = []

    def save(entry):
        if not any(e is entry for e in result["models"]):
            result["models"].append(entry)
        result["seconds"] = time.time() - t0
        atomic_write_text(args.out, json.dumps(result, indent=1))

    for name in args.models:
        try:
            run_model(name, args, device, dtype, save)
        except Exception as e:  # noqa: BLE001 - the next model may still run
            import traceback

            traceback.print_exc()
            result.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}"[:300])
    result["seconds"] = time.time() - t0
    if hasattr(os, "getloadavg"):
        result["load_average_end"] = os.getloadavg()
    atomic_write_text(args.out, json.dumps(result, indent=1))
    text = markdown(result, args)
    print(text)
    if args.markdown:
        replace_section(args.markdown, GPU_SECTION if device == "cuda" else CPU_SECTION, text)


if __name__ == "__main__":
    main()
