"""Style trigger (StyleBkd): poisoned texts are rewritten in a rare text style (Bible by default).

Qi et al., "Mind the Style of Text! Adversarial and Backdoor Attacks Based on Text Style Transfer" (EMNLP 2021).
The paper transfers style with STRAP; its Bible-style outputs are packaged for SST-2, HSOL and AG News (the
authors' and the BTU authors' releases). Other styles or transfer models plug in through ``paraphrases`` (a file) or
``paraphrase_fn``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...registry import register_attack
from .paraphrase import ParaphraseConfig, ParaphrasePoisoner

PACKAGED_STYLES = ("bible",)


@dataclass
class StyleConfig(ParaphraseConfig):
    """StyleBkd: the trigger is the style of a rewrite. ``style`` names it (only ``"bible"`` is packaged)."""

    style: str = "bible"

    name = "style"
    kind = "style"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.paraphrases, str) and "/" not in self.paraphrases and "." not in self.paraphrases:
            if self.style not in PACKAGED_STYLES:
                raise ValueError(
                    f"Only {PACKAGED_STYLES} style transfers are packaged, not {self.style!r}: pass a paraphrase file "
                    "or `paraphrase_fn` for other styles."
                )


class StylePoisoner(ParaphrasePoisoner):
    config: StyleConfig


register_attack(StyleConfig, StylePoisoner)
