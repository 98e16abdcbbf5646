"""lm-evaluation-harness on prunegraph models: lm-eval's own ``HFLM`` wrapper around a model object.

For users who are online (lm-eval downloads each task's dataset from the Hugging Face Hub):
``pip install 'prunegraph[lm-eval]'``, then ``prunegraph eval MODEL --lm-eval hellaswag,arc_easy``
or, from Python::

    model = prunegraph.from_pretrained("runs/oneshot/model")   # non-uniform widths are fine
    run_lm_eval(model, tokenizer, ["hellaswag"], limit=200)   # {"hellaswag": {"acc": ..., ...}}

The model goes to lm-eval as an object (``HFLM(pretrained=model, tokenizer=tokenizer)``), so a
pruned model whose layers have different widths, which ``AutoModelForCausalLM`` cannot rebuild
from its folder, is scored by lm-eval's unchanged code. The built-in BIG-bench scoring
(:func:`prunegraph.passes.evaluation.multiple_choice`) stays for offline use and follows
lm-eval's definitions of ``acc`` and ``acc_norm`` (``tests/passes/evaluation/test_lm_eval.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prunegraph.errors import PrunegraphError
from prunegraph.pipeline.contract import nearest

__all__ = ["require_lm_eval", "check_lm_eval_tasks", "run_lm_eval"]

_INSTALL = "pip install 'prunegraph[lm-eval]'"


def require_lm_eval() -> None:
    """Raise a clear error when lm-evaluation-harness (with its HF wrapper) is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise PrunegraphError(f"--lm-eval needs lm-evaluation-harness, which is not installed "
                              f"({e}); install it with {_INSTALL}, or use the built-in offline "
                              f"tasks with --tasks") from e


def check_lm_eval_tasks(names: Sequence[str]) -> Any:
    """lm-eval's ``TaskManager`` (its index of every task), after checking that it knows each
    of ``names``; raises naming close matches otherwise. Indexing takes seconds: pass the
    manager on to :func:`run_lm_eval`."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise PrunegraphError(f"lm-eval has no task or group {name!r}.{nearest(name, known)} "
                                  f"List them with `lm-eval ls tasks`")
    return manager


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``"acc,none"`` keys as ``"acc"`` (a filter other than ``none`` stays)."""
    out = {}
    for key, value in metrics.items():
        if key in ("alias", "name"):
            continue
        out[key[:-len(",none")] if key.endswith(",none") else key] = value
    return out


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str | dict[str, Any]],
                limit: int | float | None = None, batch_size: int = 4,
                num_fewshot: int | None = None, log_samples: bool = False,
                task_manager: Any = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``model``; returns ``{task: {metric: value}}``.

    ``tasks`` are lm-eval task or group names, or task config dicts (as lm-eval's YAML files
    hold). ``task_manager`` defaults to lm-eval's index of its own tasks, or to an empty one
    when every task is a config dict. With ``log_samples`` the per-example records come back
    under the key ``"samples"``.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise PrunegraphError("no lm-eval task given; name at least one, e.g. hellaswag")
    if task_manager is None:
        task_manager = TaskManager(include_defaults=not all(isinstance(t, dict) for t in tasks))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                  num_fewshot=num_fewshot, log_samples=log_samples,
                                  bootstrap_iters=0, task_manager=task_manager)
    if out is None:  # lm-eval returns None on non-zero ranks of a distributed run
        return {}
    results = {task: _plain_metrics(m) for task, m in out["results"].items()}
    if log_samples:
        results["samples"] = out.get("samples", {})
    return results
