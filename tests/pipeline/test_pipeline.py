"""Pipelines: validation at construction, running, failures, checks, round-trip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunegraph.pipeline.pipeline as pipeline_mod
from prunegraph.errors import PassError, PostconditionError, SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, isolated_registry, register_pass
from prunegraph.pipeline.pipeline import Pipeline, register_check
from prunegraph.pipeline.runfolder import atomic_dir


@dataclass(frozen=True)
class Analyze(Pass):
    requires = ("model",)
    provides = ("groups",)
    n: int = 2

    def run(self, state):
        state.groups = [f"g{i}" for i in range(self.n)]
        state.metrics.setdefault("order", []).append("Analyze")
        return PassResult(state, True, {"groups": self.n})


@dataclass(frozen=True)
class Gate(Pass):
    requires = ("model", "groups")
    provides = ("gates",)
    method: Literal["ddp", "hard-concrete"] = "ddp"
    sparsity: float = 0.5

    def run(self, state):
        state.gates = {g: self.sparsity for g in state.groups}
        state.metrics.setdefault("order", []).append("Gate")
        return PassResult(state, True, {"gates": len(state.gates)})


@dataclass(frozen=True)
class Finalize(Pass):
    requires = ("gates",)
    provides = ("plan",)
    round_to: int = 1

    def run(self, state):
        state.plan = dict(state.gates)
        state.metrics.setdefault("order", []).append("Finalize")
        return PassResult(state, True, {})


@dataclass(frozen=True)
class Slice(Pass):
    requires = ("model", "plan")
    provides = ()
    fail: bool = False

    def run(self, state):
        state.metrics.setdefault("order", []).append("Slice")
        if self.fail:
            raise RuntimeError("index out of range while slicing")
        return PassResult(state, False, {"sliced": len(state.plan)})


@dataclass(frozen=True)
class Save(Pass):
    """Writes a model folder atomically and fails half-way when asked."""

    requires = ("model",)
    fail_after: int = -1

    def run(self, state):
        with atomic_dir(state.run_dir / "model") as tmp:
            for i in range(3):
                if i == self.fail_after:
                    raise OSError("disk full")
                (tmp / f"shard{i}.bin").write_bytes(b"x" * 10)
        return PassResult(state, True, {"shards": 3})


ALL = (Analyze, Gate, Finalize, Slice, Save)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(pipeline_mod, "_CHECKS", {})
    with isolated_registry(empty=True):
        for cls in ALL:
            register_pass(cls)
        yield


def full():
    return Pipeline([Analyze(), Gate(sparsity=0.25), Finalize(round_to=8), Slice()])


# ------------------------------------------------------------------------------- construction


def test_missing_provider_is_an_error_at_construction_with_the_fix(registry):
    with pytest.raises(SpecError) as info:
        Pipeline([Analyze(), Slice()])
    msg = str(info.value)
    assert "pass 1 (Slice) requires 'plan'" in msg
    assert "add `Finalize` before Slice" in msg


def test_wrong_order_suggests_moving(registry):
    with pytest.raises(SpecError, match=r"pass 0 \(Gate\) requires 'groups'.*move Analyze before "
                                        r"Gate"):
        Pipeline([Gate(), Analyze()])


def test_initial_keys_matter(registry):
    with pytest.raises(SpecError, match=r"requires 'model'.*available: nothing"):
        Pipeline([Analyze()], initial=())
    Pipeline([Analyze()], initial=("model",))


def test_class_instead_of_instance(registry):
    with pytest.raises(SpecError, match="forget the parentheses"):
        Pipeline([Analyze])  # type: ignore[list-item]


# ------------------------------------------------------------------------------------ running


def test_run_in_order_and_record_metrics(registry):
    state = full().run(State(model="m", tokenizer=None), progress=False)
    assert state.metrics["order"] == ["Analyze", "Gate", "Finalize", "Slice"]
    records = state.metrics["passes"]
    assert [r["name"] for r in records] == ["Analyze", "Gate", "Finalize", "Slice"]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert records[0]["stats"] == {"groups": 2} and records[3]["modified"] is False
    assert records[3]["stats"] == {"sliced": 2}
    assert all(r["seconds"] >= 0 for r in records)
    assert state.plan == {"g0": 0.25, "g1": 0.25}


def test_progress_lines(registry, capsys):
    full().run(State(model="m", tokenizer=None), progress=True)
    err = capsys.readouterr().err
    assert "[1/4] Analyze done in" in err and "(groups=2)" in err and "[4/4] Slice" in err


def test_missing_initial_state_fails_before_running(registry):
    with pytest.raises(SpecError, match=r"initial state to hold 'tokenizer'"):
        full().run(State(model="m"), progress=False)


def test_failure_names_passes_already_run(registry):
    p = Pipeline([Analyze(), Gate(), Finalize(), Slice(fail=True)])
    state = State(model="m", tokenizer=None)
    with pytest.raises(PassError) as info:
        p.run(state, progress=False)
    msg = str(info.value)
    assert "stopped at pass 3 (Slice)" in msg
    assert "index out of range while slicing" in msg
    assert "passes already run: Analyze, Gate, Finalize." in msg
    assert isinstance(info.value.__cause__, PassError)
    assert isinstance(info.value.__cause__.__cause__, RuntimeError)
    assert state.metrics["passes"][-1]["error"].startswith("PassError")


def test_invariant_checks_run_between_passes_when_enabled(registry):
    seen = []

    @register_check("groups-nonempty", needs=("groups",))
    def _check(state):
        seen.append(len(state.metrics["passes"]))
        if not state.groups:
            raise ValueError("no groups")

    full().run(State(model="m", tokenizer=None), progress=False, checks=False)
    assert seen == []
    full().run(State(model="m", tokenizer=None), progress=False, checks=True)
    assert seen == [0, 1, 2, 3]  # after every pass from Analyze on (metrics appended after)
    bad = Pipeline([Analyze(n=0), Gate()])
    with pytest.raises(PassError, match=r"invariant check 'groups-nonempty' failed after pass "
                                        r"Analyze: ValueError: no groups") as info:
        bad.run(State(model="m", tokenizer=None), progress=False, checks=True)
    assert isinstance(info.value.__cause__, PostconditionError)


def test_checks_follow_environment(registry, monkeypatch):
    calls = []
    register_check("count")(lambda state: calls.append(1))
    monkeypatch.setenv("PRUNEGRAPH_CHECKS", "1")
    Pipeline([Analyze()]).run(State(model="m", tokenizer=None), progress=False)
    assert calls == [1]
    monkeypatch.setenv("PRUNEGRAPH_CHECKS", "0")
    Pipeline([Analyze()]).run(State(model="m", tokenizer=None), progress=False)
    assert calls == [1]


def test_run_dir_gets_spec_metrics_and_log(registry, tmp_path):
    out = tmp_path / "run"
    state = full().run(State(model="m", tokenizer=None), run_dir=out, progress=False)
    assert state.run_dir == out
    assert yaml.safe_load((out / "spec.yaml").read_text()) == full().to_dict()
    assert json.loads((out / "metrics.json").read_text())["passes"] == state.metrics["passes"]
    log = (out / "log.txt").read_text()
    assert "[3/4] Finalize: done" in log


def test_failing_pipeline_leaves_no_half_written_model(registry, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PassError, match=r"(?s)disk full.*passes already run: Analyze"):
        Pipeline([Analyze(), Save(fail_after=2)]).run(State(model="m", tokenizer=None),
                                                      run_dir=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".prunegraph-run", "log.txt",
                                                     "metrics.json", "spec.yaml"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["passes"][-1]["name"] == "Save" and "disk full" in metrics["passes"][-1]["error"]
    Pipeline([Save()]).run(State(model="m", tokenizer=None), run_dir=out, progress=False)
    assert sorted(p.name for p in (out / "model").iterdir()) == ["shard0.bin", "shard1.bin",
                                                                 "shard2.bin"]


# --------------------------------------------------------------------------------- round-trip


def test_to_dict_resolves_defaults(registry):
    d = Pipeline([Analyze(), Gate()]).to_dict()
    assert d == {"version": 1, "initial": ["model", "tokenizer"], "passes": [
        {"Analyze": {"n": 2}}, {"Gate": {"method": "ddp", "sparsity": 0.5}}]}


def test_from_dict_errors_carry_the_index(registry):
    with pytest.raises(SpecError, match=r"passes\[1\]: unknown pass 'Gat'. Did you mean 'Gate'"):
        Pipeline.from_dict({"passes": [{"Analyze": {}}, {"Gat": {}}]})
    with pytest.raises(SpecError, match=r"passes\[1\]: pass Gate has no parameter 'methd'"):
        Pipeline.from_dict({"passes": ["Analyze", {"Gate": {"methd": "ddp"}}]})
    with pytest.raises(SpecError, match="spec version 9"):
        Pipeline.from_dict({"version": 9, "passes": []})
    with pytest.raises(SpecError, match="one-key mapping"):
        Pipeline.from_dict({"passes": [{"Analyze": {}, "Gate": {}}]})


_ANALYZE = st.builds(Analyze, n=st.integers(0, 64))
_GATE = st.builds(Gate, method=st.sampled_from(["ddp", "hard-concrete"]),
                  sparsity=st.floats(0, 1, allow_nan=False) | st.integers(0, 1))
_FINALIZE = st.builds(Finalize, round_to=st.integers(1, 128))
_SLICE = st.builds(Slice, fail=st.booleans())


@st.composite
def valid_pipelines(draw):
    passes = [draw(_ANALYZE)]
    if draw(st.booleans()):
        passes.append(draw(_GATE))
        if draw(st.booleans()):
            passes.append(draw(_FINALIZE))
            passes.extend(draw(st.lists(_SLICE, max_size=2)))
    passes.extend(draw(st.lists(_ANALYZE, max_size=2)))
    return Pipeline(passes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_pipelines())
def test_round_trip_property(registry, pipe):
    d = pipe.to_dict()
    assert Pipeline.from_dict(d) == pipe
    assert Pipeline.from_dict(yaml.safe_load(yaml.safe_dump(d))) == pipe
    assert Pipeline.from_dict(json.loads(json.dumps(d))) == pipe
