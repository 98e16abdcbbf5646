"""The training loop on several GPUs: FSDP2 sharding, gradient sync, and the way back.

Under a ``torchrun`` launch (:mod:`prunegraph.pipeline.distributed`) :func:`fit
<prunegraph.passes.train.loop.fit>` trains through a :class:`Sharding`:

* **frozen weights sharded** with ``torch.distributed.fsdp.fully_shard`` (FSDP2): every decoder
  layer (the model's ``_no_split_modules``, else the blocks of its longest ``ModuleList``) and
  the root, so a rank holds ``1/N`` of the weights and all-gathers one layer at a time; under
  bf16 autocast the all-gather is in bf16 (``MixedPrecisionPolicy``); ``cpu_offload`` keeps the
  shards in CPU memory (``CPUOffloadPolicy``);
* **replicated trainables consistent**: tensors FSDP does not own (a gate family's gates and
  multipliers) get their gradients averaged over the ranks (one all-reduce per step) before the
  optimizer step, so every rank takes the same step and holds the same AdamW state; trainable
  model weights (PrunePath) are FSDP's, reduce-scattered and stepped as shards;
* **activation checkpointing** per decoder layer (``activation_checkpointing``, also in a
  single process): each layer's forward is recomputed in its backward
  (``torch.utils.checkpoint``, non-reentrant), so only layer inputs are kept;
* **the way back** (:meth:`Sharding.unwrap`): after training every parameter is all-gathered
  (``DTensor.full_tensor``) into a plain ``nn.Parameter`` and everything FSDP and the
  checkpointing added to a module (its class, hooks, state) is taken off again, so the passes
  after training (Finalize, Slice, Save) see the user's module as it was, with its gates.

Each rank draws its share of every step's blocks from the same seeded order (rank ``r`` takes
micro-batch slice ``r`` of ``N``), so ``N`` ranks of ``batch_size`` see exactly the tokens one
process sees with ``N * batch_size``; losses are means over tokens, and averaging the ranks'
gradients gives that process's gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.ir.capture import canonical_parameters
from prunegraph.passes._layers import decoder_layers
from prunegraph.pipeline import distributed

__all__ = ["Sharding", "decoder_layers", "needs_sharding"]

#: The per-module hook and state tables of ``nn.Module`` that wrapping may add to.
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def needs_sharding(config) -> bool:
    """Whether ``fit`` wraps the model: always under a launch, for activation checkpointing
    alone in a single process.

    Raises:
        SpecError: ``cpu_offload`` outside a launch (it is an FSDP setting).
    """
    if getattr(config, "cpu_offload", False) and not distributed.active():
        raise SpecError("train: cpu_offload keeps FSDP shards in CPU memory, so it needs a "
                        "torchrun launch (prunegraph run ... --nproc N); set cpu_offload: false "
                        "in a single process")
    if getattr(config, "cpu_offload", False) and distributed.device().type != "cuda":
        raise SpecError("train: cpu_offload moves FSDP shards between CPU memory and the GPUs; "
                        "these processes have no GPU (their shards are in CPU memory already): "
                        "set cpu_offload: false")
    return distributed.active() or bool(getattr(config, "activation_checkpointing", False))


class _Snapshot:
    """A module's class, attributes and hooks before wrapping, to restore them after."""

    def __init__(self, module: nn.Module) -> None:
        self.cls = module.__class__
        self.keys = set(module.__dict__)
        self.hooks = {t: set(getattr(module, t)) for t in _HOOK_TABLES if hasattr(module, t)}

    def restore(self, module: nn.Module) -> None:
        module.__class__ = self.cls
        for key in set(module.__dict__) - self.keys:
            del module.__dict__[key]
        for table, ids in self.hooks.items():
            hooks = getattr(module, table)
            for hid in [h for h in hooks if h not in ids]:
                del hooks[hid]


class Sharding:
    """One training run's wrapping of ``model`` (see the module docstring).

    Args:
        model: the model; wrapped in place by :meth:`wrap`, given back by :meth:`unwrap`.
        config: the :class:`~prunegraph.passes.train.config.TrainConfig`.
        device: the device this rank computes on.
    """

    def __init__(self, model: nn.Module, config, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        self.layers = decoder_layers(model)
        self.sharded = distributed.active()
        self._snapshots: list[tuple[nn.Module, _Snapshot]] = []
        self._aliases: dict[str, list[str]] = {}
        self._flags: dict[str, bool] = {}

    def wrap(self) -> nn.Module:
        """Checkpoint each decoder layer (when asked) and shard the model over the ranks."""
        model = self.model
        self._snapshots = [(m, _Snapshot(m)) for m in model.modules()]
        self._aliases = canonical_parameters(model)[1]
        self._flags = {name: model.get_parameter(name).requires_grad for name in self._aliases}
        if getattr(self.config, "activation_checkpointing", False):
            for layer in self.layers:
                _checkpoint_forward(layer)
        if self.sharded:
            self._fully_shard()
        return model

    def _fully_shard(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (distributed.world_size(),))
        kwargs: dict[str, Any] = {"mesh": mesh}
        dtype = next(self.model.parameters()).dtype
        if _bf16(self.config, self.device) and dtype == torch.float32:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                       reduce_dtype=torch.float32)
        if getattr(self.config, "cpu_offload", False):
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for layer in self.layers:
            fully_shard(layer, **kwargs)
        fully_shard(self.model, **kwargs)

    def replicated(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The trainable tensors FSDP does not own (their gradients are synced here)."""
        from torch.distributed.tensor import DTensor

        return [p for p in params if not isinstance(p, DTensor)]

    @torch.no_grad()
    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of replicated trainables over the ranks (one all-reduce)."""
        import torch.distributed as dist

        if not self.sharded:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(self.device, torch.float32) for g in grads])
        dist.all_reduce(flat)
        flat /= distributed.world_size()
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    @torch.no_grad()
    def check_replicas(self, params: list[nn.Parameter]) -> None:
        """Raise if a replicated trainable differs between the ranks (it must not)."""
        import torch.distributed as dist

        if not self.sharded or not params:
            return
        flat = torch.cat([p.detach().reshape(-1).to(self.device, torch.float32)
                          for p in params])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        gap = (flat - ref).abs().max()
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if float(gap) != 0.0:
            raise PrunegraphError(f"trained gates differ between the ranks by up to "
                                  f"{float(gap):.3g}; the gradient sync failed")

    @torch.no_grad()
    def unwrap(self) -> nn.Module:
        """The user's module again: full parameters, original classes and hooks."""
        from torch.distributed.tensor import DTensor

        model = self.model
        full = {}
        for name in self._aliases:
            p = model.get_parameter(name)
            full[name] = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        for module, snap in self._snapshots:
            snap.restore(module)
        _forget_composable_state(m for m, _ in self._snapshots)
        for name, aliases in self._aliases.items():
            param = nn.Parameter(full[name].detach(), requires_grad=self._flags[name])
            for alias in aliases:
                path, _, attr = alias.rpartition(".")
                owner = model.get_submodule(path) if path else model
                owner._parameters[attr] = param
        return model


def _bf16(config, device: torch.device) -> bool:
    mode = getattr(config, "autocast", "auto")
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def _checkpoint_forward(layer: nn.Module) -> None:
    """Recompute ``layer``'s forward in its backward (an instance ``forward`` that the layer's
    snapshot removes again)."""
    from torch.utils.checkpoint import checkpoint

    inner = layer.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    layer.forward = forward


def _forget_composable_state(modules) -> None:
    """Drop the registry entries ``fully_shard`` keeps per module (its state is gone)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - other torch versions keep it elsewhere
        return
    for module in modules:
        _module_state_mapping.pop(module, None)
