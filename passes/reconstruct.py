"""The ``Reconstruct`` pass: re-fit the kept weights of a weight mask to the dense layer outputs.

A mask chosen without touching the weights (LEAP, Wanda, magnitude) leaves every kept weight at
its dense value, although the best values under the mask differ: the removed weights' share of
each output can be moved onto the kept ones. ``Reconstruct`` does what SparseGPT does after it
has chosen a mask, with the mask given (``state.masks``, unchanged): layer by layer on
calibration text (``sequential``: each layer sees the outputs of the already reconstructed
layers), each masked linear's Hessian ``H = X^T X`` of its inputs, then SparseGPT's OBS walk
over the input columns that zeroes the removed weights and spreads their error over the kept
ones not yet visited (:func:`~prunegraph.passes.sparsegpt.sparsegpt_prune` with ``keep``). It
approximately minimises ``||X W'^T - X W^T||^2`` over the weights ``W'`` that are zero where
the mask is (exactly, for masks whose removed columns form a prefix of each row)::

    Pipeline([Load("smollm2-135m"), Gate(family="leap", sparsity=0.5), Train(steps=1000),
              Finalize(), Reconstruct(), Evaluate(label="pruned")])
    Pipeline([Load("smollm2-135m"), SparsePrune(method="wanda", sparsity=0.5), Reconstruct()])

The walk starts from the dense weights, which the mask's zeros have overwritten: they are
reloaded from where ``Load`` found the model (as ``Distill`` reloads its teacher; ``dense``
names another source, e.g. when the pipeline loaded a pruned folder), on the CPU, and copied
into the masked linears before each is reconstructed.

The kept weights change and the removed ones stay zero, so ``state.masks`` still describes the
model (an N:M pattern stays N:M) and ``SaveSparse`` or the 2:4 export follow as before. LEAP as
published does not update weights (methods.md §2.6): this pass is an addition, reported as
``leap+reconstruct`` in ``benchmarks/unstructured.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Reconstruct"]


@register_pass
@dataclass(frozen=True)
class Reconstruct(Pass):
    """Re-fit the kept weights of ``state.masks`` to the dense layer outputs on calibration
    text (SparseGPT's update with the mask fixed; see the module docstring)."""

    name = "Reconstruct"
    requires = ("model", "tokenizer", "masks")
    provides = ()

    calib_blocks: int = 128
    block_len: int = 128
    batch_size: int = 8
    source: str = "wikipedia"
    sequential: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    dense: str = ""

    def validate(self) -> None:
        from prunegraph.passes.sparse_prune import check_layerwise_settings

        check_layerwise_settings(self, "pass Reconstruct")

    def run(self, state: State) -> PassResult:
        from prunegraph.data.blocks import text_blocks
        from prunegraph.passes.sparse_prune import oneshot_masks, prunable_weights

        masks = state.masks
        if state.tokenizer is None:
            raise SpecError("pass Reconstruct needs a tokenizer for calibration text; load a "
                            "model that ships one")
        linears = prunable_weights(state.model)
        missing = sorted(set(masks.masks) - set(linears))
        if missing:
            raise SpecError(f"pass Reconstruct: the mask names weights that are not decoder "
                            f"linears of the model ({', '.join(missing[:3])}); it reconstructs "
                            f"masks of SparsePrune or Gate(family: leap)")
        names = {n: linears[n] for n in masks.masks}
        start = time.perf_counter()
        self._restore_dense(state, names)
        blocks = text_blocks(state.tokenizer, self.source, "calibration", self.block_len,
                             self.calib_blocks)
        _, forwards = oneshot_masks(
            state.model, "sparsegpt", masks.sparsity(), masks.pattern, blocks,
            batch_size=self.batch_size, sequential=self.sequential, blocksize=self.blocksize,
            percdamp=self.percdamp, progress=bool(state.progress), names=names,
            fixed=masks.masks)
        stats = {"weights": len(names), "masked_params": masks.numel(),
                 "sparsity": round(masks.sparsity(), 6), "forwards": forwards,
                 "calib_tokens": int(blocks.numel()),
                 "seconds": round(time.perf_counter() - start, 1)}
        state.metrics.setdefault("reconstruct", {}).update(stats)
        state.log.info("Reconstruct: %d masked weights re-fitted on %d calibration tokens",
                       len(names), blocks.numel())
        return PassResult(state, modified=True, stats=stats)

    def _restore_dense(self, state: State, names: dict) -> None:
        """Copy the dense model's values into the masked linears (the walk's starting point)."""
        import torch

        from prunegraph.passes.distill.teacher import load_teacher, teacher_source

        spec, dtype = teacher_source(state, self.dense, who="Reconstruct.dense")
        dense = load_teacher(state, spec, dtype, torch.device("cpu"), who="Reconstruct.dense")
        params = dict(dense.named_parameters())
        for n, (mod, _) in names.items():  # every check before the first copy
            if n not in params or params[n].shape != mod.weight.shape:
                raise SpecError(f"pass Reconstruct: {spec!r} has no weight {n} of shape "
                                f"{tuple(mod.weight.shape)}; name the dense model the mask was "
                                f"made on with Reconstruct.dense")
        with torch.no_grad():
            for n, (mod, _) in names.items():
                mod.weight.copy_(params[n])
