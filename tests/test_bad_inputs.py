"""The bad-input catalogue (issue 16): each case fails before the work, in one line that says what
is wrong and how to fix it, with no traceback, and leaves nothing half-written.

Commands run in-process through ``prunegraph``'s ``main`` on tiny random models. "Nothing
written" is checked on the folder each test works in: after a refused command it holds exactly
the inputs the test put there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _pruning_fixtures import fresh, groups_of, random_plan

from prunegraph.cli.main import main
from prunegraph.errors import BudgetError, CheckpointError
from prunegraph.plan.checkpoint import from_pretrained, save_pruned
from prunegraph.plan.slicing import apply_plan

TINY = {"model": "random:llama", "seed": 0, "passes": [
    "Analyze", {"Prune": {"criterion": "magnitude", "sparsity": 0.2}}, "Slice", "Save"]}


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def write_spec(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``prunegraph ARGV``; return its exit code and stderr, checked to be a short message
    without a traceback."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def refused(capsys, root: Path, *argv: str) -> str:
    """The command fails with a one-message error and writes nothing under ``root``."""
    before = listing(root)
    rc, err = cli(capsys, *argv)
    assert rc != 0, err
    head = f"prunegraph {argv[0]}: error: "
    assert head in err, err
    message = err[err.index(head):]
    assert len(message.strip().splitlines()) <= 2, err  # the message (and the --set it followed)
    assert listing(root) == before, "a refused command wrote files"
    return message


@pytest.fixture
def spec(tmp_path):
    return write_spec(tmp_path / "spec.yaml", TINY)


# ---------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1", "1"])
def test_sparsity_out_of_range_names_the_file_and_pass(capsys, tmp_path, spec, value):
    err = refused(capsys, tmp_path, "run", spec, "--out", tmp_path / "out",
                  "--set", f"Prune.sparsity={value}")
    assert str(spec) in err and "pass Prune" in err and "(0, 1)" in err


@pytest.mark.parametrize("text, match", [
    ("model: random:llama\npasses: [Analyse]\n", "unknown pass 'Analyse'. Did you mean 'Analyze'"),
    ("model: random:llama\npasses: [Analyze, {Prune: {sparsty: 0.2}}]\n",
     "has no parameter 'sparsty'. Did you mean 'sparsity'"),
    ("model: random:llama\npasses: [Analyze, {Prune: {sparsity: high}}]\n",
     "parameter 'sparsity' expects float, got str 'high'"),
    ("model: random:llama\npasses: [Analyze, {Prune: {criterion: wand}}]\n",
     "got str 'wand'. Did you mean 'wanda'"),
    ("model: random:llama\npasses: [Prune]\n", "requires 'groups'.*add `Analyze` before Prune"),
    ("", "is empty"),
    ("passes: [Analyze\n", "invalid YAML"),
    ("- Analyze\n", "a spec must be a mapping"),
    ("model: random:llama\npases: [Analyze]\n", "unknown top-level key 'pases'. Did you mean 'passes'"),
])
def test_spec_mistakes(capsys, tmp_path, text, match):
    import re

    path = write_spec(tmp_path / "spec.yaml", text)
    err = refused(capsys, tmp_path, "run", path, "--out", tmp_path / "out")
    assert re.search(match, err), err
    assert str(path) in err


@pytest.mark.parametrize("override, match", [
    ("sparsity=0.3", "Did you mean Prune.sparsity"),
    ("Prune.sparsity", "expected key=value"),
    ("Slice.nope=1", "has no parameter 'nope'"),
    ("passes.9.sparsity=0.3", "there are 4 passes"),
    ("Evaluate.label=x", "pass Evaluate is not in the spec"),
])
def test_set_mistakes(capsys, tmp_path, spec, override, match):
    err = refused(capsys, tmp_path, "run", spec, "--out", tmp_path / "out", "--set", override)
    assert match in err


# ------------------------------------------------------------------------------- budgets


def test_impossible_budget_is_refused_right_after_analyze(capsys, tmp_path, monkeypatch):
    """[Load, Analyze, Evaluate, Prune(0.99)]: the budget fails after Analyze, before Evaluate;
    the error is in log.txt and metrics.json, and the folder is marked failed."""
    data = {"model": "random:llama", "passes": [
        "Analyze", {"Evaluate": {"label": "dense", "ppl_blocks": 1, "seq_len": 16, "tasks": []}},
        {"Prune": {"criterion": "magnitude", "sparsity": 0.99}}]}
    path = write_spec(tmp_path / "spec.yaml", data)
    out = tmp_path / "out"
    rc, err = cli(capsys, "run", path, "--out", out)
    assert rc == 2
    assert "pass 3 (Prune) would fail" in err and "maximum achievable sparsity" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dense" not in metrics and metrics["status"] == "failed"
    assert [r["name"] for r in metrics["passes"]] == ["Load", "Analyze"]
    assert "maximum achievable sparsity" in (out / "log.txt").read_text()
    assert json.loads((out / ".prunegraph-run").read_text())["status"] == "failed"


def test_impossible_budget_is_refused_before_loading_when_a_dense_evaluate_comes_first(
        capsys, tmp_path, monkeypatch):
    """[Load, Evaluate, Analyze, Prune(0.99)]: checked on a meta-device analysis, before the
    model loads and before the run folder exists."""
    from prunegraph.passes import Evaluate

    def never(self, state):
        raise AssertionError("the dense evaluation ran before the budget was checked")

    monkeypatch.setattr(Evaluate, "run", never)
    data = {"model": "random:llama", "passes": [
        {"Evaluate": {"label": "dense", "ppl_blocks": 1, "seq_len": 16, "tasks": []}},
        "Analyze", {"Prune": {"criterion": "magnitude", "sparsity": 0.99}}]}
    path = write_spec(tmp_path / "spec.yaml", data)
    err = refused(capsys, tmp_path, "run", path, "--out", tmp_path / "out")
    assert "before loading the model" in err and "maximum achievable sparsity" in err


def test_round_to_larger_than_every_group_is_refused(capsys, tmp_path, spec):
    """random:llama's MLPs have 96 channels: round_to=128 could only keep them whole and would
    take the whole budget from the attention heads."""
    out = tmp_path / "out"
    rc, err = cli(capsys, "run", spec, "--out", out, "--set", "Prune.round_to=128")
    assert rc == 2
    assert "round_to=128 leaves no smaller size" in err and "model.layers.0.mlp:channels" in err
    assert not (out / "model").exists()
    assert "round_to=128" in (out / "log.txt").read_text()


def test_round_to_blocking_some_groups_is_named():
    from prunegraph.passes._widths import resolve_widths

    groups = list(groups_of("llama"))
    widths = resolve_widths(groups, None, 64)  # 96 channels: 64 is a smaller multiple
    assert widths.multiples and not widths.blocked
    with pytest.raises(BudgetError, match="round_to=96 leaves no smaller size"):
        resolve_widths(groups, None, 96)


# --------------------------------------------------------------------------- checkpoints


def _saved(tmp_path: Path, name: str, seed: int) -> Path:
    plan = random_plan("llama", seed)
    model = fresh("llama")
    apply_plan(model, plan)
    return save_pruned(model, plan, tmp_path / name)


def test_plan_from_another_save_is_named_before_the_weights(tmp_path):
    a, b = _saved(tmp_path, "a", 1), _saved(tmp_path, "b", 2)
    for f in ("prunegraph_plan.json", "prunegraph_plan.safetensors"):
        shutil.copy(b / f, a / f)
    with pytest.raises(CheckpointError, match="is not the plan these weights were saved with"):
        from_pretrained(a)


def test_plan_of_another_architecture_is_named_in_older_folders(tmp_path):
    """A folder without the plan's hash in config.json (older saves): config.json's architecture
    is compared with the plan's base model."""
    plan = random_plan("qwen3", 3)
    model = fresh("qwen3")
    apply_plan(model, plan)
    other = save_pruned(model, plan, tmp_path / "qwen3")
    folder = _saved(tmp_path, "llama", 1)
    config = json.loads((folder / "config.json").read_text())
    del config["prunegraph"]
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("prunegraph_plan.json", "prunegraph_plan.safetensors"):
        shutil.copy(other / f, folder / f)
    with pytest.raises(CheckpointError, match=r"is the plan of another model \(model_type"):
        from_pretrained(folder)


def test_truncated_plan_names_one_path_and_what_to_do(tmp_path):
    folder = _saved(tmp_path, "m", 1)
    plan = folder / "prunegraph_plan.json"
    plan.write_text(plan.read_text()[:200])
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    message = str(info.value)
    assert message.count(str(plan)) == 1 and "copy the whole folder again" in message
    assert "re-run the pipeline" in message and "re-save" not in message


# ---------------------------------------------------------------------------- model paths


def _model_commands(model: str, tmp_path: Path, spec: Path) -> list[tuple[str, ...]]:
    return [("run", spec, "--out", tmp_path / "out", "--set", f"model={model}"),
            ("inspect", model), ("eval", model, "--ppl-blocks", "1", "--seq-len", "16")]


def test_nonexistent_path(capsys, tmp_path, spec):
    missing = tmp_path / "no" / "such" / "dir"
    for argv in _model_commands(str(missing), tmp_path, spec):
        err = refused(capsys, tmp_path, *argv)
        assert f"no such file or folder: {missing}" in err


def test_folder_that_is_not_a_model(capsys, tmp_path, spec):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    for argv in _model_commands(str(folder), tmp_path, spec):
        err = refused(capsys, tmp_path, *argv)
        assert "has no config.json: not a Hugging Face model folder" in err


def test_text_file_named_gguf(capsys, tmp_path, spec):
    fake = tmp_path / "x.gguf"
    fake.write_text("hello")
    for argv in _model_commands(str(fake), tmp_path, spec):
        err = refused(capsys, tmp_path, *argv)
        assert "is not a GGUF file" in err


def test_alias_typo_suggests_the_alias(capsys, tmp_path, spec):
    for argv in _model_commands("smollm2", tmp_path, spec):
        err = refused(capsys, tmp_path, *argv)
        assert "Did you mean smollm2-135m" in err


def test_meta_model_is_refused_in_a_run(capsys, tmp_path, spec):
    err = refused(capsys, tmp_path, "run", spec, "--out", tmp_path / "out",
                  "--set", "model=meta:llama-3-8b")
    assert "meta models are for `prunegraph inspect" in err


# ---------------------------------------------------------------------------- run folders


def test_a_load_that_fails_at_run_time_marks_the_folder_failed(capsys, tmp_path, spec):
    """Corrupt weights pass the cheap checks; the run folder then says it failed, and why."""
    folder = tmp_path / "broken"
    folder.mkdir()
    fresh("llama").config.to_json_file(str(folder / "config.json"))
    (folder / "model.safetensors").write_bytes(b"garbage")
    out = tmp_path / "out"
    rc, err = cli(capsys, "run", spec, "--out", out, "--set", f"model={folder}")
    assert rc == 2 and "pipeline stopped at pass 0 (Load)" in err
    assert json.loads((out / ".prunegraph-run").read_text())["status"] == "failed"
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"
    assert "cannot load" in (out / "log.txt").read_text()
    assert not (out / "model").exists()


@pytest.mark.slow
def test_rerun_never_deletes_a_finished_run_before_the_new_one_succeeds(capsys, tmp_path, spec):
    out = tmp_path / "out"
    assert cli(capsys, "run", spec, "--out", out)[0] == 0
    weights = (out / "model" / "model.safetensors").read_bytes()
    failing = write_spec(tmp_path / "failing.yaml", {"model": "random:llama", "passes": [
        "Analyze", {"Prune": {"criterion": "wanda", "sparsity": 0.2,
                              "source": str(tmp_path / "missing.txt")}}, "Slice", "Save"]})
    rc, err = cli(capsys, "run", failing, "--out", out)
    assert rc == 2 and "previous run in" in err
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    assert json.loads((out / ".prunegraph-run").read_text())["status"] == "done"
    failed = tmp_path / "out.failed"
    assert json.loads((failed / "metrics.json").read_text())["status"] == "failed"
    assert "missing.txt" in (failed / "log.txt").read_text()
    assert cli(capsys, "run", spec, "--out", out)[0] == 0  # a successful re-run replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing.yaml", "out", "out.failed",
                                                          "spec.yaml"]


def test_ctrl_c_is_one_line_recorded_in_log_and_metrics(capsys, tmp_path, spec, monkeypatch):
    from prunegraph.passes import Prune

    def interrupt(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(Prune, "run", interrupt)
    out = tmp_path / "out"
    rc, err = cli(capsys, "run", spec, "--out", out)
    line = "interrupted during pass 2 (Prune); nothing was saved"
    assert rc == 130 and err.strip().splitlines()[-1] == f"prunegraph run: {line}. Run folder: {out}."
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and line in metrics["error"]
    assert line in (out / "log.txt").read_text()
    assert not (out / "model").exists()


def test_unwritable_out(capsys, tmp_path, spec):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = refused(capsys, tmp_path, "run", spec, "--out", blocker / "run")
    assert f"cannot create the run folder {blocker / 'run'}" in err and "is a file" in err


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_out_under_proc(capsys, tmp_path, spec):
    rc, err = cli(capsys, "run", spec, "--out", "/proc/prunegraph-test/run")
    assert rc == 2 and "/proc/prunegraph-test/run" in err and len(err.strip().splitlines()) == 1
    assert not Path("/proc/prunegraph-test").exists()


# --------------------------------------------------------------------------------- eval


def test_eval_accepts_a_run_folder(capsys, tmp_path, spec):
    out = tmp_path / "out"
    assert cli(capsys, "run", spec, "--out", out)[0] == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--ppl-blocks", "1", "--seq-len", "16", "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_seq_len_beyond_the_context_is_refused(capsys, tmp_path):
    err = refused(capsys, tmp_path, "eval", "random:llama", "--ppl-blocks", "1",
                  "--seq-len", "1024")
    assert "longer than the model's context of 512 tokens" in err


# ------------------------------------------------------------------------ examples, extras


@pytest.mark.parametrize("example, shrink", [
    ("ddp-smollm2.yaml", ["passes.0.ppl_blocks=1", "passes.0.limit=2", "passes.3.steps=2",
                          "passes.3.polish_steps=1", "passes.3.warmup=0",
                          "passes.6.ppl_blocks=1",
                          "passes.6.limit=2"]),
    ("prunepath-smollm2.yaml", ["passes.0.ppl_blocks=1", "passes.3.warmup_steps=1",
                                "passes.3.train={steps: 2, batch_size: 2, block_len: 32}",
                                "passes.4.ppl_blocks=1",
                                "passes.4.taus=[0.5, 0.9]"]),
])
@pytest.mark.slow
def test_shipped_examples_run_on_a_random_model(capsys, tmp_path, example, shrink):
    spec = Path(__file__).resolve().parent.parent / "examples" / example
    sets = [a for s in ["model=random:llama", *shrink] for a in ("--set", s)]
    rc, err = cli(capsys, "run", spec, "--out", tmp_path / "out", *sets)
    assert rc == 0, err
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_missing_optional_package_names_its_extra(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli(capsys, "run", write_spec(tmp_path / "spec.yaml", TINY), "--out", out)[0] == 0
    for name in ("onnx", "onnxscript", "onnxruntime", "onnx_ir"):
        monkeypatch.setitem(sys.modules, name, None)
    err = refused(capsys, tmp_path, "export", "onnx", out, tmp_path / "x.onnx")
    assert "pip install 'prunegraph[onnx]'" in err


def test_help_answers_without_importing_torch():
    """`prunegraph --help` (and no argument) import neither torch, transformers nor the plugins;
    the commands plugins declare are listed with their help."""
    code = ("import sys, contextlib, io\n"
            "from prunegraph.cli.main import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    rc = main([])\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'prunegraph.passes', "
            "'prunegraph.targets') if m in sys.modules]\n"
            "print(heavy, rc); print(buf.getvalue())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[0] == "[] 2", out
    for name in ("eval", "export", "inspect", "passes", "run"):
        assert f"\n    {name} " in out, f"{name} missing from --help:\n{out}"
    assert "perplexity" in out  # the eval command's help, read from its source
