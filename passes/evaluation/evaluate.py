"""The ``Evaluate`` pass: held-out perplexity and zero-shot tasks, recorded under a label.

Put one before pruning (``label: dense``) and one after (``label: pruned``) to get the
comparison in ``metrics.json``::

    {"dense": {"params": ..., "ppl": ..., "winowhy": {"acc": ..., "acc_norm": ..., "n": ...}},
     "pruned": {...}}

Perplexity uses the *evaluation* split of the text source (whole articles the calibration never
sees), in blocks of ``seq_len`` tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prunegraph.errors import SpecError
from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Evaluate", "count_params"]


def count_params(model) -> int:
    """Parameters of ``model``, tied tensors counted once."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


@register_pass
@dataclass(frozen=True)
class Evaluate(Pass):
    """Measure perplexity on held-out text and accuracy on zero-shot tasks; store under ``label``."""

    name = "Evaluate"
    requires = ("model", "tokenizer")
    provides = ()

    label: str = "eval"
    ppl_blocks: int = 32
    seq_len: int = 512
    tasks: tuple[str, ...] = ("winowhy",)
    limit: int = 200
    source: str = "wikipedia"
    batch_size: int = 4

    def validate(self) -> None:
        for key, low in (("ppl_blocks", 0), ("seq_len", 2), ("limit", 1), ("batch_size", 1)):
            if getattr(self, key) < low:
                raise SpecError(f"Evaluate.{key} must be >= {low}, got {getattr(self, key)}")

    def run(self, state: State) -> PassResult:
        from prunegraph.data.blocks import text_blocks
        from prunegraph.data.tasks import load_task

        if state.tokenizer is None:
            raise SpecError("Evaluate needs a tokenizer: load a model that ships one "
                            "(a HF folder, a .gguf file or 'smollm2-135m')")
        tasks = [load_task(t) for t in self.tasks]  # fail on a bad task name before any work
        result: dict = {"params": count_params(state.model)}
        start = time.perf_counter()
        if self.ppl_blocks:
            blocks = text_blocks(state.tokenizer, self.source, "evaluation", self.seq_len,
                                 self.ppl_blocks)
            result["ppl"] = perplexity(state.model, blocks, self.batch_size, state.progress)
            result["ppl_tokens"] = int(blocks.numel())
        for name, task in zip(self.tasks, tasks):
            result[name] = multiple_choice(state.model, state.tokenizer, task, limit=self.limit,
                                           batch_size=max(8, self.batch_size), progress=state.progress)
        result["seconds"] = round(time.perf_counter() - start, 1)
        state.metrics[self.label] = result
        state.log.info("%s: %s", self.label, {k: v for k, v in result.items()})
        return PassResult(state, modified=False, stats={k: v for k, v in result.items()
                                                        if isinstance(v, (int, float))})
