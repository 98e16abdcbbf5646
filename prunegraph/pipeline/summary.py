"""The end of a run in a few lines: the before/after table, and numbers people can read.

:func:`run_summary` compares the *measurements* a run recorded: the dict-valued entries that
passes which leave the model unchanged (``modified=False``: ``Evaluate``) added to
``state.metrics``, such as ``dense`` and ``pruned``. Their numeric values (one level of nesting
flattened: ``winowhy.acc``) become rows, the entries columns, with the change from the first
to the last. The model's parameter count at the start and the end and the run's time come from
the pipeline itself, so every run has a summary, measured or not::

    summary         dense        pruned       change
    params          134,515,008  113,254,464  -15.8%
    ppl             18.96        31.57        +66.5%
    winowhy.acc     0.505        0.51         +0.005

It is stored as ``metrics["summary"]`` and printed by ``prunegraph run``. :func:`fmt` is the
rounding every printed number goes through (per-pass lines included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["fmt", "fmt_stats", "count_params", "run_summary", "summary_table"]

#: Bookkeeping inside measurements, not worth a row.
_SKIP = {"seconds", "n"}


def fmt(value: Any) -> str:
    """A number as people read it: ints with thousands separators, floats to 4 significant
    digits (``18.956832331586607 -> 18.96``, ``0.50500001 -> 0.505``); anything else as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, (list, tuple)) and len(value) > 6:
            return f"[{', '.join(fmt(v) for v in value[:6])}, ... ({len(value)} items)]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def fmt_stats(stats: Mapping[str, Any]) -> str:
    """``k=v, ...`` with every number rounded by :func:`fmt`."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in stats.items())


def count_params(model: Any) -> int | None:
    """Parameters of a module, tied tensors once; None for anything else."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    try:
        return sum({id(p): p.numel() for p in params()}.values())
    except Exception:
        return None


def _numbers(value: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if not isinstance(value, Mapping):
        return out
    for k, v in value.items():
        if k in _SKIP or str(k).endswith("_tokens"):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = v
        elif isinstance(v, Mapping):
            for k2, v2 in v.items():
                if k2 not in _SKIP and isinstance(v2, (int, float)) and not isinstance(v2, bool):
                    out[f"{k}.{k2}"] = v2
    return out


def run_summary(metrics: Mapping[str, Any], measured: Sequence[str], *,
                params_start: int | None, params_end: int | None, seconds: float) -> dict:
    """The summary of a run (see the module docstring); ``measured`` lists the metrics keys
    added by passes that left the model unchanged, in run order."""
    columns = {k: _numbers(metrics.get(k)) for k in measured}
    columns = {k: v for k, v in columns.items() if v}
    rows: dict[str, list[Any]] = {}
    if len(columns) >= 2:
        shared = [r for r in dict.fromkeys(n for c in columns.values() for n in c)
                  if sum(r in c for c in columns.values()) >= 2]
        columns = {k: c for k, c in columns.items() if any(r in c for r in shared)}
        rows = {r: [c.get(r) for c in columns.values()] for r in shared}
    elif len(columns) == 1:
        (col,) = columns.values()
        rows = {r: [v] for r, v in col.items()}
    return {"columns": list(columns), "rows": rows,
            "parameters": {"start": params_start, "end": params_end},
            "seconds": round(seconds, 1)}


def _change(values: list[Any]) -> str:
    a, b = values[0], values[-1]
    if not all(isinstance(v, (int, float)) for v in (a, b)) or len(values) < 2:
        return ""
    if 0 <= a <= 1 and 0 <= b <= 1 and not (isinstance(a, int) and isinstance(b, int)):
        return f"{b - a:+.3f}"
    if a == 0:
        return ""
    return f"{100 * (b - a) / abs(a):+.1f}%"


def summary_table(summary: Mapping[str, Any]) -> str:
    """The summary as an aligned text table, the parameters and the time below it."""
    lines = []
    columns, rows = list(summary.get("columns", [])), summary.get("rows", {})
    if rows:
        head = ["summary", *columns] + (["change"] if len(columns) >= 2 else [])
        body = [[name, *(fmt(v) if v is not None else "-" for v in values)]
                + ([_change(values)] if len(columns) >= 2 else []) for name, values in rows.items()]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        for r in [head, *body]:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    p = summary.get("parameters", {})
    start, end = p.get("start"), p.get("end")
    if start and end:
        change = f" ({100 * (end - start) / start:+.1f}%)" if end != start else " (unchanged)"
        lines.append(f"model parameters: {fmt(start)} -> {fmt(end)}{change}")
    seconds = float(summary.get("seconds", 0))
    lines.append(f"time: {seconds / 60:.1f} min" if seconds >= 120 else f"time: {seconds:.1f} s")
    return "\n".join(lines)
