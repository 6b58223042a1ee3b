"""The hook protocol every defense implements, and the registry ``name -> (Config, Defense)``.

``BackdoorSafeTrainer`` calls these hooks and holds no method logic itself:

- ``on_train_begin(trainer)``: before the first step (exposure, detection that needs no trained model).
- ``on_epoch_end(trainer)``: after each epoch (detection from the model being trained).
- ``prepare_inputs(trainer, inputs)``: rewrite a training batch (strip tokens, mask rows).
- ``compute_loss(trainer, model, inputs, ...)``: return a loss or ``None`` to use the Trainer's.
- ``on_train_end(trainer)``: after the last step (unlearning, repair).
- ``state_dict()`` / ``load_state_dict()``: what must survive ``resume_from_checkpoint``.
- ``report()``: a JSON-serialisable account of what the defense found and did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class DefenseConfig:
    """Base of every defense config; subclasses validate their fields in ``__post_init__``."""

    name = "base"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


class Defense:
    """A defense driven by ``BackdoorSafeTrainer``. Hooks default to doing nothing."""

    def __init__(self, config: DefenseConfig):
        self.config = config

    def on_train_begin(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        pass

    def prepare_inputs(self, trainer, inputs: dict) -> dict:
        return inputs

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        return None

    def on_train_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {"defense": self.config.name, "config": self.config.to_dict()}


DEFENSES: dict[str, tuple[type[DefenseConfig], type[Defense]]] = {}


def register_defense(config_cls: type[DefenseConfig], defense_cls: type[Defense]) -> None:
    DEFENSES[config_cls.name] = (config_cls, defense_cls)


def build_defense(config: DefenseConfig | dict | None) -> Defense | None:
    """A defense from its config object, or from ``{"name": ..., **fields}``."""
    if config is None:
        return None
    if isinstance(config, dict):
        fields = dict(config)
        name = fields.pop("name", None)
        if name not in DEFENSES:
            raise ValueError(f"Unknown defense {name!r}; registered defenses: {sorted(DEFENSES)}.")
        config = DEFENSES[name][0](**fields)
    for config_cls, defense_cls in DEFENSES.values():
        if type(config) is config_cls:
            return defense_cls(config)
    raise TypeError(f"{type(config).__name__} is not a registered defense config; known: {sorted(DEFENSES)}.")
