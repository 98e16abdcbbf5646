"""Specs: YAML/TOML/dict through one schema, overrides, the implicit Load, the CLI."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph.cli import run_command as run_cli
from prunegraph.errors import SpecError
from prunegraph.pipeline.contract import Pass, PassResult, State, isolated_registry, register_pass
from prunegraph.pipeline.load import Load
from prunegraph.pipeline.spec import Spec, load_spec, parse_value

RAN: list[str] = []


@dataclass(frozen=True)
class Source(Pass):
    """Stands in for Load without touching transformers."""

    provides = ("model", "tokenizer")
    width: int = 4

    def run(self, state):
        RAN.append("Source")
        state.model, state.tokenizer = list(range(self.width)), None
        return PassResult(state, True, {"width": self.width})


@dataclass(frozen=True)
class Capture(Pass):
    requires = ("model",)
    provides = ("graph",)

    def run(self, state):
        RAN.append("Capture")
        state.graph = "g"
        return PassResult(state, True, {})


@dataclass(frozen=True)
class Prune(Pass):
    requires = ("model", "graph")
    provides = ("plan",)
    sparsity: float = 0.5
    criterion: Literal["magnitude", "wanda"] = "magnitude"
    layers: tuple[int, ...] = ()

    def run(self, state):
        RAN.append("Prune")
        state.plan = {"kept": round(len(state.model) * (1 - self.sparsity))}
        return PassResult(state, True, dict(state.plan))


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Only Load and the passes above are registered; the CLI's plugin loading is recorded."""
    RAN.clear()
    plugin_loads = []
    monkeypatch.setattr(run_cli, "load_plugins", lambda: plugin_loads.append(1))
    with isolated_registry(empty=True):
        for cls in (Load, Source, Capture, Prune):
            register_pass(cls)
        yield plugin_loads


def write(tmp_path, text, name="pipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
seed: 3
passes:
  - Source: {width: 10}
  - Capture
  - Prune: {criterion: wanda, sparsity: 0.2}
"""


# ----------------------------------------------------------------------------------- loading


def test_load_yaml(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.seed == 3 and spec.model is None
    assert spec.pipeline.passes == (Source(width=10), Capture(),
                                    Prune(criterion="wanda", sparsity=0.2))
    assert RAN == []  # loading never runs anything


def test_entry_forms(tmp_path):
    spec = load_spec({"passes": ["Source", {"Capture": None}, {"Prune": {}}]})
    assert spec.pipeline.passes == (Source(), Capture(), Prune())


def test_toml_is_the_same_schema(tmp_path):
    path = write(tmp_path, 'seed = 3\npasses = [{Source = {width = 10}}, "Capture", '
                           '{Prune = {criterion = "wanda", sparsity = 0.2}}]\n', "pipe.toml")
    assert load_spec(path) == load_spec(write(tmp_path, GOOD))


def test_yaml12_floats():
    assert parse_value("1e-3") == 0.001 and parse_value("wanda") == "wanda"
    assert parse_value("[1, 2]") == [1, 2] and parse_value("true") is True


# ------------------------------------------------------------------------------------ errors


def test_unknown_pass_has_nearest_names_path_and_index(tmp_path):
    path = write(tmp_path, "passes:\n  - Source\n  - Captrue\n")
    with pytest.raises(SpecError, match=rf"{path}: passes\[1\]: unknown pass 'Captrue'. "
                                        r"Did you mean 'Capture'"):
        load_spec(path)


def test_unknown_param_has_nearest_param_names(tmp_path):
    path = write(tmp_path, "passes:\n  - Source\n  - Capture\n  - Prune: {sparsty: 0.3}\n")
    with pytest.raises(SpecError, match=rf"{path}: passes\[2\]: pass Prune has no parameter "
                                        r"'sparsty'. Did you mean 'sparsity'\?"):
        load_spec(path)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("{sparsity: 'high'}", r"parameter 'sparsity' expects float, got str 'high'"),
        ("{sparsity: [0.1]}", r"parameter 'sparsity' expects float, got list \[0.1\]"),
        ("{layers: 3}", r"parameter 'layers' expects tuple\[int, \.\.\.\], got int 3"),
        ("{criterion: l1}", r"parameter 'criterion' expects 'magnitude' \| 'wanda', got str 'l1'"),
        ("[0.3]", r"parameters of pass Prune must be a mapping, got list \[0.3\]"),
    ],
)
def test_type_errors_name_path_index_pass_param_type_value(tmp_path, params, expected):
    path = write(tmp_path, f"passes:\n  - Source\n  - Capture\n  - Prune: {params}\n")
    with pytest.raises(SpecError, match=rf"{path}: passes\[2\]: .*{expected}"):
        load_spec(path)


def test_ordering_error_names_the_fix(tmp_path):
    path = write(tmp_path, "passes:\n  - Source\n  - Prune\n")
    with pytest.raises(SpecError, match=r"pass 1 \(Prune\) requires 'graph'.*add `Capture` "
                                        r"before Prune"):
        load_spec(path)


def test_no_model_hint(tmp_path):
    with pytest.raises(SpecError, match=r"add `Load` or `Source` before Capture.*top-level "
                                        r"`model:`"):
        load_spec({"passes": ["Capture"]})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("passes: [Source\n", r":2:1: invalid YAML"),
        ("", r"is empty"),
        ("- Source\n", r"a spec must be a mapping"),
        ("seed: 0\n", r"no 'passes' list"),
        ("sede: 0\npasses: []\n", r"unknown top-level key 'sede'. Did you mean 'seed'\?"),
        ("seed: '1'\npasses: []\n", r"top-level 'seed' expects int, got str '1'"),
        ("seed: true\npasses: []\n", r"top-level 'seed' expects int, got bool True"),
        ("version: 2\npasses: []\n", r"spec version 2 is not supported"),
        ("model: random:llama\ninitial: [model]\npasses: []\n",
         r"'initial' lists state keys .* loads its model"),
        ("passes:\n  - {Source: {}, Capture: {}}\n", r"passes\[0\]: a pass entry must be"),
    ],
)
def test_file_level_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError, match=rf"^{path}.*{expected}"):
        load_spec(path)


def test_missing_file():
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("/nonexistent/pipe.yaml")


# --------------------------------------------------------------------------------- overrides


def test_overrides_by_index_name_and_top_level(tmp_path):
    path = write(tmp_path, GOOD)
    spec = load_spec(path, overrides=["passes.2.sparsity=0.3", "Source.width=8", "seed=1",
                                      "Prune.layers=[1, 2]"])
    assert spec.pipeline.passes[2] == Prune(criterion="wanda", sparsity=0.3, layers=(1, 2))
    assert spec.pipeline.passes[0] == Source(width=8) and spec.seed == 1
    assert spec != load_spec(path)


def test_override_values_parse_as_yaml(tmp_path):
    spec = load_spec(write(tmp_path, GOOD), overrides=["Prune.sparsity=1e-3"])
    assert spec.pipeline.passes[2].sparsity == 0.001


def test_override_of_a_bare_entry_fills_params(tmp_path):
    spec = load_spec({"passes": ["Source", "Capture", "Prune"]}, overrides=["Prune.sparsity=0.25"])
    assert spec.pipeline.passes[2] == Prune(sparsity=0.25)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("passes.2.sparsity=abc", r"expects float, got str 'abc'\n  \(after --set "
                                  r"passes.2.sparsity=abc\)"),
        ("passes.2.sparsty=0.1", r"no parameter 'sparsty'. Did you mean 'sparsity'"),
        ("passes.7.sparsity=0.1", r"there are 3 passes \(indices 0 to 2\)"),
        ("passes.x.sparsity=0.1", r"write passes.INDEX.PARAM=VALUE"),
        ("Prnue.sparsity=0.1", r"no pass or top-level key 'Prnue'.*Did you mean 'Prune'"),
        ("Prune=0.1", r"write Prune.PARAM=VALUE"),
        ("seed.x=1", r"'seed' is a top-level value"),
        ("sparsity", r"expected key=value"),
        ("model=[1]", r"top-level 'model' expects str or null, got list \[1\]"),
    ],
)
def test_override_errors(tmp_path, override, expected):
    with pytest.raises(SpecError, match=expected):
        load_spec(write(tmp_path, GOOD), overrides=[override])


def test_override_of_a_pass_missing_from_the_spec():
    with pytest.raises(SpecError, match=r"pass Prune is not in the spec; add it to `passes`"):
        load_spec({"passes": ["Source"]}, overrides=["Prune.sparsity=0.1"])


def test_ambiguous_pass_name_asks_for_index():
    data = {"passes": ["Source", "Capture", "Prune", "Capture"]}
    with pytest.raises(SpecError, match=r"pass Capture appears at indices 1, 3; use "
                                        r"passes.INDEX.foo"):
        load_spec(data, overrides=["Capture.foo=1"])


def test_overrides_do_not_mutate_the_input():
    data = {"passes": ["Source", "Capture", {"Prune": {"sparsity": 0.5}}]}
    load_spec(data, overrides=["Prune.sparsity=0.1"])
    assert data["passes"][2] == {"Prune": {"sparsity": 0.5}}


# ---------------------------------------------------------------------------- implicit Load


def test_top_level_model_becomes_a_first_load():
    spec = load_spec({"model": "random:llama", "passes": ["Capture"]})
    assert spec.pipeline.passes == (Load(model="random:llama"), Capture())
    assert spec.to_dict()["passes"][0] == {"Load": {"model": "random:llama", "dtype": "float32",
                                                    "device": "auto"}}


def test_model_override_and_load_filled_from_top_level():
    spec = load_spec({"model": "random:llama", "passes": [{"Load": {"dtype": "bfloat16"}}]},
                     overrides=["model=random:qwen3"])
    assert spec.pipeline.passes == (Load(model="random:qwen3", dtype="bfloat16"),)


def test_conflicting_models_are_refused():
    with pytest.raises(SpecError, match="disagree; keep one of them"):
        load_spec({"model": "a", "passes": [{"Load": {"model": "b"}}]})


def test_top_level_device_goes_to_the_load_and_survives_a_round_trip():
    spec = load_spec({"model": "random:llama", "device": "cpu", "passes": ["Capture"]})
    assert spec.pipeline.passes[0] == Load(model="random:llama", device="cpu")
    again = load_spec(spec.to_dict())
    assert again.pipeline.passes == spec.pipeline.passes and again.device == "cpu"
    explicit = load_spec({"device": "cpu", "passes": [{"Load": {"model": "random:llama"}}]})
    assert explicit.pipeline.passes[0].device == "cpu"
    state = spec.pipeline.passes[0](State()).state
    assert next(state.model.parameters()).device.type == "cpu"
    overridden = load_spec({"model": "random:llama", "passes": []}, overrides=["device=cpu"])
    assert overridden.pipeline.passes[0].device == "cpu"


@pytest.mark.parametrize("data, message", [
    ({"model": "a", "device": "cpu", "passes": [{"Load": {"device": "cuda"}}]},
     "top-level device 'cpu' and passes\\[0\\] Load\\(device='cuda'\\) disagree"),
    ({"device": "cpu", "passes": ["Source"]}, "the spec loads no model"),
    ({"model": "a", "device": "gpu0", "passes": []}, "'gpu0' is not a device"),
])
def test_bad_devices_are_refused_before_loading(data, message):
    with pytest.raises(SpecError, match=message):
        load_spec(data)


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match="sees no CUDA GPU here; use device: auto"):
        load_spec({"model": "random:llama", "device": "cuda", "passes": []})


def test_indices_in_errors_count_file_entries_not_the_implicit_load(tmp_path):
    path = write(tmp_path, "model: random:llama\npasses:\n  - Prune\n")
    with pytest.raises(SpecError, match=r"pass 0 \(Prune\) requires 'graph'"):
        load_spec(path)


# -------------------------------------------------------------------------------- round-trip


@st.composite
def raw_specs(draw):
    passes = [{"Source": {"width": draw(st.integers(0, 100))}} if draw(st.booleans())
              else "Source"]
    if draw(st.booleans()):
        passes.append("Capture")
        for _ in range(draw(st.integers(0, 2))):
            params = {}
            if draw(st.booleans()):
                params["sparsity"] = draw(st.floats(0, 1, allow_nan=False) | st.integers(0, 1))
            if draw(st.booleans()):
                params["criterion"] = draw(st.sampled_from(["magnitude", "wanda"]))
            if draw(st.booleans()):
                params["layers"] = draw(st.lists(st.integers(0, 40), max_size=4))
            passes.append({"Prune": params} if params or draw(st.booleans()) else "Prune")
    data = {"passes": passes}
    if draw(st.booleans()):
        data["seed"] = draw(st.integers(0, 2**31))
    if draw(st.booleans()):
        data["model"] = draw(st.sampled_from(["random:llama", "smollm2-135m"]))
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_specs())
def test_round_trip_property(data):
    spec = load_spec(data)
    resolved = spec.to_dict()
    assert load_spec(resolved) == spec
    assert load_spec(yaml.safe_load(yaml.safe_dump(resolved))) == spec
    assert load_spec(json.loads(json.dumps(resolved))).to_dict() == resolved
    assert all(isinstance(next(iter(e.values())), dict) for e in resolved["passes"])


# ------------------------------------------------------------------------------------- CLI


def cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run_cli._configure_run(sub.add_parser("run"))
    run_cli._configure_passes(sub.add_parser("passes"))
    args = parser.parse_args(argv)
    return {"run": run_cli.run_command, "passes": run_cli.passes_command}[args.command](args)


def test_cli_run_writes_the_run_folder(tmp_path, capsys, registry):
    path = write(tmp_path, GOOD)
    out = tmp_path / "out"
    assert cli(["run", str(path), "--out", str(out), "--set", "Prune.sparsity=0.5"]) == 0
    assert registry == [1]  # plugins are loaded before pass names are resolved
    stdout = capsys.readouterr().out
    assert "2. Prune(sparsity=0.5, criterion='wanda', layers=[])" in stdout
    assert f"results in {out}" in stdout
    assert RAN == ["Source", "Capture", "Prune"]
    resolved = yaml.safe_load((out / "spec.yaml").read_text())
    assert resolved["passes"][2] == {"Prune": {"sparsity": 0.5, "criterion": "wanda", "layers": []}}
    assert load_spec(out / "spec.yaml") == load_spec(path, overrides=["Prune.sparsity=0.5"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["name"] for p in metrics["passes"]] == ["Source", "Capture", "Prune"]
    assert metrics["passes"][2]["stats"] == {"kept": 5}
    assert "[3/3] Prune: done" in (out / "log.txt").read_text()


def test_cli_bad_spec_fails_before_anything_runs_or_is_written(tmp_path):
    path = write(tmp_path, GOOD)
    out = tmp_path / "out"
    with pytest.raises(SpecError, match="expects float"):
        cli(["run", str(path), "--out", str(out), "--set", "Prune.sparsity=x"])
    assert RAN == [] and not out.exists()


def test_cli_refuses_foreign_out_before_running(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(SpecError, match="--overwrite"):
        cli(["run", str(write(tmp_path, GOOD)), "--out", str(out)])
    assert RAN == [] and (out / "notes.txt").read_text() == "keep"
    assert cli(["run", str(write(tmp_path, GOOD)), "--out", str(out), "--overwrite",
                "--no-progress"]) == 0
    assert not (out / "notes.txt").exists()


def test_cli_passes_lists_params_defaults_and_contract(capsys):
    assert cli(["passes"]) == 0
    text = capsys.readouterr().out
    assert "Prune" in text and "sparsity: float = 0.5" in text
    assert "criterion: 'magnitude' | 'wanda' = 'magnitude'" in text
    assert "requires: model, graph    provides: plan" in text
    assert "Load" in text and "model: str (required)" in text
    assert cli(["passes", "Source"]) == 0
    assert "Stands in for Load" in capsys.readouterr().out
    with pytest.raises(SpecError, match="Did you mean 'Prune'"):
        cli(["passes", "Prnue"])


def test_spec_is_frozen_and_compares_without_source(tmp_path):
    a = load_spec(write(tmp_path, GOOD))
    b = load_spec(yaml.safe_load(GOOD))
    assert a == b and a.source != b.source
    assert isinstance(a, Spec)


def test_nested_overrides_change_one_training_setting():
    from prunegraph.pipeline.spec import apply_overrides

    data = {"passes": ["Analyze", {"Train": {"train": {"steps": 5, "batch_size": 3}}}]}
    out = apply_overrides(data, ["Train.train.steps=7", "passes.1.train.block_len=16"])
    assert out["passes"][1] == {"Train": {"train": {"steps": 7, "batch_size": 3, "block_len": 16}}}
    assert data["passes"][1]["Train"]["train"]["steps"] == 5
    with pytest.raises(SpecError, match=r"train.steps is 7, not a mapping"):
        apply_overrides(out, ["Train.train.steps.x=1"])
