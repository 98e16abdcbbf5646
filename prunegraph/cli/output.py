"""What a command prints while it works: progress that reads well in a terminal and in a log file,
and no third-party warnings that mean nothing to the user.

* **Progress.** tqdm bars redraw one line with ``\\r``; in a file (``prunegraph run ... > log``)
  that becomes one endless line. When stderr is not a terminal, :func:`user_facing_output` puts
  a :class:`PlainProgress` stream in front of it: a bar's redraws become at most one plain line
  every ``PRUNEGRAPH_PROGRESS_SECONDS`` seconds (default 30) plus its last state, and all other
  text passes through unchanged.
* **Warnings.** :data:`QUIET_WARNINGS` and :data:`QUIET_LOGGERS` list warnings raised inside
  torch and onnxscript that a user cannot act on (the ONNX exporter's torchvision registration
  messages and deprecation notices, torch pytree's FutureWarning). They are silenced for the
  command only; everything else is shown.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["user_facing_output", "PlainProgress", "QUIET_WARNINGS"]

#: ``(category, message regex, module regex)`` of third-party warnings that mean nothing to a user.
QUIET_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r".*", r"(torch\.onnx|onnxscript|onnx_ir).*"),
    (DeprecationWarning, r".*", r"(torch\.onnx|onnxscript|onnx_ir).*"),
    # torch's pytree, raised inside torch.export / the ONNX exporter (reported from copyreg)
    (FutureWarning, r".*treespec.*LeafSpec.*|.*LeafSpec.*deprecated.*", r".*"),
    (UserWarning, r".*TypedStorage is deprecated.*", r".*"),
)

#: Loggers of third-party libraries whose warnings mean nothing to a user, and the level they
#: are raised to: the ONNX exporter logs one warning per torchvision op when torchvision is not
#: installed (prunegraph never needs it).
QUIET_LOGGERS: dict[str, int] = {
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class PlainProgress(io.TextIOBase):
    """A text stream for a log file: ``\\r`` redraws become periodic plain lines.

    Other text is written as is. A redraw (``\\r`` and the new status, as tqdm writes it) is kept
    as the current status and written as its own line when ``interval`` seconds passed since the
    last one; a bar's last status is written when a newline or other text follows it.
    """

    def __init__(self, stream, interval: float = 30.0) -> None:
        super().__init__()
        self._stream = stream
        self._interval = interval
        self._status = ""
        self._shown = ""
        self._last = 0.0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        n = len(text)
        in_redraw = False  # tqdm writes "\r" and the new status in one call
        for token in re.split(r"(\r|\n)", _ANSI.sub("", text)):
            if token == "\r":
                in_redraw = True
            elif token == "\n":
                ends_bar = in_redraw or bool(self._status)  # the newline that closes a bar
                self._flush_status()
                if not ends_bar:
                    self._stream.write("\n")
                in_redraw = False
            elif token and in_redraw:
                self._redraw(token)
            elif token:
                self._flush_status()
                self._stream.write(token)
        self._stream.flush()
        return n

    def _redraw(self, piece: str) -> None:
        piece = piece.strip()
        if not piece:
            return
        self._status = piece
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._emit()
            self._last = now

    def _emit(self) -> None:
        if self._status and self._status != self._shown:
            self._stream.write(self._status + "\n")
            self._shown = self._status

    def _flush_status(self) -> None:
        self._emit()
        self._status = self._shown = ""

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()


@contextmanager
def quiet_third_party_warnings() -> Iterator[None]:
    """Silence :data:`QUIET_WARNINGS` and :data:`QUIET_LOGGERS` inside the block."""
    loggers = {name: logging.getLogger(name) for name in QUIET_LOGGERS}
    levels = {name: lg.level for name, lg in loggers.items()}
    for name, lg in loggers.items():
        lg.setLevel(max(QUIET_LOGGERS[name], lg.level))
    try:
        with warnings.catch_warnings():
            for category, message, module in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category,
                                        module=module)
            yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


@contextmanager
def user_facing_output() -> Iterator[None]:
    """Plain progress lines when stderr is not a terminal, and the quiet warning filters."""
    old = sys.stderr
    plain = not _isatty(old)
    if plain:
        interval = float(os.environ.get("PRUNEGRAPH_PROGRESS_SECONDS", "30"))
        sys.stderr = PlainProgress(old, interval)
    try:
        with quiet_third_party_warnings():
            yield
    finally:
        if plain:
            sys.stderr.flush()
            sys.stderr = old


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
