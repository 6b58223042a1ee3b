"""``BackdoorSafeTrainingArguments``: ``TrainingArguments`` plus the defense, as trl does with its configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments


@dataclass
class BackdoorSafeTrainingArguments(TrainingArguments):
    """Training arguments with a defense.

    Args:
        defense: a registered defense name (``"btu"``) or ``None`` for plain training.
        defense_kwargs: the defense config's fields, e.g. ``{"flip_threshold": 0.7}``.
        defense_report_name: file written into ``output_dir`` after training.
    """

    defense: str | None = field(default=None, metadata={"help": "Defense to run during training, e.g. 'btu'."})
    defense_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Fields of the defense config, as a dict or a JSON string."}
    )
    defense_report_name: str = field(default="defense_report.json", metadata={"help": "Report file in output_dir."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.defense_kwargs, str):
            import json

            self.defense_kwargs = json.loads(self.defense_kwargs)
        if self.defense_kwargs and self.defense is None:
            raise ValueError("defense_kwargs is set but defense is not: name the defense, e.g. defense='btu'.")

    def defense_config(self):
        """The defense config these arguments describe, or ``None``."""
        if self.defense is None:
            return None
        from .defenses import DEFENSES

        if self.defense not in DEFENSES:
            raise ValueError(f"Unknown defense {self.defense!r}; registered defenses: {sorted(DEFENSES)}.")
        return DEFENSES[self.defense][0](**(self.defense_kwargs or {}))
