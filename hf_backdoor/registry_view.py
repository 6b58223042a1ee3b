"""Live, read-only views of part of :mod:`hf_backdoor.registry`: the attacks of one modality
(:class:`hf_backdoor.attacks.AttackView`) and the repairs ``sanitize_model`` runs (``SANITIZERS``).

A leaf, like the registry, so attack and defense modules can both build on it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .registry import RegistryEntry


class RegistryView(Mapping):
    """``{name: RegistryEntry}`` over the entries a subclass's :meth:`_entries` selects. The selection is made again at
    every access, so an entry registered later (a user's own attack or defense) appears in the view."""

    def _entries(self) -> dict[str, RegistryEntry]:
        raise NotImplementedError

    def __getitem__(self, name: str) -> RegistryEntry:
        return self._entries()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())
