"""A character-level tokenizer for tests: one token per character, ids below 256.

Builds in milliseconds (the SmolLM2 tokenizer takes seconds), fits the vocabulary of the tiny
``random:<arch>`` models, and makes token counts easy to compute by hand. It is the tokenizer
``load_model("random:<arch>")`` returns (:mod:`prunegraph.data.char_tokenizer`).
"""

from __future__ import annotations

from prunegraph.data.char_tokenizer import CHARS, SPECIALS, make_char_tokenizer

__all__ = ["make_tokenizer", "SPECIALS", "CHARS"]


def make_tokenizer(add_bos: bool = False):
    """Character tokenizer; with ``add_bos`` it puts ``<s>`` (id 1) before every encoding."""
    return make_char_tokenizer(add_bos)
