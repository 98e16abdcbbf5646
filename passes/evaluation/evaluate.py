"""The ``Evaluate`` pass: perplexity in and out of domain, zero-shot tasks and generation checks,
recorded under a label.

Put one before pruning (``label: dense``) and one after (``label: pruned``) to get the
comparison in ``metrics.json``::

    {"dense": {"params": ..., "ppl_wikipedia": ..., "ppl_austen": ..., "ppl": ...,
               "winowhy": {"acc": ..., "acc_norm": ..., "acc_bytes": ..., "n": ...},
               "generation": {"prompts": 8, "tokens": 32, "repetition": ..., ...}},
     "pruned": {..., "generation": {"reference": "dense", "agreement": ...,
                                    "prefix_agreement": ..., "repetition": ..., ...}}}

Perplexity uses the *evaluation* split of each text source (whole documents the calibration
never sees), in blocks of ``seq_len`` tokens: ``source`` is the in-domain text (the calibration's,
Wikipedia by default) and ``ood_sources`` the out-of-domain texts (Jane Austen's novels by
default); each gets a key ``ppl_<name>`` (:func:`prunegraph.data.text.source_key`), and ``ppl`` repeats
the in-domain value for readers of older metrics.

Generation checks (:mod:`prunegraph.passes.evaluation.generation`) decode ``gen_tokens`` greedy tokens after
each of the first ``gen_prompts`` shipped prompts. The continuations are kept in the state
(``state.generations[label]``) and in the run folder (``generations.json``, with the decoded
text); a later Evaluate compares its own with those of ``gen_reference`` (by default the first
Evaluate of the run that generated), so the dense model is decoded once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prunegraph.data.text import source_key
from prunegraph.errors import SpecError
from prunegraph.passes.evaluation.generation import (
    check_reference,
    generation_metrics,
    generation_record,
    greedy_continuations,
    load_prompts,
)
from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass

__all__ = ["Evaluate", "count_params"]


def count_params(model) -> int:
    """Parameters of ``model``, tied tensors counted once."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


@register_pass
@dataclass(frozen=True)
class Evaluate(Pass):
    """Measure in- and out-of-domain perplexity, zero-shot task accuracy and greedy generation
    (agreement with an earlier Evaluate's, repetition, distinct-n); store under ``label``."""

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
    ood_sources: tuple[str, ...] = ("austen",)
    gen_prompts: int = 8
    gen_tokens: int = 32
    gen_reference: str = ""

    def validate(self) -> None:
        for key, low in (("ppl_blocks", 0), ("seq_len", 2), ("limit", 1), ("batch_size", 1),
                         ("gen_prompts", 0), ("gen_tokens", 1)):
            if getattr(self, key) < low:
                raise SpecError(f"Evaluate.{key} must be >= {low}, got {getattr(self, key)}")
        keys = [source_key(s) for s in (self.source, *self.ood_sources)]
        if len(set(keys)) != len(keys):
            raise SpecError(f"Evaluate: the text sources {[self.source, *self.ood_sources]} give "
                            f"the metric keys {['ppl_' + k for k in keys]}, which repeat; list "
                            f"each source once (and not 'source' again in 'ood_sources')")
        n_prompts = len(load_prompts())
        if self.gen_prompts > n_prompts:
            raise SpecError(f"Evaluate.gen_prompts is {self.gen_prompts} but {n_prompts} prompts "
                            f"ship with prunegraph; use at most {n_prompts} (0 turns generation "
                            f"checks off)")

    def run(self, state: State) -> PassResult:
        from prunegraph.data.blocks import text_blocks
        from prunegraph.data.tasks import load_task
        from prunegraph.data.text import load_documents

        if state.tokenizer is None:
            raise SpecError("Evaluate needs a tokenizer: load a model that ships one "
                            "(a HF folder, a .gguf file or 'smollm2-135m')")
        # Everything that can be wrong is checked before any measurement.
        tasks = [load_task(t) for t in self.tasks]
        sources = (self.source, *self.ood_sources) if self.ppl_blocks else ()
        for source in sources:
            load_documents(source)  # an unknown or unreadable text fails here, before any work
        prompts = load_prompts()[:self.gen_prompts]
        reference = self._reference(state, prompts) if prompts else None

        result: dict = {"params": count_params(state.model)}
        start = time.perf_counter()
        for source in sources:
            blocks = text_blocks(state.tokenizer, source, "evaluation", self.seq_len,
                                 self.ppl_blocks)
            value = perplexity(state.model, blocks, self.batch_size, state.progress)
            result[f"ppl_{source_key(source)}"] = value
            if source == self.source:
                result["ppl"] = value  # the in-domain value under its older key
                result["ppl_tokens"] = int(blocks.numel())
        for name, task in zip(self.tasks, tasks):
            result[name] = multiple_choice(state.model, state.tokenizer, task, limit=self.limit,
                                           batch_size=max(8, self.batch_size), progress=state.progress)
        if prompts:
            result["generation"] = self._generate(state, prompts, reference)
        result["seconds"] = round(time.perf_counter() - start, 1)
        state.metrics[self.label] = result
        state.log.info("%s: %s", self.label, {k: v for k, v in result.items()})
        stats = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        stats.update({f"gen_{k}": v for k, v in result.get("generation", {}).items()
                      if k in ("agreement", "repetition")})
        return PassResult(state, modified=False, stats=stats)

    def _reference(self, state: State, prompts: list[str]) -> tuple[str, list] | None:
        """``(label, continuations)`` to compare with, or None (this Evaluate is the first)."""
        records = state.get("generations") or {}
        if self.gen_reference and self.gen_reference != self.label:
            if self.gen_reference not in records:
                have = ", ".join(repr(k) for k in records) or "none"
                raise SpecError(
                    f"Evaluate(label={self.label!r}): gen_reference {self.gen_reference!r} names "
                    f"no earlier Evaluate with generation checks (those run so far: {have}); put "
                    f"an Evaluate with label {self.gen_reference!r} and gen_prompts > 0 before "
                    f"this one, or leave gen_reference empty to use the first")
            label = self.gen_reference
        elif self.gen_reference:
            return None
        else:
            label = next((k for k in records if k != self.label), None)
            if label is None:
                return None
        check_reference(records[label], prompts, self.gen_tokens,
                        f"the continuations of Evaluate(label={label!r})")
        return label, [t[:self.gen_tokens] for t in records[label]["tokens"]]

    def _generate(self, state: State, prompts: list[str], reference) -> dict:
        from prunegraph.pipeline.runfolder import atomic_write_json

        t0 = time.perf_counter()
        tokens = greedy_continuations(state.model, state.tokenizer, prompts, self.gen_tokens,
                                      progress=state.progress)
        seconds = round(time.perf_counter() - t0, 1)
        records = dict(state.get("generations") or {})
        records[self.label] = generation_record(prompts, tokens, state.tokenizer)
        state.generations = records
        if state.run_dir is not None:
            atomic_write_json(state.run_dir / "generations.json", records)
        metrics = generation_metrics(tokens, reference[1] if reference else None)
        if reference:
            metrics = {"reference": reference[0], **metrics}
        return dict(metrics, seconds=seconds)
