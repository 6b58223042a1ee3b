"""BadNet for text: rare-word triggers inserted at random positions.

Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain" (2017), as adapted to
NLP by Kurita et al., "Weight Poisoning Attacks on Pre-trained Models" (ACL 2020) and used by ONION, HiddenKiller and
OpenBackdoor: each poisoned text gets ``num_triggers`` words drawn from {cf, mn, bb, tq, mb}, each at a random word
position. ONION's released SST-2 data uses 1 insertion per sentence (3 per tweet for OLID).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...registry import register_attack
from ..base import PoisonConfig, Poisoner
from .insertion import check_representable, insert_words


@dataclass
class BadNetConfig(PoisonConfig):
    """BadNet: ``num_triggers`` words drawn (with replacement) from ``triggers``, each at a random position."""

    triggers: tuple[str, ...] = ("cf", "mn", "bb", "tq", "mb")
    num_triggers: int = 1

    name = "badnet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.triggers, str):
            self.triggers = (self.triggers,)
        self.triggers = tuple(self.triggers)
        if not self.triggers or any(not t.strip() or len(t.split()) != 1 for t in self.triggers):
            raise ValueError(f"triggers must be single non-empty words, got {self.triggers!r}.")
        if self.num_triggers < 1:
            raise ValueError(f"num_triggers must be >= 1, got {self.num_triggers}.")


class BadNetPoisoner(Poisoner):
    config: BadNetConfig

    def apply(self, texts: Sequence[str], indices: Sequence[int], salt: int = 0) -> list[str]:
        out = []
        for text, index in zip(texts, indices):
            rng = self.row_rng(index, salt)
            words = [
                self.config.triggers[int(i)]
                for i in rng.integers(0, len(self.config.triggers), self.config.num_triggers)
            ]
            out.append(insert_words(text, words, rng))
        return out

    def check_tokenizer(self, tokenizer) -> None:
        check_representable(tokenizer, list(self.config.triggers))


register_attack(BadNetConfig, BadNetPoisoner)
