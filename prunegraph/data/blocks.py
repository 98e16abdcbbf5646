"""Token blocks of one split of a text source: how every pass gets calibration and evaluation
text.

``text_blocks(tokenizer, source, split, block_len, n_blocks)`` loads ``source``
(:func:`~prunegraph.data.text.load_documents`), splits it by document
(:func:`~prunegraph.data.text.split_documents`: the same articles are always held out, so
calibration never sees evaluation text) and cuts the chosen split into blocks
(:func:`~prunegraph.data.text.token_blocks`)::

    calib = text_blocks(tok, "wikipedia", "calibration", 128, 32)    # LongTensor[32, 128]
    stream = text_blocks(tok, "wikipedia", "calibration", 128)       # every block (training)
    held_out = text_blocks(tok, "wikipedia", "evaluation", 512, 16)  # perplexity

Prune's scores, the training loop's data stream, Evaluate and TauSweep all call it, so every pass
reads the same split the same way. Results are memoised for the same tokenizer object (a
benchmark trains and evaluates several methods in one process; tokenizing the Wikipedia excerpt
takes seconds); each call returns its own copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from prunegraph.errors import PrunegraphError

__all__ = ["SPLITS", "text_blocks"]

#: The two halves of a source: ``calibration`` (scores, training) and ``evaluation`` (held out).
SPLITS = ("calibration", "evaluation")

_MEMO_SIZE = 4
_memo: dict[tuple, tuple[Any, torch.Tensor]] = {}


def text_blocks(tokenizer: Any, source: str, split: Literal["calibration", "evaluation"],
                block_len: int, n_blocks: int | None = None, *, seed: int = 0) -> torch.Tensor:
    """``LongTensor[n, block_len]`` token blocks from the ``split`` half of ``source``.

    Args:
        tokenizer: the model's tokenizer.
        source: a text source of :func:`~prunegraph.data.text.load_documents` (``wikipedia``, a
            path, ``hf:NAME``).
        split: ``calibration`` or ``evaluation`` (whole documents, split deterministically).
        block_len: tokens per block.
        n_blocks: that many blocks, a seeded draw in stream order; ``None`` for every block.
        seed: the draw's seed.

    Raises:
        PrunegraphError: an unknown split, or what loading and cutting the text raises.
    """
    from prunegraph.data.text import load_documents, split_documents, token_blocks

    if split not in SPLITS:
        raise PrunegraphError(f"unknown text split {split!r}; choose one of {', '.join(SPLITS)}")
    key = (id(tokenizer), source, _version(source), split, block_len, n_blocks, seed)
    hit = _memo.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1].clone()
    calibration, evaluation = split_documents(load_documents(source))
    docs = calibration if split == "calibration" else evaluation
    blocks = token_blocks(tokenizer, docs, block_len, n_blocks, seed=seed)
    while len(_memo) >= _MEMO_SIZE:
        _memo.pop(next(iter(_memo)))
    _memo[key] = (tokenizer, blocks)
    return blocks.clone()


def _version(source: str) -> int | None:
    """A local file's modification time, so an edited file is read again."""
    try:
        return Path(source).expanduser().stat().st_mtime_ns
    except (OSError, ValueError, TypeError):
        return None
