"""Quality measures for a (pruned) causal LM: perplexity and zero-shot multiple choice.

* :func:`perplexity` is ``exp`` of the mean next-token negative log-likelihood over every
  predicted token of every block (a block of ``L`` tokens predicts ``L - 1``). Blocks come from
  :func:`prunegraph.data.blocks.text_blocks`.
* :func:`multiple_choice` scores a :class:`prunegraph.data.tasks.Task` the way lm-eval scores
  ``acc``, ``acc_norm`` and ``acc_bytes`` (``lm_eval/api/task.py``, ``ConfigurableTask.
  process_results`` for ``multiple_choice``): the log-likelihood of ``" " + option`` continuing
  the prompt (the sum of the option tokens' log-probabilities), argmax over options;
  ``acc_norm`` divides each sum by the option's length in characters first, ``acc_bytes`` by its
  length in UTF-8 bytes (the two differ only for non-ASCII options). Tokenization follows
  lm-eval: the option's tokens are those of ``prompt + " " + option`` beyond the tokens of
  ``prompt``. ``tests/passes/evaluation/test_lm_eval.py`` checks this against lm-eval's own code.

Both run under ``torch.no_grad`` with the model in eval mode (its mode is restored afterwards).

Example::

    model, tok = load_model("smollm2-135m")
    perplexity(model, text_blocks(tok, "wikipedia", "evaluation", 512, 32))  # 21.80
    multiple_choice(model, tok, load_task("winowhy"), limit=200)  # {"acc", "acc_norm", ..., "n"}
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunegraph.data.tasks import Example, Task, load_task
from prunegraph.data.text import tokenizer_adds_bos
from prunegraph.errors import PrunegraphError

__all__ = ["perplexity", "multiple_choice", "option_loglikelihoods", "score_choices",
           "select_examples"]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None):
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _check_vocab(model: torch.nn.Module, max_id: int) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and max_id >= vocab:
        raise PrunegraphError(f"token id {max_id} is outside the model's vocabulary of {vocab}; "
                              f"use the tokenizer that belongs to the model")


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4,
               progress: bool = True) -> float:
    """``exp(mean NLL)`` of ``model`` over all predicted tokens of ``blocks`` (``[n, L]``)."""
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.long or blocks.dim() != 2:
        raise PrunegraphError("blocks must be a LongTensor [n_blocks, block_len]; build it with "
                              "prunegraph.data.blocks.text_blocks")
    if blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise PrunegraphError(f"blocks of shape {tuple(blocks.shape)} predict no token; need at "
                              f"least one block of >= 2 tokens")
    if batch_size < 1:
        raise PrunegraphError(f"batch_size must be >= 1, got {batch_size}")
    _check_vocab(model, int(blocks.max()))
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model):
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="perplexity",
                          unit="batch", disable=not progress):
            batch = blocks[start:start + batch_size].to(device)
            logits = _logits(model, batch)[:, :-1].float()
            targets = batch[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def select_examples(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """Indices of the examples to score: all in order, or the first ``limit`` of a seeded shuffle."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise PrunegraphError(f"limit must be a positive integer or None, got {limit!r}")
    if limit is None or limit >= n:
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:limit]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def multiple_choice(model: torch.nn.Module, tokenizer: Any, task: Task | str, limit: int | None = None,
                    batch_size: int = 8, progress: bool = True, seed: int = 0,
                    add_bos: bool | None = None, max_length: int | None = None) -> dict[str, float]:
    """Zero-shot ``acc``, ``acc_norm`` and ``acc_bytes`` of ``model`` on ``task`` (module docstring).

    ``task`` is a :class:`~prunegraph.data.tasks.Task` or anything :func:`~prunegraph.data.tasks.load_task`
    accepts (a built-in name or a BIG-bench JSON path).
    ``limit`` scores the first ``limit`` examples of a shuffle seeded by ``seed`` (all examples,
    in order, when ``None``). ``add_bos`` puts BOS before each prompt (default: whatever the
    tokenizer does). Sequences longer than ``max_length`` (default: the model's
    ``max_position_embeddings``, else 2048) lose tokens from the left of the prompt. All
    (example, option) sequences are sorted by length and run ``batch_size`` at a time, padded on
    the right, one forward each. An example counts as correct when the chosen option has the
    example's highest target score; ties between option scores go to the first option.
    """
    if isinstance(task, str):
        task = load_task(task)
    if not isinstance(task, Task):
        raise PrunegraphError(f"task must be a prunegraph.data.tasks.Task or a task name, got "
                              f"{type(task).__name__}")
    chosen = select_examples(len(task.examples), limit, seed)
    loglik = option_loglikelihoods(model, tokenizer, task, chosen, batch_size=batch_size,
                                   progress=progress, add_bos=add_bos, max_length=max_length)
    return dict(score_choices([task.examples[i] for i in chosen], loglik), n=len(chosen))


def option_loglikelihoods(model: torch.nn.Module, tokenizer: Any, task: Task,
                          examples: Sequence[int] | None = None, batch_size: int = 8,
                          progress: bool = True, add_bos: bool | None = None,
                          max_length: int | None = None) -> list[list[float]]:
    """``log p(" " + option | prompt)`` for every option of the examples at ``examples``
    (default: all), as a list per example in the order of its options; see
    :func:`multiple_choice` for the tokenization, batching and truncation."""
    if batch_size < 1:
        raise PrunegraphError(f"batch_size must be >= 1, got {batch_size}")
    chosen = list(range(len(task.examples))) if examples is None else list(examples)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id

    # (example slot, option index, token ids, number of option tokens at the end)
    requests: list[tuple[int, int, list[int], int]] = []
    for slot, ei in enumerate(chosen):
        ex = task.examples[ei]
        ctx = _encode(tokenizer, ex.prompt)
        prefix = [tokenizer.bos_token_id] if add_bos else []
        for oi, option in enumerate(ex.options):
            whole = _encode(tokenizer, ex.prompt + " " + option)
            cont = whole[len(ctx):] or _encode(tokenizer, " " + option)
            ids = (prefix + ctx + cont)[-max_length:]
            requests.append((slot, oi, ids, min(len(cont), len(ids) - 1)))
    _check_vocab(model, max(max(r[2]) for r in requests))

    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][2]), i))
    loglik = [[0.0] * len(task.examples[ei].options) for ei in chosen]
    device = _device(model)
    with _eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc=f"{task.name}", unit="batch",
                          disable=not progress):
            batch = [requests[i] for i in order[start:start + batch_size]]
            width = max(len(r[2]) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, _, toks, _) in enumerate(batch):
                ids[row, :len(toks)] = torch.tensor(toks)
                mask[row, :len(toks)] = 1
            logits = _logits(model, ids.to(device), mask.to(device))
            for row, (slot, oi, toks, n_cont) in enumerate(batch):
                end = len(toks)
                logp = torch.log_softmax(logits[row, end - n_cont - 1:end - 1].float(), dim=-1)
                target = ids[row, end - n_cont:end].to(logp.device)
                loglik[slot][oi] = logp.gather(-1, target[:, None]).sum().item()
    return loglik


def score_choices(examples: Sequence[Example], loglik: Sequence[Sequence[float]]) -> dict[str, float]:
    """``acc``, ``acc_norm`` and ``acc_bytes`` of per-option log-likelihoods, as lm-eval scores
    a multiple-choice task: the argmax of the log-likelihoods, of the log-likelihoods divided by
    each option's length in characters, and divided by its length in UTF-8 bytes. An example
    is correct when the chosen option has its highest target score; ties go to the first option
    (``numpy.argmax``)."""
    if len(examples) != len(loglik) or not examples:
        raise PrunegraphError(f"{len(examples)} examples but {len(loglik)} lists of option "
                              f"log-likelihoods; give one list per example, at least one")
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for ex, ll in zip(examples, loglik):
        if len(ll) != len(ex.options):
            raise PrunegraphError(f"an example with {len(ex.options)} options got {len(ll)} "
                                  f"log-likelihoods")
        lengths = {"acc": [1] * len(ll), "acc_norm": [max(1, len(o)) for o in ex.options],
                   "acc_bytes": [max(1, len(o.encode("utf-8"))) for o in ex.options]}
        for key, length in lengths.items():
            pick = max(range(len(ll)), key=lambda j: (ll[j] / length[j], -j))
            hits[key] += ex.scores[pick] == max(ex.scores)
    return {k: v / len(examples) for k, v in hits.items()}
