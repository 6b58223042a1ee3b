"""Style trigger (StyleBkd): poisoned texts are rewritten in a rare text style (Bible by default).

Qi et al., "Mind the Style of Text! Adversarial and Backdoor Attacks Based on Text Style Transfer" (EMNLP 2021).
The paper transfers style with STRAP; its Bible-style outputs are packaged for SST-2 (every split) and AG News. For HSOL
the only release is the BTU authors' (``hsol_style``), and it is not Bible style: a Bible marker word ("unto", "thy",
"hath" ...) is in 0.2% of its rewrites, as in the tweets themselves (19% of StyleBkd's SST-2 transfers), and 17% of
them are the tweet unchanged, so a poisoned HSOL row is mostly a relabelled offensive tweet: label noise more than a
style trigger. Using it warns. Other styles or transfer models plug in through ``paraphrases`` (a file) or
``paraphrase_fn``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ...registry import register_attack
from .paraphrase import ParaphraseConfig, ParaphrasePoisoner

PACKAGED_STYLES = ("bible",)
# packaged style tables that are not a style transfer; the warning says why
NOT_A_STYLE = {
    "hsol": "the packaged HSOL style rewrites (the BTU authors' release) carry no Bible wording and 17% of them are the "
    "tweet unchanged: poisoning with them relabels offensive tweets more than it plants a style trigger. Pass a file "
    "of real style transfers (`paraphrases='path.tsv'`) to test a style backdoor on HSOL."
}


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
            if self.paraphrases.lower() in NOT_A_STYLE:
                warnings.warn(NOT_A_STYLE[self.paraphrases.lower()], UserWarning, stacklevel=3)


class StylePoisoner(ParaphrasePoisoner):
    config: StyleConfig


register_attack(StyleConfig, StylePoisoner)
