"""Defenses: one module per method, each a config dataclass plus a :class:`Defense`, and a name registry."""

from .abl import ABLConfig, ABLDefense
from .base import DEFENSES, Defense, DefenseConfig, build_defense, register_defense
from .btu import BTUConfig, BTUDefense
from .cul import ExposeConfig
from .exposure import ExposureResult, detection_threshold, expose_model
from .nad import NADConfig
from .nwc import NWCConfig
from .rnp import RNPConfig, prune_at_threshold
from .sanitize import SANITIZERS, FinetuneConfig, SanitizeConfig, register_sanitizer, sanitize_model
from .units import TransformerUnits

__all__ = [
    "DEFENSES",
    "SANITIZERS",
    "ABLConfig",
    "ABLDefense",
    "BTUConfig",
    "BTUDefense",
    "Defense",
    "DefenseConfig",
    "ExposeConfig",
    "ExposureResult",
    "FinetuneConfig",
    "NADConfig",
    "NWCConfig",
    "RNPConfig",
    "SanitizeConfig",
    "TransformerUnits",
    "build_defense",
    "detection_threshold",
    "expose_model",
    "prune_at_threshold",
    "register_defense",
    "register_sanitizer",
    "sanitize_model",
]
