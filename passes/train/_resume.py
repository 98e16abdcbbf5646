"""The training loop's checkpoint: where it lives, writing it atomically, and exact resume.

A checkpoint holds the settings it was made with, the step, the objective's state
(:meth:`~prunegraph.passes.train.objective.Objective.state_dict`), the optimizer and scheduler,
torch's RNG states and the step records so far. It is resumed only under the same settings, so
a resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunegraph.atomic import atomic_write
from prunegraph.errors import PrunegraphError

__all__ = ["checkpoint_path", "save_checkpoint", "load_checkpoint"]


def checkpoint_path(folder: Path | None, checkpoint_dir: str | None) -> Path | None:
    """Where the checkpoint lives (folders created): ``checkpoint_dir`` or the run's training
    folder; None without either."""
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else folder
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if ckpt_dir is None:
        return None
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return ckpt_dir / "checkpoint.pt"


def save_checkpoint(path: Path, settings: dict[str, Any], step: int, objective, optimizer,
                    scheduler, history: list[dict[str, Any]]) -> None:
    """Write the checkpoint to a temporary name, then rename it."""
    data = {"config": settings, "step": step, "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": history}
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_checkpoint(path: Path, settings: dict[str, Any], objective, optimizer, scheduler
                    ) -> tuple[int, list[dict[str, Any]]]:
    """Restore everything into the live objects; returns ``(step, history)``.

    Raises:
        PrunegraphError: the file is unreadable, or was made with other settings.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise PrunegraphError(f"training checkpoint {path} is corrupt or truncated ({e}); "
                              f"delete it to start over, or pass resume=false") from e
    if data.get("config") != settings or "objective" not in data:
        old = data.get("config") or {}
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        why = f"other settings ({', '.join(diff)} differ)" if diff else "an older version"
        raise PrunegraphError(f"training checkpoint {path} was made with {why}; use another "
                              f"run folder, delete the checkpoint, or pass resume=false")
    objective.load_state_dict(data["objective"])
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    torch.set_rng_state(data["torch_rng"])
    if data.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(data["cuda_rng"])
    return int(data["step"]), list(data["history"])
