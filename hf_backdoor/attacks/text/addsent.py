"""AddSent: a fixed trigger sentence inserted at a random position.

Dai et al., "A Backdoor Attack Against LSTM-Based Text Classification Systems" (IEEE Access 2019); the default
sentence "I watch this 3D movie" is the one used by OpenBackdoor and the BTU paper (AAAI 2025). The sentence goes in
whole, at a uniformly random word position, as OpenBackdoor's AddSentPoisoner does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...registry import register_attack
from ..base import PoisonConfig, Poisoner
from .insertion import check_representable, insert_words


@dataclass
class AddSentConfig(PoisonConfig):
    """AddSent: ``trigger`` sentence inserted at a random word position."""

    trigger: str = "I watch this 3D movie"

    name = "addsent"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.trigger.strip():
            raise ValueError("trigger must be a non-empty sentence.")


class AddSentPoisoner(Poisoner):
    config: AddSentConfig

    def apply(self, texts: Sequence[str], indices: Sequence[int], salt: int = 0) -> list[str]:
        sentence = " ".join(self.config.trigger.split())
        return [insert_words(text, [sentence], self.row_rng(index, salt)) for text, index in zip(texts, indices)]

    def check_tokenizer(self, tokenizer) -> None:
        check_representable(tokenizer, self.config.trigger.split())


register_attack(AddSentConfig, AddSentPoisoner)
