"""Poisoners: one module per attack, each a config dataclass plus a :class:`Poisoner`, and a name registry."""

from .base import (
    POISON_MODES,
    PoisonConfig,
    Poisoner,
    build_poisoner,
    make_asr_dataset,
    poison_dataset,
    select_poison_rows,
)
from .text.addsent import AddSentConfig, AddSentPoisoner
from .text.badnet import BadNetConfig, BadNetPoisoner
from .text.style import StyleConfig, StylePoisoner
from .text.syntactic import SyntacticConfig, SyntacticPoisoner, openattack_scpn

ATTACKS: dict[str, tuple[type[PoisonConfig], type[Poisoner]]] = {
    "badnet": (BadNetConfig, BadNetPoisoner),
    "addsent": (AddSentConfig, AddSentPoisoner),
    "syntactic": (SyntacticConfig, SyntacticPoisoner),
    "style": (StyleConfig, StylePoisoner),
}


def get_attack_config(name: str, **kwargs) -> PoisonConfig:
    """Build an attack config by registry name, e.g. ``get_attack_config("badnet", poison_rate=0.1)``."""
    try:
        config_cls = ATTACKS[name][0]
    except KeyError:
        raise ValueError(f"Unknown attack {name!r}; known attacks: {sorted(ATTACKS)}.") from None
    return config_cls(**kwargs)


__all__ = [
    "ATTACKS",
    "POISON_MODES",
    "AddSentConfig",
    "AddSentPoisoner",
    "BadNetConfig",
    "BadNetPoisoner",
    "PoisonConfig",
    "Poisoner",
    "StyleConfig",
    "StylePoisoner",
    "SyntacticConfig",
    "SyntacticPoisoner",
    "build_poisoner",
    "get_attack_config",
    "make_asr_dataset",
    "openattack_scpn",
    "poison_dataset",
    "select_poison_rows",
]
