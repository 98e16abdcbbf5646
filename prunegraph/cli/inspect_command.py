"""``prunegraph inspect MODEL``: show the groups prunegraph finds in a model.

Examples::

    prunegraph inspect smollm2-135m --json out.json --html out.html
    prunegraph inspect random:qwen3-moe
    prunegraph inspect meta:qwen3-30b-a3b          # a 30B config on the meta device, no weights
    prunegraph inspect random:mamba                # any causal-LM type of transformers, tiny

The last lines say how much of the model stayed prunable, which ops had no dimension rule (and
which parameters they pinned), and what the analysis left out and why.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from prunegraph.atomic import atomic_write_text
from prunegraph.cli.main import command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF folder, .gguf file, 'smollm2-135m', 'random:<arch>' or 'meta:<name>'")
    p.add_argument("--meta", action="store_true",
                   help="build the model's config on the meta device (no weights)")
    p.add_argument("--json", metavar="PATH", help="write every group with its members as JSON")
    p.add_argument("--dot", metavar="PATH", help="write a Graphviz DOT file of groups and parameters")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--all", action="store_true", help="print every group (default: the first 40)")
    p.add_argument("--strict", action="store_true",
                   help="an op with no dimension rule is an error (default: its spaces are pinned)")


@command("inspect", "show the prunable groups prunegraph discovers in a model", _configure)
def inspect_command(args) -> int:
    from prunegraph.data.models import load_model
    from prunegraph.ir.analysis import analyze, report

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    model, _ = load_model(args.model, meta=args.meta, tokenizer=False)
    load_s = time.perf_counter() - t0
    analysis = analyze(model, strict=args.strict)
    analysis.seconds["load"] = round(load_s, 3)
    print(report.table(analysis, None if args.all else 40))
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_json(analysis), indent=1))
        print(f"wrote {args.json}")
    if args.dot:
        atomic_write_text(args.dot, report.to_dot(analysis))
        print(f"wrote {args.dot}")
    if args.html:
        atomic_write_text(args.html, report.to_html(analysis))
        print(f"wrote {args.html}")
    return 0
