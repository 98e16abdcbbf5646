"""The training checkpoint of a run on several ranks, with ``torch.distributed.checkpoint``.

A sharded run cannot ``torch.save`` its state from one process: trainable model weights
(PrunePath) and their AdamW moments are FSDP shards. Its checkpoint is a folder
(``checkpoint.dcp/`` beside where ``checkpoint.pt`` would be) holding:

* every trainable tensor and its optimizer state, through
  ``torch.distributed.checkpoint.state_dict.get_state_dict`` (frozen weights left out: they are
  the model's, not the run's) and ``dcp.save``, each rank writing its own shards;
* ``meta.pt``, written by rank 0: the settings, the step, the scheduler, torch's RNG states, the
  objective's non-tensor state (:meth:`Objective.extra_state`) and the step records.

It is written under ``checkpoint.dcp.tmp/`` and renamed by rank 0 once every rank has written,
so a killed run leaves the previous checkpoint or the new one, never a mix. Resuming needs the
same settings and the same number of ranks (the data each rank drew depends on it).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunegraph.errors import PrunegraphError
from prunegraph.pipeline import distributed

__all__ = ["sharded_path", "save_sharded", "load_sharded"]


def sharded_path(ckpt: Path) -> Path:
    """The folder of a sharded run's checkpoint beside ``ckpt`` (``checkpoint.pt``)."""
    return ckpt.with_suffix(".dcp")


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _extra(objective) -> dict[str, Any]:
    fn = getattr(objective, "extra_state", None)
    return fn() if fn is not None else {}


def save_sharded(path: Path, settings: dict[str, Any], step: int, objective, optimizer,
                 scheduler, history: list[dict[str, Any]], root: nn.Module) -> None:
    """Write the checkpoint folder ``path`` from every rank (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if distributed.is_main() and tmp.exists():
        shutil.rmtree(tmp)
    distributed.barrier()
    model_state, optim_state = get_state_dict(root, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    if distributed.is_main():
        meta = {"config": settings, "step": step, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "objective": _extra(objective), "history": history,
                "world_size": distributed.world_size()}
        torch.save(meta, tmp / "meta.pt")
    distributed.barrier()  # every rank's shards are in tmp
    if distributed.is_main():
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    distributed.barrier()


def load_sharded(path: Path, settings: dict[str, Any], objective, optimizer, scheduler,
                 root: nn.Module) -> tuple[int, list[dict[str, Any]]]:
    """Restore the checkpoint folder ``path`` on every rank; returns ``(step, history)``.

    Raises:
        PrunegraphError: the folder is unreadable, or was made with other settings or another
            number of ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise PrunegraphError(f"training checkpoint {path} is corrupt or incomplete ({e}); "
                              f"delete it to start over, or pass resume=false") from e
    ranks = distributed.world_size()
    if meta.get("world_size") != ranks:
        raise PrunegraphError(f"training checkpoint {path} was made on {meta.get('world_size')} "
                              f"ranks, this run has {ranks}; resume with as many (each rank's "
                              f"data depends on it), or delete it to start over")
    if meta.get("config") != settings:
        old = meta.get("config") or {}
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        raise PrunegraphError(f"training checkpoint {path} was made with other settings "
                              f"({', '.join(diff)} differ); use another run folder, delete the "
                              f"checkpoint, or pass resume=false")
    model_state, optim_state = get_state_dict(root, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    keys = set_state_dict(root, optimizer, model_state_dict=state["model"],
                          optim_state_dict=state["optim"], options=_options(strict=False))
    trained = {n for n, p in root.named_parameters() if p.requires_grad}
    if keys.unexpected_keys or trained & set(keys.missing_keys):  # frozen weights are not in it
        raise PrunegraphError(f"training checkpoint {path} does not hold this run's trained "
                              f"tensors ({sorted(trained & set(keys.missing_keys))[:3]} missing, "
                              f"{keys.unexpected_keys[:3]} unexpected); delete it to start over")
    load = getattr(objective, "load_extra_state", None)
    if load is not None:
        load(meta["objective"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(meta["torch_rng"])
    if meta.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(meta["cuda_rng"])
    return int(meta["step"]), list(meta["history"])
