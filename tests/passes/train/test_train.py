"""The Train pass: frozen weights, target sparsity reached, exact resume, logs and plots,
the same loop for dense and MoE models and for both families (PrunePath's run of the same loop
is tested in test_prunepath.py)."""

from __future__ import annotations

import json

import pytest
import torch
from _gate_fixtures import corpus, gated_state, ids, one_thread  # noqa: F401

from prunegraph.errors import SpecError
from prunegraph.passes.train import Train, TrainingHalted, lr_factor
from prunegraph.pipeline.contract import State


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


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe"])
def test_polish_trains_under_the_finalize_choice(tmp_path, corpus, arch):
    """The polish fixes Finalize's choice on the gates the search ended with; the kept gates
    still move, the removed ones end at 0, Finalize then keeps that set, sliced equals gated."""
    from prunegraph.passes._widths import resolve_widths
    from prunegraph.passes.finalize import Finalize
    from prunegraph.passes.slice import Slice

    state = gated_state(arch, sparsity=0.3, lr=0.1)
    seen = []
    fam = state.gate_family
    forward_values = fam.forward_values
    fam.forward_values = lambda *a: seen.append(forward_values(*a)) or seen[-1]
    _train(state, tmp_path, steps=12, polish_steps=4, source=corpus)
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["penalty"] != 0.0 for x in lines[1:8])          # step 1: multipliers at 0
    assert all(x["penalty"] == 0.0 for x in lines[8:])
    assert [x["polish"] for x in lines] == [False] * 8 + [True] * 4
    assert (tmp_path / "train" / "sparsity.png").stat().st_size > 1000
    trained = state.trained_gates
    Finalize()(state)
    planned = state.plan.gate_values()
    at_start = fam.finalize({n: v.detach().float() for n, v in seen[8].items()}, mode="topk",
                            model=state.model).gate_values()
    for name, value in trained.items():
        assert torch.equal(value != 0, planned[name] != 0)
        assert torch.equal(value != 0, at_start[name] != 0)
    # the budget holds up to one move of the coarsest group (auto: multiples of the device's width)
    widths = resolve_widths(fam.groups, state.model, "auto")
    pool = sum(g.params_per_unit * trained[g.name].numel() for g in fam.groups)
    move = max(widths.multiples.get(g.name, 1) * g.params_per_unit * trained[g.name].numel()
               / g.size for g in fam.groups) / pool
    assert -0.02 < lines[-1]["achieved_sparsity"] - fam.target_sparsity() < 0.02 + move
    assert any(not torch.equal(seen[8][n].detach(), seen[-1][n].detach()) for n in trained)
    x = ids()
    with torch.no_grad():
        gated = state.model(x).logits
    Slice()(state)
    with torch.no_grad():
        torch.testing.assert_close(state.model(x).logits, gated, atol=1e-5, rtol=1e-5)


def test_resume_inside_the_polish_equals_uninterrupted(tmp_path, corpus):
    kw = dict(steps=8, polish_steps=4, checkpoint_every=2, source=corpus, plots=False)
    full = gated_state("llama", lr=0.1)
    _train(full, tmp_path / "a", **kw)
    with pytest.raises(TrainingHalted):
        _train(gated_state("llama", lr=0.1), tmp_path / "b", halt_after=5, **kw)
    again = gated_state("llama", lr=0.1)
    assert _train(again, tmp_path / "b", **kw).stats["resumed_at"] == 5
    for name, value in full.trained_gates.items():
        assert torch.equal(again.trained_gates[name], value)
    assert ((tmp_path / "a" / "train" / "metrics.jsonl").read_text()
            == (tmp_path / "b" / "train" / "metrics.jsonl").read_text())


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


def test_lr_schedule_restarts_for_the_polish():
    assert lr_factor(45, 100, 10, restart=80) == pytest.approx(0.5)   # first cosine ends at 80
    assert lr_factor(79, 100, 10, restart=80) == pytest.approx(0.0, abs=3e-3)
    assert lr_factor(80, 100, 10, restart=80) == pytest.approx(1.0)
    assert lr_factor(90, 100, 10, restart=80) == pytest.approx(0.5)
    assert lr_factor(90, 100, 10, "constant", restart=80) == 1.0


@pytest.mark.parametrize("kw", [dict(steps=0), dict(batch_size=0), dict(kd_weight=-1.0),
                                dict(halt_after=0), dict(steps=10, polish_steps=10),
                                dict(polish_steps=-1)])
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
