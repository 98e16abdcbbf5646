"""The target contract: one declaration gives a pass, a ``prunegraph export`` subcommand and a
Python call, all three checking parameters (types, nearest names, ``validate``) and the output
before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch

from prunegraph.cli.main import main
from prunegraph.errors import PreconditionError, SpecError
from prunegraph.pipeline.contract import State, get_pass_class, registered_passes
from prunegraph.pipeline.plugins import load_plugins
from prunegraph.pipeline.targets import isolated_targets, registered_targets, target

load_plugins()  # before any isolated block (see isolated_registry)

CALLS: list[dict] = []


def _positive(params: dict) -> None:
    if params["scale"] <= 0:
        raise SpecError(f"scale must be > 0, got {params['scale']}")


def _declare():
    @target("toy", provides="toy_path", output="toy.json", suffix=".json", validate=_positive)
    def toy(state: State, out: Path, *, overwrite: bool, scale: float = 1.0, upper: bool = True,
            mode: Literal["sum", "max"] = "sum") -> dict:
        """Parameter totals of the model as JSON.

        Args:
            scale: multiplies every total.
            upper: write the keys in upper case.
            mode: how to reduce each parameter.
        """
        CALLS.append({"scale": scale, "upper": upper, "mode": mode, "overwrite": overwrite})
        reduce = torch.sum if mode == "sum" else torch.max
        totals = {(n.upper() if upper else n): float(reduce(p.detach())) * scale
                  for n, p in state.model.named_parameters()}
        out.write_text(json.dumps(totals))
        return {"params": len(totals)}

    return toy


@pytest.fixture
def toy():
    CALLS.clear()
    with isolated_targets():
        yield _declare()
    assert "toy" not in registered_targets() and "ExportToy" not in registered_passes()


def test_declaration_makes_a_checked_pass(toy):
    cls = get_pass_class("ExportToy")
    assert cls is toy.pass_class
    assert (cls.requires, cls.provides) == (("model",), ("toy_path",))
    assert cls().to_dict() == {"ExportToy": {"path": "toy.json", "scale": 1.0, "upper": True,
                                             "mode": "sum"}}
    assert cls(scale=2).scale == 2.0  # ints widen to float, as for every pass
    with pytest.raises(SpecError, match="'scale' expects float"):
        cls(scale="big")
    with pytest.raises(SpecError, match="Did you mean 'scale'"):
        cls.from_params({"scael": 2.0})
    with pytest.raises(SpecError, match="scale must be > 0"):
        cls(scale=-1.0)
    with pytest.raises(SpecError, match=r"must end in \.json"):
        cls(path="toy.txt")
    with pytest.raises(SpecError, match="'mode' expects 'sum' \\| 'max'"):
        cls(mode="mean")


def test_pass_writes_into_the_run_folder_and_records_the_report(toy, tmp_path):
    model = torch.nn.Linear(3, 2)
    result = get_pass_class("ExportToy")(scale=2.0, upper=False)(
        State(model=model, run_dir=tmp_path))
    written = json.loads((tmp_path / "toy.json").read_text())
    assert written["weight"] == pytest.approx(2.0 * float(model.weight.detach().sum()))
    assert result.state.toy_path == str(tmp_path / "toy.json")
    assert result.state.metrics["toy"] == result.stats == {"params": 2}
    assert CALLS == [{"scale": 2.0, "upper": False, "mode": "sum", "overwrite": True}]
    with pytest.raises(PreconditionError, match="requires 'model'"):
        get_pass_class("ExportToy")()(State(run_dir=tmp_path))


def test_command_line_options_come_from_the_declaration(toy, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["export", "toy", "random:llama", str(out), "--scale", "3", "--no-upper",
                 "--mode", "max"]) == 0
    assert json.loads(capsys.readouterr().out) == {"params": len(json.loads(out.read_text()))}
    assert CALLS == [{"scale": 3.0, "upper": False, "mode": "max", "overwrite": False}]
    assert all(k == k.lower() for k in json.loads(out.read_text()))
    assert main(["export", "toy", "random:llama", str(out), "--overwrite"]) == 0
    assert CALLS[-1] == {"scale": 1.0, "upper": True, "mode": "sum", "overwrite": True}


def test_command_line_refuses_bad_input_before_loading(toy, tmp_path, capsys):
    out = tmp_path / "t.json"
    # "random:nope" fails to load: each error below comes before the model is looked at
    assert main(["export", "toy", "random:nope", str(out), "--scale", "-1"]) == 2
    assert "prunegraph export toy: scale must be > 0" in capsys.readouterr().err
    assert main(["export", "toy", "random:nope", str(tmp_path / "t.txt")]) == 2
    assert "must end in .json" in capsys.readouterr().err
    out.write_text("{}")
    assert main(["export", "toy", "random:nope", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "toy", "random:nope", str(tmp_path / "u.json")]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "toy", "random:llama", str(out), "--scael", "2"])
    assert "Did you mean '--scale'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "toy", "random:llama", str(out), "--mode", "mean"])
    assert "invalid choice: 'mean'" in capsys.readouterr().err
    assert CALLS == [] and out.read_text() == "{}"


def test_python_call_checks_like_the_command_line(toy, tmp_path):
    model = torch.nn.Linear(3, 2)
    assert toy(model, tmp_path / "a.json", scale=2) == {"params": 2}
    with pytest.raises(SpecError, match="no parameter 'scael'. Did you mean 'scale'"):
        toy(model, tmp_path / "b.json", scael=2)
    with pytest.raises(SpecError, match="already exists"):
        toy(model, tmp_path / "a.json")
    assert len(CALLS) == 1


def test_needs_are_checked_against_what_the_source_holds(tmp_path):
    with isolated_targets():
        @target("planned", needs=("model", "plan"), provides="planned_path", output="p")
        def planned(state: State, out: Path, *, overwrite: bool) -> dict:
            """Needs a plan."""
            return {}

        assert get_pass_class("ExportPlanned").requires == ("model", "plan")
        with pytest.raises(PreconditionError, match="needs 'plan'"):
            planned(torch.nn.Linear(2, 2), tmp_path / "p")
        (tmp_path / "q").mkdir()
        (tmp_path / "q" / "x").write_text("")
        with pytest.raises(SpecError, match="not empty"):  # folder outputs: nothing overwritten
            planned(torch.nn.Linear(2, 2), tmp_path / "q")


@pytest.mark.parametrize("signature, message", [
    ("state, out, *, overwrite, scale: float", "needs a default"),
    ("state, out, scale: float = 1.0, *, overwrite=False", "keyword-only"),
    ("state, out, *, overwrite, path: str = 'x'", "reserved"),
])
def test_bad_declarations_fail_at_registration(signature, message):
    namespace: dict = {}
    exec(f"def fn({signature}):\n    return {{}}", namespace)
    with isolated_targets(), pytest.raises(TypeError, match=message):
        target("bad", provides="bad_path", output="bad")(namespace["fn"])


def test_the_three_targets_are_declared_once_each():
    targets = registered_targets()
    assert {name: t.pass_name for name, t in targets.items()} == {
        "hf": "Save", "onnx": "ExportONNX", "triton": "ExportTriton"}
    for t in targets.values():
        assert get_pass_class(t.pass_name) is t.pass_class
