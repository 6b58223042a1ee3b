"""Looking attacks up by name: per-modality views of :mod:`hf_backdoor.registry` and the config builders.

Imports only the leaf registry, so both ``hf_backdoor.attacks`` and ``hf_backdoor.attacks.vision`` re-export these
without an import cycle. The views are live: an attack registered later (a user's own) appears in them.
"""

from __future__ import annotations

from ..registry import ATTACKS as _REGISTRY
from ..registry import RegistryEntry, attack_entry, attack_modality
from ..registry_view import RegistryView


class AttackView(RegistryView):
    """The registered attacks of one modality as ``{name: (config_class, poisoner_class)}`` (read-only, live)."""

    def __init__(self, modality: str):
        self.modality = modality

    def _entries(self) -> dict[str, RegistryEntry]:
        return {
            entry.config_class.name: entry
            for entry in _REGISTRY.values()
            if attack_modality(entry.config_class) == self.modality
        }

    def __repr__(self) -> str:
        return f"AttackView({self.modality!r}: {sorted(self)})"


# The text attacks, as before image attacks were added (CLI choices, cards and recipes list these).
ATTACKS = AttackView("text")
IMAGE_ATTACKS = AttackView("image")


def get_attack_config(name: str, modality: str | None = None, **kwargs):
    """Build an attack config by name, e.g. ``get_attack_config("badnet", poison_rate=0.1)``.

    ``modality`` (``"text"``, ``"image"``) picks the family member; without it a name means the text attack when
    one exists, else the only attack of that name (``"blended"``). ``"badnets"`` still works, with a FutureWarning.
    """
    return attack_entry(name, modality=modality).config_class(**kwargs)


def get_image_attack_config(name: str, **kwargs):
    """An image attack config by name, e.g. ``get_image_attack_config("badnet", poison_rate=0.1)``."""
    return get_attack_config(name, modality="image", **kwargs)
