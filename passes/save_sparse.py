"""The ``SaveSparse`` pass: a weight-pruned model as a standard HF checkpoint plus its masks.

Weight pruning changes no shape, so the folder is what ``save_pretrained`` writes (zeros in
place; plain ``AutoModelForCausalLM.from_pretrained(path)`` loads it) plus::

    masks.safetensors      the MaskSet (bool, True = kept; pattern, method, sparsity as metadata)
    sparsity/              the per-layer table (weights.csv, per_layer.md) and plot

The folder is built under a temporary name and renamed. The masks are checked against the
weights first: a weight that is nonzero where its mask says removed means the masks were never
applied (or the weights changed since), and nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunegraph.errors import CheckpointError, PreconditionError
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass
from prunegraph.pipeline.runfolder import atomic_dir, run_path
from prunegraph.plan.checkpoint import without_source_quantizer
from prunegraph.plan.masks import MASKS_FILE, MaskSet

__all__ = ["SaveSparse", "save_sparse"]


def _check_applied(model: nn.Module, masks: MaskSet) -> None:
    params = dict(model.named_parameters())
    stray = []
    for name, keep in masks.masks.items():
        if name not in params:
            raise CheckpointError(f"the model has no weight {name!r}; the masks belong to "
                                  f"another model")
        w = params[name].detach()
        if bool((w[~keep.to(w.device)] != 0).any()):
            stray.append(name)
    if stray:
        raise PreconditionError(f"{len(stray)} weights are nonzero where their mask removes "
                                f"them (first: {stray[0]}); apply the masks (MaskSet.apply_) "
                                f"before saving")


def save_sparse(model: nn.Module, masks: MaskSet, path: str | os.PathLike, tokenizer: Any = None,
                *, overwrite: bool = False) -> Path:
    """Write ``model`` (masks applied) and ``masks`` to ``path``; see the module docstring."""
    from torch.nn.utils import parametrize

    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another folder or pass "
                              f"overwrite=True")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PreconditionError("the model still has gates or mask parametrizations; finalize "
                                "(Finalize) before saving")
    masks.check_pattern()
    _check_applied(model, masks)
    with atomic_dir(path, overwrite=overwrite) as tmp, without_source_quantizer(model):
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        masks.save(tmp / MASKS_FILE)
        from prunegraph.passes._sparsity_report import write_sparsity_report

        write_sparsity_report(tmp / "sparsity", masks)
    return path


@register_pass
@dataclass(frozen=True)
class SaveSparse(Pass):
    """Save the weight-pruned model to ``path`` (relative to the run folder) as a standard HF
    checkpoint with ``masks.safetensors`` beside it. It reads ``state.masks`` (from SparsePrune,
    or from Finalize of a weight family such as LEAP)."""

    name = "SaveSparse"
    requires = ("model", "masks")
    provides = ("saved_model",)

    path: str = "model"

    def run(self, state: State) -> PassResult:
        target = run_path(state.run_dir, self.path, "SaveSparse.path")
        with torch.no_grad():
            save_sparse(state.model, state.masks, target, tokenizer=state.get("tokenizer"),
                        overwrite=True)
        state.saved_model = str(target)
        state.metrics["model_dir"] = str(target)
        return PassResult(state, modified=False,
                          stats={"path": str(target), "sparsity": round(state.masks.sparsity(), 6)})
