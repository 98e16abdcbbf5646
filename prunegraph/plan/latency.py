"""Measured GEMM latencies per device, dtype and shape, cached on disk (``round_to: latency``).

A width's cost on real hardware is a staircase, not a line: GEMM tiles, vector loads and
alignment make some widths as slow as wider ones. ``round_to: latency`` times the model's own
GEMMs (``y[t, out] = x[t, in] @ w[out, in]^T``) at each candidate width on the device the model
runs on, once, and lets the allocator keep only the widths on the fast side of each step
(:mod:`prunegraph.passes._widths`).

Each :class:`Gemm` is timed once per device, dtype and shape, and kept in memory for the process
and in a JSON file per device under the user's cache folder (:func:`cache_dir`:
``$PRUNEGRAPH_CACHE``, else ``$XDG_CACHE_HOME/prunegraph``, else ``~/.cache/prunegraph``)::

    <cache>/latency/<device>.json
    {"format": "prunegraph.latency", "version": 1, "device": "NVIDIA H200",
     "entries": {"bfloat16 t=1 out=11456 in=4096": 2.1e-05, ...}}

The timer is injectable (tests use a fake one); the default times CUDA GEMMs as the median of
CUDA-graph replays and CPU GEMMs as the fastest of repeated calls.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prunegraph.atomic import atomic_write_text

__all__ = ["Gemm", "LatencyTable", "Timer", "TOKENS", "cache_dir", "default_timer", "device_name"]

FORMAT = "prunegraph.latency"
VERSION = 1

#: Token counts a width is timed at: one decode step and one prefill of a prompt.
TOKENS: dict[str, int] = {"decode": 1, "prefill": 512}

#: ``timer(fn, device_type) -> seconds`` for one call of ``fn``.
Timer = Callable[[Callable[[], object], str], float]

#: (device name, timer, entry key) -> seconds, for this process: every pass that resolves
#: ``latency`` in one run sees the same numbers, with or without a disk cache.
_MEMORY: dict[tuple[str, object, str], float] = {}


@dataclass(frozen=True, order=True)
class Gemm:
    """``y[tokens, out] = x[tokens, in_] @ w[out, in_]^T``."""

    tokens: int
    out: int
    in_: int

    def key(self, dtype: str) -> str:
        return f"{dtype} t={self.tokens} out={self.out} in={self.in_}"


def cache_dir() -> Path:
    """The user's prunegraph cache folder (``$PRUNEGRAPH_CACHE``, ``$XDG_CACHE_HOME/prunegraph``
    or ``~/.cache/prunegraph``)."""
    if os.environ.get("PRUNEGRAPH_CACHE"):
        return Path(os.environ["PRUNEGRAPH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prunegraph"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """What the timings depend on: the GPU's name, or the CPU's model and intra-op threads."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if device == "cpu":
        return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"
    return device


def _time_cuda(fn: Callable[[], object], calls: int = 10, replays: int = 5) -> float:
    """Median of CUDA-graph replays of ``calls`` back-to-back calls (the host plays no part)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def _time_host(fn: Callable[[], object], budget: float = 0.05, least: int = 5,
               most: int = 50) -> float:
    """Fastest of repeated calls, as many as fit in ``budget`` seconds (``least`` to ``most``):
    on a shared CPU other work only ever adds time, so the minimum is the steadiest estimate."""
    fn()
    times: list[float] = []
    while len(times) < least or (sum(times) < budget and len(times) < most):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def default_timer(fn: Callable[[], object], device: str) -> float:
    """Seconds per call of ``fn`` on ``device`` (CUDA-graph replays on a GPU)."""
    return _time_cuda(fn) if device.startswith("cuda") else _time_host(fn)


class LatencyTable:
    """GEMM latencies on one device and dtype: measured once, then read from memory or disk.

    Args:
        device: the torch device the GEMMs run on (``cpu``, ``cuda``, ``cuda:1``).
        dtype: the dtype name (``bfloat16``).
        timer: ``timer(fn, device) -> seconds`` (default :func:`default_timer`).
        cache: the folder of the JSON files (default :func:`cache_dir` ``/latency``); ``None``
            keeps the timings in memory only.
        name: the device name the entries are keyed by (default :func:`device_name`).

    ``hits`` and ``misses`` count the GEMMs read from the cache and timed.
    """

    def __init__(self, device: str = "cpu", dtype: str = "float32", *, timer: Timer | None = None,
                 cache: str | os.PathLike | None | bool = True, name: str | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.timer = timer or default_timer
        self.name = name or device_name(device)
        if cache is True:
            cache = cache_dir() / "latency"
        self.path = (Path(cache) / f"{_slug(self.name)}.json") if cache else None
        self.hits = self.misses = 0

    def _load(self) -> dict[str, float]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache is measured again
        if data.get("format") != FORMAT or data.get("device") != self.name:
            return {}
        return {k: float(v) for k, v in data.get("entries", {}).items()}

    def _save(self, entries: dict[str, float]) -> None:
        if self.path is None:
            return
        data = {"format": FORMAT, "version": VERSION, "device": self.name,
                "entries": dict(sorted(entries.items()))}
        try:
            atomic_write_text(self.path, json.dumps(data, indent=0))
        except OSError:
            pass  # an unwritable cache only costs the next run a measurement

    def seconds(self, gemms: Iterable[Gemm]) -> dict[Gemm, float]:
        """Seconds per call of each GEMM, timing only those neither in memory nor on disk."""
        wanted = sorted(set(gemms))
        out, missing = {}, []
        stored = None
        for g in wanted:
            key = (self.name, self.timer, g.key(self.dtype))
            if key in _MEMORY:
                out[g] = _MEMORY[key]
                self.hits += 1
                continue
            stored = self._load() if stored is None else stored
            if key[2] in stored:
                out[g] = _MEMORY[key] = stored[key[2]]
                self.hits += 1
            else:
                missing.append(g)
        if not missing:
            return out
        for g in missing:
            out[g] = _MEMORY[(self.name, self.timer, g.key(self.dtype))] = self._measure(g)
            self.misses += 1
        stored = self._load()  # another process may have added entries meanwhile
        stored.update({g.key(self.dtype): out[g] for g in missing})
        self._save(stored)
        return out

    def _measure(self, g: Gemm) -> float:
        import torch
        import torch.nn.functional as F

        dtype = getattr(torch, self.dtype)
        x = torch.randn(g.tokens, g.in_, device=self.device, dtype=dtype)
        w = torch.randn(g.out, g.in_, device=self.device, dtype=dtype)
        with torch.no_grad():
            return float(self.timer(lambda: F.linear(x, w), self.device))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"
