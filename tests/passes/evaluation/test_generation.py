"""Generation checks (prunegraph.passes.evaluation.generation): greedy decoding and its metrics."""

from __future__ import annotations

import pytest
import torch
from _tiny_tokenizer import make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from prunegraph.data.models import load_model
from prunegraph.errors import PrunegraphError
from prunegraph.passes.evaluation.generation import (
    check_reference,
    distinct_n,
    generation_metrics,
    generation_record,
    greedy_continuations,
    load_prompts,
    repetition_rate,
    token_agreement,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# --- metric maths against hand-computed cases -------------------------------------------------

def test_agreement_by_position_and_by_prefix():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    cand = [[1, 2, 9, 4], [0, 6, 7, 8]]
    # positions equal: 3 of 4, then 3 of 4 -> 6 / 8; common prefixes: 2 and 0 -> 2 / 8
    assert token_agreement(ref, cand) == (6 / 8, 2 / 8)
    assert token_agreement(ref, ref) == (1.0, 1.0)
    # a longer reference is compared over the candidate's length
    assert token_agreement([[1, 2, 3, 4, 5]], [[1, 2, 0]]) == (2 / 3, 2 / 3)


def test_repetition_is_seq_rep_4():
    # 8 tokens -> 5 four-grams: (1,2,3,4) (2,3,4,1) (3,4,1,2) (4,1,2,3) (1,2,3,4): 4 unique
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 - 4 / 5)
    assert repetition_rate([[7] * 10]) == pytest.approx(1 - 1 / 7)        # a loop: near 1
    assert repetition_rate([list(range(10))]) == 0.0                      # nothing repeats
    # the mean over continuations; sequences shorter than n have no n-gram and are left out
    assert repetition_rate([[7] * 10, list(range(10)), [1, 2]]) == pytest.approx((6 / 7) / 2)
    assert repetition_rate([[1, 2]]) == 0.0


def test_distinct_n_pools_every_continuation():
    seqs = [[1, 2, 1], [1, 2, 3]]
    # unigrams: 1 2 1 1 2 3 -> {1, 2, 3} / 6; bigrams: (1,2) (2,1) (1,2) (2,3) -> 3 / 4
    assert distinct_n(seqs, 1) == pytest.approx(3 / 6)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)
    # the same text for every prompt halves distinct-n even if each text is varied
    assert distinct_n([list(range(8))] * 2, 1) == pytest.approx(0.5)
    assert distinct_n([[1]], 2) == 0.0


def test_generation_metrics_collects_all_and_checks_shapes():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    cand = [[1, 2, 9, 4], [0, 6, 7, 4]]
    # agreement (3 + 2) / 8, prefixes (2 + 0) / 8; unigrams 1 2 9 4 0 6 7 4: 7 of 8 distinct;
    # bigrams 12 29 94 06 67 74: all 6 distinct
    m = generation_metrics(cand, ref)
    assert m == {"prompts": 2, "tokens": 4, "agreement": 5 / 8, "prefix_agreement": 2 / 8,
                 "repetition": 0.0, "distinct_1": pytest.approx(7 / 8),
                 "distinct_2": pytest.approx(6 / 6)}
    assert "agreement" not in generation_metrics(cand)
    with pytest.raises(PrunegraphError, match="same positive length"):
        generation_metrics([[1, 2], [1]])
    with pytest.raises(PrunegraphError, match="same prompts"):
        token_agreement([[1, 2]], [[1, 2], [3, 4]])
    with pytest.raises(PrunegraphError, match="at least as many tokens"):
        token_agreement([[1, 2]], [[1, 2, 3]])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=1, max_size=4),
       st.integers(0, 2**31))
def test_metric_bounds_and_identities(seqs, seed):
    """Agreement with oneself is 1; every metric lies in [0, 1]; the prefix never exceeds the
    position-wise agreement."""
    g = torch.Generator().manual_seed(seed)
    other = [[int(t) for t in torch.randint(0, 6, (6,), generator=g)] for _ in seqs]
    assert token_agreement(seqs, seqs) == (1.0, 1.0)
    agree, prefix = token_agreement(seqs, other)
    assert 0.0 <= prefix <= agree <= 1.0
    for value in (repetition_rate(seqs), distinct_n(seqs, 1), distinct_n(seqs, 2)):
        assert 0.0 <= value <= 1.0


# --- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen3-moe"])
def test_greedy_equals_transformers_greedy(arch, tok):
    """The hand loop (KV cache, EOS not special) decodes what ``generate`` decodes greedily."""
    model = load_model(f"random:{arch}")[0]
    prompts = load_prompts()[:2]
    ours = greedy_continuations(model, tok, prompts, 12)
    for prompt, cont in zip(prompts, ours):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        cfg = GenerationConfig(do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               eos_token_id=None, pad_token_id=0)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        assert out[0, ids.shape[1]:].tolist() == cont
    assert all(len(c) == 12 for c in ours)


def test_without_a_kv_cache_every_step_reruns_the_sequence(tok):
    model = load_model("random:llama")[0]

    class NoCache(torch.nn.Module):
        """The same model behind a forward that returns logits only."""

        def __init__(self):
            super().__init__()
            self.inner = model
            self.calls = []

        def forward(self, input_ids, **kwargs):
            self.calls.append(input_ids.shape[1])
            return (self.inner(input_ids=input_ids).logits,)

    wrapped = NoCache()
    prompts = load_prompts()[:2]
    assert greedy_continuations(wrapped, tok, prompts, 5) == \
        greedy_continuations(model, tok, prompts, 5)
    n = len(tok(prompts[1], add_special_tokens=False)["input_ids"])
    assert wrapped.calls[-5:] == [n, n + 1, n + 2, n + 3, n + 4]


def test_bos_is_prepended_when_the_tokenizer_does(tok):
    model = load_model("random:llama")[0]
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    try:
        greedy_continuations(model, make_tokenizer(add_bos=True), ["ab"], 1)
        greedy_continuations(model, tok, ["ab"], 1)
    finally:
        hook.remove()
    ab = tok("ab", add_special_tokens=False)["input_ids"]
    assert seen == [[1] + ab, ab]


def test_a_collapsed_generator_is_visible(tok):
    """A model that always predicts one token: repetition near 1, distinct-n near 0, agreement
    with a healthy reference near 0; the model's mode is restored."""
    x = tok("x", add_special_tokens=False)["input_ids"][0]

    class Stuck(torch.nn.Module):
        config = None

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kwargs):
            logits = torch.zeros(*input_ids.shape, 256)
            logits[..., x] = 1.0
            return (logits,)

    stuck = Stuck().train()
    prompts = load_prompts()[:4]
    out = greedy_continuations(stuck, tok, prompts, 16)
    assert stuck.training and out == [[x] * 16] * 4
    healthy = greedy_continuations(load_model("random:gemma3")[0], tok, prompts, 16)
    m = generation_metrics(out, healthy)
    assert m["repetition"] == pytest.approx(1 - 1 / 13)
    assert m["distinct_1"] == pytest.approx(1 / 64) and m["distinct_2"] == pytest.approx(1 / 60)
    h = generation_metrics(healthy, healthy)
    assert m["agreement"] < 0.2 and h["agreement"] == 1.0 and h["distinct_2"] > 5 * m["distinct_2"]


def test_bad_prompts_and_lengths_fail_clearly(tok, tmp_path):
    model = load_model("random:llama")[0]
    with pytest.raises(PrunegraphError, match="positive integer"):
        greedy_continuations(model, tok, ["a"], 0)
    with pytest.raises(PrunegraphError, match="encodes to no token"):
        greedy_continuations(model, tok, [""], 2)
    with pytest.raises(PrunegraphError, match="does not exist"):
        load_prompts(str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PrunegraphError, match="holds no prompt"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "p.txt").write_text("first prompt\n\n second \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second"]


def test_shipped_prompts_are_distinct_sentence_openings():
    prompts = load_prompts()
    assert len(prompts) == 32 and len(set(prompts)) == 32
    assert all(5 <= len(p.split()) <= 16 for p in prompts)


def test_records_and_reference_checks(tok):
    rec = generation_record(["ab", "cd"], [[10, 11, 12], [13, 14, 15]], tok)
    assert rec["texts"] == [tok.decode([10, 11, 12]), tok.decode([13, 14, 15])]
    check_reference(rec, ["ab", "cd"], 3, "ref")
    check_reference(rec, ["ab", "cd"], 2, "ref")
    with pytest.raises(PrunegraphError, match="other prompts"):
        check_reference(rec, ["ab"], 3, "ref")
    with pytest.raises(PrunegraphError, match="holds 3 tokens a prompt, fewer than the 4"):
        check_reference(rec, ["ab", "cd"], 4, "ref")
    with pytest.raises(PrunegraphError, match="not a generation record"):
        check_reference({"tokens": []}, ["ab"], 1, "ref")
