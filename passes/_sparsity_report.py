"""The per-layer sparsity report of a mask set, written into the run folder.

``<folder>/weights.csv`` (one row per masked weight: layer, kind, shape, kept, sparsity),
``<folder>/per_layer.md`` (a layer x kind table of sparsity in percent, with the layer's total)
and ``<folder>/per_layer.png`` (sparsity per layer, one line per kind, the target dashed).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from prunegraph.pipeline.runfolder import atomic_write_bytes, atomic_write_text
from prunegraph.plan.masks import MaskSet

__all__ = ["write_sparsity_report", "per_layer_kinds"]


def per_layer_kinds(masks: MaskSet) -> tuple[list, list[str], dict]:
    """``(layers, kinds, cells)``: ``cells[(layer, kind)] = (kept, params)``, and per layer
    ``(layer, "all")``."""
    cells: dict = {}
    kinds: list[str] = []
    for row in masks.table():
        if row["kind"] not in kinds:
            kinds.append(row["kind"])
        for key in ((row["layer"], row["kind"]), (row["layer"], "all")):
            kept, params = cells.get(key, (0, 0))
            cells[key] = (kept + row["kept"], params + row["params"])
    layers = sorted({k[0] for k in cells}, key=lambda v: (v is None, v if v is not None else 0))
    return layers, kinds, cells


def _markdown(masks: MaskSet) -> str:
    layers, kinds, cells = per_layer_kinds(masks)
    head = ["layer", *kinds, "all"]
    lines = [f"Sparsity (% of weights zeroed) per layer and weight; method {masks.method or '?'}, "
             f"pattern {masks.pattern}, overall {100 * masks.sparsity():.2f}%"
             + (f" (target {100 * masks.target_sparsity:.2f}%)"
                if masks.target_sparsity is not None else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for layer in layers:
        vals = []
        for kind in (*kinds, "all"):
            kept, params = cells.get((layer, kind), (0, 0))
            vals.append(f"{100 * (1 - kept / params):.1f}" if params else "")
        lines.append(f"| {layer if layer is not None else '-'} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_sparsity_report(folder: str | Path, masks: MaskSet) -> list[Path]:
    """Write the three files (see the module docstring) into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "layer", "kind", "rows", "cols", "params", "kept", "sparsity"])
    for row in masks.table():
        writer.writerow([row["name"], row["layer"], row["kind"], *row["shape"], row["params"],
                         row["kept"], f"{row['sparsity']:.6f}"])
    out = [atomic_write_text(folder / "weights.csv", buf.getvalue()),
           atomic_write_text(folder / "per_layer.md", _markdown(masks))]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, cells = per_layer_kinds(masks)
    numbered = [v for v in layers if v is not None]
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for kind in (*kinds, "all"):
        xs = [v for v in numbered if (v, kind) in cells]
        ys = [1 - cells[(v, kind)][0] / cells[(v, kind)][1] for v in xs]
        ax.plot(xs, ys, marker="o", ms=3, lw=2.2 if kind == "all" else 1,
                color="k" if kind == "all" else None, label=kind)
    if masks.target_sparsity is not None:
        ax.axhline(masks.target_sparsity, color="grey", ls="--", lw=1, label="target")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (fraction zeroed)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{masks.method or 'masks'} ({masks.pattern}): sparsity per layer")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    out.append(atomic_write_bytes(folder / "per_layer.png", png.getvalue()))
    return out
