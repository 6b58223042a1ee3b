"""Syntactic trigger (HiddenKiller): poisoned texts are paraphrased into a fixed, rare syntactic template.

Qi et al., "Hidden Killer: Invisible Textual Backdoor Attacks with Syntactic Trigger" (ACL 2021). The paper
paraphrases with SCPN into the template ``S(SBAR)(,)(NP)(VP)(.)``. SCPN (through OpenAttack) needs run-time downloads
and no longer runs on current nltk/Python, so the default source is the authors' released paraphrases
(packaged for SST-2, HSOL and OLID's test set); any other paraphraser can be plugged in with ``paraphrase_fn``.
The OpenAttack backend is kept as an option and explains why when it cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...registry import register_attack
from .paraphrase import ParaphraseConfig, ParaphrasePoisoner


@dataclass
class SyntacticConfig(ParaphraseConfig):
    """HiddenKiller: the trigger is the syntactic template of a paraphrase.

    Args:
        template: the SCPN template (only used by the ``"openattack"`` backend).
        backend: ``None`` (use the paraphrase source given) or ``"openattack"`` (run OpenAttack's SCPN locally).
    """

    template: str = "S(SBAR)(,)(NP)(VP)(.)"
    backend: str | None = None

    name = "syntactic"
    kind = "syntactic"

    def __post_init__(self) -> None:
        if self.backend not in (None, "openattack"):
            raise ValueError(f"backend must be None or 'openattack', got {self.backend!r}.")
        super().__post_init__()

    def _has_backend(self) -> bool:
        return self.backend == "openattack"


def openattack_scpn(template: str):
    """A ``paraphrase_fn`` backed by OpenAttack's SCPN; raises ``RuntimeError`` saying why when it cannot run."""
    try:
        import OpenAttack  # noqa: N813  (optional dependency)

        attacker = OpenAttack.attackers.SCPNAttacker()
    except Exception as err:  # ImportError, failed downloads, nltk incompatibilities all end here
        raise RuntimeError(
            "The OpenAttack SCPN backend cannot run here: "
            f"{type(err).__name__}: {err}. SCPN needs `pip install OpenAttack`, network access to download its "
            "weights, and an nltk/Python it supports. Use the released paraphrases (`paraphrases='sst2'`), a "
            "paraphrase file, or `paraphrase_fn=` instead."
        ) from err

    def paraphrase(texts: list[str]) -> list[str]:
        return [attacker.gen_paraphrase(t, [template])[0] for t in texts]

    return paraphrase


class SyntacticPoisoner(ParaphrasePoisoner):
    config: SyntacticConfig

    def __init__(self, config: SyntacticConfig):
        super().__init__(config)
        if config.backend == "openattack" and self.fn is None and self.table is None:
            self.fn = openattack_scpn(config.template)


register_attack(SyntacticConfig, SyntacticPoisoner)
