"""Writing files and folders so that nothing is ever left half-written.

A file is written to a temporary name in its folder and renamed with :func:`os.replace`, so a
reader sees the old file or the new one, never a partial one. A folder (a saved model) is built
under ``<path>.tmp-XXXX`` and renamed at the end, or removed on failure. What is written gets the
permissions the user's umask gives (``mkstemp`` and ``mkdtemp`` alone would make it private)::

    atomic_write_text("run/metrics.json", text)
    atomic_write("run/checkpoint.pt", lambda tmp: torch.save(state, tmp))
    with atomic_dir("run/model") as tmp:
        model.save_pretrained(tmp)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "remove_path"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path beside ``path``, then rename it
    to ``path`` (for writers that take a path: ``torch.save``, ``fig.savefig``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under ``<path>.tmp-XXXX`` and rename it to ``path`` on success.

    On an exception the temporary folder is removed and ``path`` is untouched. An existing
    ``path`` is replaced (``overwrite=True``) or is an error.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; remove it or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.tmp-"))
    try:
        yield tmp
        _apply_umask(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.old-"))
            old.rmdir()
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def _apply_umask(root: Path) -> None:
    """Give a built folder and everything in it the user's umask: mkdtemp makes the folder 0700,
    and some writers (safetensors) create private 0600 files."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            path.chmod((0o666 | (path.stat().st_mode & 0o111)) & ~mask)


def remove_path(p: Path) -> None:
    """Remove a file or a folder tree (no error if it is gone)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
