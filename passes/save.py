"""The ``Save`` pass: write the pruned model (safetensors + config + plan + tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass
from prunegraph.pipeline.runfolder import run_path
from prunegraph.plan.checkpoint import save_pruned

__all__ = ["Save"]


@register_pass
@dataclass(frozen=True)
class Save(Pass):
    """Save the sliced model to ``path`` (relative to the run folder), reloadable with
    ``prunegraph.from_pretrained(path)``; written under a temporary name, then renamed."""

    name = "Save"
    requires = ("model", "plan")
    provides = ("saved_model",)

    path: str = "model"

    def run(self, state: State) -> PassResult:
        target = run_path(state.run_dir, self.path, "Save.path")
        save_pruned(state.model, state.plan, target, tokenizer=state.get("tokenizer"),
                    overwrite=True)
        state.saved_model = str(target)
        state.metrics["model_dir"] = str(target)
        return PassResult(state, modified=False, stats={"path": str(target)})
