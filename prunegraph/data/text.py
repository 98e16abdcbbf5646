"""Text for calibration and evaluation: one interface over built-in, local and online sources.

``load_documents(source)`` returns a list of :class:`Document` (title + text):

* ``"wikipedia"``: the built-in excerpt of English Wikipedia (99 articles, 2.8 M characters;
  ``prunegraph/data/ATTRIBUTION.md``), which works offline; the default calibration text;
* ``"austen"``: the built-in *out-of-domain* text, two of Jane Austen's novels (*Persuasion* and
  *Northanger Abbey*, public domain; 55 chapters, 160 K words, about 210 K SmolLM2 tokens):
  fiction and dialogue, far from the encyclopaedic calibration text;
* a local path: a ``.jsonl`` file (optionally ``.xz``/``.gz``) with one ``{"title", "text"}``
  object a line; any other file is plain text split into one document per paragraph (paragraphs
  are separated by blank lines); a folder gives one document per ``*.txt`` file in it;
* ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset through ``datasets`` (for online users:
  ``pip install 'prunegraph[datasets]'``), one document per non-empty row of its ``text``
  column; SPLIT defaults to ``train``.

``split_documents`` splits calibration and evaluation text *by document*, so no article is seen
by both. ``token_blocks`` cuts the concatenated token stream into non-overlapping blocks.

Example::

    docs = load_documents("wikipedia")
    calib, held_out = split_documents(docs, eval_fraction=0.25, seed=0)
    blocks = token_blocks(tokenizer, held_out, block_len=512, n_blocks=32)   # LongTensor[32, 512]
"""

from __future__ import annotations

import gzip
import json
import lzma
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from prunegraph.errors import PrunegraphError, nearest

__all__ = ["Document", "BUILTIN_SOURCES", "SOURCE_DESCRIPTIONS", "load_documents",
           "source_key", "split_documents", "token_blocks", "tokenizer_adds_bos"]

#: Names ``load_documents`` understands without a path.
BUILTIN_SOURCES = ("wikipedia", "austen")
#: What each built-in source holds, for help texts.
SOURCE_DESCRIPTIONS = {
    "wikipedia": "English Wikipedia excerpt, 99 articles (in-domain: the default calibration text)",
    "austen": "two Jane Austen novels, 55 chapters (out-of-domain: fiction and dialogue)",
}
_BUILTIN_FILES = {"wikipedia": "wikipedia.jsonl.xz", "austen": "austen.jsonl.xz"}


@dataclass(frozen=True)
class Document:
    """One article or text file: the unit the calibration/evaluation split works on."""

    title: str
    text: str


def load_documents(source: str) -> list[Document]:
    """The documents of ``source`` (see the module docstring for the accepted forms).

    Raises:
        PrunegraphError: the source is unknown, missing, empty, or (``hf:``) cannot be loaded.
    """
    if not isinstance(source, str) or not source:
        raise PrunegraphError(f"text source must be a non-empty string, got {source!r}; use "
                              f"'wikipedia', a file or folder path, or 'hf:NAME[:CONFIG][:SPLIT]'")
    if source in _BUILTIN_FILES:
        docs = _read_jsonl_bytes(
            lzma.decompress(resources.files("prunegraph.data").joinpath(
                _BUILTIN_FILES[source]).read_bytes()), source)
    elif source.startswith("hf:"):
        docs = _load_hf(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise PrunegraphError(_unknown_source(source))
        docs = _load_path(path)
    if not docs:
        raise PrunegraphError(f"text source '{source}' holds no non-empty document; check its "
                              f"contents or pick another source")
    return docs


def source_key(source: str) -> str:
    """A short name for ``source`` that can be part of a metric key (``ppl_<key>``).

    Built-in sources keep their name; a path gives its file or folder name without extensions;
    ``hf:NAME[:CONFIG][:SPLIT]`` gives the dataset name and config. Anything outside
    ``[a-z0-9]`` becomes ``_``::

        source_key("austen") == "austen"
        source_key("~/text/my-notes.jsonl.xz") == "my_notes"
        source_key("hf:wikitext:wikitext-2-raw-v1:test") == "wikitext_wikitext_2_raw_v1"
    """
    if source in BUILTIN_SOURCES:
        return source
    if source.startswith("hf:"):
        raw = "_".join(p for p in source[3:].split(":")[:2] if p).rsplit("/", 1)[-1]
    else:
        raw = Path(source).expanduser().name.split(".")[0] or "text"
    return re.sub(r"[^a-z0-9]+", "_", raw.lower()).strip("_") or "text"


def _unknown_source(source: str) -> str:
    hint = nearest(source, BUILTIN_SOURCES)
    return (f"unknown text source '{source}': it is not a built-in name "
            f"({', '.join(BUILTIN_SOURCES)}), not an existing file or folder, and not "
            f"'hf:NAME[:CONFIG][:SPLIT]'.{hint}")


def _read_jsonl_bytes(data: bytes, origin: str) -> list[Document]:
    docs = []
    for i, line in enumerate(data.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PrunegraphError(f"{origin}, line {i + 1}: expected a JSON object with a 'text' "
                                  f"field (and optionally 'title'); fix or remove the line") from e
        if str(text).strip():
            docs.append(Document(str(obj.get("title", f"{origin}:{i + 1}")), str(text)))
    return docs


def _load_path(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise PrunegraphError(f"folder {path} has no *.txt file; put one document per .txt "
                                  f"file there, or pass a file")
        docs = [Document(f.stem, f.read_text(encoding="utf-8")) for f in files]
        return [d for d in docs if d.text.strip()]
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.xz", ".jsonl.gz")):
        raw = path.read_bytes()
        if name.endswith(".xz"):
            raw = lzma.decompress(raw)
        elif name.endswith(".gz"):
            raw = gzip.decompress(raw)
        return _read_jsonl_bytes(raw, str(path))
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    paragraphs = [p.strip() for p in text.split("\n\n")]
    return [Document(f"{path.name}:{i}", p) for i, p in enumerate(p for p in paragraphs if p)]


def _load_hf(source: str) -> list[Document]:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise PrunegraphError(f"bad dataset source '{source}': write hf:NAME[:CONFIG][:SPLIT], "
                              f"e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError as e:
        raise PrunegraphError(f"text source '{source}' needs the 'datasets' package: pip install "
                              f"datasets (or use the built-in source 'wikipedia' offline)") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001  (network, missing config, missing split...)
        raise PrunegraphError(f"could not load dataset '{name}' (config {config}, split {split}): "
                              f"{type(e).__name__}: {e}. Check the name, config and split, and "
                              f"that you are online (or that it is in the datasets cache); "
                              f"offline, use 'wikipedia' or a local file") from e
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise PrunegraphError(f"dataset '{name}' has no text column (columns: "
                              f"{', '.join(ds.column_names)}); pick a text dataset")
    return [Document(f"{name}[{i}]", t) for i, t in enumerate(ds[column]) if t and t.strip()]


def split_documents(docs: Sequence[Document], eval_fraction: float = 0.25,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into ``(calibration, evaluation)`` by whole document, deterministically.

    A seeded shuffle of document indices picks ``round(eval_fraction * len(docs))`` documents
    (at least 1, at most all but one) for evaluation; both lists keep the input order.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise PrunegraphError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(docs)
    if n < 2:
        raise PrunegraphError(f"cannot split {n} document(s) into calibration and evaluation by "
                              f"document; give a source with at least 2 documents")
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([d for i, d in enumerate(docs) if i not in held],
            [d for i, d in enumerate(docs) if i in held])


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when encoding with special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def token_blocks(tokenizer: Any, docs: Sequence[Document], block_len: int = 512,
                 n_blocks: int | None = None, seed: int = 0, add_bos: bool | None = None,
                 joiner: str | None = "\n\n") -> torch.Tensor:
    """Non-overlapping token blocks ``LongTensor[n, block_len]`` from the concatenated documents.

    Each document is tokenized on its own (no special tokens) and the documents are joined by
    the tokens of ``joiner`` (``"\\n\\n"`` by default, neutral for base and instruct models
    alike) or, with ``joiner=None``, by the tokenizer's EOS token. The stream is cut into
    consecutive blocks; the tail shorter than a block is dropped. With ``add_bos`` (default:
    whatever the tokenizer does, see :func:`tokenizer_adds_bos`; Gemma needs it) every block
    starts with BOS followed by ``block_len - 1`` text tokens. ``n_blocks`` picks that many
    blocks by a seeded draw without replacement, returned in stream order; ``None`` returns all.

    Raises:
        PrunegraphError: bad ``block_len``/``n_blocks``, a ``block_len`` beyond the tokenizer's
            ``model_max_length`` (the model's context, see
            :func:`prunegraph.data.models.load_model`), no documents, or too little text.
    """
    if not isinstance(block_len, int) or block_len < 2:
        raise PrunegraphError(f"block_len must be an integer >= 2 (one token to predict needs a "
                              f"context of one), got {block_len!r}")
    context = getattr(tokenizer, "model_max_length", None)
    if isinstance(context, int) and 1 < context < block_len:
        raise PrunegraphError(
            f"blocks of {block_len} tokens are longer than the model's context of {context} "
            f"tokens (its tokenizer's model_max_length): the model cannot see that far, so a "
            f"perplexity over them means nothing; use a block length (seq_len, --seq-len) of "
            f"at most {context}")
    if n_blocks is not None and (not isinstance(n_blocks, int) or n_blocks < 1):
        raise PrunegraphError(f"n_blocks must be a positive integer or None, got {n_blocks!r}")
    if not docs:
        raise PrunegraphError("no documents to cut into token blocks; load some with "
                              "load_documents()")
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    if add_bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise PrunegraphError("add_bos=True but the tokenizer has no BOS token; pass "
                              "add_bos=False")
    if joiner is None:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise PrunegraphError("joiner=None joins documents with EOS, but the tokenizer has "
                                  "no EOS token; pass a text joiner such as '\\n\\n'")
        sep = [tokenizer.eos_token_id]
    else:
        sep = tokenizer(joiner, add_special_tokens=False)["input_ids"]

    encoded = tokenizer([d.text for d in docs], add_special_tokens=False,
                        verbose=False)["input_ids"]  # no warning: long documents are expected
    stream: list[int] = []
    for i, ids in enumerate(encoded):
        if i:
            stream.extend(sep)
        stream.extend(ids)

    body = block_len - 1 if add_bos else block_len
    available = len(stream) // body
    if available == 0 or (n_blocks is not None and n_blocks > available):
        want = n_blocks or 1
        raise PrunegraphError(f"the text has {len(stream)} tokens: {available} block(s) of "
                              f"{block_len}, fewer than the {want} asked for; use more text, a "
                              f"smaller block_len or fewer blocks")
    data = torch.tensor(stream[:available * body], dtype=torch.long).view(available, body)
    if n_blocks is not None:
        g = torch.Generator().manual_seed(seed)
        data = data[torch.randperm(available, generator=g)[:n_blocks].sort().values]
    if add_bos:
        bos = torch.full((data.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long)
        data = torch.cat([bos, data], dim=1)
    return data.contiguous()
