"""Text sources, the by-document split and token blocks (prunegraph.data.text)."""

from __future__ import annotations

import json
import lzma
import random
import string
import sys

import pytest
import torch
from _tiny_tokenizer import make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from prunegraph.data.text import (
    Document,
    load_documents,
    split_documents,
    token_blocks,
    tokenizer_adds_bos,
)
from prunegraph.errors import PrunegraphError

_RNG = random.Random(0)
#: Random letters, so that no two aligned slices of the token stream are equal.
DOCS = [Document(f"d{i}", "".join(_RNG.choice(string.ascii_letters + " ") for _ in range(30 + 9 * i)))
        for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _stream(tok, docs, joiner="\n\n"):
    return tok(joiner.join(d.text for d in docs), add_special_tokens=False)["input_ids"]


# --- sources ---------------------------------------------------------------------------------

def test_builtin_wikipedia_is_whole_articles():
    docs = load_documents("wikipedia")
    assert len(docs) == 99
    assert len({d.title for d in docs}) == len(docs)
    assert all(len(d.text.split()) >= 200 for d in docs)
    assert not any(m in d.text for d in docs for m in ("{{", "[[", "<ref", "==", "</"))
    assert {"Anarchism", "Aristotle", "Apollo 11", "Abraham Lincoln"} <= {d.title for d in docs}


def test_text_file_gives_one_document_per_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First para\nstill first.\n\n\nSecond para.\n\n  \n\nThird.\n")
    docs = load_documents(str(path))
    assert [d.text for d in docs] == ["First para\nstill first.", "Second para.", "Third."]
    assert [d.title for d in docs] == ["notes.txt:0", "notes.txt:1", "notes.txt:2"]


def test_jsonl_xz_and_folder_sources(tmp_path):
    rows = [{"title": "A", "text": "alpha"}, {"text": "beta"}, {"title": "C", "text": "  "}]
    path = tmp_path / "docs.jsonl.xz"
    path.write_bytes(lzma.compress("\n".join(json.dumps(r) for r in rows).encode()))
    docs = load_documents(str(path))
    assert [d.text for d in docs] == ["alpha", "beta"]
    assert docs[0].title == "A"

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    assert load_documents(str(folder)) == [Document("a", "ay"), Document("b", "bee")]


def test_unknown_and_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(PrunegraphError, match="Did you mean 'wikipedia'"):
        load_documents("wikipedai")
    with pytest.raises(PrunegraphError, match="not an existing file"):
        load_documents(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(PrunegraphError, match="line 1.*'text'"):
        load_documents(str(bad))
    with pytest.raises(PrunegraphError, match="hf:NAME"):
        load_documents("hf:")


def test_hf_source_without_datasets_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(PrunegraphError, match="pip install datasets"):
        load_documents("hf:wikitext:wikitext-2-raw-v1:test")


# --- split -----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 60), frac=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_split_is_by_document_disjoint_and_deterministic(n, frac, seed):
    docs = [Document(f"t{i}", f"x{i}") for i in range(n)]
    calib, held = split_documents(docs, frac, seed)
    assert 1 <= len(held) <= n - 1
    assert len(held) == min(n - 1, max(1, round(frac * n)))
    assert {d.title for d in calib}.isdisjoint({d.title for d in held})
    assert len(calib) + len(held) == n
    # input order is kept in both parts
    assert calib == [d for d in docs if d in calib] and held == [d for d in docs if d in held]
    assert split_documents(docs, frac, seed) == (calib, held)


def test_split_depends_on_seed_and_rejects_bad_input():
    docs = [Document(f"t{i}", "x") for i in range(40)]
    assert len({tuple(d.title for d in split_documents(docs, 0.25, s)[1]) for s in range(5)}) > 1
    with pytest.raises(PrunegraphError, match=r"\(0, 1\)"):
        split_documents(docs, 1.0)
    with pytest.raises(PrunegraphError, match="at least 2"):
        split_documents(docs[:1])


# --- token blocks ----------------------------------------------------------------------------

def test_all_blocks_tile_the_stream_in_order(tok):
    stream = _stream(tok, DOCS)
    blocks = token_blocks(tok, DOCS, block_len=16)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[:blocks.numel()]


def test_sampled_blocks_are_distinct_aligned_slices_and_deterministic(tok):
    stream = torch.tensor(_stream(tok, DOCS))
    blocks = token_blocks(tok, DOCS, block_len=8, n_blocks=5, seed=3)
    assert blocks.shape == (5, 8)
    starts = []
    for row in blocks:
        hits = [s for s in range(0, len(stream) - 7, 8) if torch.equal(stream[s:s + 8], row)]
        assert hits
        starts.append(hits[0])
    assert starts == sorted(starts) and len(set(starts)) == 5  # non-overlapping, stream order
    assert torch.equal(blocks, token_blocks(tok, DOCS, block_len=8, n_blocks=5, seed=3))
    others = [token_blocks(tok, DOCS, block_len=8, n_blocks=5, seed=s) for s in range(4, 8)]
    assert any(not torch.equal(blocks, o) for o in others)


def test_bos_follows_the_tokenizer_or_the_argument(tok):
    bos_tok = make_tokenizer(add_bos=True)
    assert tokenizer_adds_bos(bos_tok) and not tokenizer_adds_bos(tok)
    stream = _stream(tok, DOCS)
    blocks = token_blocks(bos_tok, DOCS, block_len=10)
    assert (blocks[:, 0] == bos_tok.bos_token_id).all()
    assert blocks[:, 1:].flatten().tolist() == stream[:blocks.shape[0] * 9]
    assert torch.equal(token_blocks(bos_tok, DOCS, block_len=10, add_bos=False),
                       token_blocks(tok, DOCS, block_len=10))
    assert (token_blocks(tok, DOCS, block_len=10, add_bos=True)[:, 0] == 1).all()


def test_eos_joiner(tok):
    blocks = token_blocks(tok, DOCS[:2], block_len=4, joiner=None).flatten().tolist()
    first = tok(DOCS[0].text, add_special_tokens=False)["input_ids"]
    assert blocks[len(first)] == tok.eos_token_id and blocks[:len(first)] == first


class _NoWork:
    """A tokenizer that fails if used: bad arguments must be refused before any tokenizing."""

    bos_token_id = eos_token_id = None

    def __call__(self, *a, **k):
        raise AssertionError("tokenizer called before the arguments were checked")


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_len=1), "block_len must be an integer >= 2"),
    (dict(block_len=16, n_blocks=0), "n_blocks must be a positive integer"),
    (dict(block_len=16, add_bos=True), "no BOS token"),
    (dict(block_len=16, add_bos=False, joiner=None), "no EOS token"),
])
def test_bad_block_arguments_fail_before_work(kwargs, match):
    with pytest.raises(PrunegraphError, match=match):
        token_blocks(_NoWork(), DOCS, **kwargs)


def test_too_little_text(tok):
    n = len(_stream(tok, DOCS)) // 16
    with pytest.raises(PrunegraphError, match=f"{n} block"):
        token_blocks(tok, DOCS, block_len=16, n_blocks=n + 1)
    with pytest.raises(PrunegraphError, match="no documents"):
        token_blocks(tok, [], block_len=16)


def test_builtin_austen_is_whole_chapters_of_two_novels():
    docs = load_documents("austen")
    assert len(docs) == 55 and len({d.title for d in docs}) == 55
    assert [d.title for d in docs[:2]] == ["Persuasion, Chapter 1", "Persuasion, Chapter 2"]
    assert docs[24].title == "Northanger Abbey, Chapter 1" and docs[-1].title.endswith("31")
    assert docs[0].text.startswith("Sir Walter Elliot, of Kellynch Hall")
    words = sum(len(d.text.split()) for d in docs)
    assert 150_000 < words < 170_000
    text = "\n".join(d.text for d in docs)
    # paragraphs are single lines; no front matter, closing word or editor's note
    paragraphs = [p for d in docs for p in d.text.split("\n\n")]
    assert all(p and p == p.strip() and "\n" not in p and "  " not in p for p in paragraphs)
    for absent in ("NOTE ON THE TEXT", "Signet", "ADVERTISEMENT BY THE AUTHORESS", "Finis"):
        assert absent not in text
    # whole chapters: the evaluation split never shares one with the calibration split
    calib, held = split_documents(docs)
    assert len(held) == 14 and not {d.title for d in calib} & {d.title for d in held}


def test_source_keys_name_metrics():
    from prunegraph.data.text import BUILTIN_SOURCES, SOURCE_DESCRIPTIONS, source_key

    assert set(SOURCE_DESCRIPTIONS) == set(BUILTIN_SOURCES) == {"wikipedia", "austen"}
    assert source_key("wikipedia") == "wikipedia" and source_key("austen") == "austen"
    assert source_key("/data/My-Notes.v2.jsonl.xz") == "my_notes"
    assert source_key("corpus/") == "corpus"
    assert source_key("hf:wikitext:wikitext-2-raw-v1:test") == "wikitext_wikitext_2_raw_v1"
    assert source_key("hf:allenai/c4:en") == "c4_en"
    assert source_key("...") == "text"


def test_unknown_source_suggests_builtin_names():
    with pytest.raises(PrunegraphError, match="Did you mean 'austen'"):
        load_documents("austin")
