"""Plugin loading: passes and targets register themselves on import.

The core never imports ``prunegraph.passes`` or ``prunegraph.targets`` by name; they are found
through the ``prunegraph.plugins`` entry-point group declared in ``pyproject.toml``. Third-party
packages can add passes, targets and CLI commands the same way.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

__all__ = ["load_plugins"]

_LOADED: set[str] = set()


def load_plugins() -> None:
    """Import every module declared in the ``prunegraph.plugins`` entry-point group (once)."""
    for ep in entry_points(group="prunegraph.plugins"):
        if ep.value in _LOADED:
            continue
        importlib.import_module(ep.value)
        _LOADED.add(ep.value)
