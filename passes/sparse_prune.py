"""The ``SparsePrune`` pass: one-shot weight pruning (magnitude, Wanda, SparseGPT) to a mask set.

The baselines every learned weight mask (LEAP) is compared against, unstructured or N:M::

    Pipeline([Load("smollm2-135m"), SparsePrune(method="sparsegpt", sparsity=0.6),
              Evaluate(label="pruned"), SaveSparse()])
    SparsePrune(method="wanda", pattern="2:4")       # 2:4 implies sparsity 0.5

* ``magnitude``: ``|W|``, ranked per output row (``comparison="row"``) or per layer.
* ``wanda``: ``|W| * ||X_j||`` per output row (the Wanda paper), the input norms collected layer
  by layer on calibration text (``sequential``: layer ``i`` sees the outputs of the already
  pruned layers ``< i``, as in the paper's code).
* ``sparsegpt``: layer-wise OBS reconstruction (:mod:`prunegraph.passes.sparsegpt`) with each
  linear's Hessian from the same layer-by-layer calibration; the kept weights are *updated*.

The weights are zeroed (and, for SparseGPT, updated) in place, so the model stays a plain HF
model; ``state.masks`` is the :class:`~prunegraph.plan.masks.MaskSet`, and with a run folder
``<run>/sparsity/`` gets the per-layer table and plot. Which weights are masked:
:func:`prunable_weights` (every decoder-layer linear; embeddings and ``lm_head`` stay dense).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, declare_key, register_pass
from prunegraph.plan.masks import MaskSet, masks_from, parse_pattern, sparse_linears

__all__ = ["SparsePrune", "prunable_weights", "oneshot_masks", "resolve_sparsity"]

declare_key("masks", "prunegraph.plan.masks.MaskSet",
            "per-weight keep masks of weight pruning; the zeros are already in the weights")


def prunable_weights(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, tuple[nn.Module, int]]:
    """The masked weights: :func:`~prunegraph.plan.masks.sparse_linears` inside the decoder layers."""
    from prunegraph.passes._layerwise import decoder_layers

    path, _ = decoder_layers(model)
    prefix = f"{path}." if path else ""
    return {n: v for n, v in sparse_linears(model, skip).items() if n.startswith(prefix)}


def resolve_sparsity(sparsity: float | None, pattern: str, where: str) -> float:
    """The sparsity a pattern and a requested value give (N:M implies ``1 - N/M``)."""
    nm = parse_pattern(pattern)
    if nm is None:
        if sparsity is None:
            raise SpecError(f"{where}: unstructured pruning needs a sparsity in (0, 1), e.g. "
                            f"sparsity: 0.5")
        if not 0.0 < sparsity < 1.0:
            raise SpecError(f"{where}: sparsity must lie in (0, 1), got {sparsity}")
        return float(sparsity)
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise SpecError(f"{where}: pattern {pattern} removes {implied:g} of the weights; drop "
                        f"sparsity or set it to {implied:g} (got {sparsity})")
    return implied


def _stats_hooks(layer: nn.Module, names: dict[str, tuple[nn.Module, int]], method: str):
    """Forward hooks on ``layer``'s masked linears collecting what ``method`` needs."""
    from prunegraph.passes.sparsegpt import HessianAccumulator

    stats: dict[str, object] = {}
    handles = []
    for name, (mod, dim) in names.items():
        if not any(m is mod for m in layer.modules()):
            continue
        cols = mod.weight.shape[dim]
        if method == "sparsegpt":
            stats[name] = HessianAccumulator(cols, mod.weight.device)
        else:
            stats[name] = torch.zeros(cols, dtype=torch.float32, device=mod.weight.device)

        def hook(_mod, args, _out, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if method == "sparsegpt":
                stats[name].add(x)
            else:
                stats[name] += (x * x).sum(0)

        handles.append(mod.register_forward_hook(hook))
    return stats, handles


@torch.no_grad()
def _prune_weight(mod: nn.Module, dim: int, method: str, stat, sparsity: float,
                  nm: tuple[int, int] | None, comparison: str, blocksize: int,
                  percdamp: float, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Prune one weight in place; returns its keep mask (``fixed``: SparseGPT reconstructs
    under this mask instead of choosing one)."""
    from prunegraph.passes.sparse_masks import keep_nm, keep_unstructured, magnitude_scores, wanda_scores
    from prunegraph.passes.sparsegpt import sparsegpt_prune

    w = mod.weight
    if method == "sparsegpt":
        as_rows = w.detach() if dim == 1 else w.detach().t()
        if fixed is not None:
            fixed = (fixed if dim == 1 else fixed.t()).to(w.device)
        new, keep = sparsegpt_prune(as_rows, stat.H, sparsity, nm=nm, blocksize=blocksize,
                                    percdamp=percdamp, keep=fixed)
        if dim == 0:
            new, keep = new.t(), keep.t()
        w.copy_(new.to(w.dtype))
        return keep
    scores = (magnitude_scores(w) if method == "magnitude"
              else wanda_scores(w, stat.sqrt(), dim))
    keep = keep_nm(scores, *nm, dim) if nm else keep_unstructured(scores, sparsity, dim,
                                                                   comparison)
    w.mul_(keep.to(w.dtype))
    return keep


def check_layerwise_settings(p: Any, where: str) -> None:
    """The calibration and OBS settings ``SparsePrune`` and ``Reconstruct`` share."""
    for key, low in (("calib_blocks", 1), ("block_len", 2), ("batch_size", 1), ("blocksize", 1)):
        if getattr(p, key) < low:
            raise SpecError(f"{where}: {key} must be >= {low}, got {getattr(p, key)}")
    if not 0.0 <= p.percdamp < 1.0:
        raise SpecError(f"{where}: percdamp must lie in [0, 1), got {p.percdamp}")


def oneshot_masks(model: nn.Module, method: str, sparsity: float, pattern: str = "unstructured",
                  blocks: torch.Tensor | None = None, *, comparison: str = "row",
                  batch_size: int = 8, sequential: bool = True, blocksize: int = 128,
                  percdamp: float = 0.01, skip: Iterable[str] = (), progress: bool = False,
                  apply: bool = True, names: dict[str, tuple[nn.Module, int]] | None = None,
                  fixed: dict[str, torch.Tensor] | None = None) -> tuple[MaskSet, int]:
    """Prune ``model`` in place with ``method`` and return ``(masks, forwards)``; ``blocks``
    (calibration tokens) are needed for ``wanda`` and ``sparsegpt``. With ``apply=False`` every
    weight is restored once its layer is done (the masks only: LEAP's initialisation);
    ``names`` overrides :func:`prunable_weights`. ``fixed`` (``sparsegpt`` only: the
    ``Reconstruct`` pass) gives every weight's keep mask: the weights are reconstructed under it
    instead of a mask being chosen."""
    from prunegraph.passes._layerwise import for_each_layer

    nm = parse_pattern(pattern)
    names = prunable_weights(model, skip) if names is None else names
    if not names:
        raise SpecError("the model has no linear weight to prune")
    if fixed is not None and (method != "sparsegpt" or set(fixed) != set(names)):
        raise SpecError("a fixed mask is reconstructed by sparsegpt and must cover every "
                        "masked weight")
    keep: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    forwards = 0

    def prune(name: str, stat) -> None:
        mod, dim = names[name]
        if not apply:
            saved[name] = mod.weight.detach().clone()
        given = fixed.get(name) if fixed is not None else None
        if stat is None and given is not None:  # a linear the layer walk never ran: mask only
            with torch.no_grad():
                mod.weight.mul_(given.to(mod.weight.device, mod.weight.dtype))
            keep[name] = given
            return
        keep[name] = _prune_weight(mod, dim, method if stat is not None or method == "magnitude"
                                   else "magnitude", stat, sparsity, nm, comparison, blocksize,
                                   percdamp, given)

    def restore(*_: object) -> None:
        with torch.no_grad():
            for name, w in saved.items():
                names[name][0].weight.copy_(w)
        saved.clear()

    if method == "magnitude":
        for name in names:
            prune(name, None)
        restore()
    else:
        if blocks is None:
            raise SpecError(f"method {method!r} needs calibration blocks")

        def visit(_i: int, layer: nn.Module, run) -> None:
            stats, handles = _stats_hooks(layer, names, method)
            try:
                run()
            finally:
                for h in handles:
                    h.remove()
            for name, stat in stats.items():
                prune(name, stat)

        forwards = for_each_layer(model, blocks, batch_size, visit, sequential=sequential,
                                  progress=progress, after=restore)
    for name in [n for n in names if n not in keep]:
        prune(name, None)  # a linear the layer walk never ran (unused module): by magnitude
    restore()
    masks = masks_from({n: keep[n] for n in names}, names, pattern=pattern, method=method,
                       target_sparsity=sparsity)
    return masks, forwards


@register_pass
@dataclass(frozen=True)
class SparsePrune(Pass):
    """One-shot weight pruning by ``method`` to ``sparsity`` (or an N:M ``pattern``); zeros the
    weights in place and provides ``masks`` (see the module docstring)."""

    name = "SparsePrune"
    requires = ("model", "tokenizer")
    provides = ("masks",)

    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float | None = None
    pattern: str | int = "unstructured"  # int only to explain an unquoted YAML 2:4 (= 124)
    comparison: Literal["row", "layer"] = "row"
    calib_blocks: int = 128
    block_len: int = 128
    batch_size: int = 8
    source: str = "wikipedia"
    sequential: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    skip: tuple[str, ...] = ()

    def validate(self) -> None:
        resolve_sparsity(self.sparsity, self.pattern, "pass SparsePrune")
        check_layerwise_settings(self, "pass SparsePrune")
        for s in self.skip:
            try:
                re.compile(s)
            except re.error as e:
                raise SpecError(f"pass SparsePrune: skip pattern {s!r} is not a regex ({e})"
                                ) from None

    def run(self, state: State) -> PassResult:
        from prunegraph.data.blocks import text_blocks

        sparsity = resolve_sparsity(self.sparsity, self.pattern, "pass SparsePrune")
        start = time.perf_counter()
        blocks = None
        if self.method != "magnitude":
            if state.tokenizer is None:
                raise SpecError(f"method '{self.method}' needs a tokenizer for calibration text; "
                                f"load a model that ships one or use method: magnitude")
            blocks = text_blocks(state.tokenizer, self.source, "calibration", self.block_len,
                                 self.calib_blocks)
        masks, forwards = oneshot_masks(
            state.model, self.method, sparsity, self.pattern, blocks,
            comparison=self.comparison, batch_size=self.batch_size, sequential=self.sequential,
            blocksize=self.blocksize, percdamp=self.percdamp, skip=self.skip,
            progress=bool(state.progress))
        masks.check_pattern()
        state.masks = masks
        if state.run_dir is not None:
            from prunegraph.passes._sparsity_report import write_sparsity_report

            write_sparsity_report(state.run_dir / "sparsity", masks)
        stats = {"method": self.method, "pattern": self.pattern,
                 "target_sparsity": round(sparsity, 6),
                 "achieved_sparsity": round(masks.sparsity(), 6), "weights": len(masks),
                 "masked_params": masks.numel(), "forwards": forwards,
                 "seconds": round(time.perf_counter() - start, 1)}
        state.metrics.setdefault("sparse_prune", {}).update(stats)
        state.log.info("SparsePrune: %s %s, %.2f%% of %d weights zeroed in %d matrices",
                       self.method, self.pattern, 100 * masks.sparsity(), masks.numel(),
                       len(masks))
        return PassResult(state, modified=True, stats=stats)
