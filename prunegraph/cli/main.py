"""The ``prunegraph`` command line.

Subcommands register themselves with :func:`command`; the core defines ``inspect`` and loads the
rest from plugins (``prunegraph.passes``, ``prunegraph.targets``) through the
``prunegraph.pipeline.plugins`` entry-point group, so the core never imports them by name.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from prunegraph.errors import PrunegraphError
from prunegraph.pipeline.plugins import load_plugins

__all__ = ["command", "main"]

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> int`` as subcommand ``name``; ``configure`` adds its arguments."""

    def decorator(fn):
        _COMMANDS[name] = (help, configure, fn)
        return fn

    return decorator


def build_parser() -> argparse.ArgumentParser:
    import prunegraph.cli.inspect_command  # noqa: F401  (registers `inspect`)
    import prunegraph.cli.run_command  # noqa: F401  (registers `run` and `passes`)

    load_plugins()
    parser = argparse.ArgumentParser(prog="prunegraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(_COMMANDS):
        help_text, configure, _ = _COMMANDS[name]
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, fn = _COMMANDS[args.command]
    try:
        return int(fn(args) or 0)
    except PrunegraphError as e:
        print(f"prunegraph {args.command}: error: {e}", file=sys.stderr)
        return 2
