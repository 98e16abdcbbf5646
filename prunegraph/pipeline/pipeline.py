"""Pipelines: an ordered list of passes, validated as a whole before anything runs.

Construction walks ``requires``/``provides`` from the initial state keys (by default ``model``
and ``tokenizer``; a leading ``Load`` pass provides them too) and raises
:class:`~prunegraph.errors.SpecError` naming the pass, the missing key and the passes that would
provide it. :meth:`Pipeline.run` runs the passes in order, logs each one's time and stats, records
them in ``state.metrics["passes"]``, runs the registered invariant checks between passes when
asked, and on failure raises :class:`~prunegraph.errors.PassError` naming the passes already run::

    from prunegraph.pipeline.pipeline import Pipeline
    from prunegraph.pipeline.contract import State

    pipe = Pipeline([Capture(), Analyze(), Prune(sparsity=0.2), Finalize(), Slice()])
    state = pipe.run(State(model=model, tokenizer=tok), run_dir="runs/demo")
    state.metrics["passes"]      # [{"name": "Capture", "seconds": 1.2, "stats": {...}}, ...]

    d = pipe.to_dict()           # {"version": 1, "initial": [...], "passes": [{"Prune": {...}}]}
    assert Pipeline.from_dict(d) == pipe

Invariant checks are plain functions registered with :func:`register_check`; each runs after a
pass when every key it needs is in the state. They are on when ``run(checks=True)`` or when the
environment sets ``PRUNEGRAPH_CHECKS=1`` (as tests and CI do)::

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

_LOG = logging.getLogger("prunegraph.pipeline.pipeline")
_CHECKS: dict[str, tuple[tuple[str, ...], Callable[[State], None]]] = {}


def register_check(name: str, needs: Sequence[str] = ()):
    """Register ``fn(state) -> None`` as an invariant check run between passes.

    It runs after a pass when every key in ``needs`` is in the state, and raises (anything) when
    the invariant is broken; the pipeline reports it as a PostconditionError of that pass.
    """

    def decorator(fn: Callable[[State], None]) -> Callable[[State], None]:
        _CHECKS[name] = (tuple(needs), fn)
        return fn

    return decorator


def registered_checks() -> dict[str, tuple[tuple[str, ...], Callable[[State], None]]]:
    return dict(_CHECKS)


def check_version(data: dict[str, Any], prefix: str = "") -> None:
    """Refuse a spec written for another spec version (``prefix`` locates it in messages)."""
    version = data.get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise SpecError(f"{prefix}spec version {version!r} is not supported "
                        f"(this prunegraph reads version {SPEC_VERSION})")


def pass_from_entry(entry: Any, *, where: str = "") -> Pass:
    """Build a pass from its spec form: ``"Name"``, ``{"Name": {params}}`` or ``{"Name": None}``."""
    prefix = f"{where}: " if where else ""
    if isinstance(entry, Pass):
        return entry
    if isinstance(entry, str):
        name, params = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        (name, params), = entry.items()
    else:
        raise SpecError(
            f"{prefix}a pass entry must be a pass name or a one-key mapping "
            f"{{PassName: {{param: value}}}}, got {entry!r}"
        )
    try:
        cls = get_pass_class(name)
    except SpecError as e:
        raise SpecError(f"{prefix}{e}") from None
    return cls.from_params(params, where=where)


class Pipeline:
    """An ordered, validated list of passes. See the module docstring."""

    def __init__(self, passes: Iterable[Pass], *, initial: Iterable[str] = DEFAULT_INITIAL):
        self.passes: tuple[Pass, ...] = tuple(passes)
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
        for i, p in enumerate(self.passes):
            for key in p.requires:
                if key in available:
                    continue
                later = [q.pass_name() for q in self.passes[i + 1:] if key in q.provides]
                providers = sorted(n for n, c in registered_passes().items() if key in c.provides)
                if later:
                    fix = f"move {later[0]} before {p.pass_name()}"
                elif providers:
                    fix = f"add {' or '.join(f'`{n}`' for n in providers)} before {p.pass_name()}"
                else:
                    fix = f"no registered pass provides {key!r}; start from a state that has it"
                have = ", ".join(sorted(available - set(AMBIENT_KEYS))) or "nothing"
                raise SpecError(
                    f"pass {i} ({p.pass_name()}) requires {key!r}, which nothing before it "
                    f"provides (available: {have}): {fix}."
                )
            available.update(p.provides)

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
        """Inverse of :meth:`to_dict`; every problem is a SpecError with the pass index."""
        prefix = f"{where}: " if where else ""
        if not isinstance(data, dict):
            raise SpecError(f"{prefix}a pipeline must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"version", "initial", "passes"}
        if unknown:
            raise SpecError(f"{prefix}unknown pipeline keys {sorted(unknown)}; "
                            f"expected version, initial, passes")
        check_version(data, prefix)
        entries = data.get("passes", [])
        if not isinstance(entries, list):
            raise SpecError(f"{prefix}'passes' must be a list, got {type(entries).__name__}")
        passes = [pass_from_entry(e, where=f"{prefix}passes[{i}]") for i, e in enumerate(entries)]
        initial = data.get("initial", DEFAULT_INITIAL)
        if not (isinstance(initial, (list, tuple)) and all(isinstance(k, str) for k in initial)):
            raise SpecError(f"{prefix}'initial' must be a list of state keys, got {initial!r}")
        try:
            return cls(passes, initial=initial)
        except SpecError as e:
            raise SpecError(f"{prefix}{e}") from None

    # -- running ---------------------------------------------------------------------------

    def run(
        self,
        state: State | None = None,
        run_dir: Any = None,
        progress: bool = True,
        *,
        checks: bool | None = None,
        seed: int | None = None,
        spec: dict[str, Any] | None = None,
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
        """
        from prunegraph.pipeline.runfolder import RunFolder

        state = State() if state is None else state
        missing = [k for k in self.initial if not state.has(k)]
        if missing:
            raise SpecError(
                f"the pipeline expects the initial state to hold {', '.join(map(repr, missing))}; "
                f"pass State({', '.join(f'{k}=...' for k in missing)}) or start with a Load pass"
            )
        if checks is None:
            checks = os.environ.get("PRUNEGRAPH_CHECKS", "") not in ("", "0", "false")
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
        done: list[str] = []
        try:
            for i, p in enumerate(self.passes):
                header = f"[{i + 1}/{len(self.passes)}] {p.pass_name()}"
                _LOG.info("%s: start", header)
                if progress:
                    print(f"{header} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                try:
                    result: PassResult = p(state)
                    state = result.state
                    if checks:
                        _run_checks(p, state)
                except Exception as e:
                    ran = ", ".join(done) or "none"
                    where = f" Run folder: {folder.path}." if folder else ""
                    records.append(dict(name=p.pass_name(), index=i, error=f"{type(e).__name__}: {e}",
                                        seconds=round(time.perf_counter() - t0, 4)))
                    raise PassError(
                        f"pipeline stopped at pass {i} ({p.pass_name()}): {e}\n"
                        f"  passes already run: {ran}.{where}"
                    ) from e
                seconds = time.perf_counter() - t0
                record = dict(name=p.pass_name(), index=i, seconds=round(seconds, 4),
                              modified=bool(result.modified), stats=result.stats)
                records.append(record)
                done.append(p.pass_name())
                _LOG.info("%s: done in %.2fs, modified=%s, stats=%s", header, seconds,
                          result.modified, result.stats)
                if progress:
                    stats = ", ".join(f"{k}={v}" for k, v in result.stats.items())
                    print(f"{header} done in {seconds:.2f}s" + (f" ({stats})" if stats else ""),
                          file=sys.stderr, flush=True)
                if folder:
                    folder.write_metrics(state.metrics)
        finally:
            if folder:
                folder.write_metrics(state.metrics)
                folder.close()
        return state


def _run_checks(p: Pass, state: State) -> None:
    for name, (needs, fn) in _CHECKS.items():
        if all(state.has(k) for k in needs):
            try:
                fn(state)
            except PrunegraphError as e:
                raise PostconditionError(
                    f"invariant check {name!r} failed after pass {p.pass_name()}: {e}") from e
            except Exception as e:
                raise PostconditionError(
                    f"invariant check {name!r} failed after pass {p.pass_name()}: "
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

