"""Defenses: one module per method, each a config dataclass plus a :class:`Defense`, and a name registry."""

from .base import DEFENSES, Defense, DefenseConfig, build_defense, register_defense
from .btu import BTUConfig, BTUDefense

__all__ = ["DEFENSES", "BTUConfig", "BTUDefense", "Defense", "DefenseConfig", "build_defense", "register_defense"]
