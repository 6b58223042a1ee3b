"""Defenses: one module per method, each a config dataclass plus a :class:`Defense`, registered by name.

Importing this package imports every built-in defense module, so the registry (``hf_backdoor.registry.DEFENSES``)
holds them all: training-stage ``btu``, ``abl``, ``z_defense``, ``loss_truncation``, ``honeypot`` and ``dpoe``
(``BackdoorSafeTrainer(defense=...)``), repair-stage ``rnp``,
``nad``, ``nwc`` and ``finetune`` (``trainer.sanitize``) and ``expose`` (``trainer.expose``).
"""

from ._shared.context import SanitizeConfig, SanitizeContext
from ._shared.repair import RepairDefense
from .abl import ABLConfig, ABLDefense
from .base import DEFENSES, Defense, DefenseConfig, build_defense, register_defense
from .btu import BTUConfig, BTUDefense
from .cul import ExposeConfig, ExposeDefense
from .dpoe import DPoEConfig, DPoEDefense
from .exposure import ExposureResult, detection_threshold, expose_model
from .finetune import FinetuneConfig, FinetuneDefense
from .honeypot import HoneypotConfig, HoneypotDefense
from .loss_truncation import LossTruncationConfig, LossTruncationDefense
from .nad import NADConfig, NADDefense
from .nwc import NWCConfig, NWCDefense
from .rnp import RNPConfig, RNPDefense, prune_at_threshold
from .sanitize import SANITIZERS, exposed_defenses, get_sanitize_config, sanitize_model
from .units import TransformerUnits
from .z_defense import ZDefenseConfig, ZDefenseDefense

# What the CLI runs when no --defense is given, per stage.
DEFAULT_DEFENSES = {"training": "btu", "repair": "rnp"}

__all__ = [
    "DEFAULT_DEFENSES",
    "DEFENSES",
    "DPoEConfig",
    "DPoEDefense",
    "HoneypotConfig",
    "HoneypotDefense",
    "LossTruncationConfig",
    "LossTruncationDefense",
    "SANITIZERS",
    "ABLConfig",
    "ABLDefense",
    "BTUConfig",
    "BTUDefense",
    "Defense",
    "DefenseConfig",
    "ExposeConfig",
    "ExposeDefense",
    "ExposureResult",
    "FinetuneConfig",
    "FinetuneDefense",
    "NADConfig",
    "NADDefense",
    "NWCConfig",
    "NWCDefense",
    "RNPConfig",
    "RNPDefense",
    "RepairDefense",
    "SanitizeConfig",
    "SanitizeContext",
    "TransformerUnits",
    "ZDefenseConfig",
    "ZDefenseDefense",
    "build_defense",
    "detection_threshold",
    "expose_model",
    "exposed_defenses",
    "get_sanitize_config",
    "prune_at_threshold",
    "register_defense",
    "sanitize_model",
]
