"""Process groups and ranks for runs launched on several GPUs with ``torchrun``.

prunegraph runs on PyTorch's own distributed engine: ``torchrun`` starts one process per GPU and
sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init` (called by ``prunegraph run``)
joins the process group (NCCL on GPUs, gloo on CPUs) and binds each process to its GPU. Every
rank then runs the same pipeline on the same seed, with two rules:

* **one writer**: rank 0 alone writes what a person reads (the run folder, metrics, plots, logs,
  the saved model); other ranks run with no run folder;
* **one analysis**: passes whose result must be the same on every rank compute it once on rank
  0 and :func:`broadcast` it (``Analyze``'s groups).

Training passes (``collective = True`` on the pass) shard the model over the ranks
(:mod:`prunegraph.passes.train.sharding`); once the last of them has run, the other ranks leave
and rank 0 runs the rest of the pipeline alone::

    torchrun --nproc-per-node 2 -m prunegraph run examples/ddp-smollm2.yaml --out runs/ddp
    prunegraph run examples/ddp-smollm2.yaml --out runs/ddp --nproc 2     # the same

Outside a ``torchrun`` launch every helper answers for a single process (rank 0 of 1), so
single-process code paths need no branches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import TypeVar

import torch

__all__ = ["launched", "init", "active", "rank", "world_size", "local_rank", "is_main",
           "device", "broadcast", "barrier", "all_mean", "shutdown", "relaunch"]

T = TypeVar("T")

#: ``owned``: the process group was made by :func:`init`; ``left``: this process has left the
#: launch (:func:`shutdown`) and runs alone from then on.
_STATE = {"owned": False, "left": False}


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> bool:
    """Join the process group of a ``torchrun`` launch (NCCL when this process has a GPU, gloo
    otherwise) and bind the process to GPU ``LOCAL_RANK``; returns whether it is distributed."""
    import torch.distributed as dist

    if not launched():
        return False
    if dist.is_initialized():
        return True
    _STATE.update(owned=True, left=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    return True


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    import torch.distributed as dist

    return (not _STATE["left"] and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0, the one writer (always true in a single process)."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for small objects: groups,
    paths); the object itself in a single process."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device() if device().type == "cuda" else None)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def all_mean(values: Sequence[float]) -> list[float]:
    """The mean over ranks of each value (one collective for all); unchanged in one process."""
    import torch.distributed as dist

    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def shutdown() -> None:
    """Leave the launch: a barrier (no rank leaves while others still talk), the process group
    destroyed if :func:`init` made it, and every helper answers for one process from then on
    (rank 0 runs the rest of a pipeline alone). A no-op outside a launch."""
    import torch.distributed as dist

    if not active():
        return
    dist.barrier()
    if _STATE["owned"]:
        dist.destroy_process_group()
        _STATE["owned"] = False
    _STATE["left"] = True


def relaunch(nproc: int, argv: Sequence[str], module: str = "prunegraph") -> int:
    """Run ``python -m module *argv`` under ``torchrun --nproc-per-node nproc`` (the standalone
    rendezvous on this host) and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", module, *argv]
    return subprocess.call(cmd)
