"""The built-in ``Load`` pass: the model and tokenizer enter the state by name.

It lives in the core because a spec's top-level ``model:`` becomes an implicit first ``Load``
(see :mod:`prunegraph.pipeline.spec`), and resolving a spec must not depend on plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Load"]

_DTYPES = ("float32", "float16", "bfloat16")


@register_pass
@dataclass(frozen=True)
class Load(Pass):
    """Load a model and its tokenizer with :func:`prunegraph.data.models.load_model`.

    ``model`` is any spec ``load_model`` understands: ``smollm2-135m``, ``random:llama``, a
    local Hugging Face folder, a ``.gguf`` file, ``meta:<name>``. ``device`` is where every
    later pass runs: ``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; ``meta:`` models stay on ``meta``.
    """

    name = "Load"
    requires = ()
    provides = ("model", "tokenizer")
    may_provide = ("plan", "router")  # a pruned folder's plan; a method runtime it carries

    model: str
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"

    def validate(self) -> None:
        import torch

        if self.device == "auto":
            return
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise SpecError(f"pass Load: device {self.device!r} is not a device ({e}); use "
                            f"auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SpecError(f"pass Load: device {self.device!r} asked for, but torch sees no "
                            f"CUDA GPU here; use device: auto (the GPU when there is one) or cpu")

    def resolved_device(self) -> str:
        """The device the model goes to (``auto`` resolved; ``meta`` models stay there)."""
        import torch

        if self.model.startswith("meta:"):
            return "meta"
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def run(self, state: State) -> PassResult:
        import torch

        from prunegraph.data.models import load_model

        model, tokenizer = load_model(self.model, dtype=getattr(torch, self.dtype))
        device = self.resolved_device()
        if device != "meta":
            model = model.to(device)
        state.model = model
        state.tokenizer = tokenizer
        self._saved_state(state)
        n = sum(p.numel() for p in model.parameters())
        return PassResult(state, modified=True, stats={"parameters": n, "device": device})

    def _saved_state(self, state: State) -> None:
        """A folder saved by prunegraph brings its plan and the runtimes on the model."""
        from pathlib import Path

        from prunegraph.plan.checkpoint import saved_plan
        from prunegraph.plan.extensions import registered_extensions

        folder = Path(self.model)
        plan = saved_plan(folder) if folder.is_dir() else None
        if plan is not None:
            state.plan = plan
        for ext in registered_extensions().values():
            described = ext.describe(state.model) if ext.state_key else None
            if described is not None:
                setattr(state, ext.state_key, described)
