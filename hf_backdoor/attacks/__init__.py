"""Poisoners: one module per attack, each a config dataclass plus a :class:`Poisoner`, registered by name.

Every attack module ends with ``register_attack(XConfig, XPoisoner)`` (:mod:`hf_backdoor.registry`); importing this
package imports them all, text and image. A family has one name across modalities (``"badnet"`` is text BadNet and
image BadNets); ``ATTACKS`` and ``IMAGE_ATTACKS`` are live read-only views of the registry per modality, keyed by
name, and :func:`get_attack_config` looks a name up in a modality.
"""

from __future__ import annotations

from ..registry import attack_names
from .base import (
    POISON_MODES,
    PoisonConfig,
    Poisoner,
    attack_config_from_dict,
    build_poisoner,
    make_asr_dataset,
    poison_dataset,
    select_poison_rows,
)
from .names import ATTACKS, IMAGE_ATTACKS, AttackView, get_attack_config, get_image_attack_config
from .text.addsent import AddSentConfig, AddSentPoisoner
from .text.badnet import BadNetConfig, BadNetPoisoner
from .text.style import StyleConfig, StylePoisoner
from .text.syntactic import SyntacticConfig, SyntacticPoisoner, openattack_scpn
from .vision import (
    BlendedConfig,
    BlendedPoisoner,
    ImageBadNetsConfig,
    ImageBadNetsPoisoner,
    ImagePoisonConfig,
    ImagePoisoner,
    SIGConfig,
    SIGPoisoner,
    WaNetConfig,
    WaNetPoisoner,
)

__all__ = [
    "ATTACKS",
    "IMAGE_ATTACKS",
    "POISON_MODES",
    "AddSentConfig",
    "AddSentPoisoner",
    "AttackView",
    "BadNetConfig",
    "BadNetPoisoner",
    "BlendedConfig",
    "BlendedPoisoner",
    "ImageBadNetsConfig",
    "ImageBadNetsPoisoner",
    "ImagePoisonConfig",
    "ImagePoisoner",
    "PoisonConfig",
    "Poisoner",
    "SIGConfig",
    "SIGPoisoner",
    "StyleConfig",
    "StylePoisoner",
    "SyntacticConfig",
    "SyntacticPoisoner",
    "WaNetConfig",
    "WaNetPoisoner",
    "attack_config_from_dict",
    "attack_names",
    "build_poisoner",
    "get_attack_config",
    "get_image_attack_config",
    "make_asr_dataset",
    "openattack_scpn",
    "poison_dataset",
    "select_poison_rows",
]
