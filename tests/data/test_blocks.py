"""text_blocks: one function for calibration and evaluation token blocks, which every pass that
reads text calls, with the split it must use."""

from __future__ import annotations

import os

import pytest
import torch
from _gate_fixtures import corpus, gated_state, one_thread, write_corpus  # noqa: F401
from _pruning_fixtures import fresh, groups_of
from _tiny_tokenizer import make_tokenizer

import prunegraph.data.blocks as blocks_module
from prunegraph.data.blocks import text_blocks
from prunegraph.data.text import load_documents, split_documents, token_blocks
from prunegraph.errors import PrunegraphError
from prunegraph.pipeline.contract import State


def test_blocks_are_those_of_the_split(corpus):
    tok = make_tokenizer()
    calibration, evaluation = split_documents(load_documents(corpus))
    assert torch.equal(text_blocks(tok, corpus, "calibration", 32, 5),
                       token_blocks(tok, calibration, 32, 5))
    assert torch.equal(text_blocks(tok, corpus, "evaluation", 16, 3, seed=4),
                       token_blocks(tok, evaluation, 16, 3, seed=4))
    assert torch.equal(text_blocks(tok, corpus, "calibration", 32),
                       token_blocks(tok, calibration, 32, None))
    with pytest.raises(PrunegraphError, match="unknown text split 'test'"):
        text_blocks(tok, corpus, "test", 32)


def test_memoised_results_are_copies_and_follow_the_file(tmp_path):
    tok = make_tokenizer()
    path = write_corpus(tmp_path / "c.txt", seed=1)
    first = text_blocks(tok, path, "calibration", 16, 4)
    first.zero_()
    again = text_blocks(tok, path, "calibration", 16, 4)
    assert again.abs().sum() > 0                          # the caller's edit did not leak
    stat = (tmp_path / "c.txt").stat()
    write_corpus(tmp_path / "c.txt", seed=2, words=310)    # the file changes (a second later)
    os.utime(tmp_path / "c.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    other = text_blocks(tok, path, "calibration", 16, 4)
    assert not torch.equal(other, again)


def test_every_pass_reads_text_through_it(monkeypatch, corpus):
    from prunegraph.passes.evaluation.evaluate import Evaluate
    from prunegraph.passes.prune import Prune
    from prunegraph.passes.prunepath.moefy import MoEfy
    from prunegraph.passes.prunepath.training import PrunePath, TauSweep
    from prunegraph.passes.train import Train

    calls = []
    real = blocks_module.text_blocks

    def spy(tokenizer, source, split, block_len, n_blocks=None, **kw):
        calls.append((split, block_len, n_blocks))
        return real(tokenizer, source, split, block_len, n_blocks, **kw)

    monkeypatch.setattr(blocks_module, "text_blocks", spy)
    tok = make_tokenizer()
    state = State(model=fresh("llama"), tokenizer=tok, groups=list(groups_of("llama")))
    Prune(criterion="wanda", sparsity=0.2, calib_blocks=3, block_len=24, source=corpus)(state)
    Evaluate(label="e", ppl_blocks=2, seq_len=20, source=corpus, tasks=[])(state)
    Train(steps=1, batch_size=2, block_len=28, source=corpus, plots=False)(
        gated_state("llama"))
    moe = MoEfy(group_size=12, iters=2)(State(model=fresh("llama"), tokenizer=tok,
                                             groups=list(groups_of("llama")))).state
    PrunePath(warmup_steps=1, train={"steps": 2, "batch_size": 2, "block_len": 12,
                                     "source": corpus})(moe)
    TauSweep(taus=[0.5], ppl_blocks=1, seq_len=14, source=corpus)(moe)
    # Evaluate: the in-domain text, then the out-of-domain one (austen by default); PrunePath:
    # the routers' initial fit (init_blocks=16), held-out probes before and after training
    # (probe_blocks=2 of 512 tokens), the training stream
    assert calls == [("calibration", 24, 3), ("evaluation", 20, 2), ("evaluation", 20, 2),
                     ("calibration", 28, None),
                     ("calibration", 12, 16), ("evaluation", 512, 2), ("calibration", 12, None),
                     ("evaluation", 512, 2),
                     ("evaluation", 14, 1)]
