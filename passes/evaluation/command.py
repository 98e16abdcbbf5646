"""``prunegraph eval MODEL``: perplexity on held-out text and zero-shot multiple-choice accuracy.

Perplexity uses the evaluation part of ``--text`` (``split_documents`` with its defaults, so the
calibration part stays unseen), cut into ``--ppl-blocks`` blocks of ``--seq-len`` tokens.
Example::

    prunegraph eval smollm2-135m --ppl-blocks 32 --seq-len 512 --tasks winowhy,timedial \\
        --limit 200 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from prunegraph.cli.main import command
from prunegraph.data.blocks import text_blocks
from prunegraph.data.tasks import load_task
from prunegraph.data.text import load_documents
from prunegraph.errors import PrunegraphError

__all__ = ["run_eval"]


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model spec for prunegraph.data.models.load_model "
                                 "(folder, .gguf, smollm2-135m, ...)")
    p.add_argument("--text", default="wikipedia",
                   help="text source for perplexity (default: the built-in wikipedia excerpt)")
    p.add_argument("--ppl-blocks", type=int, default=32,
                   help="number of perplexity blocks; 0 skips perplexity (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per block (default 512)")
    p.add_argument("--tasks", default="",
                   help="comma-separated task names or BIG-bench JSON paths, e.g. winowhy,timedial")
    p.add_argument("--limit", type=int, default=None,
                   help="examples per task (seeded shuffle, then the first N); default all")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _write_json(path: str, payload: dict) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, target)


@command("eval", "perplexity and zero-shot multiple-choice accuracy of a model", _configure)
def run_eval(args: argparse.Namespace) -> int:
    """Validate every argument and load every task first, then the model, then measure."""
    from prunegraph.data.models import load_model
    from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity

    if args.ppl_blocks < 0:
        raise PrunegraphError(f"--ppl-blocks must be >= 0, got {args.ppl_blocks}")
    if args.seq_len < 2:
        raise PrunegraphError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.limit is not None and args.limit < 1:
        raise PrunegraphError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise PrunegraphError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json_path and not Path(args.json_path).resolve().parent.is_dir():
        raise PrunegraphError(f"--json {args.json_path}: its folder does not exist; create it")
    tasks = [load_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    if args.ppl_blocks:
        load_documents(args.text)  # a bad text source fails before the model loads
    if not tasks and not args.ppl_blocks:
        raise PrunegraphError("nothing to evaluate: give --ppl-blocks > 0 or --tasks")

    model, tok = load_model(args.model)
    if tok is None:
        raise PrunegraphError(f"model '{args.model}' comes without a tokenizer, so text cannot be "
                              f"encoded for it; use a model folder or .gguf that holds one")
    progress = not args.no_progress
    results: dict = {"model": args.model}
    if args.ppl_blocks:
        t0 = time.perf_counter()
        blocks = text_blocks(tok, args.text, "evaluation", args.seq_len, args.ppl_blocks)
        ppl = perplexity(model, blocks, batch_size=args.batch_size, progress=progress)
        results["perplexity"] = {"text": args.text, "blocks": args.ppl_blocks,
                                 "seq_len": args.seq_len, "value": ppl,
                                 "seconds": round(time.perf_counter() - t0, 1)}
        print(f"perplexity ({args.text}, {args.ppl_blocks} x {args.seq_len}): {ppl:.3f}")
    for task in tasks:
        t0 = time.perf_counter()
        r = multiple_choice(model, tok, task, limit=args.limit, batch_size=args.batch_size,
                            progress=progress)
        results.setdefault("tasks", {})[task.name] = dict(
            r, seconds=round(time.perf_counter() - t0, 1))
        print(f"{task.name}: acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  (n={r['n']})")
    if args.json_path:
        _write_json(args.json_path, results)
    return 0
