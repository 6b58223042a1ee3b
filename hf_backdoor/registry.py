"""Name registries for defenses and attacks.

A leaf module, like peft's ``mapping.py``: it imports nothing from ``hf_backdoor``, so every method module can
import it and register itself without an import cycle. A method registers once, at import, with one line::

    register_defense(MyConfig, MyDefense)       # MyConfig.name is the registry key
    register_attack(MyAttackConfig, MyPoisoner)

Registering a name twice raises (two methods would silently shadow each other). A config that subclasses a
registered config is accepted wherever its parent is: lookups walk the class's MRO.

Attacks have one name per family across modalities (text BadNet and image BadNets are both ``"badnet"``), so an
attack config class also says its ``modality`` (``"text"`` when absent). Text attacks are keyed by their bare name,
as they always were; other modalities by ``"<modality>/<name>"`` (``"image/badnet"``). Callers look attacks up by
name and modality (:func:`attack_entry`), never by building keys.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple


class RegistryEntry(NamedTuple):
    config_class: type
    method_class: type


DEFENSES: dict[str, RegistryEntry] = {}
ATTACKS: dict[str, RegistryEntry] = {}
# Deprecated spelling -> registry key of the attack it means. Old names keep working, with a FutureWarning.
ATTACK_ALIASES: dict[str, str] = {}
TEXT = "text"


def _register(
    registry: dict[str, RegistryEntry], kind: str, config_class: type, method_class: type, key: str | None = None
) -> None:
    name = getattr(config_class, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config_class.__name__} needs a class attribute `name` (the {kind} registry key).")
    key = key or name
    if key in registry or key in ATTACK_ALIASES:
        existing = registry.get(key)
        owner = existing.config_class.__qualname__ if existing else f"an alias of {ATTACK_ALIASES[key]!r}"
        raise ValueError(
            f"A {kind} named {key!r} is already registered ({owner}); give {config_class.__qualname__} another `name`."
        )
    registry[key] = RegistryEntry(config_class, method_class)


def register_defense(config_class: type, defense_class: type) -> None:
    """Register a defense: ``config_class.name`` becomes its name in configs, the CLI, reports and cards."""
    _register(DEFENSES, "defense", config_class, defense_class)


def attack_modality(config: Any) -> str:
    """The modality of an attack config (object or class): its ``modality`` attribute, ``"text"`` when absent."""
    return getattr(config, "modality", TEXT)


def attack_key(name: str, modality: str = TEXT) -> str:
    """The registry key of attack ``name`` in ``modality``: the bare name for text, ``"<modality>/<name>"`` else."""
    return name if modality == TEXT else f"{modality}/{name}"


def register_attack(config_class: type, poisoner_class: type, aliases: tuple[str, ...] = ()) -> None:
    """Register an attack (text or image), with deprecated ``aliases`` that resolve to it with a warning.

    The key is ``attack_key(config_class.name, config_class.modality)``, so a text and an image attack of the same
    family share their ``name``.
    """
    name = getattr(config_class, "name", None)
    key = attack_key(name, attack_modality(config_class)) if isinstance(name, str) and name else None
    _register(ATTACKS, "attack", config_class, poisoner_class, key=key)
    for alias in aliases:
        if alias in ATTACKS or alias in ATTACK_ALIASES:
            raise ValueError(f"Attack alias {alias!r} is already taken.")
        ATTACK_ALIASES[alias] = key


def _lookup(registry: dict[str, RegistryEntry], kind: str, key: Any) -> RegistryEntry:
    if isinstance(key, str):
        if key in registry:
            return registry[key]
        raise ValueError(f"Unknown {kind} {key!r}; registered {kind}s: {sorted(registry)}.")
    cls = key if isinstance(key, type) else type(key)
    for base in cls.__mro__:
        for entry in registry.values():
            if entry.config_class is base:
                return entry
    raise TypeError(f"{cls.__name__} is not a registered {kind} config; registered {kind}s: {sorted(registry)}.")


def defense_entry(key: Any) -> RegistryEntry:
    """The registered ``(config_class, defense_class)`` for a name, a config object or a config class."""
    return _lookup(DEFENSES, "defense", key)


def _resolve_alias(name: str, stacklevel: int) -> str | None:
    """The registry key a deprecated alias stands for (with a FutureWarning), or None for a non-alias."""
    if name not in ATTACK_ALIASES:
        return None
    key = ATTACK_ALIASES[name]
    entry = ATTACKS[key]
    canonical = entry.config_class.name
    modality = attack_modality(entry.config_class)
    warnings.warn(
        f"The attack name {name!r} is deprecated; use {canonical!r} (the {modality} attack of that family).",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return key


def resolve_attack_name(name: str) -> str:
    """The registered name for ``name``; a deprecated alias warns and resolves (``"badnets"`` -> ``"badnet"``)."""
    key = _resolve_alias(name, stacklevel=3)
    return name if key is None else ATTACKS[key].config_class.name


def attack_names(modality: str | None = None) -> list[str]:
    """Sorted attack names (family names, no aliases) of one modality, or of all modalities."""
    return sorted(
        {
            entry.config_class.name
            for entry in ATTACKS.values()
            if modality is None or attack_modality(entry.config_class) == modality
        }
    )


def attack_entry(key: Any, modality: str | None = None) -> RegistryEntry:
    """The registered ``(config_class, poisoner_class)`` for a name (aliases accepted), a config or its class.

    A name is looked up in ``modality`` (``"text"``, ``"image"``) when given. Without one, a name means the text
    attack of that family if there is one (as before image attacks existed), else the only attack of that name;
    a deprecated alias means the attack it always named (``"badnets"``: the image BadNets).
    """
    if not isinstance(key, str):
        entry = _lookup(ATTACKS, "attack", key)
        if modality is not None and attack_modality(entry.config_class) != modality:
            raise TypeError(
                f"{entry.config_class.__name__} is a {attack_modality(entry.config_class)} attack, not {modality}."
            )
        return entry
    alias_key = _resolve_alias(key, stacklevel=3)
    if alias_key is not None:
        if modality is None:
            return ATTACKS[alias_key]
        key = ATTACKS[alias_key].config_class.name
    if modality is not None:
        if attack_key(key, modality) in ATTACKS:
            return ATTACKS[attack_key(key, modality)]
        known = attack_names(modality)
        raise ValueError(f"Unknown {modality} attack {key!r}; {modality} attacks: {known}.")
    if key in ATTACKS:  # a text attack's key is its name; "image/badnet" keys are accepted as they are
        return ATTACKS[key]
    matches = [k for k, entry in ATTACKS.items() if entry.config_class.name == key]
    if len(matches) == 1:
        return ATTACKS[matches[0]]
    modalities = sorted({attack_modality(e.config_class) for e in ATTACKS.values()}, key=lambda m: (m != TEXT, m))
    by_modality = {m: attack_names(m) for m in modalities}
    known = "; ".join(f"{m} attacks: {names}" for m, names in by_modality.items())
    raise ValueError(f"Unknown attack {key!r}; {known}.")
