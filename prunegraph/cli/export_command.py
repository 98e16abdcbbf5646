"""``prunegraph export TARGET RUN_OR_MODEL OUT``: one subcommand per registered target.

Each target declared with :func:`prunegraph.pipeline.targets.target` gets its subcommand here,
its options made from its parameters (``--atol 1e-3``; booleans as ``--check/--no-check``;
choices for ``Literal`` types); the report it returns is printed as JSON::

    prunegraph export onnx runs/oneshot pruned.onnx --no-check
    prunegraph export triton runs/oneshot kernels/
    prunegraph export hf runs/oneshot copy/
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from prunegraph.cli.main import command
from prunegraph.pipeline.contract import nearest, type_name
from prunegraph.pipeline.targets import Target, registered_targets

__all__ = ["export_command"]


class _TargetParser(argparse.ArgumentParser):
    """A target's parser: an unknown option gets the nearest valid one."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        unknown = [a for a in extras if a.startswith("-")]
        if unknown:
            name = unknown[0].split("=", 1)[0]
            options = [o for a in self._actions for o in a.option_strings]
            self.error(f"unrecognized option {name}.{nearest(name, options)}")
        return namespace, extras


def _add_option(parser: argparse.ArgumentParser, name: str, tp: Any, default: Any,
                help_text: str) -> None:
    """``--name`` for one target parameter; values left out keep the declared default."""
    flag = "--" + name.replace("_", "-")
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else str
    if "default" not in help_text:
        help_text = f"{help_text.rstrip('.')} (default: {default!r})".lstrip()
    help_text = help_text.replace("%", "%%")
    common: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        parser.add_argument(flag, choices=choices, type=type(choices[0]), **common)
    elif tp in (int, float, str):
        parser.add_argument(flag, type=tp, metavar=tp.__name__.upper(), **common)
    else:
        raise TypeError(f"export option {flag}: type {type_name(tp)} has no command-line form; "
                        f"use bool, int, float, str, a Literal or one of them | None")


def _configure_target(parser: argparse.ArgumentParser, t: Target) -> None:
    what = f"the {t.suffix} file to write" if t.suffix else "the folder to write"
    parser.add_argument("model", metavar="RUN_OR_MODEL",
                        help="a run folder with model/, a pruned or HF model folder, or a "
                             "load_model spec (smollm2-135m, random:llama, ...)")
    parser.add_argument("out", metavar="OUT", help=what)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    helps = t.param_help()
    types_ = t.param_types()
    for name, default in t.param_defaults().items():
        _add_option(parser, name, types_[name], default, helps.get(name, ""))


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET",
                           parser_class=_TargetParser)
    for name, t in sorted(registered_targets().items()):
        _configure_target(sub.add_parser(name, help=t.summary, description=t.summary), t)


@command("export", "export a (pruned) model to a deployment target", _configure)
def export_command(args: argparse.Namespace) -> int:
    t = registered_targets()[args.target]
    values = {k: getattr(args, k) for k in t.param_defaults() if hasattr(args, k)}
    report = t(args.model, args.out, overwrite=args.overwrite, **values)
    print(json.dumps(report, indent=2, default=str))
    return 0
