"""One-shot importance on models larger than memory: one decoder layer at a time.

The in-memory criteria (:func:`prunegraph.passes.importance.score_groups`) run the whole model.
For a model that does not fit, :func:`score_sequential` computes the same scores the way
llm-compressor's sequential pipeline calibrates: the model is a skeleton whose parameters live
on the ``meta`` device (``accelerate.init_empty_weights``: buffers such as rotary tables are
real), and each tensor is read from the checkpoint's safetensors shards only when needed
(:class:`WeightSource`):

1. **capture** (on the CPU): the model's own forward runs with every decoder layer replaced by a
   recorder, so the embedding, the attention masks and the position embeddings are computed by
   the model's code; each layer's call arguments are kept per batch and layer 0's input hidden
   states go to the activation store (CPU memory, or disk with ``offload="disk"``);
2. **layers** (on ``device``): layer ``i``'s weights are read from the shards onto the device,
   each batch of its inputs is brought in, run and its output stored as layer ``i + 1``'s input;
   Wanda's input norms are hooks on the layer's linears; the layer's member scores are reduced
   to units, and its weights go back to ``meta``. GPU memory holds one layer and one batch;
3. **taylor** also needs ``dL/dW``: every layer's inputs are kept, the tail (final norm, head and
   the loss) runs once per batch on the last hidden states with the model's own forward (layer 0
   returns the stored states, the others pass them on), and the gradient is carried back layer
   by layer (each layer recomputed from its stored input, then backward), accumulating each
   weight's gradient over the batches.

``magnitude`` reads only the member tensors. The scores equal the in-memory ones (the same
operations in the same order; tested on tiny models), so the plans are the same.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunegraph.errors import PreconditionError
from prunegraph.ir.capture import canonical_parameters
from prunegraph.ir.groups import Group
from prunegraph.passes._calibration import batches, linear_owners, sum_input_squares
from prunegraph.passes._layers import decoder_layers, layer_prefixes

__all__ = ["WeightSource", "ActivationStore", "score_sequential", "FUSED_EXPERTS",
           "fused_from_experts"]


class WeightSource:
    """The tensors of a safetensors checkpoint folder (``model.safetensors``, or shards with a
    ``model.safetensors.index.json``), read one at a time (memory-mapped)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(f, framework="pt") as handle:
                    self.files.update({k: f for k in handle.keys()})
        if not self.files:
            raise PreconditionError(f"{self.folder} holds no safetensors weights (no "
                                    f"model.safetensors or index); sequential scoring reads "
                                    f"them from there: save the model with save_pretrained")
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a CPU view of the mapped file)."""
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)

    def dtype(self) -> torch.dtype:
        return self.get(next(iter(self.files))).dtype


#: Fused expert tensors of a model and the per-expert tensors its checkpoint holds instead, for
#: each naming (``qwen2/3-moe``, ``olmoe``: ``gate_proj``/``up_proj``/``down_proj``; Mixtral's
#: ``block_sparse_moe`` ``w1``/``w3``/``w2``): the experts are stacked, gate before up, as
#: transformers' own conversion does on load.
#: Module renamings between a model and older checkpoints (Mixtral's ``block_sparse_moe``).
RENAMED = ((".mlp.", ".block_sparse_moe."),)

FUSED_EXPERTS = {
    "gate_up_proj": [("mlp", ("gate_proj", "up_proj")), ("block_sparse_moe", ("w1", "w3"))],
    "down_proj": [("mlp", ("down_proj",)), ("block_sparse_moe", ("w2",))],
}


def fused_from_experts(source: WeightSource, name: str, shape: torch.Size) -> torch.Tensor | None:
    """The fused expert tensor ``name`` (``....mlp.experts.gate_up_proj``) built from the
    per-expert tensors of the checkpoint, or None when it holds none."""
    path, _, attr = name.rpartition(".")
    if attr not in FUSED_EXPERTS or not path.endswith(".experts") or not shape:
        return None
    for module, parts in FUSED_EXPERTS[attr]:
        prefix = path.rsplit(".mlp.", 1)[0] + f".{module}.experts" if ".mlp." in path else path
        keys = [[f"{prefix}.{e}.{part}.weight" for e in range(shape[0])] for part in parts]
        if all(k in source for row in keys for k in row):
            fused = torch.cat([torch.stack([source.get(k) for k in row]) for row in keys], dim=1)
            if fused.shape == shape:
                return fused
    return None


class ActivationStore:
    """Per-batch activations off the GPU: in CPU memory, or in files under a temporary folder
    (``disk``), one file per batch, removed on :meth:`close`."""

    def __init__(self, where: str = "cpu") -> None:
        if where not in ("cpu", "disk"):
            raise PreconditionError(f"offload must be 'cpu' or 'disk', got {where!r}")
        self.where = where
        self._mem: dict[Any, torch.Tensor] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="prunegraph-acts-")) if where == "disk" else None

    def put(self, key: Any, value: torch.Tensor) -> None:
        value = value.detach().to("cpu")
        if self._dir is None:
            self._mem[key] = value
        else:
            torch.save(value, self._dir / f"{'_'.join(map(str, key))}.pt")

    def get(self, key: Any, device: torch.device) -> torch.Tensor:
        if self._dir is None:
            return self._mem[key].to(device)
        return torch.load(self._dir / f"{'_'.join(map(str, key))}.pt").to(device)

    def drop(self, key: Any) -> None:
        if self._dir is None:
            self._mem.pop(key, None)
        else:
            (self._dir / f"{'_'.join(map(str, key))}.pt").unlink(missing_ok=True)

    def close(self) -> None:
        self._mem.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward is not needed."""


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Split a layer call into its hidden states and the rest."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


class _Skeleton:
    """The model with parameters on ``meta``, filled from the shards one module at a time."""

    def __init__(self, model: nn.Module, source: WeightSource) -> None:
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on meta; buffers (rotary tables) real
            skel = type(model)(model.config)
        if hasattr(skel, "tie_weights"):
            skel.tie_weights()  # tied embeddings share one tensor, as in the checkpoint
        self.model = skel.eval()
        self.source = source
        self.aliases = canonical_parameters(skel)[1]
        self.layers = decoder_layers(skel)
        prefixes = layer_prefixes(skel)
        self.layer_of = {n: next((i for i, p in enumerate(prefixes) if n.startswith(p + ".")), -1)
                         for n in self.aliases}
        self.tuple_output: bool | None = None

    def names(self, layer: int) -> list[str]:
        """Canonical parameter names of decoder layer ``layer`` (-1: outside every layer)."""
        return [n for n, i in self.layer_of.items() if i == layer]

    def _set(self, name: str, value: nn.Parameter) -> None:
        for alias in self.aliases[name]:
            path, _, attr = alias.rpartition(".")
            owner = self.model.get_submodule(path) if path else self.model
            owner._parameters[attr] = value

    def load(self, names: list[str], device: torch.device, grad: set[str] = frozenset()) -> None:
        """Read ``names`` from the shards onto ``device`` (``grad``: those that need .grad)."""
        for name in names:
            names_ = [*self.aliases[name], *(a.replace(new, old) for a in self.aliases[name]
                                             for new, old in RENAMED if new in a)]
            stored = next((a for a in names_ if a in self.source), None)
            if stored is not None:
                tensor = self.source.get(stored)
            else:
                tensor = fused_from_experts(self.source, name, self.model.get_parameter(name).shape)
            if tensor is None:
                raise PreconditionError(f"the checkpoint in {self.source.folder} has no tensor "
                                        f"{name!r}; it belongs to another model")
            tensor = tensor.to(device)
            self._set(name, nn.Parameter(tensor, requires_grad=name in grad))

    def buffers_to(self, module: nn.Module, device: torch.device) -> None:
        """Move ``module``'s buffers (real, not on meta) to ``device``."""
        for sub in module.modules():
            for key, buf in sub._buffers.items():
                if buf is not None and buf.device.type != "meta":
                    sub._buffers[key] = buf.to(device)

    def release(self, names: list[str]) -> None:
        """Put ``names`` back on ``meta`` (frees their memory)."""
        for name in names:
            p = self.model.get_parameter(name)
            self._set(name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def run_layer(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict
                  ) -> torch.Tensor:
        out = self.layers[index](hidden, *args, **kwargs)
        if self.tuple_output is None:
            self.tuple_output = isinstance(out, tuple)
        return out[0] if isinstance(out, tuple) else out

    def forward_with(self, ids: torch.Tensor, replace) -> Any:
        """The model's forward with each layer's forward replaced by ``replace(i)``."""
        for i, layer in enumerate(self.layers):
            layer.forward = replace(i)
        try:
            return self.model(input_ids=ids, use_cache=False)
        except _Stop:
            return None
        finally:
            for layer in self.layers:
                del layer.forward


def _capture(skel: _Skeleton, blocks: torch.Tensor, batch_size: int, store: ActivationStore,
             progress: bool) -> list[list[tuple[tuple, dict]]]:
    """Layer 0's input per batch into ``store``; every layer's other call arguments per batch
    (masks, position embeddings), all computed on the CPU by the model's own forward."""
    outer = skel.names(-1)
    skel.load(outer, torch.device("cpu"))
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in skel.layers]
    last = len(skel.layers) - 1
    for b, batch in enumerate(batches(blocks, batch_size, progress, "capture")):
        def recorder(i, b=b):
            def forward(*args, **kwargs):
                hidden, rest, kw = _hidden(args, kwargs)
                calls[i].append((rest, kw))
                if i == 0:
                    store.put((0, b), hidden)
                if i == last:
                    raise _Stop
                return (hidden,) if skel.tuple_output else hidden
            return forward

        with torch.no_grad():
            skel.forward_with(batch, recorder)
    skel.release(outer)
    return calls


def score_sequential(model: nn.Module, groups: list[Group], criterion: str,
                     blocks: torch.Tensor | None, weights: str | Path, *, batch_size: int = 4,
                     device: str | torch.device | None = None, offload: str = "cpu",
                     progress: bool = True):
    """Per-unit scores of every prunable group, one decoder layer in memory at a time; the same
    result as :func:`~prunegraph.passes.importance.score_groups` (see the module docstring).

    Args:
        model: the model (any device, ``meta`` included): its class and config.
        groups: its analysis groups.
        criterion: ``magnitude``, ``wanda`` or ``taylor``.
        blocks: calibration token blocks (wanda, taylor).
        weights: the folder of its safetensors checkpoint.
        batch_size: blocks per forward.
        device: where layers run (default: the GPU when there is one).
        offload: where activations wait between layers: ``cpu`` memory or ``disk``.
    """
    from prunegraph.passes.importance import check_criterion, sum_member_scores, unit_sums

    check_criterion(criterion)
    groups = [g for g in groups if g.prunable]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = WeightSource(weights)
    skel = _Skeleton(model, source)
    members = {m.param for g in groups for m in g.members}
    missing = sorted(members - set(skel.layer_of) - {a for al in skel.aliases.values()
                                                     for a in al})
    if missing:
        raise PreconditionError(f"{len(missing)} group member(s) name parameters the model does "
                                f"not have: {', '.join(missing[:5])}; re-run the analysis")
    canon = {a: c for c, al in skel.aliases.items() for a in al}
    stats: dict = {"criterion": criterion, "groups": len(groups), "forwards": 0, "tokens": 0,
                   "sequential": {"layers": len(skel.layers), "device": str(device),
                                  "offload": offload}}
    contrib: dict[tuple[str, int], torch.Tensor] = {}   # (group, member index) -> unit sums
    plain: dict[tuple[str, int], torch.Tensor] = {}     # wanda's activation-free fallback

    def reduce(names: set[str], elem, fallback=None) -> None:
        """Unit sums of every member whose parameter is in ``names`` (now in memory)."""
        for g in groups:
            for j, m in enumerate(g.members):
                if canon[m.param] in names:
                    contrib[(g.name, j)] = unit_sums(m, g.size, elem(m.param)).float().cpu()
                    if fallback is not None:
                        plain[(g.name, j)] = unit_sums(m, g.size, fallback(m.param)).float().cpu()

    blocks = None if blocks is None else torch.as_tensor(blocks, dtype=torch.long)
    if criterion == "magnitude":
        for i in range(-1, len(skel.layers)):
            names = {n for n in skel.names(i) if any(canon[p] == n for p in members)}
            if not names:
                continue
            skel.load(sorted(names), device)
            reduce(names, lambda p: skel.model.get_parameter(p).detach().float() ** 2)
            skel.release(sorted(names))
        return sum_member_scores(groups, contrib, sqrt=True, stats=stats)
    if blocks is None or blocks.numel() == 0:
        raise PreconditionError(f"criterion '{criterion}' needs calibration token blocks")
    store = ActivationStore(offload)
    try:
        if criterion == "wanda":
            fallback = _wanda_layers(skel, groups, blocks, batch_size, device, store, members,
                                     canon, reduce, stats, progress)
            for g in groups:
                if g.name in fallback:
                    for j in range(len(g.members)):
                        contrib[(g.name, j)] = plain[(g.name, j)]
            stats["wanda_fallback"] = fallback
            return sum_member_scores(groups, contrib, sqrt=False, stats=stats)
        _taylor_layers(skel, blocks, batch_size, device, store, members, canon, reduce, stats,
                       progress)
        return sum_member_scores(groups, contrib, sqrt=False, stats=stats)
    finally:
        store.close()


def _batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    return batches(blocks, batch_size, False, "")


def _wanda_layers(skel, groups, blocks, batch_size, device, store, members, canon, reduce,
                  stats, progress) -> dict[str, list[str]]:
    """Layer by layer: input norms of each layer's linears, then its members' Wanda scores;
    returns the groups scored without activations (as the in-memory path does)."""
    calls = _capture(skel, blocks, batch_size, store, progress)
    n_batches = len(calls[0])
    norms: dict[str, torch.Tensor] = {}
    tokens = 0
    for i in range(len(skel.layers)):
        names = skel.names(i)
        skel.load(names, device)
        skel.buffers_to(skel.layers[i], device)
        layer_members = {p for p in members if canon[p] in names}
        owners = linear_owners(skel.model, layer_members)
        sq, handles = sum_input_squares({id(m): m for _, m in owners.values()}.values())
        try:
            with torch.no_grad():
                for b in range(n_batches):
                    rest, kw = calls[i][b]
                    out = skel.run_layer(i, store.get((i, b), device), _to(rest, device),
                                         _to(kw, device))
                    store.put((i + 1, b), out)
                    store.drop((i, b))
        finally:
            for h in handles:
                h.remove()
        tokens = int(blocks.numel())
        from prunegraph.plan.gating import linear_input_dim

        for name, (attr, mod) in owners.items():
            if attr == "bias":
                norms[name] = torch.tensor(float(tokens)).sqrt()
            elif id(mod) in sq:
                shape = [1, 1]
                shape[linear_input_dim(mod)] = -1
                norms[name] = sq[id(mod)].sqrt().cpu().reshape(shape)
        here = {canon[p] for p in layer_members}

        def wanda(p, skel=skel):
            w = skel.model.get_parameter(p).detach().float().abs()
            return w * norms[p].to(w.device) if p in norms else w

        reduce(here, wanda, lambda p, skel=skel: skel.model.get_parameter(p).detach().float().abs())
        skel.release(names)
        if progress:
            print(f"\rwanda: layer {i + 1}/{len(skel.layers)}", end="", flush=True)
    outer = {canon[p] for p in members if skel.layer_of[canon[p]] < 0}
    if outer:  # members outside the layers (none in the supported models): activation-free
        skel.load(sorted(outer), device)
        reduce(outer, lambda p: skel.model.get_parameter(p).detach().float().abs(),
               lambda p: skel.model.get_parameter(p).detach().float().abs())
        skel.release(sorted(outer))
    stats.update(tokens=tokens, forwards=n_batches)
    fallback = {g.name: sorted({m.param for m in g.members if m.param not in norms})
                for g in groups}
    return {name: lacking for name, lacking in fallback.items() if lacking}


def _taylor_layers(skel, blocks, batch_size, device, store, members, canon, reduce, stats,
                   progress) -> None:
    """Forward layer by layer keeping every layer's input, the loss on the last hidden states,
    then the gradient carried back one layer at a time; ``|W * dL/dW|`` per member weight."""
    from prunegraph.passes._calibration import next_token_loss

    calls = _capture(skel, blocks, batch_size, store, progress)
    n_batches, n_layers = len(calls[0]), len(skel.layers)
    with torch.no_grad():
        for i in range(n_layers):
            names = skel.names(i)
            skel.load(names, device)
            skel.buffers_to(skel.layers[i], device)
            for b in range(n_batches):
                rest, kw = calls[i][b]
                out = skel.run_layer(i, store.get((i, b), device), _to(rest, device),
                                     _to(kw, device))
                store.put((i + 1, b), out)
            skel.release(names)
    wanted = {canon[p] for p in members}
    outer = skel.names(-1)
    skel.load(outer, device, grad=wanted)
    skel.buffers_to(skel.model, device)
    n_pred = blocks.shape[0] * (blocks.shape[1] - 1)
    for b, batch in enumerate(_batches(blocks, batch_size)):
        hidden = store.get((n_layers, b), device).requires_grad_(True)

        def inject(i, hidden=hidden):
            def forward(*args, **kwargs):
                h = hidden if i == 0 else _hidden(args, kwargs)[0]
                return (h,) if skel.tuple_output else h
            return forward

        for layer in skel.layers:
            layer.forward = inject(skel.layers.index(layer))
        try:
            loss = next_token_loss(skel.model, batch.to(device))
        finally:
            for layer in skel.layers:
                del layer.forward
        (loss * (batch.shape[0] * (batch.shape[1] - 1) / n_pred)).backward()
        store.put(("g", n_layers, b), hidden.grad)
    here = {n for n in outer if n in wanted}
    reduce(here, lambda p: _saliency(skel.model.get_parameter(p)))
    skel.release(outer)
    for i in reversed(range(n_layers)):
        names = skel.names(i)
        skel.load(names, device, grad=wanted)
        skel.buffers_to(skel.layers[i], device)
        for b in range(n_batches):
            rest, kw = calls[i][b]
            hidden = store.get((i, b), device).requires_grad_(True)
            out = skel.run_layer(i, hidden, _to(rest, device), _to(kw, device))
            out.backward(store.get(("g", i + 1, b), device))
            store.put(("g", i, b), hidden.grad)
            store.drop(("g", i + 1, b))
            store.drop((i + 1, b))
        reduce({n for n in names if n in wanted}, lambda p: _saliency(skel.model.get_parameter(p)))
        skel.release(names)
        if progress:
            print(f"\rtaylor: layer {n_layers - i}/{n_layers}", end="", flush=True)
    stats.update(tokens=int(blocks.numel()), forwards=n_batches)


def _saliency(p: nn.Parameter) -> torch.Tensor:
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    return (p.detach().float() * g.float()).abs()
