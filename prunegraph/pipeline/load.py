"""The built-in ``Load`` pass: the model and tokenizer enter the state by name.

It lives in the core because a spec's top-level ``model:`` becomes an implicit first ``Load``
(see :mod:`prunegraph.pipeline.spec`), and resolving a spec must not depend on plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, declare_key, register_pass

__all__ = ["Load"]

_DTYPES = ("float32", "float16", "bfloat16")

declare_key("model_source", "builtins.dict",
            "where Load found the model: {'model': its spec, 'dtype': name, 'pruned': whether it "
            "was a pruned folder}; a pass that needs the model as loaded (Distill's dense "
            "teacher) reloads it from here")


@register_pass
@dataclass(frozen=True)
class Load(Pass):
    """Load a model and its tokenizer with :func:`prunegraph.data.models.load_model`.

    ``model`` is any spec ``load_model`` understands: ``smollm2-135m``, ``random:llama`` (a
    tiny random model with a character tokenizer, for trying a spec), a local Hugging Face
    folder, a run folder (its ``model/``), a ``.gguf`` file, a Hub id (``owner/name``, when
    online). ``meta:<name>`` configs have no weights and are refused: they are for
    ``prunegraph inspect``. ``device`` is where every later pass runs: ``auto`` (a CUDA GPU when
    one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. ``device: meta`` loads any
    model as its config alone (no weights read; a local folder keeps its tokenizer): for
    analysis, and for ``Prune(sequential=True)``, which reads the weights from the folder one
    layer at a time.
    """

    name = "Load"
    requires = ()
    provides = ("model", "tokenizer", "model_source")
    may_provide = ("plan", "router")  # a pruned folder's plan; a method runtime it carries

    model: str
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"

    def validate(self) -> None:
        import torch

        if self.model.startswith("meta:"):
            raise SpecError(f"pass Load: model {self.model!r} is a config on the meta device, "
                            f"with no weights; meta models are for `prunegraph inspect "
                            f"{self.model}`. To try a pipeline quickly, use model: random:llama "
                            f"(tiny, random weights) or smollm2-135m")
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

    def check_inputs(self) -> None:
        """The model spec names something loadable (a known name, an existing folder with
        config.json, a real .gguf file) before the run folder is created."""
        from prunegraph.data.models import check_model_spec
        from prunegraph.errors import PrunegraphError

        try:
            check_model_spec(self.model, allow_meta=False)
        except PrunegraphError as e:
            raise SpecError(f"pass Load: {e}") from None

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

        device = self.resolved_device()
        model, tokenizer = load_model(self.model, dtype=getattr(torch, self.dtype),
                                      meta=device == "meta")  # no weights read for meta
        if device != "meta":
            model = model.to(device)
        state.model = model
        state.tokenizer = tokenizer
        pruned = self._saved_state(state)
        state.model_source = {"model": self.model, "dtype": self.dtype, "pruned": pruned}
        n = sum(p.numel() for p in model.parameters())
        return PassResult(state, modified=True, stats={"parameters": n, "device": device})

    def _saved_state(self, state: State) -> bool:
        """A folder saved by prunegraph brings its plan and the runtimes on the model; returns
        whether it was one."""
        from pathlib import Path

        from prunegraph.data.models import model_folder
        from prunegraph.plan.checkpoint import saved_plan
        from prunegraph.plan.extensions import registered_extensions

        folder = Path(self.model).expanduser()
        plan = saved_plan(model_folder(folder)) if folder.is_dir() else None
        if plan is not None:
            state.plan = plan
        for ext in registered_extensions().values():
            described = ext.describe(state.model) if ext.state_key else None
            if described is not None:
                setattr(state, ext.state_key, described)
        return plan is not None
