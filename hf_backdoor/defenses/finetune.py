"""Plain fine-tuning on the clean set: the baseline every removal defense must beat.

The defaults are TSBD's fine-tuning stage (Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities based on
Unlearning Weight Changes and Backdoor Activeness", NeurIPS 2024; official code linweiii/TSBD): SGD lr 0.01, momentum
0.9, no weight decay, 20 epochs, batch 256. TSBD's zeroing and its activeness-aware gradient term are left out, so
``finetune`` against ``nwc`` isolates what TSBD adds.

Deviations: none from that stage's optimiser settings. The fine-tuning uses the fit part of the clean set only; its
held-out part measures the clean accuracy after every epoch (``SanitizeConfig.holdout_fraction``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..registry import register_defense
from ._shared.context import SanitizeConfig, SanitizeContext
from ._shared.loops import sgd_finetune
from ._shared.repair import RepairDefense, fmt


@dataclass
class FinetuneConfig(SanitizeConfig):
    """Plain SGD fine-tuning on the clean set (post-training). See the module docstring."""

    learning_rate: float = field(default=0.01, metadata={"help": "SGD learning rate (TSBD's fine-tuning: 0.01)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum, in [0, 1) (TSBD: 0.9)."})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay, >= 0 (TSBD: none)."})
    epochs: int = field(default=20, metadata={"help": "Epochs over the fit part of the clean set (TSBD: 20)."})
    batch_size: int = field(default=256, metadata={"help": "Clean rows per step (TSBD: 256)."})

    name = "finetune"
    title = "Fine-tuning on clean data"
    citation = "the baseline of Lin et al., NeurIPS 2024 (TSBD)"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("learning_rate", "epochs", "batch_size")
        self._check_interval("[0, 1)", "momentum")
        self._check_at_least(0, "weight_decay")


class FinetuneDefense(RepairDefense):
    """Fine-tunes the model in place on the fit rows (see the module docstring)."""

    holdout_histories = {"fine-tuning": "finetune_history"}
    limitations = (
        "- Fine-tuning on clean rows is a baseline, not a removal method: a backdoor the clean rows never "
        "exercise can survive it unchanged.",
    )

    def repair(self, context: SanitizeContext, model: nn.Module) -> dict[str, Any]:
        config = self.config
        start = time.perf_counter()
        history = sgd_finetune(
            context,
            model,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            batch_size=config.batch_size,
        )
        return {"finetune_history": history, "timings_s": {"finetune": time.perf_counter() - start}}

    @classmethod
    def findings(cls, report: dict[str, Any]) -> list[str]:
        history = report.get("finetune_history") or []
        config = report.get("config") or {}
        if not history:
            return []
        return [
            f"- Fine-tuned {len(history)} epoch(s) on the clean rows (SGD lr {config.get('learning_rate')}, momentum "
            f"{config.get('momentum')}); last epoch's training loss {fmt(history[-1].get('loss'))}."
        ]

    @classmethod
    def summary(cls, report: dict[str, Any]) -> str | None:
        return f"fine-tuned {len(report.get('finetune_history') or [])} epoch(s) on the clean rows"


register_defense(FinetuneConfig, FinetuneDefense)
