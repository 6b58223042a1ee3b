"""Loss truncation: every step leaves the rows the model fits worst out of its loss.

Kang & Hashimoto, "Improved Natural Language Generation via Loss Truncation", ACL 2020: drop the ``c`` fraction of
examples with the highest loss. The same small-loss selection is the core of Han et al., "Co-teaching: Robust
Training of Deep Neural Networks with Extremely Noisy Labels", NeurIPS 2018. Neither paper is about backdoors; this
module applies the idea to dirty-label paraphrase-trigger poisoning.

The premise: a poisoned row is a text of another class rewritten into the trigger's template or style and given the
target label. Until the model has learned the trigger its meaning contradicts its label, so if the model learns the
task before the trigger, the poisoned rows are the worst-fit ones, and leaving them out keeps them from teaching the
trigger (they then stay worst-fit: the selection keeps itself going).

Measured on the default MiniLM (README, "Paraphrase triggers"; ``benchmarks/results/paraphrase_defenses.json``), the
premise does not hold well: the syntactic trigger is learned about as fast as the task, the per-row drop rate
separates poisoned rows only weakly (AUROC 0.54-0.61) and the backdoor is only dented, at a cost in clean accuracy.
DPoE (``dpoe.py``) measured better and is the default paraphrase defense; this one is kept as a measured baseline
and for models and data where its premise holds.

Where it cannot work at all:

- Triggers learned *faster* than the task: a rare word (BadNet) or an inserted sentence (AddSent) makes its rows the
  best-fit rows within an epoch. Stack it after ``BTUConfig()``, which finds those triggers.
- Clean-label poisoning (the rows' labels are right): there is nothing for the loss to contradict.
- Poisoned rows above ``drop_fraction`` of the target label's rows in a batch.
- The clean rows left out are the hardest ones (ambiguous or mislabelled texts), so the model loses some accuracy;
  the report's ``dropped_fraction`` says how many rows were left out.

How it runs: after a warm-up (``warmup_ratio`` of the training steps, on every row), each micro-batch's per-row
cross-entropy (the Trainer's label smoothing applies) is ranked *within each label*, and the ``drop_fraction`` of
each label's rows with the highest loss get weight 0; the loss is the mean over the rest. Why per batch and per
label rather than Kang & Hashimoto's running quantile over all rows, measured on MiniLM/SST-2 at 20% syntactic
poisoning: within ten steps the model predicts the majority label for every row (the target label holds 70% of the
rows at that rate), so the worst-fit rows are all of the other label. A global quantile left them all out and the
model never came back (CACC 0.499, every row predicted as the target label); a quantile over a window of recent
losses lags losses that keep rising and left out every row of the other label the same way. Ranking within each
label of each batch keeps the same share of every label in every step, so no label can be starved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from ..registry import register_defense
from ._shared.row_signals import RowSignals, fmt, ground_truth, last_epoch_value
from .base import Defense, DefenseConfig

logger = logging.getLogger(__name__)


@dataclass
class LossTruncationConfig(DefenseConfig):
    """Leave each label's worst-fit rows out of every training step's loss (a paraphrase-trigger baseline)."""

    drop_fraction: float = field(
        default=0.3,
        metadata={
            "help": "share of each label's rows in a batch left out of the loss (those with the highest loss), in "
            "[0, 1). Must exceed the poisoned rows' share of the target label's rows (20% poisoning of a balanced "
            "binary task is 29% of the target label)."
        },
    )
    warmup_ratio: float = field(
        default=0.1,
        metadata={
            "help": "share of the training steps, in [0, 1), trained on every row before truncation starts (the "
            "model must learn something of the task before its worst-fit rows mean anything)."
        },
    )
    per_label: bool = field(
        default=True,
        metadata={
            "help": "rank rows within each label of the batch (True) or across the whole batch (False: a label the "
            "model leans away from can lose all of its rows)."
        },
    )
    name = "loss_truncation"

    def __post_init__(self) -> None:
        self._check_interval("[0, 1)", "drop_fraction", "warmup_ratio")


class LossTruncationDefense(Defense):
    config: LossTruncationConfig
    owns_loss = True
    needs_row_ids = True  # the per-row drop decisions are recorded by row id for the report
    limitations = (
        "- Loss truncation stops triggers that the model learns *after* the task (dirty-label paraphrase "
        "triggers). Token triggers (rare words, inserted sentences) are learned first and pass it: stack it after "
        "BTU.",
        "- Clean-label poisoning, and poisoned rows above `drop_fraction` of the target label's rows, are not covered.",
    )

    def __init__(self, config: LossTruncationConfig):
        super().__init__(config)
        self.signals = RowSignals()
        self.steps = 0
        self.rows_seen = 0
        self.rows_dropped = 0
        self._truth = None
        self._labels = None

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(
                "LossTruncationDefense needs labelled batches: the training set has no `labels`/`label` column."
            )
        outputs = model(**inputs)
        smoothing = float(getattr(trainer.args, "label_smoothing_factor", 0.0) or 0.0)
        per_row = F.cross_entropy(outputs.logits.float(), labels, reduction="none", label_smoothing=smoothing)
        detached = per_row.detach()
        warming_up = trainer.state.global_step < self.config.warmup_ratio * max(1, trainer.state.max_steps)
        keep = torch.ones_like(detached) if warming_up else self.kept_rows(detached, labels)
        loss = (per_row * keep).sum() / keep.sum().clamp(min=1.0)
        self.steps += 1
        self.rows_seen += len(keep)
        self.rows_dropped += int(len(keep) - keep.sum().item())
        self.signals.record(trainer, dropped=1.0 - keep, loss=detached)
        return (loss, outputs) if return_outputs else loss

    def kept_rows(self, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """1.0 for the rows that stay in the loss: all but the ``floor(drop_fraction * n)`` highest-loss rows of each
        label's ``n`` rows in the batch (of the whole batch without ``per_label``)."""
        keep = torch.ones_like(losses)
        groups = [labels == label for label in labels.unique()] if self.config.per_label else [labels == labels]
        for rows in groups:
            positions = rows.nonzero().flatten()
            count = int(self.config.drop_fraction * len(positions))
            if count:
                keep[positions[losses[positions].topk(count).indices]] = 0.0
        return keep

    def on_train_end(self, trainer) -> None:
        self._truth, self._labels = ground_truth(trainer)

    # -- state and report -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "signals": self.signals.state_dict(),
            "counts": torch.tensor([self.steps, self.rows_seen, self.rows_dropped], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.signals.load_state_dict(state.get("signals", {}))
        self.steps, self.rows_seen, self.rows_dropped = (int(v) for v in state["counts"].tolist())

    def report(self) -> dict[str, Any]:
        report = super().report()
        summary = self.signals.summary(self._truth, {"dropped": "high", "loss": "high"}, self._labels)
        by_epoch = summary.get("dropped", {})
        report.update(
            {
                "steps": self.steps,
                "rows_seen": self.rows_seen,
                "dropped_fraction": self.rows_dropped / self.rows_seen if self.rows_seen else None,
                "has_ground_truth": self._truth is not None,
                "row_ids_missing": self.signals.missing_row_ids,
                "signals": summary,
                "drop_rate_poisoned": last_epoch_value(summary, "dropped", "mean_poisoned"),
                "drop_rate_clean": last_epoch_value(summary, "dropped", "mean_clean"),
                "drop_rate_poisoned_by_epoch": {e: v.get("mean_poisoned") for e, v in by_epoch.items()},
                "drop_rate_clean_by_epoch": {e: v.get("mean_clean") for e, v in by_epoch.items()},
                "dropped_auroc": last_epoch_value(summary, "dropped", "auroc"),
                "loss_auroc": last_epoch_value(summary, "loss", "auroc"),
                "loss_auroc_same_label": last_epoch_value(summary, "loss", "auroc_same_label"),
            }
        )
        return report

    # -- rendering --------------------------------------------------------------------------------------------------
    @classmethod
    def report_scalars(cls, report: dict[str, Any]) -> dict[str, float]:
        keys = ("dropped_fraction", "drop_rate_poisoned", "drop_rate_clean", "dropped_auroc", "loss_auroc")
        return {k: float(report[k]) for k in keys if isinstance(report.get(k), (int, float))}

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        config = report.get("config", {})
        lines = [
            f"Loss truncation left the worst-fit {fmt(config.get('drop_fraction'), '.0%')} of each label's rows out of "
            "every training step (after a warm-up on every row), so rows whose label contradicts their text "
            "(dirty-label paraphrase poisoning) taught the model little.",
            f"- Rows left out over training: {fmt(report.get('dropped_fraction'), '.1%')}",
        ]
        if report.get("has_ground_truth"):
            lines.append(
                f"- Against the `poisoned` column (last epoch): left out {fmt(report.get('drop_rate_poisoned'), '.1%')}"
                f" of poisoned rows and {fmt(report.get('drop_rate_clean'), '.1%')} of clean rows; AUROC of being left "
                f"out {fmt(report.get('dropped_auroc'))}, of the row's loss {fmt(report.get('loss_auroc'))}"
            )
        if report.get("row_ids_missing"):
            lines.append("- Row ids were not available, so no per-row decisions were recorded.")
        return "\n".join(lines)

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        line = f"loss_truncation: left out {fmt(report.get('dropped_fraction'), '.1%')} of rows"
        if report.get("has_ground_truth"):
            line += (
                f" (poisoned {fmt(report.get('drop_rate_poisoned'), '.1%')}, clean "
                f"{fmt(report.get('drop_rate_clean'), '.1%')}, AUROC {fmt(report.get('dropped_auroc'))})"
            )
        return [line]


register_defense(LossTruncationConfig, LossTruncationDefense)
