"""Timing pieces for end-to-end benchmarks in which the host must not hide the GPU.

A Hugging Face forward launches hundreds of small kernels from Python; on a fast GPU the host is
the bottleneck (37 ms per generated token for SmolLM2 on an H200 through ``generate``), so any
kernel's effect disappears. What this module gives instead:

* :class:`GreedyDecoder`: greedy decoding with a static KV cache (``transformers.StaticCache``)
  and, on CUDA, the whole decode step (forward, argmax, cache write, position and mask update)
  captured once as a CUDA graph and replayed per token. All state lives in fixed device buffers,
  so a replay needs nothing from the host. On the CPU the same step runs eagerly.
* :func:`time_prefill`: a prompt forward (``logits_to_keep=1``, what generation needs), captured
  as a CUDA graph on CUDA, timed with CUDA events over replays; wall clock on the CPU.
* :func:`use_graph_attention`: the attention the two above need. HF builds its SDPA masks with
  host syncs (``.all()`` on a device tensor) that a CUDA graph cannot hold, and under capture it
  gives up the causal fast path. The registered ``prunegraph_graph_sdpa`` is HF's own SDPA
  attention under a name HF has no mask builder for, so the model passes no mask and prefill runs
  SDPA's ``is_causal`` kernel exactly as eager inference does (inputs here have no padding and no
  packing). Decode passes its own ``[1, 1, 1, L]`` boolean mask over the static cache; for a
  single query token with grouped kv heads, the ``G`` query heads of one kv head attend as ``G``
  query rows against that kv head (exact, and no ``repeat_kv`` copy of the cache per step).
* :func:`no_host_sync`: raises at the first operation that would read a device value on the host
  (``.item()``, ``bool(tensor)``, ``nonzero``), the operations that break CUDA-graph capture. The
  CPU dry run uses it to check that a decode step is capturable before device time is spent.
* :func:`copy_bandwidth`: measured device-to-device copy bandwidth (the decode roofline).

Works with transformers 5.x, whose forward takes the cache as ``past_key_values`` (5.17) or
``cache`` (5.24): :func:`cache_keyword` reads the model's signature.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["GreedyDecoder", "HostSyncError", "cache_keyword", "copy_bandwidth", "decode_bytes",
           "eager_greedy", "no_host_sync",
           "static_cache", "time_prefill", "use_graph_attention", "GRAPH_ATTENTION"]

GRAPH_ATTENTION = "prunegraph_graph_sdpa"


# --------------------------------------------------------------------------------------------
# Attention and cache
# --------------------------------------------------------------------------------------------


def _graph_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len == 1 and attention_mask is not None and heads != kv_heads:
        group = heads // kv_heads
        q = query.reshape(batch, kv_heads, group, dim)  # query head h uses kv head h // group
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask,
                                             dropout_p=dropout, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def use_graph_attention(model: torch.nn.Module) -> None:
    """Make ``model`` use :data:`GRAPH_ATTENTION` (see the module docstring)."""
    from transformers import AttentionInterface

    AttentionInterface.register(GRAPH_ATTENTION, _graph_sdpa)
    model.set_attn_implementation(GRAPH_ATTENTION)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor "
                    f"`past_key_values`; cannot pass it a static KV cache")


def static_cache(model: torch.nn.Module, max_len: int):
    """A ``StaticCache`` of ``max_len`` positions; layers allocate on their first write, with
    that layer's own kv head count (pruned layers differ)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


# --------------------------------------------------------------------------------------------
# Host-sync check
# --------------------------------------------------------------------------------------------


class HostSyncError(RuntimeError):
    """An operation read a device value on the host (it would break CUDA-graph capture)."""


_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique",
             "_unique2", "equal"}


class _NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in _SYNC_OPS:
            raise HostSyncError(f"{func} reads a device value on the host; a CUDA graph "
                                f"cannot capture it")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise :class:`HostSyncError` at the first host read of a tensor value inside."""
    with _NoHostSync():
        yield


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _capture(fn: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _replay_seconds(graph: torch.cuda.CUDAGraph, n: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@torch.no_grad()
def time_prefill(model: torch.nn.Module, ids: torch.Tensor, reps: int = 5) -> float:
    """Median seconds of one prompt forward of ``ids [B, S]`` (no cache, last logits only)."""
    def forward():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    if ids.device.type != "cuda":
        forward()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    graph = _capture(forward)
    _replay_seconds(graph, 1)
    seconds = statistics.median(_replay_seconds(graph, 1) for _ in range(reps))
    del graph
    return seconds


class GreedyDecoder:
    """Greedy decoding of ``steps`` tokens after a ``prompt_len``-token prompt, batch ``batch``.

    ``generate(prompt)`` prefills the static cache eagerly, then runs ``steps`` decode steps
    (CUDA-graph replays on CUDA) and returns ``(tokens [batch, prompt_len + steps + 1], seconds
    of the decode steps)``; the prompt's last logits give the first new token, each step one more.

    ``compile`` (a ``torch.compile`` backend name, e.g. ``"inductor"``) compiles the step before
    it is captured, so the graph replays fused kernels for the norms, rotary embedding and
    residual adds instead of HF's dozens of small ones per layer; the compilation happens in the
    warm-up before the first capture (:attr:`compile_seconds`). Call :meth:`close` to drop the
    compiled code with the graph.
    """

    def __init__(self, model: torch.nn.Module, batch: int, prompt_len: int, steps: int,
                 compile: str | None = None):
        self.model, self.batch, self.prompt_len, self.steps = model, batch, prompt_len, steps
        device = next(model.parameters()).device
        self.max_len = prompt_len + steps
        self.cache = static_cache(model, self.max_len)
        self.cache_kw = cache_keyword(model)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(1, 1, 1, self.max_len, dtype=torch.bool, device=device)
        self.positions = torch.arange(self.max_len, device=device)
        self.tokens = torch.zeros(batch, self.max_len + 1, dtype=torch.long, device=device)
        self.graph = None
        self.compiled = compile
        self.compile_seconds = 0.0
        self._step = (torch.compile(self.step, backend=compile, dynamic=False, fullgraph=False)
                      if compile else self.step)

    def prefill(self, prompt: torch.Tensor) -> None:
        if prompt.shape != (self.batch, self.prompt_len):
            raise ValueError(f"prompt shape {tuple(prompt.shape)} != "
                             f"{(self.batch, self.prompt_len)}")
        self.cache.reset()
        logits = self.model(input_ids=prompt, use_cache=True, logits_to_keep=1,
                            **{self.cache_kw: self.cache}).logits
        first = logits[:, -1, :].argmax(-1)
        self.tokens.zero_()
        self.tokens[:, :self.prompt_len] = prompt
        self.tokens[:, self.prompt_len] = first
        self.ids.copy_(first[:, None])
        self.pos.fill_(self.prompt_len)

    def step(self) -> None:
        """One decode step at position ``pos``: everything on the device, nothing on the host."""
        torch.le(self.positions, self.pos.view(1), out=self.mask.view(-1))
        logits = self.model(input_ids=self.ids, position_ids=self.pos,
                            attention_mask=self.mask, use_cache=True,
                            **{self.cache_kw: self.cache}).logits
        nxt = logits[:, -1, :].argmax(-1)
        self.tokens.index_copy_(1, self.pos.view(1) + 1, nxt[:, None])
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor) -> tuple[torch.Tensor, float]:
        cuda = prompt.device.type == "cuda"
        if self.compiled and not self.compile_seconds:  # compile once, outside any timing
            self.prefill(prompt)
            t0 = time.perf_counter()
            self._step()
            if cuda:
                torch.cuda.synchronize()
            self.compile_seconds = time.perf_counter() - t0
        if cuda and self.graph is None:
            self.prefill(prompt)
            self.graph = _capture(self._step)
        self.prefill(prompt)
        if cuda:
            seconds = _replay_seconds(self.graph, self.steps)
        else:
            t0 = time.perf_counter()
            for _ in range(self.steps):
                self._step()
            seconds = time.perf_counter() - t0
        return self.tokens.clone(), seconds

    def close(self) -> None:
        """Free the graph and the cache (their memory is held until then), and the compiled
        step's code."""
        self.graph = None
        self.cache = None
        if self.compiled:
            self._step = None
            torch._dynamo.reset()


@torch.no_grad()
def eager_greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference greedy tokens with HF's default cache and attention (for checking the decoder)."""
    ids = prompt
    for _ in range(steps + 1):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1, :].argmax(-1, keepdim=True)], dim=1)
    return ids


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> dict[str, float]:
    """Measured device memory bandwidth in bytes/s, CUDA-graph timed: ``memcpy`` (a
    device-to-device ``copy_``, read + write), ``kernel_copy`` (an elementwise kernel, read +
    write) and ``read`` (a sum over the buffer), and ``best``, the largest: the roofline a
    bandwidth-bound kernel is held to."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    out = {}
    for name, fn, moved in (("memcpy", lambda: dst.copy_(src), 2 * nbytes),
                            ("kernel_copy", lambda: torch.mul(src, 1.0, out=dst), 2 * nbytes),
                            ("read", lambda: src.sum(), nbytes)):
        graph = _capture(fn)
        out[name] = moved / statistics.median(_replay_seconds(graph, 1) for _ in range(reps))
        del graph
    out["best"] = max(out.values())
    return out


def decode_bytes(model: torch.nn.Module, batch: int, cache_len: int) -> int:
    """Bytes one dense decode step reads: every weight but the input embedding (a tied head is
    read as the head), plus the whole static K/V cache of the batch."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = {id(p): p for p in model.parameters()}
    if emb is not head:
        params.pop(id(emb), None)
    weights = sum(p.numel() * p.element_size() for p in params.values())
    kv = sum(2 * layer.self_attn.k_proj.out_features for layer in model.model.layers)
    return weights + batch * cache_len * kv * emb.element_size()
