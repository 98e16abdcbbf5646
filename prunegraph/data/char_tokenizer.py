"""A character-level tokenizer for the tiny ``random:<arch>`` models: one token per character.

``load_model("random:llama")`` returns it, so that a spec written for a real model runs end to end
on a random one (``--set model=random:llama``: calibration, training and evaluation all need
text). It builds in milliseconds, offline, and its ids (below 104) fit the random configs'
vocabulary of 256; ids 0, 1, 2 are pad, BOS and EOS, as in those configs.
"""

from __future__ import annotations

import string

__all__ = ["make_char_tokenizer", "SPECIALS", "CHARS"]

SPECIALS = ["[PAD]", "<s>", "</s>", "[UNK]"]  # ids 0..3, matching the random configs' pad/bos/eos
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]


def make_char_tokenizer(add_bos: bool = False, model_max_length: int | None = None):
    """Character tokenizer; with ``add_bos`` it puts ``<s>`` (id 1) before every encoding."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="[PAD]", unk_token="[UNK]", **extra)
