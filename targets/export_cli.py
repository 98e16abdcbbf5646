"""``prunegraph export TARGET RUN_OR_MODEL OUT``: one command, one sub-command per target.

Targets register with :func:`export_target`; each adds its own options and returns a JSON-able
report, which the command prints::

    prunegraph export onnx runs/oneshot pruned.onnx
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from prunegraph.cli.main import command

__all__ = ["export_target", "EXPORT_TARGETS"]

#: target name -> (help, configure(parser), run(args) -> report)
EXPORT_TARGETS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                                Callable[[argparse.Namespace], dict[str, Any]]]] = {}


def export_target(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> report`` as ``prunegraph export <name>``."""

    def decorator(fn):
        EXPORT_TARGETS[name] = (help, configure, fn)
        return fn

    return decorator


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name in sorted(EXPORT_TARGETS):
        help_text, configure, _ = EXPORT_TARGETS[name]
        t = sub.add_parser(name, help=help_text, description=help_text)
        t.add_argument("model", metavar="RUN_OR_MODEL",
                       help="a run folder with model/, a pruned or HF model folder, or a "
                            "load_model spec (smollm2-135m, random:llama, ...)")
        t.add_argument("out", help="where to write the export")
        t.add_argument("--overwrite", action="store_true", help="replace an existing output")
        configure(t)


@command("export", "export a (pruned) model to a deployment target", _configure)
def export_command(args: argparse.Namespace) -> int:
    _, _, run = EXPORT_TARGETS[args.target]
    print(json.dumps(run(args), indent=2, default=str))
    return 0
