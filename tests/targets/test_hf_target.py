"""The HF checkpoint as a target: the ``Save`` pass (the name specs use) and
``prunegraph export hf`` write folders that ``from_pretrained`` rebuilds, from one declaration."""

from __future__ import annotations

import json

import pytest
import torch
from _pruning_fixtures import fresh, input_ids, logits, random_plan

from prunegraph import from_pretrained
from prunegraph.cli.main import main
from prunegraph.errors import PreconditionError
from prunegraph.pipeline.contract import State, get_pass_class
from prunegraph.pipeline.plugins import load_plugins
from prunegraph.plan.checkpoint import save_pruned, saved_plan
from prunegraph.plan.slicing import apply_plan
from prunegraph.targets.hf import Save, hf_target

load_plugins()


def _pruned(seed: int = 5):
    plan = random_plan("llama", seed)
    model = fresh("llama")
    apply_plan(model, plan)
    return model, plan


def test_save_keeps_its_spec_name_and_contract(tmp_path):
    from prunegraph.passes import Save as from_passes
    from prunegraph.pipeline.spec import load_spec

    assert get_pass_class("Save") is Save is from_passes  # importable where it was
    assert (Save.requires, Save.provides) == (("model", "plan"), ("saved_model",))
    spec = tmp_path / "s.yaml"
    spec.write_text("model: random:llama\npasses:\n  - Analyze\n  - Prune: {sparsity: 0.3}\n"
                    "  - Slice\n  - Save: {path: out}\n")
    assert load_spec(spec).to_dict()["passes"][-1] == {"Save": {"path": "out"}}


def test_save_pass_writes_a_reloadable_model_into_the_run_folder(tmp_path):
    model, plan = _pruned()
    result = Save()(State(model=model, plan=plan, tokenizer=None, run_dir=tmp_path))
    path = tmp_path / "model"
    assert result.state.saved_model == str(path) == result.state.metrics["model_dir"]
    assert result.stats == {"path": str(path)}
    ids = input_ids("llama")
    torch.testing.assert_close(logits(from_pretrained(path), ids), logits(model, ids),
                               rtol=0, atol=1e-6)
    with pytest.raises(PreconditionError, match="requires 'plan'"):
        Save()(State(model=model, run_dir=tmp_path))


def test_export_hf_copies_a_run_folder_model(tmp_path, capsys):
    model, plan = _pruned(6)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".prunegraph-run").write_text("")
    save_pruned(model, plan, run / "model")
    out = tmp_path / "copy"
    assert main(["export", "hf", str(run), str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(out)}
    back = from_pretrained(out)
    assert saved_plan(out).to_dict() == plan.to_dict()
    ids = input_ids("llama", 1)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=1e-6)
    assert main(["export", "hf", "random:nope", str(out)]) == 2  # refused before loading
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "hf", str(run), str(out), "--overwrite"]) == 0


def test_export_hf_needs_a_plan(tmp_path, capsys):
    assert main(["export", "hf", "random:llama", str(tmp_path / "m")]) == 2
    assert "needs 'plan'" in capsys.readouterr().err
    with pytest.raises(PreconditionError, match="needs 'plan'"):
        hf_target(fresh("llama"), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
