"""The model card of a pruned folder: ``README.md``, as the Hugging Face Hub shows it.

:func:`model_card` says what the folder holds and how it was made: the base model, the method
and budget, the widths per layer, how to load it (and whether plain transformers can), the
results and the command. :func:`~prunegraph.plan.checkpoint.save_pruned` writes a first card
from what it knows (the plan); a pipeline run rewrites it at the end with its measurements,
spec and command (:func:`write_model_card`)::

    write_model_card("runs/oneshot/model", base_model="smollm2-135m", summary=metrics["summary"],
                     spec=spec, command="prunegraph run examples/oneshot-smollm2.yaml ...")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from prunegraph.atomic import atomic_write_text

__all__ = ["model_card", "write_model_card", "loading_note", "UNIFORM_HINT"]

#: What to do when plain transformers cannot load a pruned folder.
UNIFORM_HINT = ("load it with `prunegraph.from_pretrained(folder)`, or prune with "
                "`Prune: {strategy: uniform}` (the same widths in every layer) for a checkpoint "
                "that plain transformers loads")


def _method(spec: dict[str, Any] | None) -> list[str]:
    """The passes that decided what to remove, with their parameters, from a resolved spec."""
    if not spec:
        return []
    lines = []
    for entry in spec.get("passes", []):
        (name, params), = entry.items() if isinstance(entry, dict) else ((entry, {}),)
        if name in ("Load", "Evaluate", "Save", "Analyze"):
            continue
        shown = {k: v for k, v in (params or {}).items()
                 if k in ("criterion", "sparsity", "strategy", "scope", "family", "budget",
                          "steps", "polish_steps", "mode", "round_to", "group_size", "tau")}
        lines.append(f"`{name}`" + (f" ({', '.join(f'{k}: {v}' for k, v in shown.items())})"
                                    if shown else ""))
    return lines


def _front_matter(base_hub_id: str | None) -> str:
    meta: dict[str, Any] = {"library_name": "prunegraph",
                            "tags": ["prunegraph", "pruned", "structured-pruning"]}
    if base_hub_id:
        meta["base_model"] = base_hub_id
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_card(folder: str | os.PathLike, *, base_model: str | None = None,
               summary: dict[str, Any] | None = None, spec: dict[str, Any] | None = None,
               command: str | None = None) -> str:
    """The README.md text for the pruned folder ``folder`` (read: its plan and config.json)."""
    from prunegraph.data.models import hub_id
    from prunegraph.pipeline.summary import fmt, summary_table

    folder = Path(folder)
    plan = json.loads((folder / "prunegraph_plan.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    info = config.get("prunegraph", {})
    extra = plan.get("extra", {})
    fp = plan.get("fingerprint") or {}
    report = plan.get("report") or {}
    model_class = extra.get("model_class") or fp.get("model_class", "model")
    total = fp.get("params_total")
    removed = report.get("params_removed")
    name = base_model or model_class
    lines = [_front_matter(hub_id(base_model) if base_model else None),
             f"# {name}, pruned with prunegraph", ""]
    lines.append(f"- **Base model:** `{base_model}` ({model_class})" if base_model
                 else f"- **Base model:** {model_class}")
    if total and removed is not None:
        lines.append(f"- **Parameters:** {fmt(int(total))} -> {fmt(int(total - removed))} "
                     f"({100 * removed / total:.1f}% removed)")
    method = _method(spec)
    if method:
        lines.append(f"- **Method:** {' -> '.join(method)}")
    lines.append(f"- **dtype:** {config.get('dtype') or config.get('torch_dtype') or 'float32'}")
    lines += ["", "## Loading", "", "```python", "import prunegraph", "",
              f"model = prunegraph.from_pretrained({str(folder)!r})", "```", ""]
    if extra.get("hf_compatible"):
        lines.append("Every layer has the same widths, so `config.json` is a standard config and "
                     "`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads the folder "
                     "as well.")
    else:
        lines.append("The layers have different widths (below; `per_layer` in config.json, the "
                     "plan in `prunegraph_plan.json`). Plain `transformers` cannot build such a "
                     f"model: {UNIFORM_HINT}.")
    per_layer = info.get("per_layer") or {}
    if per_layer:
        fields = list(dict.fromkeys(k for v in per_layer.values() for k in v))
        lines += ["", "## Widths per layer", "", "| layer | " + " | ".join(fields) + " |",
                  "|---|" + "---|" * len(fields)]
        base = info.get("base_widths", {})
        if base:
            lines.append("| (base) | " + " | ".join(str(base.get(f, "")) for f in fields) + " |")
        for layer, values in per_layer.items():
            lines.append(f"| {layer} | " + " | ".join(str(values.get(f, base.get(f, "")))
                                                   for f in fields) + " |")
    if summary:
        lines += ["", "## Results", "", "```", summary_table(summary), "```"]
    if command or spec:
        lines += ["", "## How it was made", ""]
        if command:
            lines += ["```", command, "```", ""]
        if spec:
            lines += ["The resolved pipeline spec:", "", "```yaml",
                      yaml.safe_dump(spec, sort_keys=False, default_flow_style=None).rstrip(),
                      "```"]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, **info: Any) -> Path:
    """Write (atomically) ``folder/README.md`` from :func:`model_card`."""
    return atomic_write_text(Path(folder) / "README.md", model_card(folder, **info))


def loading_note(folder: str | os.PathLike) -> str:
    """One or two lines on how to load a pruned folder (printed at the end of a run)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "config.json").read_text()).get("prunegraph") or {}
    except (OSError, ValueError):
        return f"model: {folder} (prunegraph.from_pretrained)"
    if not info:  # no prunegraph section: what save_pretrained wrote (SaveSparse)
        from prunegraph.plan.masks import MASKS_FILE

        zeros = (" with the pruned weights zeroed in place (masks in "
                 f"{MASKS_FILE})" if (folder / MASKS_FILE).exists() else "")
        return (f"model: {folder}: a standard checkpoint{zeros}; "
                f"AutoModelForCausalLM.from_pretrained loads it")
    if info.get("uniform"):
        return (f"model: {folder}: a standard checkpoint (same widths in every layer); "
                f"transformers or prunegraph.from_pretrained load it")
    return (f"model: {folder}: its layers have different widths, so plain transformers cannot "
            f"load it;\n  {UNIFORM_HINT}")
