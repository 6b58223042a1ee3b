"""Moved to :mod:`hf_backdoor.hub.cards`; this name keeps old imports working."""

from .hub.cards import CardFigure, build_model_card, card_metadata, library_versions

__all__ = ["CardFigure", "build_model_card", "card_metadata", "library_versions"]
