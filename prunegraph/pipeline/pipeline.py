"""Pipelines: an ordered list of passes, validated as a whole before anything runs.

Construction walks ``requires``/``provides``/``invalidates`` from the initial state keys (by
default ``model`` and ``tokenizer``, or none when the first pass provides them, as ``Load`` does)
and raises :class:`~prunegraph.errors.SpecError` naming the pass, the missing key and the fix: the
passes that would provide it, or the earlier pass that invalidated it and why (``[Slice, Prune]``:
"Prune requires 'groups', which Slice invalidated (the model's shapes changed): add Analyze after
Slice"). :meth:`Pipeline.run` runs the passes in order, logs each one's time and stats, records
them in ``state.metrics["passes"]``, runs the registered invariant checks between passes when
asked, and on failure raises :class:`~prunegraph.errors.PassError` naming the passes already run::

    from prunegraph.pipeline.pipeline import Pipeline
    from prunegraph.pipeline.contract import State

    pipe = Pipeline([Analyze(), Prune(sparsity=0.2), Slice()])
    state = pipe.run(State(model=model, tokenizer=tok), run_dir="runs/demo")
    state.metrics["passes"]      # [{"name": "Analyze", "seconds": 1.2, "stats": {...}}, ...]
    state.metrics["summary"]     # parameters before/after, measurements side by side

    d = pipe.to_dict()           # {"version": 1, "initial": [...], "passes": [{"Prune": {...}}]}
    assert Pipeline.from_dict(d) == pipe

Invariant checks are plain functions registered with :func:`register_check`. A check with
``passes=()`` runs after every pass once every key it ``needs`` is in the state; one that names
passes runs around those passes only, and may take a snapshot before the pass (``before``) that
it compares with after. They are on when ``run(checks=True)`` or when the environment sets
``PRUNEGRAPH_CHECKS=1`` (as the test suite does). The core registers the equivalence guarantees
as checks (:mod:`prunegraph.plan.invariants`: gates at 1 compute the original model; the sliced
model computes the gated one)::

    @register_check("graph-lint", needs=("graph",))
    def _lint(state):
        state.graph.lint()
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import prunegraph.pipeline.load  # noqa: F401  (registers the built-in Load pass)
from prunegraph.errors import PassError, PostconditionError, PrunegraphError, SpecError
from prunegraph.pipeline.contract import (
    AMBIENT_KEYS,
    Pass,
    PassResult,
    State,
    get_pass_class,
    registered_passes,
)

__all__ = [
    "SPEC_VERSION",
    "DEFAULT_INITIAL",
    "Pipeline",
    "register_check",
    "registered_checks",
    "pass_from_entry",
]

SPEC_VERSION = 1
DEFAULT_INITIAL: tuple[str, ...] = ("model", "tokenizer")

_LOG = logging.getLogger("prunegraph.pipeline")


@dataclass(frozen=True)
class Check:
    """A registered invariant check (see :func:`register_check`)."""

    name: str
    needs: tuple[str, ...]
    fn: Callable[..., None]
    passes: tuple[str, ...] = ()
    before: Callable[[State], Any] | None = None
    guarantee: bool = False

    def applies(self, p: Pass, state: State, *, before: bool = False) -> bool:
        """Whether the check runs around ``p``; before it, the keys ``p`` provides may be absent."""
        if self.guarantee and self.name not in p.guarantees:
            return False
        if self.passes and p.pass_name() not in self.passes:
            return False
        return all(state.has(k) for k in self.needs if not (before and k in p.provides))


_CHECKS: dict[str, Check] = {}


def register_check(name: str, needs: Sequence[str] = (), *, passes: Sequence[str] = (),
                   before: Callable[[State], Any] | None = None, guarantee: bool = False):
    """Register ``fn`` as an invariant check run between passes.

    ``fn(state)`` runs after a pass when every key in ``needs`` is in the state: after every
    pass, after the passes named in ``passes``, or, with ``guarantee=True``, after the passes
    that list the check in their ``guarantees``. With ``before``, ``before(state)`` runs just
    before such a pass (when its ``needs`` are present then) and ``fn(state, snapshot)`` gets
    what it returned. A check raises (anything) when the invariant is broken; the pipeline
    reports it as a PostconditionError of that pass.
    """

    def decorator(fn: Callable[..., None]) -> Callable[..., None]:
        _CHECKS[name] = Check(name, tuple(needs), fn, tuple(passes), before, guarantee)
        return fn

    return decorator


def registered_checks() -> dict[str, Check]:
    """Every registered check, the core's equivalence checks included."""
    from prunegraph.plan.invariants import CHECKS

    return {**{c.name: c for c in CHECKS}, **_CHECKS}


def check_version(data: dict[str, Any], prefix: str = "") -> None:
    """Refuse a spec written for another spec version (``prefix`` locates it in messages)."""
    version = data.get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise SpecError(f"{prefix}spec version {version!r} is not supported "
                        f"(this prunegraph reads version {SPEC_VERSION})")


def parse_entry(entry: Any, *, where: str = "") -> tuple[str, dict[str, Any]]:
    """Split a spec entry into ``(pass name, parameters)``: ``"Name"``, ``{"Name": {params}}``
    or ``{"Name": None}``. Every place that reads pass entries goes through here."""
    prefix = f"{where}: " if where else ""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        (name, params), = entry.items()
        if params is None:
            params = {}
        if isinstance(name, str):
            if not isinstance(params, dict):
                raise SpecError(f"{prefix}parameters of pass {name} must be a mapping, got "
                                f"{type(params).__name__} {params!r}")
            return name, params
    raise SpecError(
        f"{prefix}a pass entry must be a pass name or a one-key mapping "
        f"{{PassName: {{param: value}}}}, got {entry!r}"
    )


def pass_from_entry(entry: Any, *, where: str = "") -> Pass:
    """Build a pass from its spec form (see :func:`parse_entry`)."""
    if isinstance(entry, Pass):
        return entry
    name, params = parse_entry(entry, where=where)
    prefix = f"{where}: " if where else ""
    try:
        cls = get_pass_class(name)
    except SpecError as e:
        raise SpecError(f"{prefix}{e}") from None
    return cls.from_params(params, where=where)


class Pipeline:
    """An ordered, validated list of passes. See the module docstring."""

    def __init__(self, passes: Iterable[Pass], *, initial: Iterable[str] | None = None):
        self.passes: tuple[Pass, ...] = tuple(passes)
        if initial is None:  # a pipeline that loads its own model starts from nothing
            first = self.passes[0] if self.passes else None
            loads = isinstance(first, Pass) and set(DEFAULT_INITIAL) <= set(first.provides)
            initial = () if loads else DEFAULT_INITIAL
        self.initial: tuple[str, ...] = tuple(initial)
        for i, p in enumerate(self.passes):
            if not isinstance(p, Pass):
                raise SpecError(
                    f"pipeline entry {i} is {type(p).__name__} {p!r}, not a Pass instance"
                    + (" (did you forget the parentheses?)"
                       if isinstance(p, type) and issubclass(p, Pass) else "")
                )
            p._check_params()  # catches subclasses whose __post_init__ skipped super()
        self._validate_order()

    def _validate_order(self) -> None:
        available = set(self.initial) | set(AMBIENT_KEYS)
        stale: dict[str, tuple[int, Pass]] = {}  # key -> the pass that invalidated it
        for i, p in enumerate(self.passes):
            for key in p.requires:
                if key in available:
                    continue
                raise SpecError(self._missing(i, p, key, available, stale.get(key)))
            for key in p.invalidates:
                if key not in p.provides:
                    available.discard(key)
                    stale[key] = (i, p)
            for key in (*p.provides, *p.may_provide):
                available.add(key)
                stale.pop(key, None)

    def _missing(self, i: int, p: Pass, key: str, available: set[str],
                 stale: tuple[int, Pass] | None) -> str:
        """The construction error for pass ``i`` requiring ``key``, with the fix."""
        later = [q.pass_name() for q in self.passes[i + 1:] if key in q.provides]
        providers = sorted(n for n, c in registered_passes().items()
                           if key in (*c.provides, *c.may_provide))
        if stale is not None:
            j, q = stale
            fix = (f"add {' or '.join(f'`{n}`' for n in providers)} between them"
                   if providers else f"move {p.pass_name()} before {q.pass_name()}")
            return (f"pass {i} ({p.pass_name()}) requires {key!r}, which pass {j} "
                    f"({q.pass_name()}) invalidated ({q.invalidates[key]}): {fix}.")
        if later:
            fix = f"move {later[0]} before {p.pass_name()}"
        elif providers:
            fix = f"add {' or '.join(f'`{n}`' for n in providers)} before {p.pass_name()}"
        else:
            fix = f"no registered pass provides {key!r}; start from a state that has it"
        have = ", ".join(sorted(available - set(AMBIENT_KEYS))) or "nothing"
        return (f"pass {i} ({p.pass_name()}) requires {key!r}, which nothing before it "
                f"provides (available: {have}): {fix}.")

    # -- equality and serialisation ------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pipeline):
            return NotImplemented
        return self.passes == other.passes and self.initial == other.initial

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(map(repr, self.passes))}])"

    def __len__(self) -> int:
        return len(self.passes)

    def describe(self) -> str:
        """One line per pass with every parameter resolved, for printing before a run."""
        lines = []
        for i, p in enumerate(self.passes):
            params = ", ".join(f"{k}={v!r}" for k, v in p.params().items())
            lines.append(f"  {i}. {p.pass_name()}({params})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """``{"version", "initial", "passes": [{Name: {every param}}]}`` (plain YAML/JSON data)."""
        return {
            "version": SPEC_VERSION,
            "initial": list(self.initial),
            "passes": [p.to_dict() for p in self.passes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "") -> Pipeline:
        """Inverse of :meth:`to_dict`, through the one spec schema
        (:meth:`prunegraph.pipeline.spec.Spec.from_dict`); problems are SpecErrors."""
        from prunegraph.pipeline.spec import Spec

        if isinstance(data, dict) and "initial" not in data:
            data = {**data, "initial": list(DEFAULT_INITIAL)}
        return Spec.from_dict(data, source=where or None).pipeline

    # -- running ---------------------------------------------------------------------------

    def _passes_for_this_rank(self) -> tuple[tuple[Pass, ...], int]:
        """The passes this process runs and the index of the last collective one (-1: none).

        In a single process (and on rank 0): every pass. On the other ranks of a ``torchrun``
        launch: the passes up to the last collective one (training); the process group ends
        after it (:meth:`run`), and rank 0 runs the rest alone."""
        from prunegraph.pipeline import distributed

        last = max((i for i, p in enumerate(self.passes) if p.collective), default=-1)
        if distributed.is_main():
            return self.passes, last
        return self.passes[:last + 1], last

    def run(
        self,
        state: State | None = None,
        run_dir: Any = None,
        progress: bool = True,
        *,
        checks: bool | None = None,
        seed: int | None = None,
        spec: dict[str, Any] | None = None,
        command: str | None = None,
    ) -> State:
        """Run every pass in order and return the final state.

        Args:
            state: the initial state (a fresh one when None); must hold ``self.initial``.
            run_dir: a path or :class:`~prunegraph.pipeline.runfolder.RunFolder`; when given, the resolved
                spec, ``metrics.json`` and ``log.txt`` are written there and passes get it as
                ``state.run_dir``.
            progress: print one line per pass to stderr and let long passes show progress bars.
            checks: run the registered invariant checks after each pass (default: the
                ``PRUNEGRAPH_CHECKS`` environment variable).
            seed: seed Python, NumPy and torch before the first pass.
            spec: what to record as ``spec.yaml`` (default: ``self.to_dict()``).
            command: the command line that started the run, for the saved model's card.

        At the end, ``state.metrics["summary"]`` holds the before/after comparison
        (:mod:`prunegraph.pipeline.summary`), and a model a pass saved (``state.saved_model``)
        gets its model card with the results, the spec and the command.
        """
        from prunegraph.pipeline.early import (
            EarlyCheckError,
            early_schedule,
            meta_preflight,
            run_early_checks,
        )
        from prunegraph.pipeline.runfolder import RunFolder
        from prunegraph.pipeline.summary import (
            count_params,
            fmt_stats,
            run_summary,
            summary_table,
        )

        state = State() if state is None else state
        missing = [k for k in self.initial if not state.has(k)]
        if missing:
            raise SpecError(
                f"the pipeline expects the initial state to hold {', '.join(map(repr, missing))}; "
                f"pass State({', '.join(f'{k}=...' for k in missing)}) or start with a Load pass"
            )
        for each in self.passes:  # model names, files: before the run folder exists
            each.check_inputs()
        if checks is None:
            checks = os.environ.get("PRUNEGRAPH_CHECKS", "") not in ("", "0", "false")
        schedule = early_schedule(self.passes)
        for k in meta_preflight(self.passes, early_schedule(self.passes, adjacent=True),
                                progress):
            schedule.pop(k, None)
        folder = None
        if run_dir is not None:
            folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
            if not folder.is_open:
                folder.open(spec if spec is not None else self.to_dict())
            state.run_dir = folder.path
        state.progress = progress
        if seed is not None:
            _seed_everything(seed)
        records: list[dict[str, Any]] = state.metrics.setdefault("passes", [])
        state.metrics["status"] = "running"
        _LOG.info("pipeline:\n%s", self.describe())
        done: list[str] = []
        from prunegraph.pipeline import distributed

        passes, last_collective = self._passes_for_this_rank()
        if last_collective < 0:
            distributed.shutdown()  # nothing for the other ranks: rank 0 runs alone
        measured: list[str] = []
        params_start = count_params(state.get("model"))
        start = time.perf_counter()
        i = -1
        p: Pass | None = None  # the pass running, for the error message

        def finish(status: str, state: State) -> str:
            """Record how the run ended and close the folder; a note on where things are."""
            state.metrics["status"] = status
            if folder is None or not folder.is_open:
                return ""
            folder.write_metrics(state.metrics)
            folder.close(status)
            if folder.failed_path is not None:
                return (f" The previous run in {folder.path} is kept; this run's folder "
                        f"(log.txt, metrics.json) is {folder.failed_path}.")
            return f" Run folder: {folder.path}." if status != "done" else ""

        try:
            run_early_checks(self.passes, schedule.get(-1, ()), state,
                             after="before its first pass")
            for i, p in enumerate(passes):
                header = f"[{i + 1}/{len(self.passes)}] {p.pass_name()}"
                _LOG.info("%s: start", header)
                if progress:
                    print(f"{header} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                keys_before = set(state.metrics)
                try:
                    snapshots = _before_checks(p, state) if checks else {}
                    result: PassResult = p(state)
                    state = result.state
                    if checks:
                        _run_checks(p, state, snapshots)
                except BaseException as e:
                    records.append(dict(name=p.pass_name(), index=i,
                                        error=f"{type(e).__name__}: {e}",
                                        seconds=round(time.perf_counter() - t0, 4)))
                    raise
                seconds = time.perf_counter() - t0
                record = dict(name=p.pass_name(), index=i, seconds=round(seconds, 4),
                              modified=bool(result.modified), stats=result.stats)
                records.append(record)
                done.append(p.pass_name())
                if not result.modified:
                    measured += [k for k in state.metrics if k not in keys_before]
                if params_start is None:  # the model as loaded
                    params_start = count_params(state.get("model"))
                _LOG.info("%s: done in %.2fs, modified=%s, stats=%s", header, seconds,
                          result.modified, fmt_stats(result.stats))
                if progress:
                    stats = fmt_stats(result.stats)
                    print(f"{header} done in {seconds:.2f}s" + (f" ({stats})" if stats else ""),
                          file=sys.stderr, flush=True)
                if folder:
                    folder.write_metrics(state.metrics)
                run_early_checks(self.passes, schedule.get(i, ()), state,
                                 after=f"after pass {i} ({p.pass_name()})")
                if i == last_collective:
                    distributed.shutdown()  # the other ranks leave; rank 0 goes on alone
            if not distributed.is_main():
                finish("done", state)
                return state
            summary = run_summary(state.metrics, measured, params_start=params_start,
                                  params_end=count_params(state.get("model")),
                                  seconds=time.perf_counter() - start)
            state.metrics["summary"] = summary
            _LOG.info("summary:\n%s", summary_table(summary))
            self._card(state, spec if spec is not None else self.to_dict(), command)
        except KeyboardInterrupt:
            saved = state.get("saved_model")
            where = f"during pass {i} ({p.pass_name()})" if p is not None else "at the start"
            message = f"interrupted {where}; " + (
                f"the model saved earlier is in {saved}" if saved else "nothing was saved")
            state.metrics["error"] = message
            _LOG.error("%s", message)
            note = finish("interrupted", state)
            raise KeyboardInterrupt(f"{message}.{note}" if note else message) from None
        except Exception as e:
            at = f"pass {i} ({p.pass_name()})" if p is not None else "the start"
            if isinstance(e, EarlyCheckError):
                at = "early"
            state.metrics["error"] = f"{at}: {type(e).__name__}: {e}"
            error = PassError(f"pipeline stopped {'at ' * (at != 'early')}{at}: {e}\n"
                              f"  passes already run: {', '.join(done) or 'none'}.")
            _LOG.error("%s", error, exc_info=e)
            raise PassError(f"{error}{finish('failed', state)}") from e
        finish("done", state)
        return state


    def _card(self, state: State, spec: dict[str, Any], command: str | None) -> None:
        """Rewrite the model card of the folder a pass saved, now that the results are known."""
        from pathlib import Path

        from prunegraph.pipeline.load import Load
        from prunegraph.plan.model_card import write_model_card

        saved = state.get("saved_model")
        if not saved or not (Path(saved) / "prunegraph_plan.json").is_file():
            return
        base = next((p.model for p in self.passes if isinstance(p, Load)), None)
        write_model_card(saved, base_model=base, summary=state.metrics.get("summary"),
                         spec=spec, command=command)


def _before_checks(p: Pass, state: State) -> dict[str, Any]:
    """Snapshots of the checks that compare the state before and after ``p``."""
    snapshots = {}
    for check in registered_checks().values():
        if check.before is not None and check.applies(p, state, before=True):
            snapshots[check.name] = check.before(state)
    return snapshots


def _run_checks(p: Pass, state: State, snapshots: dict[str, Any]) -> None:
    for check in registered_checks().values():
        if check.before is not None and check.name not in snapshots:
            continue
        if not check.applies(p, state):
            continue
        args = (state, snapshots[check.name]) if check.before is not None else (state,)
        try:
            check.fn(*args)
        except PrunegraphError as e:
            raise PostconditionError(
                f"invariant check {check.name!r} failed after pass {p.pass_name()}: {e}") from e
        except Exception as e:
            raise PostconditionError(
                f"invariant check {check.name!r} failed after pass {p.pass_name()}: "
                f"{type(e).__name__}: {e}") from e


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    import torch

    torch.manual_seed(seed)

