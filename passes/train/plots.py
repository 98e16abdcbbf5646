"""Plots of a mask-training run, saved next to its metrics (matplotlib, Agg backend).

``loss.png`` (loss, CE, KL per step), ``sparsity.png`` (achieved and expected sparsity against
the target, with the first multiplier), ``kept_per_layer.png`` (kept fraction per layer and group
kind) and ``head_gates.png`` (a layer x head map of the final head gate values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunegraph.atomic import atomic_write

__all__ = ["write_plots"]


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def write_plots(folder: Path, history: list[dict[str, Any]], family,
                final: dict[str, torch.Tensor]) -> list[Path]:
    """Write the four plots into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    steps = [h["step"] for h in history]
    polish = next((h["step"] for h in history if h.get("polish")), None)

    def mark_polish(ax) -> None:
        if polish is not None:
            ax.axvline(polish, color="tab:red", ls=":", lw=1, label="polish starts")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "ce", "kl"):
        ax.plot(steps, [h[key] for h in history], label=key)
    mark_polish(ax)
    ax.set_xlabel("step")
    ax.set_title(f"{family.name}: training loss")
    ax.legend()
    _save(fig, folder / "loss.png")
    plt.close(fig)
    out.append(folder / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["achieved_sparsity"] for h in history], label="achieved (gate = 0)")
    ax.plot(steps, [h["expected_sparsity"] for h in history], label="expected (1 - mean s)")
    ax.axhline(family.target_sparsity(), color="k", ls="--", lw=1, label="target")
    mark_polish(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity of the gated pool")
    l1 = next((k for k in (history[0] if history else {}) if k.startswith("l1_")), None)
    if l1:
        ax2 = ax.twinx()
        ax2.plot(steps, [h[l1] for h in history], color="grey", lw=1, label=l1)
        ax2.set_ylabel(l1)
    ax.legend(loc="lower right")
    ax.set_title(f"{family.name}: sparsity")
    _save(fig, folder / "sparsity.png")
    plt.close(fig)
    out.append(folder / "sparsity.png")

    per_kind: dict[str, dict[int, float]] = {}
    for g in family.groups:
        if g.layer is not None:
            v = final[g.name]
            per_kind.setdefault(g.kind, {})[g.layer] = float((v != 0).float().mean())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, rows in sorted(per_kind.items()):
        layers = sorted(rows)
        ax.plot(layers, [rows[i] for i in layers], marker="o", ms=3, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"{family.name}: kept fraction per layer")
    _save(fig, folder / "kept_per_layer.png")
    plt.close(fig)
    out.append(folder / "kept_per_layer.png")

    heads = sorted((g for g in family.groups if g.kind == "heads" and g.layer is not None),
                   key=lambda g: g.layer)
    if heads:
        width = max(g.size for g in heads)
        grid = torch.full((len(heads), width), float("nan"))
        for i, g in enumerate(heads):
            grid[i, : g.size] = final[g.name].float().reshape(-1)[: g.size]
        fig, ax = plt.subplots(figsize=(max(3, 0.4 * width + 2), max(3, 0.2 * len(heads) + 1)))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(heads)), [str(g.layer) for g in heads], fontsize=6)
        fig.colorbar(im, ax=ax, label="final gate value")
        ax.set_title(f"{family.name}: head gates")
        _save(fig, folder / "head_gates.png")
        plt.close(fig)
        out.append(folder / "head_gates.png")
    return out
