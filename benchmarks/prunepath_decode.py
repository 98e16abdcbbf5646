"""End-to-end greedy decoding tokens/s: dense vs PrunePath (masked PyTorch and Triton kernels).

One model, switched in place between configurations, each timed the same way: HF ``generate``
(greedy, ``use_cache=True``) of ``--new-tokens`` tokens after a fixed ``--prompt-len``-token
prompt, batch 1; one short warm-up, then the median of ``--reps`` runs, with
``torch.cuda.synchronize()`` around each. ``tok_s`` counts the prompt's prefill in the time (what
a user waits for); ``decode_tok_s`` removes a separately timed prefill forward. Configurations:

* ``dense_eager``: the model without routers (MoEfy only permutes channels: the dense outputs);
* ``dense_triton``: the same with the generated fused SwiGLU kernels (``install_triton_mlps``);
* ``prunepath_masked`` at each τ: the routers' PyTorch path (every channel computed, then scaled
  by the top-p gates); its run also gives the mean fraction of FFN channels touched per token
  (prompt and generated tokens);
* ``prunepath_triton`` at each τ: the router and expert decode kernels
  (``install_prunepath_mlps``; the prompt's prefill takes the masked path, see there).

The model is SmolLM2-135M in bf16 on CUDA. ``--from-run DIR`` loads a saved PrunePath run
(``DIR/model``, trained routers). Without it the script MoEfies the model (48 experts × 32
channels) and installs *untrained* routers with random weights scaled so that each layer's router
logits have std ``--logit-std`` on the prompt: a speed-only setting (the routing is as sparse as
that std makes it, the text is not meaningful). ``--random-init`` uses SmolLM2-135M's config with
random weights where the GGUF is not installed (speed only too). On an H100 the defaults take
about 2-3 minutes::

    python benchmarks/prunepath_decode.py --out benchmarks/results/prunepath_decode.json \\
        --markdown docs/benchmarks.md

CPU smoke check (Triton rows skipped unless ``--interpret``, which runs the kernels on triton's
CPU interpreter)::

    python benchmarks/prunepath_decode.py --device cpu --model random:llama --new-tokens 4 \\
        --prompt-len 8 --reps 1 --out /tmp/prunepath_decode.json
"""

from __future__ import annotations

import argparse
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

SECTION = "## PrunePath end-to-end greedy decoding (GPU)"
TAUS = (0.5, 0.7, 0.9, 0.95)


# --------------------------------------------------------------------------------------------
# Model set-up
# --------------------------------------------------------------------------------------------


def load(args) -> tuple[torch.nn.Module, object, str]:
    """(model on CPU in float32 with routers installed, tokenizer or None, source note)."""
    import prunegraph
    from prunegraph.passes.prunepath import router as pp

    if args.from_run:
        model = prunegraph.from_pretrained(Path(args.from_run) / "model", dtype=torch.float32)
        if not pp.is_installed(model):
            raise SystemExit(f"{args.from_run}/model has no PrunePath routers")
        return model.eval(), _tokenizer(args.from_run), f"run {args.from_run} (trained routers)"
    model, tok = _base_model(args)
    moefy_and_route(model, args.group_size, args.kmeans_iters)
    return model, tok, (f"{args.model}{' (random init)' if args.random_init else ''}, MoEfy "
                        f"{args.group_size}-channel experts, untrained routers with random "
                        f"weights (logit std {args.logit_std}): speed only")


def _base_model(args):
    from prunegraph.data.models import load_config, load_model

    if not args.random_init:
        return load_model(args.model)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(load_config(args.model)).eval(), None


def _tokenizer(run: str):
    from transformers import AutoTokenizer

    folder = Path(run) / "model"
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(folder)
    return None


def moefy_and_route(model, group_size: int, iters: int) -> None:
    """Analyze, MoEfy (balanced k-means experts) and install zero routers, as the example
    pipeline does, without training."""
    from prunegraph.ir.analysis import analyze
    from prunegraph.passes.prunepath.moefy import MoEfy
    from prunegraph.passes.prunepath.training import PrunePath
    from prunegraph.pipeline.contract import State

    state = State(model=model, groups=list(analyze(model).groups))
    state = MoEfy(group_size=group_size, iters=iters)(state).state
    PrunePath(warmup_steps=0, train=dict(steps=0))(state)


@torch.no_grad()
def randomise_routers(model, prompt: torch.Tensor, logit_std: float, seed: int = 0) -> None:
    """Random router weights, each layer's scaled so its logits on ``prompt`` have std
    ``logit_std`` (peakier logits: fewer experts reach τ)."""
    from prunegraph.passes.prunepath import router as pp

    gen = torch.Generator().manual_seed(seed)
    for r in pp.routers(model):
        r.weight.copy_(torch.randn(r.weight.shape, generator=gen))
    inputs, hooks = {}, []
    for w in pp.kernel_weights(model):
        mlp = model.get_submodule(w["mlp"])
        hooks.append(mlp.register_forward_pre_hook(
            lambda _m, args, name=w["mlp"]: inputs.__setitem__(name, args[0].detach())))
    try:
        model(input_ids=prompt, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for w, r in zip(pp.kernel_weights(model), pp.routers(model)):
        std = torch.nn.functional.linear(inputs[w["mlp"]].float(), r.weight.float()).std()
        r.weight.mul_(logit_std / float(std.clamp_min(1e-12)))


class RouterSwitch:
    """Remove the routers (dense model) and put them back with the same weights and τ."""

    def __init__(self, model) -> None:
        from prunegraph.passes.prunepath import router as pp

        self.model, self.spec = model, pp.spec(model)
        self.weights = [r.weight.detach().clone() for r in pp.routers(model)]

    def mlp_paths(self) -> list[str]:
        return [e["router"].rpartition(".")[0] for e in self.spec["layers"]]

    def remove(self) -> None:
        from prunegraph.passes.prunepath import router as pp

        pp.remove(self.model)

    @torch.no_grad()
    def restore(self) -> None:
        from prunegraph.passes.prunepath import router as pp

        routers = pp.install(self.model, self.spec["layers"], self.spec["tau"], self.spec["mode"])
        for r, w in zip(routers, self.weights):
            r.weight.copy_(w)


def make_prompt(tokenizer, vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """A fixed ``[1, length]`` prompt: held-out Wikipedia text, or random ids without a
    tokenizer."""
    if tokenizer is not None:
        from prunegraph.data.blocks import text_blocks

        return text_blocks(tokenizer, "wikipedia", "evaluation", length, 1, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=gen)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def measure(model, prompt: torch.Tensor, new_tokens: int, reps: int, warmup_tokens: int) -> dict:
    """Greedy ``generate`` tokens/s (median of ``reps`` after a warm-up) and the tokens."""
    device = prompt.device
    mask = torch.ones_like(prompt)

    def generate(n: int) -> torch.Tensor:
        return model.generate(prompt, attention_mask=mask, do_sample=False, use_cache=True,
                              max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=model.config.eos_token_id)

    generate(warmup_tokens)
    prefill = statistics.median(
        _timed(lambda: model(input_ids=prompt, attention_mask=mask, use_cache=True), device)
        for _ in range(reps))
    times, out = [], None
    for _ in range(reps):
        box = []
        times.append(_timed(lambda: box.append(generate(new_tokens)), device))
        out = box[0]
    total = statistics.median(times)
    decode = max(total - prefill, 1e-9)
    return {"tok_s": new_tokens / total, "decode_tok_s": (new_tokens - 1) / decode,
            "prefill_ms": 1e3 * prefill, "generate_s": times,
            "tokens": out[0, prompt.shape[1]:].tolist()}


def _agreement(tokens: list[int], ref: list[int]) -> int:
    """How many leading generated tokens equal ``ref``'s."""
    n = 0
    for a, b in zip(tokens, ref):
        if a != b:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


def run_configs(model, switch: RouterSwitch, prompt, args, record) -> None:
    """Measure every configuration, calling ``record(row)`` after each."""
    from prunegraph.passes.prunepath import router as pp

    triton_ok = args.device != "cpu" or args.interpret
    skip = "skipped: no CUDA (pass --interpret for triton's CPU interpreter)"
    switch.remove()
    dense = _one(record, "dense_eager", None, lambda: measure(model, prompt, *args.timing))
    if triton_ok:
        _one(record, "dense_triton", None, lambda: _dense_triton(model, switch, prompt, args),
             ref=dense)
    else:
        record({"config": "dense_triton", "tau": None, "note": skip})
    switch.restore()
    for tau in args.taus:
        pp.set_tau(model, tau)
        masked = _one(record, "prunepath_masked", tau, lambda: _masked(model, prompt, args))
        if not triton_ok:
            record({"config": "prunepath_triton", "tau": tau, "note": skip})
            continue
        row = _one(record, "prunepath_triton", tau, lambda: _prunepath_triton(model, prompt, args),
                   ref=masked)
        if row and masked:
            row["active_fraction"] = masked.get("active_fraction")


def _one(record, config: str, tau, fn, ref: dict | None = None) -> dict | None:
    """Run one configuration; an error becomes a row, so the others still run."""
    print(f"[{time.strftime('%H:%M:%S')}] {config}" + (f" tau={tau}" if tau else ""), flush=True)
    row = {"config": config, "tau": tau}
    try:
        row.update(fn())
        if ref and "tokens" in ref:
            row["tokens_equal_ref"] = _agreement(row["tokens"], ref["tokens"])
            row["ref"] = ref["config"]
    except Exception as e:  # keep the other configurations
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    record(row)
    return row if "error" not in row else None


def _dense_triton(model, switch: RouterSwitch, prompt, args) -> dict:
    from prunegraph.targets.triton.codegen import load_module, write_module
    from prunegraph.targets.triton.runner import install_triton_mlps, mlp_shapes, uninstall

    paths = switch.mlp_paths()
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(write_module(mlp_shapes(model, paths), Path(tmp) / "mlps.py"))
        install_triton_mlps(model, paths, module)
        try:
            return _measure_noting_fallbacks(model, prompt, args)
        finally:
            uninstall(model, paths)


def _measure_noting_fallbacks(model, prompt, args) -> dict:
    """``measure``, with any "fall back to PyTorch" warning kept in the row: a Triton row that
    silently ran PyTorch would be mislabelled."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out = measure(model, prompt, *args.timing)
    notes = sorted({str(w.message) for w in caught if "fall back" in str(w.message)})
    if notes:
        out["fallback_warnings"] = notes
    return out


def _masked(model, prompt, args) -> dict:
    from prunegraph.passes.prunepath import router as pp

    pp.reset_stats(model)
    out = measure(model, prompt, *args.timing)
    out["active_fraction"] = pp.active_fraction(model)
    return out


def _prunepath_triton(model, prompt, args) -> dict:
    from prunegraph.targets.triton.runner import install_prunepath_mlps, uninstall

    install_prunepath_mlps(model, max_grid_tokens=args.max_grid_tokens)
    try:
        return _measure_noting_fallbacks(model, prompt, args)
    finally:
        uninstall(model)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    """This benchmark's docs section: setup, command, table."""
    rows = [r for r in result["rows"] if "tok_s" in r]
    base = next((r["tok_s"] for r in rows if r["config"] == "dense_eager"), None)
    lines = [SECTION, "",
             f"{result['device']}, torch {result['torch']}, triton {result['triton']}, "
             f"{result['dtype']}. Model: {result['source']}. Greedy `generate` (KV cache, batch "
             f"1) of {result['new_tokens']} tokens after a {result['prompt_len']}-token prompt; "
             f"median of {result['reps']} runs after a warm-up. tokens/s includes the prompt's "
             f"prefill; decode tokens/s subtracts a separately timed prefill forward. FFN "
             f"fraction: channels touched per token on the masked path. Triton PrunePath: "
             f"router + expert decode kernels for up to {result['max_grid_tokens']} tokens, the "
             f"masked path for the prefill.", "",
             "```", result["command"], "```", "",
             "| configuration | τ | FFN fraction | tokens/s | decode tokens/s | × dense eager | "
             "greedy tokens equal to |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "tok_s" not in r:
            lines.append(f"| {r['config']} | {r['tau'] or ''} | | | | | "
                         f"{r.get('error') or r.get('note', '')} |")
            continue
        frac = f"{r['active_fraction']:.3f}" if r.get("active_fraction") is not None else ""
        speed = f"{r['tok_s'] / base:.2f}" if base else ""
        same = (f"{r['ref']}: first {r['tokens_equal_ref']}/{result['new_tokens']}"
                if "tokens_equal_ref" in r else "")
        if r.get("fallback_warnings"):
            same += " (fell back to PyTorch!)"
        lines.append(f"| {r['config']} | {r['tau'] or ''} | {frac} | {r['tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {speed} | {same} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a prunegraph.data.models.load_model spec")
    ap.add_argument("--random-init", action="store_true",
                    help="the model's config with random weights (no GGUF needed; speed only)")
    ap.add_argument("--from-run", default=None, help="a saved PrunePath run folder (DIR/model)")
    ap.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    ap.add_argument("--group-size", type=int, default=32, help="MoEfy expert size (no --from-run)")
    ap.add_argument("--kmeans-iters", type=int, default=10, help="MoEfy k-means iterations")
    ap.add_argument("--logit-std", type=float, default=1.0,
                    help="std of the untrained routers' random logits (no --from-run)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-grid-tokens", type=int, default=16,
                    help="inputs up to this many tokens run the PrunePath kernels")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--interpret", action="store_true",
                    help="on the CPU, run the Triton rows under TRITON_INTERPRET=1 (slow)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prunepath_decode.json"))
    ap.add_argument("--markdown", type=Path, default=None,
                    help="replace/append this benchmark's section in this file")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.timing = (args.new_tokens, args.reps, args.warmup_tokens)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.interpret:  # before any kernel module is imported: triton.jit reads it then
        os.environ["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    device = torch.device(args.device)
    print(f"loading {args.from_run or args.model}", flush=True)
    model, tokenizer, source = load(args)
    prompt = make_prompt(tokenizer, model.config.vocab_size, args.prompt_len)
    if not args.from_run:
        randomise_routers(model, prompt, args.logit_std)
    model.to(device=device, dtype=getattr(torch, args.dtype))
    prompt = prompt.to(device)
    switch = RouterSwitch(model)
    print(f"set up in {time.perf_counter() - start:.0f} s", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": _triton_version(), "dtype": args.dtype,
              "source": source, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "reps": args.reps, "max_grid_tokens": args.max_grid_tokens,
              "command": " ".join(["python", "benchmarks/prunepath_decode.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "rows": []}

    def record(row: dict) -> None:
        result["rows"].append(row)
        result["seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "generate_s")}),
              flush=True)

    run_configs(model, switch, prompt, args, record)
    print(markdown(result), flush=True)
    if args.markdown is not None:
        replace_section(args.markdown, SECTION, markdown(result))
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
