"""Run the Triton kernels on triton's CPU interpreter unless the caller chose otherwise.

``TRITON_INTERPRET`` must be set before the kernel modules are imported (``triton.jit`` reads it
when decorating), so it is set here, before any test module of this folder is collected.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

_NO_BACKEND = os.environ["TRITON_INTERPRET"] in ("", "0") and not torch.cuda.is_available()


def _reimport_kernels_if_decorated_without_interpreter() -> None:
    """If something imported the kernel modules before this file set TRITON_INTERPRET, their
    ``@triton.jit`` functions were built for the GPU; re-import them in dependency order."""
    import importlib
    import sys

    if os.environ["TRITON_INTERPRET"] in ("", "0"):
        return
    swiglu = sys.modules.get("prunegraph.targets.triton.swiglu")
    if swiglu is None or type(swiglu.swiglu_decode_tile).__name__ == "InterpretedFunction":
        return
    for name in ("swiglu", "prunepath_decode", "prunepath_prefill", "prunepath", "codegen",
                 "runner"):
        full = f"prunegraph.targets.triton.{name}"
        if full in sys.modules:
            importlib.reload(sys.modules[full])


_reimport_kernels_if_decorated_without_interpreter()


def pytest_collection_modifyitems(config, items):
    if not _NO_BACKEND:
        return
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="TRITON_INTERPRET=0 and no CUDA device: nothing runs kernels")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """Where the tests put tensors: the CPU under the interpreter, else the GPU."""
    return "cpu" if os.environ["TRITON_INTERPRET"] not in ("", "0") else "cuda"
