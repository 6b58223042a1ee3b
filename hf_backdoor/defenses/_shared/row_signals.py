"""Per-row values that training-stage defenses record as rows are trained on, and their scoring against a
``poisoned`` column (the report's AUROCs)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...metrics import roc_auc


class RowSignals:
    """Per-row values recorded as rows are trained on: ``{name: {epoch: {position: value}}}``.

    Positions come from ``trainer.row_positions(trainer.batch_row_ids)``; with no row ids (a trainer without the row
    protocol) nothing is recorded and the report says so.
    """

    def __init__(self):
        self.values: dict[str, dict[int, dict[int, float]]] = {}
        self.missing_row_ids = False

    def record(self, trainer, **named: torch.Tensor) -> None:
        row_ids = getattr(trainer, "batch_row_ids", None)
        if row_ids is None:
            self.missing_row_ids = True
            return
        positions = trainer.row_positions(row_ids)
        epoch = int(math.floor(float(getattr(trainer.state, "epoch", 0.0) or 0.0)))
        for name, tensor in named.items():
            per_epoch = self.values.setdefault(name, {}).setdefault(epoch, {})
            for position, value in zip(positions, tensor.detach().float().cpu().tolist()):
                per_epoch[int(position)] = float(value)

    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain containers only, so the checkpoint loads with torch.load(weights_only=True).
        out = {}
        for name, epochs in self.values.items():
            out[name] = {
                str(epoch): torch.tensor([[p, v] for p, v in rows.items()], dtype=torch.float64).reshape(-1, 2)
                for epoch, rows in epochs.items()
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {
            name: {int(epoch): {int(p): float(v) for p, v in table.tolist()} for epoch, table in epochs.items()}
            for name, epochs in state.items()
        }

    def summary(
        self, truth: np.ndarray | None, suspicious_when: dict[str, str], labels: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Per signal and epoch: mean over rows, means over poisoned and clean rows, and the AUROC of the signal
        against ``truth`` (oriented by ``suspicious_when[name]``: ``"low"`` or ``"high"`` values flag a row). With
        ``labels``, also the AUROC among the rows carrying the poisoned rows' (most common) label only
        (``auroc_same_label``): a signal that only tells the target class from the others scores 0.5 there."""
        out: dict[str, Any] = {}
        for name, epochs in self.values.items():
            per_epoch = {}
            for epoch in sorted(epochs):
                rows = epochs[epoch]
                positions = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
                values = np.fromiter(rows.values(), dtype=np.float64, count=len(rows))
                entry: dict[str, Any] = {
                    "rows": int(len(values)),
                    "mean": float(values.mean()) if len(values) else None,
                }
                if len(values):
                    entry["quantiles"] = {
                        str(q): float(np.quantile(values, q)) for q in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
                    }
                if truth is not None and len(values):
                    flags = truth[positions].astype(bool)
                    if flags.any():
                        entry["mean_poisoned"] = float(values[flags].mean())
                    if (~flags).any():
                        entry["mean_clean"] = float(values[~flags].mean())
                    if flags.any() and (~flags).any():
                        oriented = -values if suspicious_when.get(name, "high") == "low" else values
                        entry["auroc"] = roc_auc(oriented, flags)
                        if labels is not None:
                            row_labels = labels[positions]
                            target = np.bincount(row_labels[flags]).argmax()
                            same = row_labels == target
                            if (~flags[same]).any():
                                entry["auroc_same_label"] = roc_auc(oriented[same], flags[same])
                per_epoch[f"epoch_{epoch + 1}"] = entry
            out[name] = per_epoch
        return out


def ground_truth(trainer) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The training set's ``poisoned`` column (0/1, dataset order) and its labels, or ``(None, None)`` without a
    ``poisoned`` column."""
    dataset = getattr(trainer, "train_dataset", None)
    columns = getattr(dataset, "column_names", None) or []
    if "poisoned" not in columns:
        return None, None
    raw = dataset.with_format(None)
    label_column = next((c for c in ("label", "labels") if c in columns), None)
    labels = np.asarray(raw[label_column], dtype=np.int64) if label_column else None
    return np.asarray(raw["poisoned"], dtype=np.int64), labels


def last_epoch_value(summary: dict[str, Any], signal: str, key: str):
    """``key`` of the last epoch recorded for ``signal`` in a :meth:`RowSignals.summary` (``None`` when absent)."""
    epochs = summary.get(signal) or {}
    if not epochs:
        return None
    return epochs[max(epochs, key=lambda e: int(e.split("_")[1]))].get(key)


def fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
