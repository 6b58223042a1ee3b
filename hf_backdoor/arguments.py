"""``BackdoorSafeTrainingArguments``: ``TrainingArguments`` plus the defenses, as trl does with its configs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments


@dataclass
class BackdoorSafeTrainingArguments(TrainingArguments):
    """Training arguments with defenses.

    Args:
        defense: registered defense names run during training, in order (a stack): ``["btu"]``, ``["btu", "abl"]``;
            a string is accepted too (``"btu"`` or ``"btu,abl"``). ``None`` trains as a plain ``Trainer``.
        defense_kwargs: the defense config's fields, e.g. ``{"flip_threshold": 0.7}`` for one defense, or one dict per
            name for a stack (``{"btu": {...}, "abl": {...}}``); a JSON string is accepted.
        defense_report_name: file written into ``output_dir`` after training.
    """

    defense: list[str] | None = field(
        default=None,
        metadata={"help": "Defenses run during training, in order (a stack), e.g. `btu` or `btu abl`."},
    )
    defense_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Fields of the defense config as JSON, e.g. '{\"flip_threshold\": 0.7}'; for a stack, one object "
            'per defense name: \'{"btu": {...}, "abl": {...}}\'.'
        },
    )
    defense_report_name: str = field(default="defense_report.json", metadata={"help": "Report file in output_dir."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.defense, str):
            self.defense = [name.strip() for name in self.defense.split(",") if name.strip()]
        if self.defense is not None:
            self.defense = [name for name in self.defense if name.lower() != "none"] or None
        if isinstance(self.defense_kwargs, str):
            try:
                self.defense_kwargs = json.loads(self.defense_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"defense_kwargs is not valid JSON ({error}): {self.defense_kwargs!r}") from None
        if self.defense_kwargs and self.defense is None:
            raise ValueError("defense_kwargs is set but defense is not: name the defense, e.g. defense=['btu'].")
        self.defense_config()  # unknown names and bad fields fail here, before any model is loaded

    def defense_specs(self) -> list[dict[str, Any]]:
        """``[{"name": ..., **fields}]`` for each named defense, in stack order."""
        from .defenses.base import defense_specs

        return defense_specs(self.defense or [], self.defense_kwargs)

    def defense_config(self, stage: str = "training") -> list | None:
        """The defense configs these arguments describe (one per name, in order), or ``None``."""
        if not self.defense:
            return None
        from .defenses.base import build_defenses

        return [d.config for d in build_defenses(self.defense_specs(), stage=stage)]
