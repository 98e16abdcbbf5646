"""The training configuration: Train's flat parameters are its fields, PrunePath nests it under
``train`` (merged onto its own defaults, round-tripping through specs, its former flat names read
with a warning), and the loop honours ``lr_schedule`` and ``autocast``."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from _gate_fixtures import corpus, gated_state, one_thread  # noqa: F401

from prunegraph.errors import SpecError
from prunegraph.passes.prunepath.training import TRAINING, PrunePath
from prunegraph.passes.train import Train, TrainConfig
from prunegraph.pipeline.pipeline import pass_from_entry


def test_train_parameters_are_the_configuration_fields_plus_the_objective():
    names = [f.name for f in Train.param_fields()]
    assert names == [*TrainConfig.field_names(), "kd_weight", "polish_steps", "round_to"]
    defaults = Train.param_defaults()
    assert {k: defaults[k] for k in TrainConfig.field_names()} == TrainConfig().to_dict()
    train = Train(steps=30, batch_size=2, lr_schedule="constant", checkpoint_dir="ckpt")
    assert train.config == TrainConfig(steps=30, batch_size=2, lr_schedule="constant",
                                       checkpoint_dir="ckpt")
    assert Train.from_params(train.params()) == train


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=0), "pass Train: batch_size must be >= 1"),
    (dict(lr_schedule="linear"), "'cosine' | 'constant'"),
    (dict(autocast="fp16"), "'auto' | 'bf16' | 'off'"),
])
def test_train_refuses_bad_settings(kw, match):
    with pytest.raises(SpecError, match=match):
        Train(**kw)


def test_a_mapping_is_merged_onto_the_passes_defaults():
    p = PrunePath(train={"batch_size": 8})
    assert p.train == dataclasses.replace(TRAINING, batch_size=8)
    assert p.train.warmup == 0 and p.train.keep_checkpoint is False    # PrunePath's defaults
    assert PrunePath().train == TRAINING
    given = TrainConfig(steps=60)
    assert PrunePath(train=given).train is given                         # taken as it is


@pytest.mark.parametrize("train, match", [
    ({"batch_sise": 2}, "PrunePath.train has no setting 'batch_sise'. Did you mean 'batch_size'"),
    ({"steps": "3"}, "PrunePath.train.steps expects int, got str"),
    ({"grad_accum": 0}, "PrunePath.train.grad_accum must be >= 1"),
    ({"steps": 4}, "warmup_steps must lie in \\[0, train.steps\\]"),
    ([1, 2], "must be a mapping"),
])
def test_nested_settings_are_checked_like_parameters(train, match):
    with pytest.raises(SpecError, match=match):
        PrunePath(warmup_steps=5, train=train)


def test_prunepath_spec_round_trips_with_the_nested_configuration():
    p = pass_from_entry({"PrunePath": {"warmup_steps": 3, "train_tau": 0.4,
                                       "train": {"steps": 9, "grad_accum": 2}}})
    assert p.train.steps == 9 and p.train.grad_accum == 2 and p.train.warmup == 0
    spec = p.to_dict()
    assert spec["PrunePath"]["train"] == p.train.to_dict()
    json.dumps(spec)                                                    # plain data
    assert pass_from_entry(spec) == p


def test_former_flat_prunepath_names_are_read_into_train(caplog):
    old = {"warmup_steps": 2, "steps": 3, "batch_size": 2, "lr_warmup": 1,
           "lr_schedule": "constant", "keep_checkpoint": True, "train_tau": 0.4}
    with caplog.at_level(logging.WARNING):
        p = pass_from_entry({"PrunePath": old})
    assert p == PrunePath(warmup_steps=2, train_tau=0.4,
                          train={"steps": 5, "batch_size": 2, "warmup": 1,
                                 "lr_schedule": "constant", "keep_checkpoint": True})
    assert "now sit under `train`" in caplog.text and "steps: 5" in caplog.text
    with pytest.raises(SpecError, match="train.steps twice"):
        pass_from_entry({"PrunePath": {"steps": 3, "train": {"steps": 10}}})


def _lrs(tmp_path, corpus, **kw) -> list[float]:
    state = gated_state("llama", lr=0.1)
    state.run_dir = tmp_path
    Train(steps=6, batch_size=2, block_len=32, warmup=2, source=corpus, plots=False,
          **kw)(state)
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_lr_schedule_constant_keeps_the_gate_rate(tmp_path, corpus):
    const = [r["lr"] for r in _lrs(tmp_path / "c", corpus, lr_schedule="constant")]
    assert const == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.1])
    cosine = [r["lr"] for r in _lrs(tmp_path / "d", corpus)]
    assert cosine[:2] == pytest.approx([0.05, 0.1]) and cosine[-1] < 0.02


def test_autocast_auto_is_float32_on_the_cpu_and_bf16_is_honoured(tmp_path, corpus):
    auto = _lrs(tmp_path / "a", corpus)
    off = _lrs(tmp_path / "o", corpus, autocast="off")
    bf16 = _lrs(tmp_path / "b", corpus, autocast="bf16")
    assert [r["ce"] for r in auto] == [r["ce"] for r in off]
    assert [r["ce"] for r in bf16] != [r["ce"] for r in off]
    assert [r["ce"] for r in bf16] == pytest.approx([r["ce"] for r in off], rel=0.05)


def test_prunegraph_passes_lists_the_nested_settings(capsys):
    from prunegraph.cli.main import main

    assert main(["passes", "PrunePath"]) == 0
    out = capsys.readouterr().out
    assert "train.steps: int = 100" in out and "train.warmup: int = 0" in out  # PrunePath's
    assert "train.autocast: 'auto' | 'bf16' | 'off' = 'auto'" in out
    assert "train: TrainConfig = TrainConfig(steps=100, warmup=0, keep_checkpoint=False, " \
           "plots=False)" in out
