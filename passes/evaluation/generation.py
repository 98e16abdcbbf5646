"""Generation checks: greedy continuations of a (pruned) model against a reference model's.

A pruned model can keep its perplexity and multiple-choice scores while its open generation
collapses into loops; these measures make that visible. For each of a fixed list of prompts
(:func:`load_prompts`: 32 neutral sentence openings shipped in
``prunegraph/data/generation_prompts.txt``), :func:`greedy_continuations` decodes the first
``max_new_tokens`` tokens by plain argmax, and :func:`generation_metrics` compares them:

* ``agreement``: the fraction of the ``N`` positions where the candidate's token equals the
  reference's, averaged over prompts (1.0: the same text; position by position, so a single
  early divergence costs every later position it shifts);
* ``prefix_agreement``: the length of the common prefix over ``N``, averaged over prompts (how
  long the pruned model follows the dense one before it first departs);
* ``repetition``: seq-rep-4 of Welleck et al. 2019 ("Neural text generation with unlikelihood
  training"): per continuation, ``1 - unique 4-grams / 4-grams``, averaged over prompts (0 for
  text without a repeated 4-gram, near 1 for a generator stuck in a loop);
* ``distinct_1``, ``distinct_2``: distinct-n of Li et al. 2016 ("A diversity-promoting objective
  function for neural conversation models"): distinct n-grams over all n-grams, pooled over
  every continuation (low when the model says the same thing whatever the prompt).

Decoding is a hand-written argmax loop over the model's own forward and KV cache rather than
``model.generate``: a metric must not follow a model folder's ``generation_config`` (sampling,
repetition penalty, stopping at EOS), and the dense and pruned models must be decoded alike.
Every continuation is exactly ``max_new_tokens`` long (EOS is a token like the others).

Example::

    prompts = load_prompts()[:16]
    ref = greedy_continuations(dense, tok, prompts, 32)
    out = greedy_continuations(pruned, tok, prompts, 32)
    generation_metrics(out, ref)   # {"agreement": 0.41, "prefix_agreement": 0.22, ...}
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from prunegraph.data.text import tokenizer_adds_bos
from prunegraph.errors import PrunegraphError

__all__ = ["BUILTIN_PROMPTS", "load_prompts", "greedy_continuations", "token_agreement",
           "repetition_rate", "distinct_n", "generation_metrics", "generation_record",
           "check_reference"]

#: File of the shipped prompts in ``prunegraph.data``, one prompt a line.
BUILTIN_PROMPTS = "generation_prompts.txt"


def load_prompts(path: str | None = None) -> list[str]:
    """The shipped prompts, or those of a UTF-8 text file with one prompt a line.

    Raises:
        PrunegraphError: the file is missing or holds no prompt.
    """
    if path is None:
        text = resources.files("prunegraph.data").joinpath(BUILTIN_PROMPTS).read_text("utf-8")
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise PrunegraphError(f"prompt file {path} does not exist; give a text file with one "
                                  f"prompt a line")
        text = file.read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PrunegraphError(f"prompt file {path} holds no prompt; write one prompt a line")
    return prompts


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` in newer transformers, ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _forward(model: torch.nn.Module, ids: torch.Tensor, cache: Any, cache_arg: str):
    out = model(input_ids=ids, use_cache=True, **({cache_arg: cache} if cache is not None else {}))
    logits = out.logits if hasattr(out, "logits") else out[0]
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return logits[:, -1].float(), new_cache


def greedy_continuations(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                         max_new_tokens: int = 32, add_bos: bool | None = None,
                         progress: bool = False) -> list[list[int]]:
    """The first ``max_new_tokens`` argmax tokens after each prompt, one prompt at a time.

    ``add_bos`` puts BOS before each prompt (default: whatever the tokenizer does). With a model
    that returns no KV cache, every step re-runs the whole sequence (same tokens, slower).
    """
    from tqdm.auto import tqdm

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PrunegraphError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    cache_arg = _cache_argument(model)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        with torch.no_grad():
            for prompt in tqdm(prompts, desc="generation", unit="prompt", disable=not progress):
                ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                ids = ([tokenizer.bos_token_id] if add_bos else []) + ids
                if not ids:
                    raise PrunegraphError(f"prompt {prompt!r} encodes to no token; give a "
                                          f"non-empty prompt")
                if vocab is not None and max(ids) >= vocab:
                    raise PrunegraphError(f"prompt {prompt!r} has token id {max(ids)}, outside "
                                          f"the model's vocabulary of {vocab}; use the "
                                          f"tokenizer that belongs to the model")
                seq = torch.tensor([ids], device=device)
                logits, cache = _forward(model, seq, None, cache_arg)
                new: list[int] = []
                for step in range(max_new_tokens):
                    token = int(logits[0].argmax())
                    new.append(token)
                    if step + 1 == max_new_tokens:
                        break
                    seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
                    if cache is None:
                        logits, _ = _forward(model, seq, None, cache_arg)
                    else:
                        logits, cache = _forward(model, seq[:, -1:], cache, cache_arg)
                out.append(new)
    finally:
        model.train(was_training)
    return out


def _check_lengths(seqs: Sequence[Sequence[int]], what: str) -> int:
    if not seqs:
        raise PrunegraphError(f"no {what} continuations to measure")
    n = len(seqs[0])
    if n < 1 or any(len(s) != n for s in seqs):
        raise PrunegraphError(f"{what} continuations must all have the same positive length, "
                              f"got lengths {sorted({len(s) for s in seqs})}")
    return n


def token_agreement(reference: Sequence[Sequence[int]],
                    candidate: Sequence[Sequence[int]]) -> tuple[float, float]:
    """``(agreement, prefix_agreement)`` of ``candidate`` to ``reference`` (module docstring)."""
    n = _check_lengths(candidate, "candidate")
    if len(reference) != len(candidate) or _check_lengths(reference, "reference") < n:
        raise PrunegraphError(f"the reference has {len(reference)} continuations of "
                              f"{len(reference[0]) if reference else 0} tokens; the candidate "
                              f"{len(candidate)} of {n}: generate both from the same prompts, the "
                              f"reference with at least as many tokens")
    same = prefix = 0
    for ref, cand in zip(reference, candidate):
        matches = [a == b for a, b in zip(ref[:n], cand)]
        same += sum(matches)
        prefix += next((i for i, m in enumerate(matches) if not m), n)
    total = n * len(candidate)
    return same / total, prefix / total


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def repetition_rate(seqs: Sequence[Sequence[int]], n: int = 4) -> float:
    """seq-rep-n: mean over continuations of ``1 - unique n-grams / n-grams`` (0 if none)."""
    rates = []
    for seq in seqs:
        grams = _ngrams(seq, n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """distinct-n: distinct n-grams over all n-grams, pooled over continuations (0 if none)."""
    grams = [g for seq in seqs for g in _ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generation_metrics(candidate: Sequence[Sequence[int]],
                       reference: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Repetition and diversity of ``candidate``, and its agreement to ``reference`` if given."""
    n = _check_lengths(candidate, "candidate")
    out: dict[str, float] = {"prompts": len(candidate), "tokens": n}
    if reference is not None:
        out["agreement"], out["prefix_agreement"] = token_agreement(reference, candidate)
    out.update(repetition=repetition_rate(candidate, 4), distinct_1=distinct_n(candidate, 1),
               distinct_2=distinct_n(candidate, 2))
    return out


def generation_record(prompts: Sequence[str], continuations: Sequence[Sequence[int]],
                      tokenizer: Any) -> dict[str, Any]:
    """What a run keeps of one model's continuations: prompts, token ids and decoded text."""
    return {"prompts": list(prompts), "tokens": [list(c) for c in continuations],
            "texts": [tokenizer.decode(c) for c in continuations]}


def check_reference(record: Any, prompts: Sequence[str], max_new_tokens: int, where: str) -> None:
    """Raise unless ``record`` (see :func:`generation_record`) holds continuations of at least
    ``max_new_tokens`` tokens for exactly ``prompts``."""
    if not (isinstance(record, dict) and isinstance(record.get("prompts"), list)
            and isinstance(record.get("tokens"), list)):
        raise PrunegraphError(f"{where} is not a generation record (a mapping with 'prompts' and "
                              f"'tokens'); use the generations.json that a run writes")
    if list(record["prompts"]) != list(prompts):
        raise PrunegraphError(f"{where} was generated from other prompts ({len(record['prompts'])} "
                              f"of them) than the {len(prompts)} asked for now; use the same "
                              f"number of prompts as the reference")
    have = min((len(t) for t in record["tokens"]), default=0)
    if have < max_new_tokens:
        raise PrunegraphError(f"{where} holds {have} tokens a prompt, fewer than the "
                              f"{max_new_tokens} asked for; generate at most {have} tokens")
