"""``prunegraph run`` and ``prunegraph passes``: run a pipeline spec; list the passes to write one.

::

    prunegraph run examples/prune.yaml --out runs/demo --set Prune.sparsity=0.3
    prunegraph passes            # every registered pass: parameters, defaults, requires/provides
    prunegraph passes Prune      # one pass with its full docstring
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shlex

from prunegraph.cli.main import command
from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import (
    Pass,
    declared_keys,
    nearest,
    registered_passes,
    type_name,
)
from prunegraph.pipeline.plugins import load_plugins

__all__ = ["run_command", "passes_command", "describe_pass"]


def _configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="PIPELINE.yaml", help="the pipeline spec (YAML or TOML)")
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value: model=random:llama, passes.1.sparsity=0.3, "
                        "Prune.sparsity=0.3 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR even when it is not empty and not a prunegraph run folder "
                        "(a previous run folder is replaced only once the new run succeeded)")
    p.add_argument("--no-progress", action="store_true", help="no per-pass lines on stderr")
    p.add_argument("--checks", action="store_true",
                   help="run the invariant checks between passes (gates at 1 equal the model, "
                        "the sliced model equals the gated one, ...) on a few probe tokens")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run on N GPUs (N processes on a CPU machine): starts itself again under "
                        "torchrun --nproc-per-node N; training is sharded with FSDP, rank 0 "
                        "writes the run folder")


@command("run", "run a pipeline spec and write a run folder", _configure_run)
def run_command(args: argparse.Namespace) -> int:
    from prunegraph.pipeline import distributed
    from prunegraph.pipeline.runfolder import RunFolder
    from prunegraph.pipeline.spec import load_spec

    load_plugins()
    if args.nproc < 1:
        raise SpecError(f"--nproc must be >= 1, got {args.nproc}")
    spec = load_spec(args.spec, overrides=args.overrides)
    folder = RunFolder(args.out, overwrite=args.overwrite)  # refuse a bad --out before running
    if args.nproc > 1 and not distributed.launched():
        return distributed.relaunch(args.nproc, _argv_without_nproc(args))
    distributed.init()
    command_line = shlex.join(["prunegraph", *getattr(args, "argv", [])]) or None
    if not distributed.is_main():  # rank 0 writes the run folder and prints
        spec.run(None, progress=False, checks=args.checks or None, command=command_line)
        distributed.shutdown()  # not on an error: the rank exits and torchrun stops the others
        return 0
    from prunegraph.pipeline.summary import summary_table
    from prunegraph.plan.model_card import loading_note

    print(f"pipeline {args.spec}:")
    print(spec.describe(), flush=True)
    state = spec.run(folder, progress=not args.no_progress, checks=args.checks or None,
                     command=command_line)
    distributed.shutdown()
    print()
    print(summary_table(state.metrics["summary"]))
    saved = state.get("saved_model")
    if saved:
        print(loading_note(saved))
    print(f"done; results in {folder.path}/ (spec.yaml, metrics.json, log.txt"
          + (", model/" if folder.model_dir.is_dir() else "") + ")")
    return 0


def _argv_without_nproc(args: argparse.Namespace) -> list[str]:
    """The ``run`` command line of ``args`` for each process of a torchrun launch."""
    argv = ["run", str(args.spec), "--out", str(args.out)]
    argv += [f"--set={o}" for o in args.overrides]
    argv += [flag for flag, on in (("--overwrite", args.overwrite),
                                   ("--no-progress", args.no_progress),
                                   ("--checks", args.checks)) if on]
    return argv


def _configure_passes(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show only this pass, with its full docstring")


@command("passes", "list the registered passes, their parameters and requires/provides",
         _configure_passes)
def passes_command(args: argparse.Namespace) -> int:
    load_plugins()
    import prunegraph.pipeline.load  # noqa: F401  (the built-in Load)

    passes = registered_passes()
    if args.name:
        if args.name not in passes:
            raise SpecError(f"unknown pass {args.name!r}.{nearest(args.name, passes)}")
        print(describe_pass(passes[args.name], full=True))
        return 0
    for name in sorted(passes):
        print(describe_pass(passes[name]))
        print()
    return 0


def describe_pass(cls: type[Pass], full: bool = False) -> str:
    """A pass as users write it in YAML: name, summary, requires -> provides, parameters."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):  # the dataclass-generated signature, not a docstring
        doc = ""
    summary = doc if full else doc.split("\n\n")[0].replace("\n", " ")
    lines = [f"{cls.pass_name()}: {summary}".rstrip(": ")]
    lines.append(f"    requires: {', '.join(cls.requires) or '-'}    "
                 f"provides: {', '.join(cls.provides) or '-'}"
                 + (f"    may provide: {', '.join(cls.may_provide)}" if cls.may_provide else ""))
    if cls.invalidates:
        lines.append(f"    invalidates: {', '.join(cls.invalidates)} "
                     f"({'; '.join(sorted(set(cls.invalidates.values())))})")
    if cls.guarantees:
        lines.append(f"    checked: {', '.join(cls.guarantees)} (with --checks)")
    if cls.early_needs:
        lines.append(f"    checked early: as soon as the state holds {', '.join(cls.early_needs)} "
                     f"(before the heavy passes in between)")
    if full:
        keys = declared_keys()
        for key in dict.fromkeys((*cls.requires, *cls.provides, *cls.may_provide)):
            if key in keys and keys[key].doc:
                lines.append(f"    state {key}: {keys[key].doc}")
    types_ = cls.param_types()
    for k, default in cls.param_defaults().items():
        tail = "(required)" if default is dataclasses.MISSING else f"= {default!r}"
        lines.append(f"    {k}: {type_name(types_[k])} {tail}")
        values = _VALUES.get(k)
        if values is not None and "str" in type_name(types_[k]):
            lines.append(f"        values: {values()}")
    more = getattr(cls, "parameter_help", None)  # a pass's nested settings, gate families ...
    if callable(more):
        lines.extend(f"    {line}" for line in more(full))
    return "\n".join(lines)


def _sources() -> str:
    from prunegraph.data.text import BUILTIN_SOURCES

    return (f"{', '.join(BUILTIN_SOURCES)} (built in); a .txt/.jsonl file or a folder of them; "
            f"hf:NAME[:CONFIG][:SPLIT] (a datasets name, online)")


def _tasks() -> str:
    from prunegraph.data.tasks import BUILTIN_TASKS

    return f"{', '.join(BUILTIN_TASKS)} (built in); or a BIG-bench task JSON file"


def _models() -> str:
    from prunegraph.data.models import META_CONFIGS, RANDOM_CONFIGS, SMOLLM2_ALIAS

    return (f"{SMOLLM2_ALIAS}; random:{{{','.join(RANDOM_CONFIGS)}}} (tiny, random weights); a "
            f"local HF folder or .gguf file; a run folder; a Hub id owner/name (online). "
            f"(meta:{{{','.join(META_CONFIGS)}}} only in `prunegraph inspect`)")


#: Values of string parameters that the core knows, by parameter name (shown by `passes`).
_VALUES = {
    "source": _sources,
    "tasks": _tasks,
    "model": _models,
    "device": lambda: "auto (the GPU when there is one), cpu, cuda, cuda:N",
    "kinds": lambda: "heads, channels, experts, expert_channels, shared_expert_channels",
}
