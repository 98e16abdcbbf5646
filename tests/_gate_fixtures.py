"""Shared helpers for the gate-family, Train and Finalize tests: a tiny corpus, a state with gates."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from _pruning_fixtures import fresh, groups_of
from _tiny_tokenizer import make_tokenizer

from prunegraph.pipeline.contract import State

WORDS = ("the of and to in a is was for on that with as by at from his her it an were are which "
         "this be or has had first new one two their after its who").split()


def write_corpus(path: Path, docs: int = 12, words: int = 300, seed: int = 0) -> str:
    """A small plain-text corpus (paragraph = document) for calibration in tests."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words))
                                for _ in range(docs)) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine are 20x faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path) -> str:
    return write_corpus(tmp_path / "corpus.txt")


def gated_state(arch: str, family: str = "ddp", sparsity: float = 0.3, **gate_kw) -> State:
    from prunegraph.passes.gates.insert import Gate

    state = State(model=fresh(arch), tokenizer=make_tokenizer(), groups=list(groups_of(arch)))
    return Gate(family=family, sparsity=sparsity, **gate_kw)(state).state


def ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
