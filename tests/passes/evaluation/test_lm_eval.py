"""The built-in multiple-choice scoring against lm-evaluation-harness's definition of acc,
acc_norm and acc_bytes, and ``run_lm_eval`` on a non-uniform pruned model.

lm-eval 0.4 (``lm_eval/api/task.py``, ``ConfigurableTask.process_results`` for
``output_type: multiple_choice``) scores each example from the log-likelihoods ``lls`` of
``" " + choice`` after the context::

    pred      = argmax(lls)                                    -> acc
    pred_norm = argmax(lls / [len(c) for c in choices])        -> acc_norm (characters)
    pred_byte = argmax(lls / [len(c.encode()) for c in choices]) -> acc_bytes (UTF-8 bytes)

``numpy.argmax`` breaks ties towards the first choice. The first test checks that formula on
hand-computed cases and always runs; the second compares with lm-eval's own code (its
``process_results``, its ``HFLM`` log-likelihoods and its aggregated scores) when lm-eval is
installed (``pip install 'prunegraph[lm-eval]'``), offline, on a local dataset.
"""

from __future__ import annotations

import json

import pytest
from _tiny_tokenizer import make_tokenizer

from prunegraph.data.tasks import Example, task_from_json
from prunegraph.passes.evaluation.metrics import multiple_choice, option_loglikelihoods, score_choices

#: (choices, index of the correct one, log-likelihoods, expected (acc, acc_norm, acc_bytes))
CASES = [
    # -4 > -5: acc picks 0 (wrong); per character -4/3 < -5/4 picks 1 (right); per byte
    # "ééé" is 6 bytes: -4/6 > -5/4 picks 0 (wrong)
    (["ééé", "abcd"], 1, [-4.0, -5.0], (0, 1, 0)),
    # the same choices, the other answer correct: every score flips
    (["ééé", "abcd"], 0, [-4.0, -5.0], (1, 0, 1)),
    # a tie goes to the first choice, in every score
    (["ab", "cd", "ef"], 0, [-2.0, -2.0, -3.0], (1, 1, 1)),
    # a long choice wins only once divided by its length: -9/9 = -1 > -2/1
    (["x", "yyyyyyyyy"], 1, [-2.0, -9.0], (0, 1, 1)),
]


def _example(choices, gold):
    return Example("q", tuple(choices), tuple(float(i == gold) for i in range(len(choices))))


@pytest.mark.parametrize("choices, gold, lls, expected", CASES)
def test_scores_follow_lm_evals_formula_by_hand(choices, gold, lls, expected):
    got = score_choices([_example(choices, gold)], [lls])
    assert (got["acc"], got["acc_norm"], got["acc_bytes"]) == expected


def test_scores_average_over_examples():
    got = score_choices([_example(c, g) for c, g, _, _ in CASES], [ll for *_, ll, _ in CASES])
    assert got == {"acc": pytest.approx(2 / 4), "acc_norm": pytest.approx(3 / 4),
                   "acc_bytes": pytest.approx(3 / 4)}


#: A shared example set: prompts, choices (one non-ASCII), the correct index.
DOCS = [
    {"prompt": "The sky is", "choices": ["blue", "a large green cheese"], "gold": 0},
    {"prompt": "Two plus two is", "choices": ["four", "five", "twenty-two"], "gold": 0},
    {"prompt": "Water is", "choices": ["dry as dust", "wet"], "gold": 1},
    {"prompt": "Le cafe est", "choices": ["tres chaud", "froid", "crème brûlée"], "gold": 2},
    {"prompt": "Snow is", "choices": ["cold", "hot as fire"], "gold": 0},
    {"prompt": "A cat says", "choices": ["meow", "woof", "moo"], "gold": 0},
]


def _lm_eval_config(tmp_path):
    data = tmp_path / "shared.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    return {"task": "shared", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "c")},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm", "acc_bytes")]}


def _same_task():
    return task_from_json({
        "task_prefix": "", "example_input_prefix": "", "example_output_prefix": "",
        "append_choices_to_input": False,
        "examples": [{"input": d["prompt"],
                      "target_scores": {c: int(i == d["gold"]) for i, c in enumerate(d["choices"])}}
                     for d in DOCS]}, "shared")


def test_matches_lm_evals_own_code_on_a_non_uniform_pruned_model(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install "
                                          "'prunegraph[lm-eval]'); the formula is checked above")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from _pruning_fixtures import fresh, random_plan
    from lm_eval.api.task import ConfigurableTask

    from prunegraph import from_pretrained
    from prunegraph.passes.evaluation.harness import run_lm_eval
    from prunegraph.plan.checkpoint import save_pruned
    from prunegraph.plan.slicing import apply_plan

    cfg = _lm_eval_config(tmp_path)
    # 1. lm-eval's process_results on the hand cases
    task = ConfigurableTask(config=cfg)
    for choices, gold, lls, expected in CASES:
        doc = {"prompt": "q", "choices": choices, "gold": gold}
        r = task.process_results(doc, [(ll, False) for ll in lls])
        assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == expected

    # 2. lm-eval's HFLM on a pruned model with per-layer widths, rebuilt by from_pretrained
    plan = random_plan("llama", seed=3)
    model = fresh("llama")
    apply_plan(model, plan)
    widths = {m.weight.shape[1] for n, m in model.named_modules() if n.endswith("down_proj")}
    assert len(widths) > 1  # non-uniform: plain transformers could not rebuild it
    model = from_pretrained(save_pruned(model, plan, tmp_path / "pruned"))
    tok = make_tokenizer()
    out = run_lm_eval(model, tok, [cfg], batch_size=2, log_samples=True)
    samples = sorted(out.pop("samples")["shared"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    ours = option_loglikelihoods(model, tok, _same_task(), progress=False)
    for a, b in zip(theirs, ours):
        assert a == pytest.approx(b, abs=1e-4)
    mine = multiple_choice(model, tok, _same_task(), progress=False)
    for key in ("acc", "acc_norm", "acc_bytes"):
        assert out["shared"][key] == pytest.approx(mine[key])


def test_unknown_lm_eval_tasks_are_named_before_any_model_loads(monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval not installed")
    import lm_eval.tasks

    from prunegraph.errors import PrunegraphError
    from prunegraph.passes.evaluation.harness import check_lm_eval_tasks

    class Index:  # lm-eval's TaskManager without the seconds of indexing its YAML files
        all_tasks = ["hellaswag", "arc_easy", "arc_challenge"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    assert isinstance(check_lm_eval_tasks(["hellaswag", "arc_easy"]), Index)
    with pytest.raises(PrunegraphError, match="no task or group 'helaswag'.*'hellaswag'"):
        check_lm_eval_tasks(["arc_easy", "helaswag"])


def test_lm_eval_metric_names_lose_the_default_filter():
    from prunegraph.passes.evaluation.harness import _plain_metrics

    assert _plain_metrics({"alias": "x", "name": "x", "acc,none": 0.5, "acc_stderr,none": 0.1,
                           "exact_match,strict-match": 0.2}) == {
        "acc": 0.5, "acc_stderr": 0.1, "exact_match,strict-match": 0.2}


def test_eval_command_runs_lm_eval_tasks_by_name(tmp_path, monkeypatch):
    """``prunegraph eval MODEL --lm-eval NAME``: the task found by name in lm-eval's index (here
    an index of one local YAML task), scored by lm-eval, written to the JSON results."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed")
    import yaml
    from lm_eval.tasks import TaskManager
    from test_evaluation import _args

    from prunegraph.data.models import load_model
    from prunegraph.errors import PrunegraphError
    from prunegraph.passes import harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "shared.yaml").write_text(yaml.safe_dump(_lm_eval_config(tmp_path)))
    real_check = harness.check_lm_eval_tasks

    def local_index(names):
        with monkeypatch.context() as m:
            m.setattr("lm_eval.tasks.TaskManager", lambda: TaskManager(
                include_path=str(tmp_path / "tasks"), include_defaults=False))
            return real_check(names)

    monkeypatch.setattr(harness, "check_lm_eval_tasks", local_index)
    model, tok = load_model("random:gemma3")[0], make_tokenizer()
    monkeypatch.setattr("prunegraph.data.models.load_model", lambda spec: (model, tok))
    out = tmp_path / "r.json"
    fn, args = _args(lm_eval="shared", limit="all", json=out)
    assert fn(args) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"model", "lm_eval", "lm_eval_seconds"}  # only what is named
    mine = multiple_choice(model, tok, _same_task(), progress=False)
    for key in ("acc", "acc_norm", "acc_bytes"):
        assert res["lm_eval"]["shared"][key] == pytest.approx(mine[key])
    with pytest.raises(PrunegraphError, match="no task or group 'shard'.*'shared'"):
        fn(_args(lm_eval="shard")[1])
