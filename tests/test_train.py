"""The Train pass: frozen weights, target sparsity reached, exact resume, logs and plots,
the same loop for dense and MoE models and for both families (PrunePath's run of the same loop
is tested in test_prunepath.py)."""

from __future__ import annotations

import json

import pytest
import torch

from _gate_fixtures import corpus, gated_state, one_thread  # noqa: F401
from prunegraph.errors import SpecError
from prunegraph.pass_infra import State
from prunegraph.passes.train import Train, TrainingHalted, lr_factor


def _train(state: State, run_dir, **kw):
    state.run_dir = run_dir
    return Train(**{"batch_size": 2, "block_len": 32, "warmup": 2, **kw})(state)


def test_short_run_reaches_target_and_leaves_weights_alone(tmp_path, corpus):
    state = gated_state("llama", sparsity=0.3, lr=0.1)
    weights = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    result = _train(state, tmp_path, steps=30, source=corpus, checkpoint_every=10)
    fam = state.gate_family
    assert all(not p.requires_grad for p in state.model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in state.model.named_parameters())
    assert result.stats["achieved_sparsity"] >= fam.target_sparsity() - 0.02
    assert result.stats["steps_to_target"] is not None
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert {"loss", "ce", "kl", "achieved_sparsity", "expected_sparsity", "l1_params",
            "mu", "lr"} <= set(lines[0])
    for plot in ("loss.png", "sparsity.png", "kept_per_layer.png", "head_gates.png"):
        assert (tmp_path / "train" / plot).stat().st_size > 1000
    # the gated model now runs with the trained values
    assert all(torch.equal(state.gates.values[n].detach(), v)
               for n, v in state.trained_gates.items())


@pytest.mark.parametrize("family", ["ddp", "hard_concrete"])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, corpus, family):
    kw = dict(steps=6, checkpoint_every=2, source=corpus, plots=False)
    full = gated_state("llama", family=family)
    _train(full, tmp_path / "a", **kw)
    first = gated_state("llama", family=family)
    with pytest.raises(TrainingHalted, match="resume"):
        _train(first, tmp_path / "b", halt_after=3, **kw)
    again = gated_state("llama", family=family)          # a fresh process: new model, new gates
    result = _train(again, tmp_path / "b", **kw)
    assert result.stats["resumed_at"] == 3
    for name, value in full.trained_gates.items():
        assert torch.equal(again.trained_gates[name], value)
    for key in ("l1", "l2", "l3"):
        assert torch.equal(getattr(again.gate_family, key), getattr(full.gate_family, key))
    a = (tmp_path / "a" / "train" / "metrics.jsonl").read_text()
    b = (tmp_path / "b" / "train" / "metrics.jsonl").read_text()
    assert a == b


def test_resume_refuses_other_settings(tmp_path, corpus):
    state = gated_state("llama")
    _train(state, tmp_path, steps=2, checkpoint_every=1, source=corpus, plots=False)
    other = gated_state("llama", sparsity=0.4)
    with pytest.raises(Exception, match="other settings"):
        _train(other, tmp_path, steps=2, checkpoint_every=1, source=corpus, plots=False)


def test_moe_per_expert_channels_train(tmp_path, corpus):
    state = gated_state("qwen3-moe", sparsity=0.3, lr=0.1)
    result = _train(state, tmp_path, steps=4, source=corpus, plots=False)
    shapes = {n: tuple(v.shape) for n, v in state.trained_gates.items()}
    assert any(len(s) == 2 for s in shapes.values())
    assert result.stats["tokens"] == 4 * 2 * 32


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kw", [dict(steps=0), dict(batch_size=0), dict(kd_weight=-1.0),
                                dict(halt_after=0)])
def test_bad_parameters_fail_at_construction(kw):
    with pytest.raises(SpecError):
        Train(**kw)


def test_halt_after_needs_somewhere_to_checkpoint(corpus):
    state = gated_state("llama")
    with pytest.raises(SpecError, match="halt_after needs a run folder or checkpoint_dir"):
        Train(steps=2, halt_after=1, source=corpus)(state)
    assert all(p.requires_grad for p in state.model.parameters())  # refused before any work


def test_checkpoint_dir_survives_a_replaced_run_folder(tmp_path, corpus):
    import shutil

    kw = dict(steps=4, checkpoint_every=1, source=corpus, plots=False,
              checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(TrainingHalted):
        _train(gated_state("llama"), tmp_path / "run", halt_after=2, **kw)
    shutil.rmtree(tmp_path / "run")                   # `prunegraph run` replaces its folder
    result = _train(gated_state("llama"), tmp_path / "run", **kw)
    assert result.stats["resumed_at"] == 2
    assert (tmp_path / "run" / "train" / "metrics.jsonl").read_text().count("\n") == 4
