"""The Evaluate pass: in- and out-of-domain perplexity keys, generation checks against the first
Evaluate of a run, and every bad setting refused before any measurement."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny_tokenizer import make_tokenizer

import prunegraph.passes  # noqa: F401  (registers the passes)
from prunegraph.data.models import load_model
from prunegraph.data.text import load_documents, split_documents, token_blocks
from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.passes.evaluation.evaluate import Evaluate
from prunegraph.passes.evaluation.generation import greedy_continuations, load_prompts, token_agreement
from prunegraph.passes.evaluation.metrics import perplexity
from prunegraph.pipeline import Pipeline
from prunegraph.pipeline.contract import State


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture()
def texts(tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("\n\n".join(f"Article {i} describes the town of Place{i}." for i in range(8)))
    novel = tmp_path / "novel.txt"
    novel.write_text("\n\n".join(f'"Dear {i}," said she, "how do you do?"' for i in range(8)))
    return str(wiki), str(novel)


def _eval(texts, **over):
    params = dict(ppl_blocks=2, seq_len=8, tasks=(), source=texts[0], ood_sources=(texts[1],),
                  gen_prompts=3, gen_tokens=6)
    return Evaluate(**{**params, **over})


def _blocks(tok, source):
    return token_blocks(tok, split_documents(load_documents(source))[1], 8, 2)


def _perturbed(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return other


def test_perplexity_in_and_out_of_domain_and_generation(tmp_path, texts, tok):
    model = load_model("random:llama")[0]
    state = State(model=model, tokenizer=tok)
    state.run_dir = tmp_path / "run"
    state = _eval(texts, label="dense")(state).state
    dense = state.metrics["dense"]
    assert dense["ppl_wiki"] == pytest.approx(perplexity(model, _blocks(tok, texts[0]),
                                                         progress=False))
    assert dense["ppl_novel"] == pytest.approx(perplexity(model, _blocks(tok, texts[1]),
                                                          progress=False))
    assert dense["ppl"] == dense["ppl_wiki"] and dense["ppl_tokens"] == 16
    gen = dense["generation"]
    assert "agreement" not in gen and gen["prompts"] == 3 and gen["tokens"] == 6

    pruned = _perturbed(model)
    state.model = pruned
    result = _eval(texts, label="pruned")(state)
    m = state.metrics["pruned"]["generation"]
    prompts = load_prompts()[:3]
    ref = greedy_continuations(model, tok, prompts, 6)
    out = greedy_continuations(pruned, tok, prompts, 6)
    assert m["reference"] == "dense" and 0 < m["agreement"] < 1  # the perturbation shows
    assert (m["agreement"], m["prefix_agreement"]) == pytest.approx(token_agreement(ref, out))
    assert result.stats["gen_agreement"] == m["agreement"] and "ppl_novel" in result.stats

    saved = json.loads((tmp_path / "run" / "generations.json").read_text())
    assert list(saved) == ["dense", "pruned"]
    assert saved["dense"]["tokens"] == ref and saved["pruned"]["tokens"] == out
    assert saved["dense"]["prompts"] == prompts
    assert saved["pruned"]["texts"] == [tok.decode(t) for t in out]

    # the same model again agrees fully; fewer tokens than the reference compare on a prefix
    state.model = model
    _eval(texts, label="again", gen_tokens=4, ppl_blocks=0)(state)
    assert state.metrics["again"]["generation"]["agreement"] == 1.0
    assert "ppl" not in state.metrics["again"]


def test_explicit_reference_and_a_pipeline_run_folder(tmp_path, texts, tok):
    model = load_model("random:llama")[0]
    pipe = Pipeline([_eval(texts, label="before", gen_prompts=2),
                     _eval(texts, label="base", gen_prompts=2),
                     _eval(texts, label="after", gen_prompts=2, gen_reference="base")])
    state = pipe.run(State(model=model, tokenizer=tok), run_dir=tmp_path / "run",
                     progress=False)
    assert state.metrics["base"]["generation"]["reference"] == "before"
    assert state.metrics["after"]["generation"]["reference"] == "base"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["after"]["generation"]["agreement"] == 1.0
    assert set(json.loads((tmp_path / "run" / "generations.json").read_text())) == {
        "before", "base", "after"}


def test_a_missing_or_mismatched_reference_fails_before_measuring(monkeypatch, texts, tok):
    model = load_model("random:llama")[0]
    state = _eval(texts, label="dense", ppl_blocks=0)(State(model=model, tokenizer=tok)).state

    def no_measure(*a, **k):
        raise AssertionError("measured before the reference was checked")

    monkeypatch.setattr("prunegraph.passes.evaluation.evaluate.perplexity", no_measure)
    with pytest.raises(SpecError, match="gen_reference 'base' names no earlier Evaluate.*'dense'"):
        _eval(texts, label="pruned", gen_reference="base")(state)
    with pytest.raises(PrunegraphError, match="holds 6 tokens a prompt, fewer than the 8"):
        _eval(texts, label="pruned", gen_tokens=8)(state)
    with pytest.raises(PrunegraphError, match="other prompts"):
        _eval(texts, label="pruned", gen_prompts=4)(state)
    # an Evaluate that names itself as the reference compares with nothing
    state = _eval(texts, label="x", ppl_blocks=0, gen_reference="x")(state).state
    assert "agreement" not in state.metrics["x"]["generation"]


@pytest.mark.parametrize("over, match", [
    (dict(ood_sources=("wikipedia", "x/wikipedia.txt")), "repeat"),
    (dict(source="austen", ood_sources=("austen",)), "repeat"),
    (dict(gen_prompts=33), "32 prompts ship"),
    (dict(gen_prompts=-1), "gen_prompts must be >= 0"),
    (dict(gen_tokens=0), "gen_tokens must be >= 1"),
])
def test_bad_settings_are_spec_errors(over, match):
    with pytest.raises(SpecError, match=match):
        Evaluate(**over)


def test_defaults_measure_wikipedia_and_austen_and_generate():
    e = Evaluate()
    assert (e.source, e.ood_sources, e.gen_prompts, e.gen_tokens) == (
        "wikipedia", ("austen",), 8, 32)
