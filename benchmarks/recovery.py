"""Recovery after pruning (SmolLM2-135M): one-shot Taylor and DDP, each then distilled from the
dense model (all weights, or LoRA adapters merged back), at a CPU budget and a GPU budget.

For each fraction of decoder parameters removed (20%, 50%) and each pruning method:

* ``taylor``: ``Prune(criterion=taylor)`` (one-shot, 32 calibration blocks);
* ``ddp``: ``Gate(ddp) -> Train(polish) -> Finalize(topk)`` (mask training, frozen weights);

the model is sliced, evaluated, and then recovered by ``Distill(mode=full)`` and
``Distill(mode=lora)`` from the same sliced model, each evaluated again. Every number comes from
the passes a user runs (``Evaluate``): perplexity in domain (held-out Wikipedia articles) and
out of domain (Jane Austen), ratios to the dense model measured in the same run, winowhy
accuracy, and greedy generation agreement with the dense model's continuations. Tokens are
counted per pipeline (calibration or mask training, plus distillation) and wall times per stage.

Budgets (``--budget``):

* ``tiny``: a 2-layer random Llama with SmolLM2's tokenizer, a few steps: a dry run of every
  code path in about a minute on the CPU;
* ``cpu``: the real model at a budget that finishes in well under an hour on 2 shared cores;
* ``gpu``: one H200 (bf16 autocast for training, float32 evaluation), about 20M training tokens
  per pipeline in all: DDP 2.05M (the learned-gates benchmark's setting) + Distill 16.4M
  (1,000 steps x 16 x 1,024)::

    python benchmarks/recovery.py --budget cpu --out benchmarks/results/recovery_cpu.json \\
        --docs docs/benchmarks.md
    python benchmarks/recovery.py --budget gpu --out benchmarks/results/recovery_gpu.json \\
        --docs docs/benchmarks.md

``--sparsities``, ``--methods`` and ``--recoveries`` run a part (to fit a time limit per
command); ``--merge`` combines the JSON files of such parts into one table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _docs import replace_section

from prunegraph.passes import Distill, Evaluate, Finalize, Gate, Prune, Slice, Train
from prunegraph.pipeline import Load
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.runfolder import atomic_write_text

#: One section of docs/benchmarks.md per budget.
SECTION = "## Recovery after pruning, {budget} budget: Distill after one-shot and DDP (SmolLM2-135M)"
METHODS = ("taylor", "ddp")
RECOVERIES = ("none", "full", "lora")


@dataclass(frozen=True)
class Budget:
    """Every setting of one budget."""

    model: str = "smollm2-135m"
    calib_blocks: int = 32          # Taylor's calibration blocks
    calib_len: int = 128
    ddp_steps: int = 240            # DDP mask training, polish included
    ddp_polish: int = 40
    ddp_batch: int = 4
    ddp_block: int = 128
    distill_steps: int = 60
    distill_batch: int = 4
    distill_block: int = 128
    distill_warmup: int = 5
    lr_full: float = 1e-4
    lr_lora: float = 1e-3
    ppl_blocks: int = 4
    seq_len: int = 512
    limit: int = 50
    gen_prompts: int = 4
    gen_tokens: int = 32

    def ddp_tokens(self) -> int:
        return self.ddp_steps * self.ddp_batch * self.ddp_block

    def distill_tokens(self) -> int:
        return self.distill_steps * self.distill_batch * self.distill_block


BUDGETS = {
    "tiny": Budget(model="tiny", calib_blocks=2, calib_len=32, ddp_steps=4, ddp_polish=1,
                   ddp_batch=2, ddp_block=32, distill_steps=3, distill_batch=2,
                   distill_block=32, distill_warmup=1, ppl_blocks=1, seq_len=64, limit=4,
                   gen_prompts=2, gen_tokens=4),
    "cpu": Budget(ddp_steps=30, ddp_polish=10, distill_steps=30, ppl_blocks=4, limit=40,
                  gen_prompts=4),
    "gpu": Budget(calib_len=512, ddp_steps=500, ddp_polish=100, ddp_batch=8, ddp_block=512,
                  distill_steps=1000, distill_batch=16, distill_block=1024, distill_warmup=50,
                  ppl_blocks=32, limit=200, gen_prompts=8),
}


def tiny_model(folder: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer (so the shipped text sources tokenize),
    saved as a HF folder, so that Distill reloads its teacher as from any folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunegraph.data.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def dense_folder(spec: str, folder: Path) -> str:
    """The dense model saved once as a HF folder (safetensors), so that each Distill reloads
    its teacher in a second instead of dequantising the GGUF file again."""
    from transformers import AutoModelForCausalLM

    from prunegraph.data.models import load_model

    model, tokenizer = load_model(spec)
    plain = AutoModelForCausalLM.from_config(model.config)  # GGUF-loaded models refuse to save
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def evaluate(state: State, label: str, b: Budget) -> dict[str, Any]:
    Evaluate(label=label, ppl_blocks=b.ppl_blocks, seq_len=b.seq_len, tasks=("winowhy",),
             limit=b.limit, gen_prompts=b.gen_prompts, gen_tokens=b.gen_tokens)(state)
    r = state.metrics[label]
    gen = r.get("generation", {})
    return {"params": r["params"], "ppl_wikipedia": r["ppl_wikipedia"],
            "ppl_austen": r["ppl_austen"], "winowhy": r["winowhy"]["acc"],
            "winowhy_norm": r["winowhy"]["acc_norm"], "gen_agreement": gen.get("agreement"),
            "gen_prefix_agreement": gen.get("prefix_agreement"),
            "gen_repetition": gen.get("repetition"), "eval_seconds": r["seconds"]}


def prune(state: State, method: str, sparsity: float, b: Budget) -> dict[str, Any]:
    """Prune ``state.model`` by ``method`` and slice it; the stage's tokens and time."""
    start = time.perf_counter()
    if method == "taylor":
        Prune(criterion="taylor", sparsity=sparsity, calib_blocks=b.calib_blocks,
              block_len=b.calib_len)(state)
        tokens = b.calib_blocks * b.calib_len
    else:
        Gate(family="ddp", sparsity=sparsity, budget="params", scope="global", lr=0.05)(state)
        Train(steps=b.ddp_steps, polish_steps=b.ddp_polish, batch_size=b.ddp_batch,
              block_len=b.ddp_block, warmup=max(1, b.ddp_steps // 10), kd_weight=2.0,
              checkpoint_every=b.ddp_steps, keep_checkpoint=False, plots=False)(state)
        Finalize(mode="topk")(state)
        tokens = b.ddp_tokens()
    Slice()(state)
    return {"prune_tokens": tokens, "prune_seconds": round(time.perf_counter() - start, 1),
            "removed": state.plan.report["params_removed"]}


def distill(state: State, mode: str, b: Budget) -> dict[str, Any]:
    lr = b.lr_full if mode == "full" else b.lr_lora
    Distill(mode=mode, lr=lr, train={"steps": b.distill_steps, "batch_size": b.distill_batch,
                                     "block_len": b.distill_block,
                                     "warmup": b.distill_warmup, "plots": False})(state)
    d = state.metrics["distill"]
    return {"distill_tokens": d["tokens"], "distill_seconds": d["seconds"], "lr": lr,
            "kl_first": d["kl_first"], "kl_last": d["kl_last"],
            "trained_params": d["trained_params"]}


def run(args, b: Budget) -> dict[str, Any]:
    results: dict[str, Any] = {
        "budget": args.budget, "command": args.command, "complete": False,
        "settings": b.__dict__, "torch": torch.__version__,
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                   else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
                        f"{torch.get_num_threads()} threads"),
        "load_average_start": os.getloadavg()[0], "runs": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = (tiny_model(Path(tmp) / "tiny") if b.model == "tiny"
                else dense_folder(b.model, Path(tmp) / "dense"))
        base = Load(spec)(State()).state
        if args.groups:
            from prunegraph.ir.groups import Group

            groups = [Group.from_dict(d) for d in json.loads(Path(args.groups).read_text())]
        else:
            from prunegraph.passes import Analyze

            groups = list(Analyze()(base).state.groups)
        results["dense"] = evaluate(base, "dense", b)
        print("dense", results["dense"], flush=True)
        dense_model = base.model
        for sparsity in args.sparsities:
            rows = results["runs"].setdefault(str(sparsity), {})
            for method in args.methods:
                state = State(model=copy.deepcopy(dense_model), tokenizer=base.tokenizer,
                              model_source=base.model_source, groups=list(groups),
                              generations=base.generations)
                state.run_dir = Path(tmp) / f"{method}-{sparsity}"
                info = prune(state, method, sparsity, b)
                if "none" in args.recoveries:
                    rows[method] = {**info, **evaluate(state, f"{method}@{sparsity}", b),
                                    "tokens": info["prune_tokens"]}
                    print(sparsity, method, rows[method], flush=True)
                    save(results, args, t0)
                sliced = state.model
                for mode in (r for r in args.recoveries if r != "none"):
                    state.model = copy.deepcopy(sliced)
                    rec = distill(state, mode, b)
                    name = f"{method}+distill-{mode}"
                    rows[name] = {**info, **rec, **evaluate(state, f"{name}@{sparsity}", b),
                                  "tokens": info["prune_tokens"] + rec["distill_tokens"]}
                    print(sparsity, name, rows[name], flush=True)
                    save(results, args, t0)
                del state, sliced
                save(results, args, t0)
    results["complete"] = True
    save(results, args, t0)
    return results


def save(results: dict[str, Any], args, t0: float) -> None:
    """Write the JSON and the docs section as they stand (a long run shows its rows as they
    come, and an interrupted one keeps them)."""
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["load_average_end"] = os.getloadavg()[0]
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    if args.docs:
        replace_section(Path(args.docs), SECTION.format(budget=results["budget"].upper()),
                        markdown(results))


def markdown(results: dict[str, Any]) -> str:
    b = results["settings"]
    dense = results["dense"]
    lines = [SECTION.format(budget=results["budget"].upper()), ""]
    budgets = results.get("parts") or [results]
    for part in budgets:
        lines.append("```\n" + part["command"] + "\n```")
    gpu = results["budget"] == "gpu"
    done = "" if results.get("complete", True) else " (interrupted: the rows so far)"
    lines += ["", f"Budget `{results['budget']}` on {results['device']} (torch "
              f"{results['torch']}), {results['seconds']:.0f} s in all{done}"
              + ("" if gpu else f"; load average {results['load_average_start']:.1f} at the "
                 f"start, {results['load_average_end']:.1f} at the end (a shared machine: read "
                 f"the ratios, not the times)") + ".",
              f"Taylor: {b['calib_blocks']} x {b['calib_len']} calibration tokens. DDP: "
              f"{b['ddp_steps']} steps ({b['ddp_polish']} polish) x {b['ddp_batch']} x "
              f"{b['ddp_block']} tokens. Distill: {b['distill_steps']} steps x "
              f"{b['distill_batch']} x {b['distill_block']} tokens, logit KL (T = 1), lr "
              f"{b['lr_full']:g} (full: every weight but the embeddings) or {b['lr_lora']:g} "
              f"(LoRA rank 16 on every linear layer, merged). Perplexity on {b['ppl_blocks']} x "
              f"{b['seq_len']} held-out tokens of each text, winowhy on {b['limit']} examples, "
              f"generation agreement with the dense model over {b['gen_prompts']} prompts x "
              f"{b['gen_tokens']} greedy tokens. *Tokens*: training tokens of the pipeline in "
              f"all (calibration or mask training, plus distillation).", "",
              "| removed | method | params | ppl wiki | / dense | ppl austen | / dense | winowhy "
              "| gen agreement | tokens | prune s | distill s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|",
              f"| 0 | dense | {dense['params']:,} | {dense['ppl_wikipedia']:.2f} | 1.00 | "
              f"{dense['ppl_austen']:.2f} | 1.00 | {dense['winowhy']:.2f} | | | | |"]
    for sparsity, rows in results["runs"].items():
        for name, r in rows.items():
            agree = r.get("gen_agreement")
            lines.append(
                f"| {float(sparsity):.0%} | {name} | {r['params']:,} | {r['ppl_wikipedia']:.2f} | "
                f"{r['ppl_wikipedia'] / dense['ppl_wikipedia']:.2f} | {r['ppl_austen']:.2f} | "
                f"**{r['ppl_austen'] / dense['ppl_austen']:.2f}** | {r['winowhy']:.2f} | "
                f"{'' if agree is None else f'{agree:.2f}'} | {r['tokens']:,} | "
                f"{r['prune_seconds']:.0f} | {_seconds(r.get('distill_seconds'))} |")
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from parts run separately with the same budget."""
    first = parts[0]
    for p in parts[1:]:
        if p["budget"] != first["budget"] or p["settings"] != first["settings"]:
            raise SystemExit("cannot merge parts run with other budgets or settings")
    out = {**first, "runs": {}, "parts": [{"command": p["command"]} for p in parts],
           "complete": all(p.get("complete", True) for p in parts),
           "seconds": sum(p["seconds"] for p in parts),
           "load_average_end": parts[-1]["load_average_end"]}
    for p in parts:
        for sparsity, rows in p["runs"].items():
            out["runs"].setdefault(sparsity, {}).update(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--recoveries", nargs="+", choices=RECOVERIES, default=list(RECOVERIES))
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="override the budget's distillation steps")
    ap.add_argument("--groups", default=None,
                    help="groups JSON (Group.to_dict() list) instead of analysing here, e.g. "
                         "benchmarks/results/smollm2-groups.json where torch.export fails")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the JSON files of parts into --out and --docs; runs nothing")
    ap.add_argument("--out", default="benchmarks/results/recovery.json")
    ap.add_argument("--docs", default=None, help="write the section into this markdown file")
    args = ap.parse_args()
    command = "python " + " ".join(["benchmarks/recovery.py", *sys.argv[1:]])
    if args.merge:
        results = merge([json.loads(Path(f).read_text()) for f in args.merge])
    else:
        b = BUDGETS[args.budget]
        if args.distill_steps is not None:
            b = replace(b, distill_steps=args.distill_steps)
        args.command = command
        results = run(args, b)
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    print(table)
    if args.docs:
        replace_section(Path(args.docs), SECTION.format(budget=results["budget"].upper()), table)


if __name__ == "__main__":
    main()
