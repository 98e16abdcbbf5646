"""Mask training and one-shot calibration at 8B-32B size: step time and peak memory per GPU.

Random bf16 weights of real configurations, built on the GPU (no download):

* ``llama8b-1gpu``: Llama-3-8B (32 layers), batch 4 x 2048 tokens on one GPU. The DDP
  mask-training step of the training loop (teacher forward with the gates bypassed, student
  forward and backward, budget penalty, AdamW on the gates) next to its baselines in the same
  run: (a) the plain frozen forward + backward (input gradients only, no weight gradients), and
  (b) (a) plus a no-grad forward, the bare compute of a distilled mask step. Also the same step
  with every gate on its parameter (the former placement, a weight-sized gradient per gated
  layer) and with activation checkpointing;
* ``llama8b-2gpu``: the same step on 2 GPUs (torchrun, FSDP2, batch 2 per rank: the same
  global batch), tokens/s against one GPU;
* ``qwen30b-2gpu``: Qwen3-30B-A3B (48 layers, 128 experts, top-8) on 2 GPUs with heads, whole
  experts and expert channels gated, batch 2 x 2048 per rank;
* ``qwen32b-wanda``: Qwen3-32B (64 layers) written to disk as safetensors shards (one per
  decoder layer), then one-shot Wanda layer by layer on one GPU
  (:mod:`prunegraph.passes._sequential`): time and peak GPU memory against one decoder layer
  plus its activations, and against the whole model.

Each part runs in its own process (torchrun for 2 GPUs) under its own timeout, so one slow part
cannot eat the others; results are written after every part::

    python benchmarks/scale.py run --out benchmarks/results/scale.json          # on 2 H200s
    python benchmarks/scale.py run --tiny --out /tmp/scale.json                 # CPU dry run
    python benchmarks/scale.py docs --json benchmarks/results/scale.json        # the docs table

``--groups DIR`` reads the analysis groups of each configuration from ``DIR/<config>.json``
(made once with ``python benchmarks/scale.py groups --out DIR``; the analysis is not what is
measured here), else they are computed on the meta device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"llama8b": ("meta:llama-3-8b", "random:llama"),
          "qwen30b": ("meta:qwen3-30b-a3b", "random:qwen3-moe"),
          "qwen32b": ("meta:qwen3-32b", "random:qwen3")}
#: part -> (model, GPUs, timeout in seconds)
PARTS = {"llama8b-1gpu": ("llama8b", 1, 110), "llama8b-2gpu": ("llama8b", 2, 110),
         "qwen32b-wanda": ("qwen32b", 1, 170), "qwen30b-2gpu": ("qwen30b", 2, 140),
         "cli-2gpu": ("llama8b", 1, 90)}
SEQ, BATCH = 2048, 4


# ------------------------------------------------------------------------------------ helpers


def _spec(model: str, tiny: bool) -> str:
    return MODELS[model][1 if tiny else 0]


def _groups(spec: str, folder: str | None, model=None):
    """The analysis groups of ``spec``: from ``folder`` when they name this model's
    parameters, else analysed on the meta device."""
    from prunegraph.ir.groups import Group

    name = spec.split(":", 1)[1]
    path = Path(folder) / f"{name}.json" if folder else None
    if path is not None and path.exists():
        groups = [Group.from_dict(d) for d in json.loads(path.read_text())]
        names = {n for n, _ in model.named_parameters()} if model is not None else None
        if names is None or all(m.param in names for g in groups for m in g.members):
            return groups
    from prunegraph.data.models import load_model
    from prunegraph.ir.analysis import analyze

    if model is not None and next(model.parameters()).device.type == "meta":
        return analyze(model).groups  # this very model (fewer layers with SCALE_LAYERS)
    meta, _ = load_model(spec, meta=True, tokenizer=False)
    return analyze(meta).groups


def _build(spec: str, device, dtype):
    """Random weights of ``spec``'s configuration, initialised where they live."""
    import torch
    from transformers import AutoModelForCausalLM

    from prunegraph.data.models import load_config

    config = load_config(spec)
    if getattr(config, "num_experts", None):
        config._experts_implementation = _experts_impl(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _experts_impl(device) -> str:
    """transformers' grouped-GEMM experts on a GPU when this version has them, else its loop."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return "eager"
    return "grouped_mm" if device.type == "cuda" and "grouped_mm" in ALL_EXPERTS_FUNCTIONS \
        else "eager"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup: int, iters: int) -> dict:
    """Mean seconds per call and peak memory (GiB) over ``iters`` calls after ``warmup``."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    out = {"seconds": round((time.perf_counter() - t0) / iters, 4)}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def _autocast(device):
    from contextlib import nullcontext

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _plain(model, ids, device, teacher: bool):
    """One frozen forward + backward (input gradients only), after a no-grad forward when
    ``teacher``."""
    import torch
    import torch.nn.functional as F

    def step():
        if teacher:
            with torch.no_grad(), _autocast(device):
                model(input_ids=ids)
        with _autocast(device):
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits[:, :-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1))
        loss.backward()

    return step


class MaskStep:
    """The training loop's own step (``loop._step``) of a DDP gate objective on ``model``."""

    def __init__(self, model, groups, device, batch: int, seq: int, kinds, sites="auto",
                 checkpointing=False):
        import torch

        from prunegraph.passes.gates.registry import family_class
        from prunegraph.passes.train.config import TrainConfig
        from prunegraph.passes.train.gate_objective import GateObjective
        from prunegraph.passes.train.loop import _optimizer, _train_only
        from prunegraph.passes.train.sharding import Sharding, needs_sharding
        from prunegraph.pipeline import distributed
        from prunegraph.plan.gating import apply_gates

        family = family_class("ddp")(groups, 0.2, model, kinds=kinds).to(device).train()
        values = {k: v.detach() for k, v in family.forward_values(0, 1).items()}
        self.gates = apply_gates(model, family.groups, values, sites=sites)
        self.objective = GateObjective(family, self.gates, kd_weight=2.0, model=model)
        self.config = TrainConfig(steps=10_000, batch_size=batch, block_len=seq, warmup=0,
                                  autocast="bf16" if device.type == "cuda" else "off",
                                  activation_checkpointing=checkpointing, plots=False)
        self.sharding = None
        if needs_sharding(self.config):
            _train_only(model, self.objective.param_groups())
            self.sharding = Sharding(model, self.config, device)
            self.sharding.wrap()
        self.optimizer, self.scheduler = _optimizer(model, self.objective, self.config)
        vocab = model.config.vocab_size
        ranks = distributed.world_size()
        gen = torch.Generator().manual_seed(0)
        self.blocks = torch.randint(0, vocab, (batch * ranks * 4, seq), generator=gen)
        self.order = torch.arange(batch * ranks * 4).repeat(2_500)
        self.model, self.t = model, 0
        self.sites = self.gates.sites

    def __call__(self):
        from prunegraph.passes.train.loop import _step

        _step(self.model, self.objective, self.config, self.blocks, self.order, self.t % 1000,
              self.optimizer, self.scheduler, self.sharding)
        self.t += 1

    def close(self):
        if self.sharding is not None:
            self.sharding.unwrap()
        self.gates.remove()


def _device():
    import torch

    from prunegraph.pipeline import distributed

    if distributed.active():
        return distributed.device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -------------------------------------------------------------------------------------- parts


def part_llama8b_1gpu(tiny: bool, groups_dir: str | None) -> dict:
    import torch

    device = _device()
    seq = 32 if tiny else SEQ
    spec = _spec("llama8b", tiny)
    model = _build(spec, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = _groups(spec, groups_dir, model)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, seq), device=device)
    n = 1 if tiny else 4
    out = {"params": sum(p.numel() for p in model.parameters()), "batch": BATCH, "seq": seq}
    out["plain_fwd_bwd"] = _timed(_plain(model, ids, device, teacher=False), device, 1, n)
    out["teacher_fwd_plus_fwd_bwd"] = _timed(_plain(model, ids, device, teacher=True), device, 1,
                                             n)
    kinds = ("heads", "channels")
    for label, kw in (("mask_step", {}), ("mask_step_parameter_sites", {"sites": "parameter"}),
                      ("mask_step_checkpointed", {"checkpointing": True})):
        step = MaskStep(model, groups, device, BATCH, seq, kinds, **kw)
        out[label] = {**_timed(step, device, 2, n), "sites": step.sites}
        step.close()
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = out["teacher_fwd_plus_fwd_bwd"]["seconds"]
    out["ratio_vs_teacher_plus_fwd_bwd"] = round(out["mask_step"]["seconds"] / base, 3)
    out["ratio_vs_plain_fwd_bwd"] = round(out["mask_step"]["seconds"]
                                          / out["plain_fwd_bwd"]["seconds"], 3)
    out["tokens_per_s"] = round(BATCH * seq / out["mask_step"]["seconds"], 1)
    return out


def _two_gpu_step(model_key: str, tiny: bool, groups_dir: str | None, kinds) -> dict:
    import torch

    from prunegraph.pipeline import distributed

    distributed.init()
    device = _device()
    seq = 32 if tiny else SEQ
    spec = _spec(model_key, tiny)
    t0 = time.perf_counter()
    model = _build(spec, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    groups = _groups(spec, groups_dir, model)
    per_rank = BATCH // distributed.world_size()
    step = MaskStep(model, groups, device, per_rank, seq, kinds)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    timing = _timed(step, device, 2, 1 if tiny else 4)
    peaks = distributed.all_mean([timing.get("peak_gib", 0.0)])
    worst = torch.tensor([timing.get("peak_gib", 0.0)], device=device)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    out = {"params": params, "ranks": distributed.world_size(), "batch_per_rank": per_rank,
           "seq": seq, "build_s": round(build_s, 1), "mask_step": timing,
           "peak_gib_mean": round(peaks[0], 2), "peak_gib_max": round(float(worst), 2),
           "tokens_per_s": round(BATCH * seq / timing["seconds"], 1),
           "gated_groups": len(step.objective.family.groups), "sites": step.sites}
    t1 = time.perf_counter()
    step.close()  # the unsharded module back, as after training
    from torch.distributed.tensor import DTensor

    out["unwrap_s"] = round(time.perf_counter() - t1, 1)
    out["unwrapped_plain"] = not any(isinstance(p, DTensor) for p in model.parameters())
    distributed.shutdown()
    return out


def part_llama8b_2gpu(tiny: bool, groups_dir: str | None) -> dict:
    return _two_gpu_step("llama8b", tiny, groups_dir, ("heads", "channels"))


def part_qwen30b_2gpu(tiny: bool, groups_dir: str | None) -> dict:
    return _two_gpu_step("qwen30b", tiny, groups_dir, ("heads", "experts", "expert_channels"))


def write_random_shards(spec: str, folder: Path, device) -> dict:
    """Random bf16 weights of ``spec``, one safetensors shard per decoder layer (and one for
    the rest), with the index and ``config.json``: a Hugging Face folder of the model."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from prunegraph.data.models import load_config
    from prunegraph.passes._layers import layer_prefixes

    config = load_config(spec)
    if os.environ.get("SCALE_LAYERS"):  # the first N decoder layers (each is the same size)
        n = int(os.environ["SCALE_LAYERS"])
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:n]
        config.num_hidden_layers = n
    with init_empty_weights():
        skel = AutoModelForCausalLM.from_config(config)
    prefixes = layer_prefixes(skel)
    shards: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, p in skel.named_parameters():
        layer = next((i for i, pre in enumerate(prefixes) if name.startswith(pre + ".")), None)
        key = f"model-layer{layer:03d}.safetensors" if layer is not None else "model-rest.safetensors"
        shards.setdefault(key, []).append((name, p.shape))
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    t_start = time.perf_counter()
    for file, tensors in shards.items():
        out = {}
        for name, shape in tensors:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            if len(shape) == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            out[name] = t.cpu()
            weight_map[name] = file
            total += t.numel() * 2
        save_file(out, folder / file)
        print(f"shard {file}: {time.perf_counter() - t_start:.1f}s", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    layer_bytes = max(sum(int(torch.Size(s).numel()) * 2 for _, s in t)
                      for f, t in shards.items() if "layer" in f)
    return {"model_bytes": total, "layer_bytes": layer_bytes, "shards": len(shards)}


def part_qwen32b_wanda(tiny: bool, groups_dir: str | None) -> dict:
    import torch

    from prunegraph.data.models import load_config, load_model
    from prunegraph.passes._sequential import score_sequential
    from prunegraph.passes.allocate import allocate
    from prunegraph.plan.plan import Plan

    device = _device()
    spec = _spec("qwen32b", tiny)
    seq, n_blocks = (32, 8) if tiny else (SEQ, int(os.environ.get("SCALE_CALIB_BLOCKS", "32")))
    disk = os.environ.get("SCALE_DISK")
    with tempfile.TemporaryDirectory(prefix="qwen32b-", dir=disk) as tmp:
        folder = Path(tmp) / "model"
        t0 = time.perf_counter()
        written = write_random_shards(spec, folder, device)
        write_s = time.perf_counter() - t0
        model, _ = load_model(str(folder), meta=True, tokenizer=False)
        groups = _groups(spec, groups_dir, model)
        blocks = torch.randint(0, model.config.vocab_size, (n_blocks, seq),
                               generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t1 = time.perf_counter()
        scores = score_sequential(model, groups, "wanda", blocks, folder, batch_size=BATCH,
                                  device=device, offload="cpu", progress=True)
        _sync(device)
        score_s = time.perf_counter() - t1
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        keep = allocate(groups, scores, 0.2, model=model, scope="decoder", strategy="global")
        plan = Plan.from_keep(groups, keep, model=model, scores=scores)
    hidden = model.config.hidden_size
    batch_acts = BATCH * seq * hidden * 2
    return {"params": written["model_bytes"] // 2, "layers": model.config.num_hidden_layers,
            "calib_blocks": n_blocks, "seq": seq, "batch": BATCH, "write_shards_s": round(write_s, 1),
            "score_s": round(score_s, 1), "tokens": int(blocks.numel()),
            "peak_gib": None if peak is None else round(peak / 2**30, 2),
            "layer_gib": round(written["layer_bytes"] / 2**30, 2),
            "model_gib": round(written["model_bytes"] / 2**30, 2),
            "batch_hidden_gib": round(batch_acts / 2**30, 3),
            "removed_params": int(keep.stats["removed"]), "plan_groups": len(plan.groups),
            "shards_in": disk or tempfile.gettempdir(),
            "full_model_layers": load_config(spec).num_hidden_layers}


def part_cli_2gpu(tiny: bool, groups_dir: str | None) -> dict:
    """``prunegraph run SPEC --nproc 2`` end to end on a tiny model (a smoke test of the
    launch, the broadcast analysis, the sharded checkpoint and rank 0's run folder)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import yaml
    from _tiny_tokenizer import make_tokenizer

    from prunegraph.data.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        load_model("random:llama")[0].save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n\n".join(" ".join(f"word{(i * j) % 97}" for j in range(400))
                                       for i in range(12)))
        spec = {"model": str(folder),
                "passes": ["Analyze", {"Gate": {"family": "ddp", "sparsity": 0.3}},
                           {"Train": {"steps": 4, "batch_size": 2, "block_len": 64,
                                      "checkpoint_every": 2, "source": str(corpus),
                                      "plots": False}}, "Finalize", "Slice", "Save"]}
        (Path(tmp) / "spec.yaml").write_text(yaml.safe_dump(spec))
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "prunegraph", "run", str(Path(tmp) / "spec.yaml"),
                               "--out", str(out), "--nproc", "2", "--no-progress"],
                              capture_output=True, text=True, timeout=80)
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
        return {"returncode": done.returncode, "seconds": round(time.perf_counter() - t0, 1),
                "passes": [p["name"] for p in metrics.get("passes", [])],
                "train_steps": metrics.get("train", {}).get("steps"),
                "saved": (out / "model").is_dir(), "gpus": torch.cuda.device_count(),
                "stderr": done.stderr[-1500:] if done.returncode else ""}


PART_FUNCTIONS = {"llama8b-1gpu": part_llama8b_1gpu, "llama8b-2gpu": part_llama8b_2gpu,
                  "qwen32b-wanda": part_qwen32b_wanda, "qwen30b-2gpu": part_qwen30b_2gpu,
                  "cli-2gpu": part_cli_2gpu}


# ------------------------------------------------------------------------------ orchestration


def _run_part(name: str, tiny: bool, groups_dir: str | None, timeout: float) -> dict:
    _, gpus, _ = PARTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        args = [__file__, "part", name, "--json", str(out)]
        args += ["--tiny"] if tiny else []
        args += ["--groups", groups_dir] if groups_dir else []
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={gpus}", *args] if gpus > 1 else [sys.executable, *args])
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:  # what it printed says where the time went
            tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                           for x in (e.stdout, e.stderr))
            return {"status": "timeout", "timeout_s": round(timeout), "output": tail[-1500:]}
        wall = round(time.perf_counter() - t0, 1)
        if done.returncode != 0 or not out.exists():
            return {"status": "failed", "wall_s": wall, "stderr": done.stderr[-2500:]}
        return {"status": "ok", "wall_s": wall, **json.loads(out.read_text())}


def _machine() -> dict:
    import torch

    info = {"host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import transformers

    info["transformers"] = transformers.__version__
    return info


def run(args) -> None:
    from prunegraph.atomic import atomic_write_text

    out = Path(args.out)
    flags = " --tiny" if args.tiny else ""
    flags += f" --groups {Path(args.groups).name}" if args.groups else ""
    flags += f" --budget {args.budget:g}" + (f" --parts {args.parts}" if args.parts != ",".join(PARTS)
                                            else "")
    results = {"command": f"python benchmarks/scale.py run{flags}",
               "machine": _machine(), "parts": {}}
    deadline = time.perf_counter() + args.budget
    for name in args.parts.split(","):
        left = deadline - time.perf_counter()
        timeout = min(PARTS[name][2] * args.timeout_scale, left)
        if timeout < 20:
            results["parts"][name] = {"status": "skipped", "why": "no time left in the budget"}
        else:
            print(f"{name}: up to {timeout:.0f}s ...", flush=True)
            results["parts"][name] = _run_part(name, args.tiny, args.groups, timeout)
            print(f"{name}: {json.dumps(results['parts'][name])[:1500]}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")


def part(args) -> None:
    from prunegraph.pipeline import distributed

    result = PART_FUNCTIONS[args.name](args.tiny, args.groups)
    if distributed.rank() == 0:
        Path(args.json).write_text(json.dumps(result))


def groups(args) -> None:
    from prunegraph.data.models import load_model
    from prunegraph.ir.analysis import analyze

    Path(args.out).mkdir(parents=True, exist_ok=True)
    for key in MODELS:
        spec = _spec(key, args.tiny)
        meta, _ = load_model(spec, meta=True, tokenizer=False)
        found = analyze(meta).groups
        name = spec.split(":", 1)[1]
        (Path(args.out) / f"{name}.json").write_text(json.dumps([g.to_dict() for g in found]))
        print(name, len(found), "groups")


def _fmt(part: dict, key: str, unit: str = "") -> str:
    v = part.get(key)
    return "-" if v is None else f"{v}{unit}"


def docs(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _docs import replace_section

    data = json.loads(Path(args.json).read_text())
    parts = data["parts"]
    gpus = ", ".join(data["machine"].get("gpus", [])) or "no GPU"
    lines = ["## Mask training and one-shot calibration at scale (H200)", "",
             f"`{data['command']}` on {gpus} (nvidia-h200-x2; torch {data['machine']['torch']}, transformers "
             f"{data['machine']['transformers']}); random bf16 weights of the real "
             f"configurations, batch {BATCH} x {parts.get('llama8b-1gpu', {}).get('seq', SEQ)} "
             f"tokens per step over all GPUs. JSON: "
             f"`benchmarks/results/scale.json`.", ""]
    one = parts.get("llama8b-1gpu", {})
    if one.get("status") == "ok":
        lines += ["**Llama-3-8B, one GPU** (DDP gates on heads and MLP channels, KD from the "
                  "same weights with the gates bypassed):", "",
                  "| step | s/step | peak GiB |", "|---|---:|---:|"]
        for key, label in (("plain_fwd_bwd", "plain frozen forward + backward (baseline a)"),
                           ("teacher_fwd_plus_fwd_bwd", "no-grad forward + (a) (baseline b)"),
                           ("mask_step", "DDP mask-training step (gates on activations)"),
                           ("mask_step_parameter_sites", "the same, every gate on its weight"),
                           ("mask_step_checkpointed", "the same, activation checkpointing")):
            row = one.get(key, {})
            lines.append(f"| {label} | {_fmt(row, 'seconds')} | {_fmt(row, 'peak_gib')} |")
        lines += ["", f"Mask step / baseline b = **{one.get('ratio_vs_teacher_plus_fwd_bwd')}x** "
                  f"(target <= 1.3x); / baseline a = {one.get('ratio_vs_plain_fwd_bwd')}x "
                  f"(the teacher's no-grad forward is the difference between a and b); "
                  f"{one.get('tokens_per_s')} tokens/s.", ""]
    two = parts.get("llama8b-2gpu", {})
    if two.get("status") == "ok" and one.get("status") == "ok":
        speed = round(two["tokens_per_s"] / one["tokens_per_s"], 2)
        lines += [f"**Llama-3-8B, 2 GPUs** (FSDP2, batch {two['batch_per_rank']} per rank): "
                  f"{two['mask_step']['seconds']} s/step, {two['tokens_per_s']} tokens/s = "
                  f"**{speed}x** one GPU (target >= 1.8x, ideal 2x); peak "
                  f"{two['peak_gib_max']} GiB per GPU.", ""]
    moe = parts.get("qwen30b-2gpu", {})
    if moe.get("status") == "ok":
        lines += [f"**Qwen3-30B-A3B, 2 GPUs** (heads, whole experts and expert channels gated: "
                  f"{moe['gated_groups']} groups; {moe['sites']['activation']} gated linears on "
                  f"the activation, {moe['sites']['parameter']} fused expert tensors on the "
                  f"parameter): {moe['mask_step']['seconds']} s/step, "
                  f"{moe['tokens_per_s']} tokens/s, peak {moe['peak_gib_max']} GiB per GPU.", ""]
    seq = parts.get("qwen32b-wanda", {})
    if seq.get("status") == "ok":
        lines += [f"**Qwen3-32B one-shot Wanda, one GPU, layer by layer** ({seq['layers']} "
                  f"layers, {seq['model_gib']} GiB of shards written in {seq['write_shards_s']} s; "
                  f"{seq['calib_blocks']} x {seq['seq']} calibration tokens): scored in "
                  f"{seq['score_s']} s, peak GPU memory **{seq['peak_gib']} GiB** against "
                  f"{seq['layer_gib']} GiB for one decoder layer and {seq['model_gib']} GiB for "
                  f"the model (target: one layer plus activations); plan of "
                  f"{seq['plan_groups']} groups, {seq['removed_params']:,} parameters removed.",
                  ""]
    for name, p in parts.items():
        if p.get("status") != "ok":
            why = p.get("why") or (f"over its {p['timeout_s']} s limit" if "timeout_s" in p
                                   else p.get("stderr", "")[-200:])
            lines.append(f"- `{name}` was not measured: {p.get('status')}, {why}")
    replace_section(Path(args.docs), lines[0], "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every part, each in its own process and timeout")
    r.add_argument("--out", default="benchmarks/results/scale.json")
    r.add_argument("--parts", default=",".join(PARTS))
    r.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a dry run")
    r.add_argument("--groups", help="folder of <config>.json analysis groups")
    r.add_argument("--budget", type=float, default=480.0, help="seconds for all parts")
    r.add_argument("--timeout-scale", type=float, default=1.0)
    p = sub.add_parser("part", help=argparse.SUPPRESS)
    p.add_argument("name", choices=sorted(PARTS))
    p.add_argument("--json", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--groups")
    g = sub.add_parser("groups", help="analyse each configuration once, for --groups")
    g.add_argument("--out", required=True)
    g.add_argument("--tiny", action="store_true")
    d = sub.add_parser("docs", help="write the docs/benchmarks.md section from the JSON")
    d.add_argument("--json", default="benchmarks/results/scale.json")
    d.add_argument("--docs", default="docs/benchmarks.md")
    args = parser.parse_args()
    {"run": run, "part": part, "groups": groups, "docs": docs}[args.cmd](args)


if __name__ == "__main__":
    main()
