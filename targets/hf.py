"""HF target: the pruned model as a Hugging Face folder that reloads with its per-layer widths.

The writer and the reader are the core's (:func:`prunegraph.plan.checkpoint.save_pruned` and
:func:`~prunegraph.plan.checkpoint.from_pretrained`: loading a pruned model is core API); this
module declares the writer as a target like ONNX and Triton, which gives it the pass ``Save``
(the name specs use) and ``prunegraph export hf RUN_OR_MODEL OUT_DIR`` (a copy of a run's model,
or a pruned folder re-saved elsewhere)::

    passes:
      - Prune: {sparsity: 0.2}
      - Slice
      - Save: {path: model}        # runs/x/model, reloadable with prunegraph.from_pretrained
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.targets import target
from prunegraph.plan.checkpoint import save_pruned

__all__ = ["Save", "hf_target"]


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SpecError(f"{out} already exists; choose another folder or pass --overwrite")


def _metrics(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    return {"model_dir": str(out)}


@target("hf", pass_name="Save", needs=("model", "plan"), provides="saved_model", output="model",
        check_output=_check_output, metrics=_metrics)
def hf_target(state: State, out: Path, *, overwrite: bool) -> dict[str, Any]:
    """The sliced model as a folder that prunegraph.from_pretrained reloads.

    Safetensors, config, plan and tokenizer, written under a temporary name and then renamed.
    """
    save_pruned(state.model, state.plan, out, tokenizer=state.get("tokenizer"),
                overwrite=overwrite)
    return {"path": str(out)}


Save = hf_target.pass_class
