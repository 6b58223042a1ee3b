"""A plugin defense, written the way a user outside hf_backdoor would write one: a config, a defense, one
registration line. It defends nothing; it counts the training rows it sees, so a test can tell that the trainer ran
its hooks, logged its scalars and put its report into the card (tests/test_protocol.py).

Import this module (or pass it to the CLI's plugin option) and ``"toy"`` is a defense name like ``"btu"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_backdoor.defenses.base import Defense, DefenseConfig
from hf_backdoor.registry import register_defense


@dataclass
class ToyConfig(DefenseConfig):
    """Counts training rows and epochs (a test double, not a defense)."""

    name = "toy"
    title = "Toy row counter"
    citation = "a test double of hf-backdoor's test suite"

    unit: str = field(default="training rows", metadata={"help": "What the card calls the rows it counted."})


class ToyDefense(Defense):
    config: ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.rows_seen = 0
        self.epochs_seen = 0

    def prepare_inputs(self, trainer, inputs: dict) -> dict:
        self.rows_seen += int(inputs["labels"].shape[0])
        return inputs

    def on_epoch_end(self, trainer) -> None:
        self.epochs_seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"rows_seen": self.rows_seen, "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows_seen, self.epochs_seen = state["rows_seen"], state["epochs_seen"]

    def report(self) -> dict[str, Any]:
        return {**super().report(), "rows_seen": self.rows_seen, "epochs_seen": self.epochs_seen}

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        return (
            f"- The toy counted **{report['rows_seen']}** {report['config']['unit']} in {report['epochs_seen']} epochs."
        )


register_defense(ToyConfig, ToyDefense)
