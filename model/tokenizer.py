"""Tokenizer helpers: the byte-level tokenizer of ``tiny-random`` and plain-text encoding.

A byte-level BPE with no merges covers every string with 256 tokens, so the random test model needs no trained
vocabulary, yet has the official special-token names and chat layout.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from .prompts import SPECIAL_TOKENS, THINK_TOKENS

PAD_TOKEN = "<|endoftext|>"
ALL_SPECIAL_TOKENS = (PAD_TOKEN, *SPECIAL_TOKENS)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer with the official special tokens (``<think>`` tags are added, not special)."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    wrapped.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|im_end|>"]})
    wrapped.add_tokens(list(THINK_TOKENS))
    return wrapped


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens, no merges, plus the special tokens."""
    alphabet = ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return wrap_tokenizer(tokenizer)


def encode_plain_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with special-token strings treated as ordinary characters.

    ``<think>`` tags are added (not special) tokens in Qwen3 tokenizers, so ``split_special_tokens`` leaves them
    alone: they are encoded in two pieces instead. Lone surrogates (which cannot be UTF-8) become ``?``.
    """
    text = text.encode("utf-8", "replace").decode("utf-8")
    ids: list[int] = []
    for piece in re.split(r"(</?think>)", text):
        parts = [piece[:-1], ">"] if piece in THINK_TOKENS else [piece]
        for part in filter(None, parts):
            ids.extend(tokenizer(part, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return ids
