"""Calibration one decoder layer at a time: the order SparseGPT and Wanda prune in.

:func:`for_each_layer` runs the calibration batches into the first decoder layer once (a full
model forward per batch, stopped at the last layer, that records what the model passes to every
layer: attention masks and position embeddings may differ per layer, as in Gemma 3), then walks
the layers in order. For layer ``i`` the visitor gets ``run``, which feeds every batch's hidden
states through that layer (the visitor's hooks on its linears collect statistics: input norms,
Hessians), and prunes the layer. The next layer's inputs are then the outputs of the *pruned*
layer (``sequential=True``, as in both papers' code) or of the dense one.

The decoder layers are the longest ``nn.ModuleList`` holding linear modules (``model.layers``,
``transformer.h`` ...); nothing model-specific is named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunegraph.errors import PrunegraphError
from prunegraph.passes._calibration import batches
from prunegraph.plan.masks import input_dim

__all__ = ["decoder_layers", "for_each_layer"]


class _Stop(Exception):
    """Raised by the last layer's pre-hook: the rest of the forward is not needed."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: the longest ``nn.ModuleList`` whose entries hold linear modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if not all(any(input_dim(m) is not None for m in layer.modules()) for layer in mod):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (path, mod)
    if best is None:
        raise PrunegraphError(f"{type(model).__name__} has no list of decoder layers holding "
                              f"linear modules; layer-wise calibration cannot run on it")
    return best


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest
    raise PrunegraphError("a decoder layer was called without hidden states as its first "
                          "argument or a hidden_states= keyword; layer-wise calibration cannot "
                          "follow this model")


def _capture(model: nn.Module, layers: nn.ModuleList, blocks: torch.Tensor, batch_size: int,
             device: torch.device, progress: bool) -> tuple[list[torch.Tensor], list[list]]:
    """Layer 0's hidden input per batch, and per batch the other arguments of every layer."""
    hidden: list[torch.Tensor] = []
    rest: list[list] = []
    current: list = []

    def hook_for(i: int):
        def hook(_mod, args, kwargs):
            h, a, kw = _hidden_of(args, kwargs)
            if i == 0:
                hidden.append(h.detach())
            current.append((a, kw))
            if i == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        for batch in batches(blocks, batch_size, progress, "calibration"):
            current = []
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
            if len(current) != len(layers):
                raise PrunegraphError(f"the forward reached {len(current)} of {len(layers)} "
                                      f"decoder layers; layer-wise calibration needs all")
            rest.append(current)
    finally:
        for h in handles:
            h.remove()
    return hidden, rest


def _run(layer: nn.Module, hidden: list[torch.Tensor], rest: list[list], i: int
         ) -> list[torch.Tensor]:
    outs = []
    for h, per_layer in zip(hidden, rest):
        a, kw = per_layer[i]
        out = layer(h, *a, **kw)
        outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outs


def for_each_layer(model: nn.Module, blocks: torch.Tensor, batch_size: int,
                   visit: Callable[[int, nn.Module, Callable[[], None]], Any],
                   sequential: bool = True, progress: bool = False,
                   after: Callable[[int, nn.Module], Any] | None = None) -> int:
    """Call ``visit(i, layer, run)`` for every decoder layer in order (see the module doc), and
    ``after(i, layer)`` once the next layer's inputs are computed; returns the number of
    forwards through the full model (one per batch)."""
    _, layers = decoder_layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden, rest = _capture(model, layers, blocks, batch_size, device, progress)
            for i, layer in enumerate(layers):
                dense_out: list[torch.Tensor] = []

                def run(layer=layer, i=i, dense_out=dense_out) -> None:
                    dense_out[:] = _run(layer, hidden, rest, i)

                visit(i, layer, run)
                if sequential or not dense_out:
                    hidden = _run(layer, hidden, rest, i)
                else:
                    hidden = list(dense_out)
                if after is not None:
                    after(i, layer)
    finally:
        model.train(was_training)
    return len(rest)
