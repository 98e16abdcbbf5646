"""Run folders and atomic writes: nothing is ever left half-written.

A pipeline run leaves a folder a person can read and re-run::

    runs/demo/
      .prunegraph-run     marker: a prunegraph run, and how it ended ({"status": "done"})
      spec.yaml           the resolved spec, every default filled in (re-run it as is)
      metrics.json        state.metrics, rewritten after every pass (per-pass time and stats)
      log.txt             the log of the run
      model/  plots/ ...  whatever passes write under state.run_dir

Files are written to a temporary name in the same folder and renamed with :func:`os.replace`, so
a reader sees the old file or the new one, never a partial one. Folders (a saved model) are built
under ``<path>.tmp-XXXX`` by :func:`atomic_dir` and renamed at the end, or removed on failure::

    with atomic_dir(state.run_dir / "model") as tmp:
        model.save_pretrained(tmp)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from prunegraph.atomic import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    remove_path,
)
from prunegraph.errors import SpecError

__all__ = [
    "RunFolder",
    "MARKER",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_dir",
    "to_json",
]

MARKER = ".prunegraph-run"


# ------------------------------------------------------------------------------ atomic writes


def to_json(obj: Any, indent: int | None = 2, *, strict: bool = True) -> str:
    """JSON text for metrics-like data: paths, tuples, sets, NumPy and torch scalars allowed.

    Anything else is a TypeError, or its ``repr`` when ``strict=False`` (metrics must never
    hide the error of a failing run behind a serialisation error).
    """
    default = _json_default if strict else _lenient_default
    return json.dumps(obj, indent=indent, default=default, allow_nan=True) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Serialise first (a failure writes nothing), then write atomically."""
    return atomic_write_text(path, to_json(obj, indent))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} as JSON")


def _lenient_default(obj: Any) -> Any:
    try:
        return _json_default(obj)
    except Exception:
        return repr(obj)


# -------------------------------------------------------------------------------- run folders


class RunFolder:
    """The output folder of one pipeline run. See the module docstring.

    Construction only checks (so a bad ``--out`` fails before any pass runs); :meth:`open`
    creates the folder, writes ``spec.yaml`` and attaches the ``log.txt`` handler; :meth:`close`
    records how the run ended and detaches it.

    A previous run in the same place is never deleted before the new one has succeeded:
    :meth:`open` moves it aside (``<name>.previous-XXXX``), :meth:`close` removes it after a run
    that ended ``done``, and puts it back otherwise, the failed run going to ``<name>.failed``
    (so its ``log.txt`` can be read). A run that fails where there was none stays in place,
    marked: ``metrics.json`` and the marker file say ``"status": "failed"`` (or
    ``"interrupted"``).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._handler: logging.Handler | None = None
        self._previous: Path | None = None
        self._created = ""
        #: Where the failed run went when a previous run was put back (see :meth:`close`).
        self.failed_path: Path | None = None
        self._check()

    @property
    def is_open(self) -> bool:
        return self._handler is not None

    @property
    def model_dir(self) -> Path:
        """Where a Save pass puts the model (write it with :func:`atomic_dir`)."""
        return self.path / "model"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @staticmethod
    def is_run_folder(path: str | os.PathLike) -> bool:
        return (Path(path) / MARKER).is_file()

    def _check(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise SpecError(f"run folder {p} exists and is not a folder; choose another --out")
        _check_writable(p)
        if not p.is_dir() or not any(p.iterdir()) or self.is_run_folder(p):
            return
        if not self.overwrite:
            raise SpecError(
                f"{p} is not empty and is not a prunegraph run folder; refusing to write into it. "
                f"Choose another --out, or pass --overwrite to replace it"
            )
        resolved = p.resolve()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or \
                Path.cwd().resolve().is_relative_to(resolved):
            raise SpecError(f"refusing to replace {p}: it is the root, your home or holds the "
                            f"current directory; choose another --out")

    def open(self, spec: dict[str, Any]) -> None:
        """Move any previous run here aside, create the folder with the marker and
        ``spec.yaml``, start ``log.txt``."""
        self._check()
        self._created = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            if self.path.exists() and any(self.path.iterdir()):
                self._previous = _aside(self.path, "previous")
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_marker("running")
            self.write_spec(spec)
        except OSError as e:
            self._restore()
            raise SpecError(f"cannot write the run folder {self.path}: "
                            f"{e.strerror or e}; choose another --out") from None
        handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("prunegraph")
        self._old_level = root.level
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        root.addHandler(handler)
        self._handler = handler

    def _write_marker(self, status: str) -> None:
        atomic_write_json(self.path / MARKER, {"created": self._created, "status": status})

    def write_spec(self, spec: dict[str, Any]) -> Path:
        return atomic_write_text(self.path / "spec.yaml",
                                 yaml.safe_dump(spec, sort_keys=False, default_flow_style=None))

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """Write ``metrics.json``; values JSON cannot hold are written as their repr."""
        return atomic_write_text(self.path / "metrics.json", to_json(metrics, strict=False))

    def close(self, status: str = "done") -> None:
        """Detach ``log.txt`` and record ``status`` (``done``, ``failed``, ``interrupted``) in
        the marker; then drop the previous run (``done``) or put it back (see the class
        docstring)."""
        if self._handler is None:
            return
        root = logging.getLogger("prunegraph")
        root.removeHandler(self._handler)
        root.setLevel(self._old_level)
        self._handler.close()
        self._handler = None
        try:
            self._write_marker(status)
        except OSError:
            pass
        if self._previous is None:
            return
        if status == "done":
            remove_path(self._previous)
            self._previous = None
            return
        failed = self.path.with_name(self.path.name + ".failed")
        if failed.exists() and self.is_run_folder(failed):
            remove_path(failed)
        if failed.exists():
            failed = _aside(self.path, "failed")
        else:
            os.replace(self.path, failed)
        self.failed_path = failed
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            if self.path.exists() and not any(self.path.iterdir()):
                self.path.rmdir()
            if not self.path.exists():
                os.replace(self._previous, self.path)
            self._previous = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("done" if exc[0] is None else "failed")

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"


def _aside(path: Path, tag: str) -> Path:
    """Rename ``path`` to a fresh ``<name>.<tag>-XXXX`` beside it; returns the new path."""
    import tempfile

    new = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.{tag}-"))
    new.rmdir()
    os.replace(path, new)
    return new


def _check_writable(path: Path) -> None:
    """Refuse a run folder that cannot be created: name the folder and the reason."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SpecError(f"cannot create the run folder {path}: {probe} is a file; choose "
                        f"another --out")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise SpecError(f"cannot create the run folder {path}: {probe} is not writable; choose "
                        f"another --out")


def run_path(run_dir: str | os.PathLike | None, path: str, param: str) -> Path:
    """``path`` as given if absolute, else inside the run folder; ``param`` names the setting in
    the error when there is no run folder to resolve against."""
    target = Path(path)
    if target.is_absolute():
        return target
    if run_dir is None:
        raise SpecError(f"{param} {path!r} is relative but the pipeline runs without a run folder; "
                        "pass --out DIR or an absolute path")
    return Path(run_dir) / target
