"""``prunegraph eval``: its help, its default set, generation agreement against a reference, and
the lm-eval option's checks."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from _tiny_tokenizer import make_tokenizer

from prunegraph.data.models import load_model
from prunegraph.data.tasks import BUILTIN_TASKS
from prunegraph.errors import PrunegraphError
from prunegraph.passes.evaluation.generation import (
    generation_record,
    greedy_continuations,
    load_prompts,
    token_agreement,
)

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # test_evaluation, next to this file
from test_evaluation import _args  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def models():
    dense = load_model("random:gemma3")[0]  # varied greedy text (the tiny llama loops)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for w in (layer.mlp.down_proj.weight for layer in pruned.model.layers):
            w[:, ::2] = 0  # half of every MLP's channels gone: a cruder model
    return dense, pruned


def test_help_lists_tasks_texts_and_the_default_set():
    from prunegraph.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    text = sub.format_help()
    for name in (*BUILTIN_TASKS, "wikipedia", "austen", "--lm-eval", "--reference",
                 "default set", "32 shipped"):
        assert name in text
    assert "winowhy (default)" in text and "timedial (default)" not in text


def test_no_measurement_named_runs_the_default_set(tmp_path, monkeypatch, models, tok):
    monkeypatch.setattr("prunegraph.data.models.load_model", lambda spec: (models[0], tok))
    out = tmp_path / "r.json"
    fn, args = _args(seq_len=8, limit=3, json=out)
    assert fn(args) == 0
    res = json.loads(out.read_text())
    assert set(res["perplexity"]) == {"wikipedia", "austen"}
    assert res["perplexity"]["wikipedia"]["blocks"] == 32
    assert res["perplexity"]["austen"]["domain"] == "out-of-domain"
    assert set(res["tasks"]) == {"winowhy", "cause_and_effect_one_sentence"}
    assert all(t["n"] == 3 for t in res["tasks"].values())
    gen = res["generation"]
    assert gen["prompts"] == 8 and gen["tokens"] == 32 and len(gen["texts"]) == 8
    assert "agreement" not in gen  # no reference given


def test_naming_one_measurement_runs_only_that(tmp_path, monkeypatch, models, tok):
    monkeypatch.setattr("prunegraph.data.models.load_model", lambda spec: (models[0], tok))
    out = tmp_path / "r.json"
    fn, args = _args(gen_prompts=2, gen_tokens=4, json=out)
    assert fn(args) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"model", "generation"}
    fn, args = _args(tasks="none", ppl_blocks=0, gen_prompts=0)
    with pytest.raises(PrunegraphError, match="nothing to evaluate"):
        fn(args)


def test_agreement_against_a_reference_model_or_a_runs_generations(tmp_path, monkeypatch,
                                                                   models, tok):
    dense, pruned = models
    loaded = []

    def load(spec):
        loaded.append(spec)
        return (dense if spec == "dense-model" else pruned), tok

    monkeypatch.setattr("prunegraph.data.models.load_model", load)
    prompts = load_prompts()[:4]
    ref = greedy_continuations(dense, tok, prompts, 10)
    mine = greedy_continuations(pruned, tok, prompts, 10)
    expected = token_agreement(ref, mine)
    assert expected[0] < 1  # the cruder model departs somewhere

    out = tmp_path / "r.json"
    fn, args = _args(model="pruned-model", gen_prompts=4, gen_tokens=10,
                     reference="dense-model", json=out)
    assert fn(args) == 0
    gen = json.loads(out.read_text())["generation"]
    assert loaded == ["dense-model", "pruned-model"]  # the reference first, then freed
    assert (gen["agreement"], gen["prefix_agreement"]) == pytest.approx(expected)
    assert gen["reference"] == "dense-model"

    # a run's generations.json: its 'dense' record, here holding more tokens than asked for
    run_gens = tmp_path / "generations.json"
    longer = greedy_continuations(dense, tok, prompts, 12)
    run_gens.write_text(json.dumps({"before": generation_record(prompts, mine, tok),
                                    "dense": generation_record(prompts, longer, tok)}))
    fn, args = _args(model="pruned-model", gen_prompts=4, gen_tokens=10,
                     reference=run_gens, json=out)
    assert fn(args) == 0
    gen = json.loads(out.read_text())["generation"]
    assert (gen["agreement"], gen["prefix_agreement"]) == pytest.approx(expected)
    assert gen["reference"].endswith("generations.json:dense")


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read it as JSON"),
    ("{}", "holds no continuations"),
    (json.dumps({"dense": {"prompts": ["other"], "tokens": [[1]]}}), "other prompts"),
])
def test_bad_reference_files_fail_before_loading(tmp_path, monkeypatch, content, match):
    def no_load(spec):
        raise AssertionError("model loaded before the reference was checked")

    monkeypatch.setattr("prunegraph.data.models.load_model", no_load)
    path = tmp_path / "generations.json"
    path.write_text(content)
    fn, args = _args(gen_prompts=2, reference=path)
    with pytest.raises(PrunegraphError, match=match):
        fn(args)


def test_lm_eval_without_the_extra_is_a_clear_error(monkeypatch):
    def no_load(spec):
        raise AssertionError("model loaded before the lm-eval check")

    monkeypatch.setattr("prunegraph.data.models.load_model", no_load)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    fn, args = _args(lm_eval="hellaswag")
    with pytest.raises(PrunegraphError, match=r"pip install 'prunegraph\[lm-eval\]'"):
        fn(args)
