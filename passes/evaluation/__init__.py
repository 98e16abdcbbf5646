"""Evaluation: perplexity and zero-shot task scoring (:mod:`.metrics`), the ``Evaluate`` pass
and the ``prunegraph eval`` command."""

from prunegraph.passes.evaluation import command  # noqa: F401  (registers `prunegraph eval`)
from prunegraph.passes.evaluation.evaluate import Evaluate

__all__ = ["Evaluate"]
