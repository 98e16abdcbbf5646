"""Targets: one declaration gives a lowering both its pass and its ``prunegraph export`` command.

A target is one function ``export(state, out, *, overwrite, **params) -> report`` under the
:func:`target` decorator. Its keyword parameters (typed, with defaults) are the target's
parameters; the ``Args:`` section of its docstring is their help::

    from prunegraph.pipeline.targets import target

    @target("onnx", pass_name="ExportONNX", provides="onnx_path", output="model.onnx",
            suffix=".onnx")
    def onnx_target(state, out, *, overwrite: bool, check: bool = True,
                    atol: float = 1e-4) -> dict:
        \"\"\"An ONNX logits graph with dynamic batch and sequence axes.

        Args:
            check: compare onnxruntime's logits with PyTorch's.
            atol: absolute tolerance of that comparison.
        \"\"\"
        return export_onnx(state.model, out, check=check, atol=atol, overwrite=overwrite)

Registering it makes, from that one declaration:

* the pass ``ExportONNX(path="model.onnx", check=True, atol=1e-4)``: it requires the target's
  ``needs`` (``model`` by default), writes ``path`` relative to the run folder, sets
  ``state.<provides>`` to the path written and records the report in ``metrics.json``;
* the command ``prunegraph export onnx RUN_OR_MODEL OUT [--check/--no-check] [--atol F]
  [--overwrite]`` (:mod:`prunegraph.cli.export_command`);
* a Python call, ``onnx_target("runs/demo", "m.onnx", atol=1e-3)``, whose source is a run
  folder, a model folder, a ``load_model`` spec, an ``nn.Module`` or a :class:`State`.

All three check parameters the way passes do (types, the nearest valid name for an unknown one,
the target's own ``validate``) and refuse a bad output (``check_output``) before anything is
loaded or written. A target function receives a :class:`State` holding at least its ``needs``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunegraph.errors import PreconditionError, PrunegraphError, SpecError
from prunegraph.pipeline.contract import (
    Pass,
    PassResult,
    State,
    coerce_param,
    declare_key,
    declared_keys,
    isolated_registry,
    nearest,
    register_pass,
    type_name,
)

__all__ = [
    "Target",
    "target",
    "registered_targets",
    "get_target",
    "isolated_targets",
    "load_source",
    "check_file_output",
    "check_folder_output",
]

#: Names a target parameter cannot take: the command line and the pass use them already.
RESERVED = frozenset({"path", "out", "model", "overwrite", "target", "command"})

_TARGETS: dict[str, Target] = {}


def check_file_output(out: Path, overwrite: bool, suffix: str) -> None:
    """Refuse an output file with the wrong suffix, in a missing folder, or already there."""
    if out.suffix != suffix:
        raise SpecError(f"the output {out} must end in {suffix}, e.g. {out.with_suffix(suffix)}")
    if not out.parent.is_dir():
        raise SpecError(f"the folder {out.parent} does not exist; create it first")
    if out.exists() and not overwrite:
        raise SpecError(f"{out} already exists; choose another name or pass --overwrite")


def check_folder_output(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that is a file, or exists with something in it."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"{out} is a file; pass a folder to write into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SpecError(f"{out} exists and is not empty; choose another folder or pass "
                        f"--overwrite")


def load_source(spec: str | os.PathLike) -> State:
    """A :class:`State` with ``model``, ``tokenizer`` and, for a pruned checkpoint, ``plan`` (and
    any runtime it carries), as the ``Load`` pass makes it, on the CPU.

    ``spec`` is a run folder (its ``model/``), a model folder or a ``load_model`` spec.
    """
    from prunegraph.pipeline.load import Load
    from prunegraph.pipeline.runfolder import RunFolder

    path = Path(spec)
    if path.is_dir() and RunFolder.is_run_folder(path):
        if not (path / "model").is_dir():
            raise PrunegraphError(f"the run folder {path} has no model/ folder; add a Save pass "
                                  "to the pipeline (or pass a model folder)")
        path = path / "model"
    return Load(model=str(path), device="cpu")(State()).state


def _state_of(model: Any, tokenizer: Any = None) -> State:
    return State(model=model, tokenizer=tokenizer)


def _param_help(fn: Callable) -> dict[str, str]:
    """``name -> text`` from the ``Args:`` section of a Google-style docstring."""
    lines = (inspect.getdoc(fn) or "").splitlines()
    out: dict[str, str] = {}
    try:
        start = lines.index("Args:") + 1
    except ValueError:
        return out
    current = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        text = line.strip()
        head, sep, rest = text.partition(":")
        entry = line.startswith("    ") and not line.startswith("     ")
        if sep and entry and head.isidentifier():
            current = head
            out[current] = rest.strip()
        elif current and text:
            out[current] += " " + text
    return out


@dataclass(frozen=True, eq=False)
class Target:
    """A registered lowering; build it with :func:`target`, not directly.

    Attributes:
        name: the subcommand, ``prunegraph export <name>``.
        fn: ``fn(state, out, *, overwrite, **params) -> report`` (a JSON-able dict).
        needs: state keys ``fn`` reads (the pass's ``requires``).
        provides: the state key that receives the path written.
        output: the pass's default ``path``, relative to the run folder.
        suffix: the output is a file that must end so; ``None``: a folder.
        pass_name: the generated pass's spec name.
        check_output: refuse a bad ``(out, overwrite)`` before any work.
        validate: range checks over the parameters (raise :class:`SpecError`).
        metrics: ``(out, report) -> entries`` merged into ``metrics.json`` (default:
            ``{name: report}``).
        pass_class: the generated pass.
    """

    name: str
    fn: Callable[..., dict[str, Any]]
    needs: tuple[str, ...]
    provides: str
    output: str
    suffix: str | None
    pass_name: str
    check_output: Callable[[Path, bool], None]
    validate: Callable[[dict[str, Any]], None] | None = None
    metrics: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None
    pass_class: type[Pass] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pass_class", _make_pass(self))

    @property
    def summary(self) -> str:
        first = (inspect.getdoc(self.fn) or self.name).split("\n\n")[0]
        return first.replace("\n", " ").replace("``", "")

    def param_types(self) -> dict[str, Any]:
        return {k: v for k, v in self.pass_class.param_types().items() if k != "path"}

    def param_defaults(self) -> dict[str, Any]:
        return {k: v for k, v in self.pass_class.param_defaults().items() if k != "path"}

    def param_help(self) -> dict[str, str]:
        return _param_help(self.fn)

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` checked as pass parameters are (names, types, ``validate``), with every
        default filled in."""
        where = f"prunegraph export {self.name}"
        types_ = self.param_types()
        out = self.param_defaults()
        for key, value in values.items():
            if key not in types_:
                raise SpecError(f"{where}: no parameter {key!r}.{nearest(str(key), types_)} "
                                f"Its parameters: {', '.join(types_) or 'none'}.")
            try:
                out[key] = coerce_param(value, types_[key])
            except TypeError:
                raise SpecError(f"{where}: parameter {key!r} expects {type_name(types_[key])}, "
                                f"got {type(value).__name__} {value!r}") from None
        if self.validate is not None:
            try:
                self.validate(dict(out))
            except SpecError as e:
                raise SpecError(f"{where}: {e}") from None
        return out

    def __call__(self, source: Any, out: str | os.PathLike, *, overwrite: bool = False,
                 **params: Any) -> dict[str, Any]:
        """Export ``source`` (run folder, model folder or spec, ``nn.Module``, :class:`State`)
        to ``out``; parameters and the output are checked before anything loads."""
        values = self.params(params)
        out = Path(out)
        self.check_output(out, overwrite)
        if isinstance(source, State):
            state = source
        elif isinstance(source, (str, os.PathLike)):
            state = load_source(source)
        else:
            state = _state_of(source)
        missing = [k for k in self.needs if not state.has(k)]
        if missing:
            what = f"{str(source)!r}" if isinstance(source, (str, os.PathLike)) else "the source"
            raise PreconditionError(
                f"the {self.name} target needs {', '.join(map(repr, missing))}, which {what} "
                f"does not have; pass a run folder or a model folder written by a pipeline "
                f"that provides it")
        return self.fn(state, out, overwrite=overwrite, **values)


def _make_pass(t: Target) -> type[Pass]:
    """The frozen-dataclass pass of target ``t``: ``path`` plus the target's parameters."""
    try:
        hints = typing.get_type_hints(t.fn)
    except NameError as e:
        raise TypeError(f"target {t.name}: an annotation of {t.fn.__qualname__} does not "
                        f"resolve ({e}); import the names it uses at module level") from e
    fields: list[tuple[str, Any, Any]] = [("path", str, field(default=t.output))]
    for p in list(inspect.signature(t.fn).parameters.values())[2:]:
        if p.name == "overwrite":
            continue
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"target {t.name}: parameter {p.name!r} must be keyword-only "
                            f"(after *, overwrite)")
        if p.name in RESERVED:
            raise TypeError(f"target {t.name}: parameter name {p.name!r} is reserved")
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"target {t.name}: parameter {p.name!r} needs a default")
        fields.append((p.name, hints.get(p.name, Any), field(default=p.default)))
    names = [f[0] for f in fields[1:]]

    # ``self`` is an instance of the pass class make_dataclass builds below (a Pass with ``fields``)
    def validate(self: Any) -> None:
        if t.suffix and not self.path.endswith(t.suffix):
            raise SpecError(f"{self.pass_name()}.path must end in {t.suffix}, got {self.path!r}")
        if t.validate is not None:
            try:
                t.validate({k: getattr(self, k) for k in names})
            except SpecError as e:
                raise SpecError(f"{self.pass_name()}: {e}") from None

    def run(self: Any, state: State) -> PassResult:
        from prunegraph.pipeline.runfolder import run_path

        out = run_path(state.run_dir, self.path, f"{self.pass_name()}.path")
        report = t.fn(state, out, overwrite=True, **{k: getattr(self, k) for k in names})
        setattr(state, t.provides, str(out))
        state.metrics.update(t.metrics(out, report) if t.metrics else {t.name: report})
        state.log.info("%s wrote %s", self.pass_name(), out)
        return PassResult(state, modified=False, stats=report)

    doc = (inspect.getdoc(t.fn) or "").split("\nArgs:")[0].rstrip()
    doc += (f"\n\nWrites ``path`` (relative to the run folder) and sets "
            f"``state.{t.provides}``.\nThe same target on the command line: "
            f"``prunegraph export {t.name} RUN_OR_MODEL OUT``.")
    cls = dataclasses.make_dataclass(
        t.pass_name, fields, bases=(Pass,), frozen=True,
        namespace={"name": t.pass_name, "requires": tuple(t.needs), "provides": (t.provides,),
                   "validate": validate, "run": run, "target": t, "__doc__": doc})
    cls.__module__ = t.fn.__module__
    if t.provides not in declared_keys():
        declare_key(t.provides, "builtins.str", f"the path the {t.name} target wrote")
    return register_pass(cls)


def target(name: str, *, provides: str, output: str, needs: tuple[str, ...] = ("model",),
           suffix: str | None = None, pass_name: str | None = None,
           check_output: Callable[[Path, bool], None] | None = None,
           validate: Callable[[dict[str, Any]], None] | None = None,
           metrics: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None
           ) -> Callable[[Callable[..., dict[str, Any]]], Target]:
    """Register ``fn(state, out, *, overwrite, **params) -> report`` as target ``name`` (see the
    module docstring); returns the :class:`Target`, which is callable like the export."""
    if not name.isidentifier():
        raise ValueError(f"target name {name!r} must be an identifier, e.g. 'onnx'")

    def decorator(fn: Callable[..., dict[str, Any]]) -> Target:
        if check_output is not None:
            check = check_output
        elif suffix:
            def check(out: Path, overwrite: bool) -> None:
                check_file_output(out, overwrite, suffix)
        else:
            check = check_folder_output
        declared = Target(name=name, fn=fn, needs=tuple(needs), provides=provides,
                          output=output, suffix=suffix,
                          pass_name=pass_name or f"Export{name[:1].upper()}{name[1:]}",
                          check_output=check, validate=validate, metrics=metrics)
        old = _TARGETS.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (
                fn.__module__, fn.__qualname__):
            raise ValueError(f"target name {name!r} is already registered by "
                             f"{old.fn.__module__}.{old.fn.__qualname__}")
        _TARGETS[name] = declared
        return declared

    return decorator


@contextmanager
def isolated_targets() -> Iterator[None]:
    """Register targets inside the block only (for tests): targets and their passes are
    restored on exit. Load plugins before the block (see ``isolated_registry``)."""
    saved = dict(_TARGETS)
    try:
        with isolated_registry():
            yield
    finally:
        _TARGETS.clear()
        _TARGETS.update(saved)


def registered_targets() -> dict[str, Target]:
    """A copy of the registry: name -> :class:`Target`."""
    return dict(_TARGETS)


def get_target(name: str) -> Target:
    """The target called ``name``; :class:`SpecError` with the nearest names if none."""
    try:
        return _TARGETS[name]
    except KeyError:
        hint = nearest(name, _TARGETS) or f" Targets: {', '.join(sorted(_TARGETS)) or 'none'}."
        raise SpecError(f"unknown target {name!r}.{hint}") from None

