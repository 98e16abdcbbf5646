"""The repeated blocks of a model: what sharding wraps and what sequential calibration onloads."""

from __future__ import annotations

from torch import nn

__all__ = ["decoder_layers", "layer_prefixes"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` in call order: modules whose class Hugging Face lists in
    ``_no_split_modules``, else the children of its longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def layer_prefixes(model: nn.Module) -> list[str]:
    """The module path of each decoder layer (``model.layers.3``), in call order."""
    path = {id(m): name for name, m in model.named_modules()}
    return [path[id(layer)] for layer in decoder_layers(model)]
