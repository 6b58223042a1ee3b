"""Image poisoners: one module per attack, each a config dataclass plus an :class:`ImagePoisoner`, registered in
:mod:`hf_backdoor.registry` under the family name (image BadNets is ``"badnet"``, like text BadNet).

They are applied with the same :func:`hf_backdoor.poison_dataset` and :func:`hf_backdoor.make_asr_dataset` as the
text attacks (same row choice, modes and ``poisoned``/``orig_label``/``row_index`` columns).
"""

from ..names import IMAGE_ATTACKS, get_image_attack_config
from .badnets import ImageBadNetsConfig, ImageBadNetsPoisoner
from .base import ImagePoisonConfig, ImagePoisoner
from .blended import BlendedConfig, BlendedPoisoner
from .sig import SIGConfig, SIGPoisoner
from .wanet import WaNetConfig, WaNetPoisoner

__all__ = [
    "IMAGE_ATTACKS",
    "BlendedConfig",
    "BlendedPoisoner",
    "ImageBadNetsConfig",
    "ImageBadNetsPoisoner",
    "ImagePoisonConfig",
    "ImagePoisoner",
    "SIGConfig",
    "SIGPoisoner",
    "WaNetConfig",
    "WaNetPoisoner",
    "get_image_attack_config",
]
