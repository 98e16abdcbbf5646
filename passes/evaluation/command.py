"""``prunegraph eval MODEL``: perplexity in and out of domain, generation checks, zero-shot tasks,
and lm-evaluation-harness for users who are online.

With no measurement named it runs the default set: perplexity on the in-domain text (``--text``,
the Wikipedia excerpt that calibrates pruning) and on the out-of-domain text (``--ood-text``,
Jane Austen's novels), generation checks (8 shipped prompts x 32 greedy tokens: repetition and
distinct-n, and agreement with ``--reference`` when given) and the default tasks (200 examples
each). Naming any of ``--ppl-blocks``, ``--gen-prompts``, ``--tasks`` or ``--lm-eval`` runs only
what is named. Perplexity uses the evaluation part of each text (``text_blocks`` with its
defaults, so the calibration part stays unseen), cut into ``--ppl-blocks`` blocks of
``--seq-len`` tokens. Example::

    prunegraph eval runs/oneshot/model --reference runs/oneshot/generations.json --json r.json
    prunegraph eval smollm2-135m --ppl-blocks 32 --tasks winowhy,timedial --limit 200
    prunegraph eval runs/oneshot/model --lm-eval hellaswag,arc_easy --limit 500   # online
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunegraph.cli import command
from prunegraph.data.blocks import text_blocks
from prunegraph.data.tasks import BUILTIN_TASKS, load_task
from prunegraph.data.text import SOURCE_DESCRIPTIONS, load_documents, source_key
from prunegraph.errors import PrunegraphError

__all__ = ["run_eval", "DEFAULT_TASKS"]

#: Tasks of the default set: the two the project's benchmarks report.
DEFAULT_TASKS = ("winowhy", "cause_and_effect_one_sentence")
#: What each built-in task asks (BIG-bench's own descriptions), for ``--help``.
TASK_DESCRIPTIONS = {
    "cause_and_effect_one_sentence": "51 examples, 2 options: distinguish cause and effect",
    "goal_inference": "1703 examples, 4-5 options: given a goal, choose the most likely step",
    "timedial": "2550 examples, 3 options: fill a masked temporal span in a dialogue",
    "winowhy": "2865 examples, 2 options: judge the reasoning behind Winograd schema answers",
}
_DEFAULTS = dict(ppl_blocks=32, gen_prompts=8, tasks=",".join(DEFAULT_TASKS))


def _limit(value: str | int | None) -> int | None:
    """``--limit``: a positive integer, or ``all`` (None)."""
    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise PrunegraphError(f"--limit must be a positive integer or 'all', got {value!r}")
    return n


def _epilog() -> str:
    from prunegraph.passes.evaluation.generation import load_prompts

    tasks = "\n".join(f"  {t}{' (default)' if t in DEFAULT_TASKS else ''}: "
                      f"{TASK_DESCRIPTIONS.get(t, '')}" for t in BUILTIN_TASKS)
    texts = "\n".join(f"  {name}: {desc}" for name, desc in SOURCE_DESCRIPTIONS.items())
    return (f"built-in tasks (BIG-bench, offline; or give a BIG-bench task.json path):\n{tasks}\n\n"
            f"built-in texts (or a file, a folder of .txt, hf:NAME[:CONFIG][:SPLIT]):\n{texts}\n\n"
            f"generation prompts: {len(load_prompts())} shipped sentence openings\n\n"
            f"default set, when none of --ppl-blocks, --gen-prompts, --tasks, --lm-eval is given:\n"
            f"  perplexity on --text and --ood-text ({_DEFAULTS['ppl_blocks']} blocks each), "
            f"generation checks\n  ({_DEFAULTS['gen_prompts']} prompts), tasks "
            f"{_DEFAULTS['tasks'].replace(',', ', ')} (--limit 200)")


def _configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _epilog()
    p.add_argument("model", help="model spec for prunegraph.data.models.load_model "
                                 "(folder, .gguf, smollm2-135m, ...)")
    p.add_argument("--text", default="wikipedia",
                   help="in-domain text for perplexity (default: the built-in wikipedia excerpt)")
    p.add_argument("--ood-text", default="austen",
                   help="comma-separated out-of-domain texts for perplexity, '' for none "
                        "(default: austen)")
    p.add_argument("--ppl-blocks", type=int, default=None,
                   help=f"perplexity blocks per text; 0 skips perplexity (default set: "
                        f"{_DEFAULTS['ppl_blocks']})")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per block (default 512)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated task names or BIG-bench JSON paths, or 'none' "
                        f"(default set: {_DEFAULTS['tasks']}; all built-in tasks are listed "
                        f"below)")
    p.add_argument("--limit", default="200",
                   help="examples per task (seeded shuffle, then the first N), or 'all' "
                        "(default 200)")
    p.add_argument("--gen-prompts", type=int, default=None,
                   help=f"generation checks on the first N shipped prompts; 0 skips them "
                        f"(default set: {_DEFAULTS['gen_prompts']})")
    p.add_argument("--gen-tokens", type=int, default=32,
                   help="greedy tokens per prompt (default 32)")
    p.add_argument("--reference", default=None,
                   help="what generation agreement is measured against: a model spec (the "
                        "dense model, decoded here first) or a run's generations.json (its "
                        "'dense' continuations, else its first)")
    p.add_argument("--lm-eval", dest="lm_eval", default="", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks, run through lm-eval's own "
                        "HF wrapper (pip install 'prunegraph[lm-eval]'; needs network access "
                        "for the datasets); --limit and --batch-size apply")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _resolve_defaults(args: argparse.Namespace) -> None:
    """The default set when no measurement is named; otherwise what is not named is off."""
    named = any(v for v in (args.ppl_blocks is not None, args.gen_prompts is not None,
                            args.tasks is not None, args.lm_eval))
    if args.ppl_blocks is None:
        args.ppl_blocks = 0 if named else _DEFAULTS["ppl_blocks"]
    if args.gen_prompts is None:
        args.gen_prompts = 0 if named else _DEFAULTS["gen_prompts"]
    if args.tasks is None:
        args.tasks = "" if named else _DEFAULTS["tasks"]
    if args.tasks.strip().lower() == "none":
        args.tasks = ""


def _reference_from_json(path: Path, prompts: list[str], n_tokens: int) -> tuple[str, list]:
    from prunegraph.passes.evaluation.generation import check_reference

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunegraphError(f"--reference {path}: cannot read it as JSON ({e}); give a run's "
                              f"generations.json") from e
    if isinstance(data, dict) and "prompts" in data:
        label, record = path.name, data
    elif isinstance(data, dict) and data:
        label = "dense" if "dense" in data else next(iter(data))
        record = data[label]
    else:
        raise PrunegraphError(f"--reference {path} holds no continuations; give a run's "
                              f"generations.json")
    check_reference(record, prompts, n_tokens, f"--reference {path} ({label!r})")
    return f"{path}:{label}", [t[:n_tokens] for t in record["tokens"]]


def _check(args: argparse.Namespace) -> None:
    for key, low in (("ppl_blocks", 0), ("seq_len", 2), ("gen_prompts", 0), ("gen_tokens", 1),
                     ("batch_size", 1)):
        if getattr(args, key) < low:
            flag = "--" + key.replace("_", "-")
            raise PrunegraphError(f"{flag} must be >= {low}, got {getattr(args, key)}")
    if args.json_path and not Path(args.json_path).resolve().parent.is_dir():
        raise PrunegraphError(f"--json {args.json_path}: its folder does not exist; create it")
    args.limit = _limit(args.limit)
    from prunegraph.passes.evaluation.generation import load_prompts

    if args.gen_prompts > len(load_prompts()):
        raise PrunegraphError(f"--gen-prompts {args.gen_prompts}: only {len(load_prompts())} "
                              f"prompts ship with prunegraph; use at most that many")
    if args.reference and not args.gen_prompts:
        raise PrunegraphError("--reference sets what generation agreement is measured against, "
                              "but generation checks are off; add --gen-prompts N")


@command("eval", "perplexity (in and out of domain), generation checks, zero-shot tasks and "
                 "lm-eval tasks of a model", _configure)
def run_eval(args: argparse.Namespace) -> int:
    """Validate every argument and load every text and task first, then the models, then measure."""
    from prunegraph.data.models import load_model
    from prunegraph.passes.evaluation.generation import (
        generation_metrics,
        generation_record,
        greedy_continuations,
        load_prompts,
    )
    from prunegraph.passes.evaluation.harness import check_lm_eval_tasks, run_lm_eval
    from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity

    _resolve_defaults(args)
    _check(args)
    tasks = [load_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    lm_tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    texts = {}
    if args.ppl_blocks:
        sources = [args.text] + [t.strip() for t in args.ood_text.split(",") if t.strip()]
        keys = [source_key(s) for s in sources]
        if len(set(keys)) != len(keys):
            raise PrunegraphError(f"the texts {sources} repeat (metric keys {keys}); list each "
                                  f"text once, and not --text again in --ood-text")
        for s in sources:
            load_documents(s)  # an unknown or unreadable text fails here, before the model loads
        texts = dict.fromkeys(sources)
    prompts = load_prompts()[:args.gen_prompts]
    reference = None
    if args.reference and args.reference.endswith(".json"):
        reference = _reference_from_json(Path(args.reference), prompts, args.gen_tokens)
    manager = check_lm_eval_tasks(lm_tasks) if lm_tasks else None
    if not (tasks or texts or prompts or lm_tasks):
        raise PrunegraphError("nothing to evaluate: give --ppl-blocks > 0, --gen-prompts > 0, "
                              "--tasks or --lm-eval (or none of them for the default set)")

    progress = not args.no_progress
    if args.reference and reference is None:  # a model: decode it first, then free it
        ref_model, ref_tok = load_model(args.reference)
        if ref_tok is None:
            raise PrunegraphError(f"--reference model '{args.reference}' comes without a "
                                  f"tokenizer; use a model folder or .gguf that holds one")
        reference = (args.reference, greedy_continuations(ref_model, ref_tok, prompts,
                                                           args.gen_tokens, progress=progress))
        del ref_model
    model, tok = load_model(args.model)
    if tok is None:
        raise PrunegraphError(f"model '{args.model}' comes without a tokenizer, so text cannot be "
                              f"encoded for it; use a model folder or .gguf that holds one")
    results: dict = {"model": args.model}
    for i, source in enumerate(texts):
        t0 = time.perf_counter()
        blocks = text_blocks(tok, source, "evaluation", args.seq_len, args.ppl_blocks)
        ppl = perplexity(model, blocks, batch_size=args.batch_size, progress=progress)
        domain = "in-domain" if i == 0 else "out-of-domain"
        results.setdefault("perplexity", {})[source_key(source)] = {
            "text": source, "domain": domain, "blocks": args.ppl_blocks,
            "seq_len": args.seq_len, "value": ppl, "seconds": round(time.perf_counter() - t0, 1)}
        results[f"ppl_{source_key(source)}"] = ppl
        print(f"perplexity {source_key(source)} ({domain}, {args.ppl_blocks} x {args.seq_len}): "
              f"{ppl:.3f}")
    if prompts:
        t0 = time.perf_counter()
        tokens = greedy_continuations(model, tok, prompts, args.gen_tokens, progress=progress)
        metrics = generation_metrics(tokens, reference[1] if reference else None)
        results["generation"] = dict(metrics, **({"reference": reference[0]} if reference else {}),
                                     seconds=round(time.perf_counter() - t0, 1),
                                     texts=generation_record(prompts, tokens, tok)["texts"])
        agree = (f"agreement {metrics['agreement']:.3f} (prefix {metrics['prefix_agreement']:.3f}) "
                 f"with {reference[0]}, " if reference else "")
        print(f"generation ({len(prompts)} prompts x {args.gen_tokens} tokens): {agree}"
              f"repetition {metrics['repetition']:.3f}, distinct-1 {metrics['distinct_1']:.3f}, "
              f"distinct-2 {metrics['distinct_2']:.3f}")
    for task in tasks:
        t0 = time.perf_counter()
        r = multiple_choice(model, tok, task, limit=args.limit, batch_size=args.batch_size,
                            progress=progress)
        results.setdefault("tasks", {})[task.name] = dict(
            r, seconds=round(time.perf_counter() - t0, 1))
        print(f"{task.name}: acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  (n={r['n']})")
    if lm_tasks:
        t0 = time.perf_counter()
        results["lm_eval"] = run_lm_eval(model, tok, lm_tasks, limit=args.limit,
                                         batch_size=args.batch_size, task_manager=manager)
        for name, metrics in results["lm_eval"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"lm-eval {name}: {shown}")
        results["lm_eval_seconds"] = round(time.perf_counter() - t0, 1)
    if args.json_path:
        from prunegraph.pipeline.runfolder import atomic_write_json

        atomic_write_json(args.json_path, results)
    return 0
