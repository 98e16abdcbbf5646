"""Checkpoint extensions: method runtimes that live on a pruned model beside the plan.

Some methods leave modules of their own on the model (PrunePath's routers). The core knows none
of them by name: a plugin registers a :class:`CheckpointExtension`, and
:func:`prunegraph.plan.checkpoint.save_pruned` stores what ``describe`` returns under the
extension's name in the plan's JSON; :func:`~prunegraph.plan.checkpoint.from_pretrained` calls
``rebuild`` with it on the freshly built model before the tensors are loaded::

    register_extension(CheckpointExtension(
        name="prunepath",
        describe=router.spec,                 # model -> JSON-able dict, or None when absent
        extra_params=router.router_param_names,  # parameters added on top of the plan
        rebuild=lambda model, spec: router.install(model, spec["layers"], ...),
    ))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["CheckpointExtension", "register_extension", "registered_extensions"]


@dataclass(frozen=True)
class CheckpointExtension:
    """How one method runtime is saved with a pruned model and rebuilt on load."""

    name: str
    describe: Callable[[nn.Module], dict[str, Any] | None]
    extra_params: Callable[[nn.Module], set[str]]
    rebuild: Callable[[nn.Module, dict[str, Any]], None]
    #: The pipeline state key that holds the description while the runtime is on the model
    #: (``Load`` of a saved folder sets it), or "" for none.
    state_key: str = ""


_EXTENSIONS: dict[str, CheckpointExtension] = {}


def register_extension(extension: CheckpointExtension) -> CheckpointExtension:
    """Register (or replace) the extension called ``extension.name``."""
    _EXTENSIONS[extension.name] = extension
    return extension


def registered_extensions(*, load: bool = False) -> dict[str, CheckpointExtension]:
    """Every registered extension; with ``load=True`` the plugins are imported first, so that a
    checkpoint that needs one finds it (saving and loading checkpoints do that)."""
    if load:
        from prunegraph.pipeline.plugins import load_plugins

        load_plugins()
    return dict(_EXTENSIONS)
