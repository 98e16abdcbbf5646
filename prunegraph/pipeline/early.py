"""Early checks: refuse, before the heavy passes, a run that a later pass would fail.

A pass that can tell from part of the state that it will fail declares the keys it reads
(``early_needs``) and implements ``check_early(state)`` (see
:class:`~prunegraph.pipeline.contract.Pass`). ``Prune`` does, for its budget: ``early_needs =
("model", "groups")``, so in ``[Load, Evaluate, Analyze, Evaluate, Prune]`` its budget is checked
right after ``Analyze``, before the second ``Evaluate``.

:func:`early_schedule` finds, for each such pass, the earliest point after which nothing before
it replaces or invalidates those keys. :func:`meta_preflight` goes further when the keys come
from a pass that can run on the meta device (``runs_on_meta``, as ``Analyze``) and only passes
that read the model (``provides == ()``, such as a dense ``Evaluate``) stand between ``Load`` and
it: it runs that pass on a meta-device copy of the model (the config, no weights) before
anything is loaded, so an impossible budget is refused in seconds instead of after the dense
evaluation::

    [Load(smollm2-135m), Evaluate(dense), Analyze, Prune(sparsity=0.99), ...]
    -> SpecError before loading: pass 3 (Prune) would fail: sparsity 0.99 ... the maximum
       achievable sparsity is 0.8865 ...
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.pipeline.contract import Pass, State

__all__ = ["EarlyCheckError", "early_schedule", "run_early_checks", "meta_preflight"]

_LOG = logging.getLogger("prunegraph.pipeline.early")


class EarlyCheckError(SpecError):
    """A later pass would fail: the run stops before the work in between."""


def _touches(p: Pass, keys: set[str]) -> bool:
    return bool(keys & (set(p.provides) | set(p.may_provide) | set(p.invalidates)))


def early_schedule(passes: Sequence[Pass], adjacent: bool = False) -> dict[int, list[int]]:
    """``position -> indices of the passes whose early check runs after the pass at position``
    (``-1``: before the first pass). A check that could only run right before its own pass is
    left out (the pass checks itself then) unless ``adjacent``: a meta-device preflight can
    still run it before the model loads."""
    out: dict[int, list[int]] = {}
    for j, p in enumerate(passes):
        needs = set(p.early_needs)
        if not needs:
            continue
        k = next((i for i in range(j - 1, -1, -1) if _touches(passes[i], needs)), -1)
        if k < j - 1 or adjacent:
            out.setdefault(k, []).append(j)
    return out


def run_early_checks(passes: Sequence[Pass], indices: Sequence[int], state: State,
                     after: str) -> None:
    """Run the early checks of ``passes[j]`` for ``j`` in ``indices`` on ``state``; a failure
    is a SpecError naming the pass that would fail and where the check ran (``after``)."""
    for j in indices:
        p = passes[j]
        if not all(state.has(k) for k in p.early_needs):
            continue  # something unexpected; the pass will check itself when it runs
        try:
            p.check_early(state)
        except PrunegraphError as e:
            raise EarlyCheckError(f"pass {j} ({p.pass_name()}) would fail, so the run stops "
                                  f"{after}: {e}") from e


def meta_preflight(passes: Sequence[Pass], schedule: dict[int, list[int]],
                   progress: bool = False) -> set[int]:
    """Run the early checks that wait for a ``runs_on_meta`` pass on a meta-device model built
    from the ``Load``'s config, when only model readers stand between them (see the module
    docstring). Returns the positions it checked (their checks need not run again).

    Raises:
        SpecError: a pass would fail (its check_early raised).
    """
    from prunegraph.pipeline.load import Load

    if not passes or not isinstance(passes[0], Load):
        return set()
    positions = []
    for k in sorted(schedule):
        if k < 2 or not getattr(passes[k], "runs_on_meta", False):
            continue
        between = passes[1:k]
        if all(not q.provides and not q.may_provide and not q.invalidates for q in between):
            positions.append(k)
    if not positions:
        return set()
    k = positions[0]
    model = _meta_model(passes[0].model)
    if model is None:
        return set()
    if progress:
        import sys

        print(f"checking {', '.join(passes[j].pass_name() for j in schedule[k])} on a "
              f"meta-device {passes[k].pass_name()} first (no weights) ...", file=sys.stderr,
              flush=True)
    state = State(model=model, tokenizer=None)
    try:
        state = passes[k](state).state
    except PrunegraphError as e:
        _LOG.info("meta-device preflight skipped: %s", e)
        return set()
    run_early_checks(passes, schedule[k], state,
                     after=f"before loading the model (checked on a meta-device "
                           f"{passes[k].pass_name()})")
    return {k}


def _meta_model(spec: str):
    """The model ``spec`` names, built on the meta device from its config; None when that is
    not possible or not faithful (a folder pruned by prunegraph rebuilds from its plan)."""
    from pathlib import Path

    import torch

    from prunegraph.data.models import load_config

    path = Path(spec).expanduser()
    if path.is_dir() and any(path.glob("**/prunegraph_plan.json")):
        return None
    try:
        from transformers import AutoModelForCausalLM

        config = load_config(spec)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config).eval()
    except Exception as e:  # best effort: the real run checks again after its Analyze
        _LOG.info("meta-device preflight skipped: %s: %s", type(e).__name__, e)
        return None
