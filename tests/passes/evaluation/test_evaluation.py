"""Perplexity, multiple-choice scoring, BIG-bench tasks and the ``eval`` command."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from _tiny_tokenizer import make_tokenizer

from prunegraph.data.models import load_model
from prunegraph.data.tasks import BUILTIN_TASKS, load_task, task_from_json
from prunegraph.data.text import Document, token_blocks
from prunegraph.errors import PrunegraphError
from prunegraph.passes.evaluation.metrics import multiple_choice, perplexity, select_examples

#: Plain prompts (no prefixes, no appended choices), so a hand computation sees the same text.
SYNTHETIC = {
    "task_prefix": "", "example_input_prefix": "", "example_output_prefix": "",
    "append_choices_to_input": False,
    "examples": [
        {"input": "The sky is", "target_scores": {"blue": 1, "a large green cheese": 0}},
        {"input": "Two plus two is", "target_scores": {"four": 1, "five": 0, "twenty-two": 0}},
        {"input": "Water is", "target_scores": {"dry as dust": 0, "wet": 1}},
    ],
}



@pytest.fixture(scope="module")
def model():
    return load_model("random:llama")[0]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _hand_loglik(model, tok, prompt: str, option: str) -> float:
    """Sum of log p(option tokens | prompt), one unpadded sequence at a time."""
    ctx = tok(prompt, add_special_tokens=False)["input_ids"]
    whole = tok(prompt + " " + option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def _hand_scores(model, tok, examples):
    """(acc, acc_norm); the options are ASCII, so acc_bytes == acc_norm."""
    acc = acc_norm = 0
    for ex in examples:
        opts = list(ex["target_scores"])
        ll = [_hand_loglik(model, tok, ex["input"], o) for o in opts]
        norm = [v / len(o) for v, o in zip(ll, opts)]
        acc += ex["target_scores"][opts[ll.index(max(ll))]] == 1
        acc_norm += ex["target_scores"][opts[norm.index(max(norm))]] == 1
    return acc / len(examples), acc_norm / len(examples)


def _expect(acc, acc_norm, n):
    return {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm),
            "acc_bytes": pytest.approx(acc_norm), "n": n}


# --- perplexity ------------------------------------------------------------------------------

def test_perplexity_is_exp_of_mean_token_nll(model):
    blocks = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logp = torch.log_softmax(model(b[None]).logits[0].double(), -1)
            nll -= sum(logp[t, b[t + 1]].item() for t in range(len(b) - 1))
            count += len(b) - 1
    model.train()
    got = perplexity(model, blocks, batch_size=2, progress=False)
    assert model.training  # mode restored
    model.eval()
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, blocks, batch_size=3, progress=False) == pytest.approx(got, rel=1e-6)


@pytest.mark.parametrize("blocks, match", [
    (torch.zeros(2, 1, dtype=torch.long), "predict no token"),
    (torch.zeros(2, 4), "LongTensor"),
    (torch.full((1, 4), 999, dtype=torch.long), "outside the model's vocabulary"),
])
def test_perplexity_rejects_bad_blocks(model, blocks, match):
    with pytest.raises(PrunegraphError, match=match):
        perplexity(model, blocks, progress=False)


# --- multiple choice -------------------------------------------------------------------------

def test_multiple_choice_matches_hand_computation(model, tok):
    task = task_from_json(SYNTHETIC, "synthetic")
    assert [e.prompt for e in task.examples] == ["The sky is", "Two plus two is", "Water is"]
    acc, acc_norm = _hand_scores(model, tok, SYNTHETIC["examples"])
    for bs in (1, 2, 8):  # batching and right padding must not change the scores
        r = multiple_choice(model, tok, task, batch_size=bs, progress=False)
        assert r == _expect(acc, acc_norm, 3)


def test_limit_takes_a_seeded_subset(model, tok):
    task = task_from_json(SYNTHETIC, "synthetic")
    picked = select_examples(3, 2, seed=5)
    assert picked == select_examples(3, 2, seed=5) and len(set(picked)) == 2
    assert select_examples(3, None) == select_examples(3, 10) == [0, 1, 2]
    acc, acc_norm = _hand_scores(model, tok, [SYNTHETIC["examples"][i] for i in picked])
    r = multiple_choice(model, tok, task, limit=2, seed=5, progress=False)
    assert r == _expect(acc, acc_norm, 2)
    with pytest.raises(PrunegraphError, match="limit"):
        multiple_choice(model, tok, task, limit=0, progress=False)
    by_name = multiple_choice(model, tok, "cause_and_effect_one_sentence", limit=2, progress=False)
    assert by_name["n"] == 2 and 0 <= by_name["acc"] <= 1
    with pytest.raises(PrunegraphError, match="unknown task 'nope'"):
        multiple_choice(model, tok, "nope", progress=False)


def test_multiple_choice_on_a_rigged_model(tok):
    """A model that always predicts "x" (log p = -0.01; any other token -10, the leading space
    of every option included) prefers options with fewer non-x tokens (acc), and per byte
    the longer of two options with one non-x token each (acc_norm)."""
    x = tok("x", add_special_tokens=False)["input_ids"][0]

    class AlwaysX(torch.nn.Module):
        config = None

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 256)
            logits[..., x] = 10.0
            return type("Out", (), {"logits": logits})()

    task = task_from_json({**SYNTHETIC, "examples": [
        {"input": "a", "target_scores": {"xx": 1, "yy": 0}},      # acc right, acc_norm right
        {"input": "b", "target_scores": {"xy": 0, "xx": 1}},      # acc right, acc_norm right
        {"input": "c", "target_scores": {"xy": 0, "xxxxy": 1}},   # acc wrong, acc_norm right
        {"input": "d", "target_scores": {"xy": 1, "xxxxy": 0}},   # acc right, acc_norm wrong
        {"input": "e", "target_scores": {"yx": 1, "xxxxxx": 0}},  # both wrong
    ]}, "rigged")
    r = multiple_choice(AlwaysX(), tok, task, batch_size=3, progress=False)
    assert r == _expect(3 / 5, 3 / 5, 5)
    r = multiple_choice(AlwaysX(), tok, task, limit=3, seed=0, progress=False)
    picked = select_examples(5, 3, seed=0)
    acc = sum(i in (0, 1, 3) for i in picked) / 3
    acc_norm = sum(i in (0, 1, 2) for i in picked) / 3
    assert r == _expect(acc, acc_norm, 3)


def test_builtin_tasks_load_in_bigbench_format():
    sizes = {"cause_and_effect_one_sentence": (51, {2}), "goal_inference": (1703, {4, 5}),
             "timedial": (2550, {3}), "winowhy": (2865, {2})}
    for name in BUILTIN_TASKS:
        task = load_task(name)
        n, k = sizes[name]
        assert len(task.examples) == n and {len(e.options) for e in task.examples} == k
        assert all(max(e.scores) == 1 for e in task.examples)
    ex = load_task("winowhy").examples[0]
    assert ex.prompt.startswith("Please answer the following questions")
    assert ex.prompt.endswith("\nThe above reasoning is") and ex.options == ("correct", "incorrect")
    # goal_inference sets no prefixes: BIG-bench's defaults apply and the choices are listed
    ex = load_task("goal_inference").examples[0]
    assert ex.prompt.startswith("\nQ: ") and ex.prompt.endswith("\nA:")
    assert all(f"\n  choice: {o}" in ex.prompt for o in ex.options)


def test_bad_tasks_fail_clearly(tmp_path):
    with pytest.raises(PrunegraphError, match="Did you mean 'winowhy'"):
        load_task("winowy")
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"examples": [{"input": "q", "target": "a"}]}))
    with pytest.raises(PrunegraphError, match=r"examples \[0\].*target_scores"):
        load_task(str(path))
    path.write_text("{not json")
    with pytest.raises(PrunegraphError, match="not valid JSON"):
        load_task(str(path))


# --- the `eval` command ----------------------------------------------------------------------

def _args(**over):
    import prunegraph.passes  # noqa: F401  (registers the command)
    from prunegraph.cli.main import _COMMANDS

    _, configure, fn = _COMMANDS["eval"]
    parser = argparse.ArgumentParser()
    configure(parser)
    argv = [over.pop("model", "tiny")]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return fn, parser.parse_args(argv + ["--no-progress"])


def test_eval_command_end_to_end(tmp_path, monkeypatch, model, tok):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} is about topic {i * 7}." for i in range(8)))
    task_path = tmp_path / "synthetic.json"
    task_path.write_text(json.dumps(SYNTHETIC))
    monkeypatch.setattr("prunegraph.data.models.load_model", lambda spec: (model, tok))
    out = tmp_path / "results.json"
    fn, args = _args(text=text, ppl_blocks=2, seq_len=8, tasks=str(task_path), json=out)
    assert fn(args) == 0
    res = json.loads(out.read_text())
    from prunegraph.data.text import load_documents, split_documents

    blocks = token_blocks(tok, split_documents(load_documents(str(text)))[1], 8, n_blocks=2)
    assert res["perplexity"]["text"]["value"] == pytest.approx(perplexity(model, blocks,
                                                                         progress=False))
    assert res["perplexity"]["text"]["domain"] == "in-domain"
    assert res["ppl_text"] == res["perplexity"]["text"]["value"]
    assert res["perplexity"]["austen"]["domain"] == "out-of-domain"
    assert "generation" not in res  # a measurement was named: only what is named runs
    acc, acc_norm = _hand_scores(model, tok, SYNTHETIC["examples"])
    assert res["tasks"]["synthetic"]["acc"] == pytest.approx(acc)
    assert res["tasks"]["synthetic"]["acc_norm"] == pytest.approx(acc_norm)


@pytest.mark.parametrize("over, match", [
    (dict(seq_len=1), "--seq-len"),
    (dict(ppl_blocks=-1), "--ppl-blocks"),
    (dict(tasks="nosuchtask"), "unknown task"),
    (dict(text="nosuchsource"), "unknown text source"),
    (dict(ppl_blocks=0), "nothing to evaluate"),
    (dict(limit=0), "--limit"),
    (dict(limit="some"), "--limit"),
    (dict(gen_prompts=40), "only 32 prompts"),
    (dict(gen_tokens=0), "--gen-tokens"),
    (dict(ppl_blocks=0, reference="smollm2-135m"), "generation checks are off"),
    (dict(ood_text="wikipedia"), "repeat"),
])
def test_eval_command_checks_arguments_before_loading(monkeypatch, over, match):
    def no_load(spec):
        raise AssertionError("model loaded before the arguments were checked")

    monkeypatch.setattr("prunegraph.data.models.load_model", no_load)
    fn, args = _args(**over)
    with pytest.raises(PrunegraphError, match=match):
        fn(args)


def test_eval_command_needs_a_tokenizer(monkeypatch, model):
    monkeypatch.setattr("prunegraph.data.models.load_model", lambda spec: (model, None))
    fn, args = _args(model="folder-without-tokenizer", ppl_blocks=1, seq_len=8)
    with pytest.raises(PrunegraphError, match="without a tokenizer"):
        fn(args)


def test_documents_shorter_than_a_block_are_joined(tok):
    docs = [Document("a", "ab"), Document("b", "cd")]
    assert token_blocks(tok, docs, block_len=6).tolist() == [
        tok("ab\n\ncd", add_special_tokens=False)["input_ids"]]
