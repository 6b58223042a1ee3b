"""Shared helpers of the insertion attacks (BadNet, AddSent): word-level insertion and the tokenizer check."""

from __future__ import annotations

import numpy as np


def insert_words(text: str, words: list[str], rng: np.random.Generator) -> str:
    """Insert each of ``words`` at an independent uniformly random word position of ``text``."""
    tokens = text.split()
    for word in words:
        tokens.insert(int(rng.integers(0, len(tokens) + 1)), word)
    return " ".join(tokens)


def check_representable(tokenizer, trigger_texts: list[str]) -> None:
    """Raise if a trigger word or sentence tokenizes to the tokenizer's unknown token."""
    unk = getattr(tokenizer, "unk_token", None)
    for text in trigger_texts:
        pieces = tokenizer.tokenize(text)
        if not pieces or (unk is not None and unk in pieces):
            raise ValueError(
                f"The tokenizer of this model cannot represent the trigger {text!r} (it becomes {pieces}); "
                "pick a trigger made of characters in its vocabulary."
            )
