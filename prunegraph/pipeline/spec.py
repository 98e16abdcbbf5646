"""Pipeline specs: one schema for Python, YAML and TOML, validated before any pass runs.

A spec file is a small typed top level plus the ordered pass list::

    model: smollm2-135m        # optional: becomes an implicit first `Load` pass
    device: auto               # optional: the Load's device (auto = the GPU when there is one)
    seed: 0                    # seeds Python, NumPy and torch before the first pass
    passes:
      - Analyze                # a bare name: every parameter at its default
      - Prune: {criterion: wanda, sparsity: 0.2}

``load_spec(path_or_dict, overrides=[...])`` returns a :class:`Spec`. Overrides are
``key=value`` strings: ``model=random:llama``, ``seed=1``, ``passes.1.sparsity=0.3`` (the index
counts entries as written in the file) or ``Prune.sparsity=0.3`` (when ``Prune`` appears once);
a nested setting is reached key by key: ``Train.train.steps=40`` changes one training setting.
Values are parsed as YAML (``0.3`` is a float, ``[1, 2]`` a list, ``wanda`` a string).

**The implicit Load.** When ``model`` is set and the list does not start with ``Load``, the spec
runs ``Load(model=<model>)`` first. When it starts with ``Load`` without a ``model`` parameter,
the top-level ``model`` fills it in; giving both with different values is an error.
:meth:`Spec.to_dict` writes the ``Load`` explicitly, with every default resolved, so the
``spec.yaml`` of a run folder re-runs the same thing.

Every problem is a :class:`~prunegraph.errors.SpecError` naming the file, the pass index, the
pass, the parameter, the expected type and the value received, with the nearest valid names.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import State, nearest, registered_passes
from prunegraph.pipeline.load import Load
from prunegraph.pipeline.pipeline import (
    SPEC_VERSION,
    Pipeline,
    check_version,
    parse_entry,
    pass_from_entry,
)

__all__ = ["Spec", "load_spec", "apply_overrides", "parse_value", "TOP_LEVEL_KEYS"]

#: Top-level keys of a spec and their types (``passes`` aside).
TOP_LEVEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "version": int, "model": (str, type(None)), "device": (str, type(None)),
    "seed": int, "initial": list, "passes": list}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-3`` (PyYAML wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``0.3`` -> float, ``wanda`` -> str, ``[1, 2]`` -> list)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError:
        return text


@dataclasses.dataclass(frozen=True)
class Spec:
    """A resolved pipeline spec: the validated pipeline plus the top-level settings."""

    pipeline: Pipeline
    model: str | None = None
    seed: int = 0
    source: str | None = dataclasses.field(default=None, compare=False)
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (every default filled in, the Load explicit), as plain data."""
        out: dict[str, Any] = {"version": SPEC_VERSION, "model": self.model}
        if self.device is not None:
            out["device"] = self.device
        if self.pipeline.initial:
            out["initial"] = list(self.pipeline.initial)
        return {**out, "seed": self.seed, "passes": [p.to_dict() for p in self.pipeline.passes]}

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> Spec:
        """Validate ``data`` (the YAML form) into a Spec; see the module docstring."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise SpecError(f"{where}a spec must be a mapping with a 'passes' list, got "
                            f"{type(data).__name__}")
        for key, value in data.items():
            if key not in TOP_LEVEL_KEYS:
                raise SpecError(f"{where}unknown top-level key {key!r}.{nearest(str(key), TOP_LEVEL_KEYS)}"
                                f" Top-level keys: {', '.join(TOP_LEVEL_KEYS)}.")
            expected = TOP_LEVEL_KEYS[key]
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                names = " or ".join(t.__name__ if t is not type(None) else "null"
                                    for t in (expected if isinstance(expected, tuple) else (expected,)))
                raise SpecError(f"{where}top-level {key!r} expects {names}, got "
                                f"{type(value).__name__} {value!r}")
        check_version(data, where)
        if "passes" not in data:
            raise SpecError(f"{where}the spec has no 'passes' list; add `passes: [...]`")
        model, device = data.get("model"), data.get("device")
        entries = list(data["passes"])
        first = _entry_name(entries[0]) if entries else None
        if first == Load.name and (model, device) != (None, None):
            name, params = parse_entry(entries[0], where=f"{where}passes[0]")
            params = dict(params)
            for key, value in (("model", model), ("device", device)):
                if value is None:
                    continue
                if key not in params:
                    params[key] = value
                elif params[key] != value:
                    raise SpecError(
                        f"{where}top-level {key} {value!r} and passes[0] Load({key}="
                        f"{params[key]!r}) disagree; keep one of them"
                    )
            entries[0] = {name: params}
        elif device is not None and model is None:
            raise SpecError(f"{where}top-level device {device!r} applies to the Load pass, but "
                            f"the spec loads no model; set `model:` or start with a Load pass")
        passes = [pass_from_entry(e, where=f"{where}passes[{i}]") for i, e in enumerate(entries)]
        implicit = model is not None and not (passes and isinstance(passes[0], Load))
        initial = data.get("initial")
        if initial is not None and not all(isinstance(k, str) for k in initial):
            raise SpecError(f"{where}'initial' must be a list of state keys, got {initial!r}")
        if initial and (implicit or (passes and isinstance(passes[0], Load))):
            raise SpecError(f"{where}'initial' lists state keys a pipeline run in memory starts "
                            f"with, but this spec loads its model; remove 'initial' or the "
                            f"model/Load")
        try:
            if implicit and model is not None:  # validate first without the Load, so indices match the file
                Pipeline(passes, initial=Load.provides)
                passes.insert(0, Load(model=model, device=device or "auto"))
            pipeline = Pipeline(passes, initial=tuple(initial or ()))
        except SpecError as e:
            hint = ("" if model is not None or (passes and isinstance(passes[0], Load))
                    else " (or set the top-level `model:`, which adds a Load)")
            raise SpecError(f"{where}{e}{hint}") from None
        return cls(pipeline=pipeline, model=model, seed=data.get("seed", 0), source=source,
                   device=device)

    def describe(self) -> str:
        head = [f"model: {self.model}", f"seed: {self.seed}", "passes:"]
        return "\n".join(head) + "\n" + self.pipeline.describe()

    def run(self, run_dir: Any = None, *, overwrite: bool = False, progress: bool = True,
            checks: bool | None = None, state: State | None = None,
            command: str | None = None) -> State:
        """Run from ``state`` (empty by default; it must hold the spec's ``initial`` keys),
        writing the run folder ``run_dir`` when given."""
        state = State() if state is None else state
        missing = [k for k in self.pipeline.initial if not state.has(k)]
        if missing:
            raise SpecError(f"this spec starts from a state holding {', '.join(missing)} (its "
                            f"'initial'); set the top-level `model:` or start with a Load pass "
                            f"to run it on its own")
        from prunegraph.pipeline.runfolder import RunFolder

        folder = None
        if run_dir is not None:
            folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir,
                                                                              overwrite=overwrite)
        return self.pipeline.run(state, run_dir=folder, progress=progress, checks=checks,
                                 seed=self.seed, spec=self.to_dict(), command=command)


def load_spec(source: str | os.PathLike | dict[str, Any], overrides: list[str] | tuple = (),
              ) -> Spec:
    """Read, override and validate a spec; every problem is a SpecError raised before running."""
    if isinstance(source, dict):
        data, label = copy.deepcopy(source), None
    else:
        path = Path(source)
        label = str(path)
        data = _read_file(path)
    data = apply_overrides(data, overrides, where=label)
    try:
        return Spec.from_dict(data, source=label)
    except SpecError as e:
        if overrides:
            raise SpecError(f"{e}\n  (after --set {' --set '.join(overrides)})") from None
        raise


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path}: invalid TOML: {e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise SpecError(f"{path}{at}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise SpecError(f"{path} is empty; a spec needs at least `passes: [...]`")
    return data


# --------------------------------------------------------------------------------- overrides


def _entry_name(entry: Any) -> str | None:
    try:
        return parse_entry(entry)[0]
    except SpecError:
        return None


def _passes_with_param(names: list[str | None], param: str) -> list[str]:
    """The passes of the spec (once each) that have a parameter ``param``."""
    passes = registered_passes()
    return [n for n in dict.fromkeys(names)
            if n in passes and param in {f.name for f in passes[n].param_fields()}]


def apply_overrides(data: Any, overrides: list[str] | tuple = (), *, where: str | None = None
                    ) -> Any:
    """Apply ``key=value`` overrides (see the module docstring) to a copy of the raw spec."""
    if not overrides:
        return data
    prefix = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise SpecError(f"{prefix}cannot apply --set to a spec that is not a mapping")
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key=value, e.g. passes.1.sparsity=0.3")
        value = parse_value(text)
        parts = key.split(".")
        entries = data.get("passes")
        if parts[0] in TOP_LEVEL_KEYS and parts[0] != "passes":
            if len(parts) != 1:
                raise SpecError(f"--set {item!r}: {parts[0]!r} is a top-level value; "
                                f"write {parts[0]}=VALUE")
            data[parts[0]] = value
            continue
        if not isinstance(entries, list):
            raise SpecError(f"--set {item!r}: {prefix}the spec has no 'passes' list")
        if parts[0] == "passes":
            if len(parts) < 3 or not parts[1].lstrip("-").isdigit():
                raise SpecError(f"--set {item!r}: write passes.INDEX.PARAM=VALUE, "
                                f"e.g. passes.1.sparsity=0.3")
            index = int(parts[1])
            if not 0 <= index < len(entries):
                raise SpecError(f"--set {item!r}: {prefix}there are {len(entries)} passes "
                                f"(indices 0 to {len(entries) - 1})")
            path = parts[2:]
        else:
            names = [_entry_name(e) for e in entries]
            hits = [i for i, n in enumerate(names) if n == parts[0]]
            if not hits:
                if parts[0] in registered_passes():
                    raise SpecError(f"--set {item!r}: {prefix}pass {parts[0]} is not in the "
                                    f"spec; add it to `passes` first")
                candidates = ([n for n in names if n] + [k for k in TOP_LEVEL_KEYS if k != "passes"]
                              + list(registered_passes()))
                owners = _passes_with_param(names, parts[0]) if len(parts) == 1 else []
                hint = (f" Did you mean {' or '.join(f'{n}.{parts[0]}' for n in owners)}?"
                        if owners else nearest(parts[0], candidates))
                raise SpecError(f"--set {item!r}: {prefix}no pass or top-level key "
                                f"{parts[0]!r} in the spec.{hint}")
            if len(hits) > 1:
                raise SpecError(
                    f"--set {item!r}: pass {parts[0]} appears at indices "
                    f"{', '.join(map(str, hits))}; use passes.INDEX.{'.'.join(parts[1:]) or 'PARAM'}"
                )
            if len(parts) < 2:
                raise SpecError(f"--set {item!r}: write {parts[0]}.PARAM=VALUE")
            index, path = hits[0], parts[1:]
        try:
            name, params = parse_entry(entries[index])
        except SpecError as e:
            raise SpecError(f"--set {item!r}: {prefix}passes[{index}]: {e}") from None
        entries[index] = {name: _set_nested(copy.deepcopy(params), path, value, item)}
    return data


def _set_nested(params: dict, path: list[str], value: Any, item: str) -> dict:
    """``params`` with ``path`` (``['train', 'steps']`` for ``Pass.train.steps``) set to
    ``value``; nested settings such as a pass's ``train`` block are overridden key by key."""
    node = params
    for i, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise SpecError(f"--set {item!r}: {'.'.join(path[:i + 1])} is {child!r}, not a "
                            f"mapping of settings")
        node = child
    node[path[-1]] = value
    return params
