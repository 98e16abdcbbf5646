"""The ``prunegraph`` command line.

Subcommands register themselves with :func:`command`; the core defines ``inspect``, ``run``,
``passes`` and ``export`` (one subcommand per registered target) and loads the rest from plugins
(``prunegraph.passes``, ``prunegraph.targets``) through the ``prunegraph.plugins`` entry-point
group, so the core never imports them by name.

``prunegraph`` and ``prunegraph --help`` answer without importing torch, transformers or the
plugins: plugins declare their commands in the ``prunegraph.cli.commands`` entry-point group
(``name = module``), and the overview reads each command's one-line help from its module's
source (:func:`_declared_help`). A command that runs imports what it needs.

Errors reach the user as one line: a :class:`~prunegraph.errors.PrunegraphError` as its message,
Ctrl-C as "interrupted", an :class:`OSError` with the path and the reason, anything else with
its type and first line (``PRUNEGRAPH_TRACEBACK=1`` shows the full traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from prunegraph.errors import PrunegraphError

__all__ = ["command", "main", "build_parser"]

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}
_DESCRIPTION = ("prunegraph: a compiler for pruning language models (trace, find coupled "
                "channels, heads and experts, prune, slice, export).")
_EPILOG = ("examples:\n"
           "  prunegraph inspect smollm2-135m --all\n"
           "  prunegraph run examples/oneshot-smollm2.yaml --out runs/oneshot\n"
           "  prunegraph passes Prune\n"
           "  prunegraph COMMAND --help")
COMMANDS_GROUP = "prunegraph.cli.commands"


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> int`` as subcommand ``name``; ``configure`` adds its arguments."""

    def decorator(fn):
        _COMMANDS[name] = (help, configure, fn)
        return fn

    return decorator


def _core_commands() -> None:
    import prunegraph.cli.export_command  # noqa: F401  (registers `export`, one per target)
    import prunegraph.cli.inspect_command  # noqa: F401  (registers `inspect`)
    import prunegraph.cli.run_command  # noqa: F401  (registers `run` and `passes`)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: every command with its arguments (imports the plugins)."""
    from prunegraph.pipeline.plugins import load_plugins

    _core_commands()
    load_plugins()
    for ep in _declared_commands():
        if ep.name not in _COMMANDS:
            ep.load()
    parser = _parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(_COMMANDS):
        help_text, configure, _ = _COMMANDS[name]
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _parser() -> argparse.ArgumentParser:
    from prunegraph import __version__

    parser = argparse.ArgumentParser(prog="prunegraph", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"prunegraph {__version__}")
    return parser


def _overview_parser() -> argparse.ArgumentParser:
    """Command names and one-line help only: no plugin, torch or transformers import."""
    _core_commands()
    helps = {name: entry[0] for name, entry in _COMMANDS.items()}
    for ep in _declared_commands():
        helps.setdefault(ep.name, _declared_help(ep.value, ep.name))
    parser = _parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(helps):
        sub.add_parser(name, help=helps[name])
    return parser


def _declared_commands() -> list:
    from importlib.metadata import entry_points

    return list(entry_points(group=COMMANDS_GROUP))


def _declared_help(module: str, name: str) -> str:
    """The help string of ``@command(name, help, ...)`` in ``module``'s source, read without
    importing the module or its packages (which would import torch)."""
    import ast
    from pathlib import Path

    origin = _module_origin(module)
    fallback = f"(from {module}; prunegraph {name} --help)"
    if origin is None:
        return fallback
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return fallback
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "command"
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
                and node.args[0].value == name and isinstance(node.args[1], ast.Constant)):
            return str(node.args[1].value)
    return fallback


def _module_origin(name: str) -> str | None:
    """The file of module ``name``, found through the import finders but without importing it
    or its parent packages."""
    spec, path = None, None
    parts = name.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[: i + 1])
        module = sys.modules.get(prefix)
        if module is not None:
            spec = module.__spec__
        else:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                try:
                    spec = find(prefix, path) if find else None
                except (ImportError, ValueError, AttributeError, TypeError):
                    spec = None
                if spec is not None:
                    break
        if spec is None:
            return None
        path = spec.submodule_search_locations
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return spec.origin


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser = _overview_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints the help or the version and exits
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command line, for what a run records (its model card)
    _, _, fn = _COMMANDS[args.command]
    from prunegraph.cli.output import user_facing_output

    try:
        with user_facing_output():
            return int(fn(args) or 0)
    except PrunegraphError as e:
        print(f"prunegraph {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a run says where it was interrupted
        print(f"prunegraph {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as e:  # one line, not a traceback; PRUNEGRAPH_TRACEBACK=1 for the full one
        if os.environ.get("PRUNEGRAPH_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"prunegraph {args.command}: error: {describe_exception(e)}", file=sys.stderr)
        if not isinstance(e, (OSError, ImportError)):
            print("  (unexpected: set PRUNEGRAPH_TRACEBACK=1 for the traceback and report it "
                  "if it looks like a bug)", file=sys.stderr)
        return 1


def describe_exception(e: BaseException) -> str:
    """One line for an exception: a missing optional package with its install command, an
    OSError as "reason: path", others as "Type: first line"."""
    from prunegraph.errors import missing_extra

    hint = missing_extra(e)
    if hint:
        return hint
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__
