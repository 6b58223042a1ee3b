"""Backdoor metrics as plain numpy functions: CACC, ASR (with its floor) and detection quality.

- CACC: accuracy on the clean test split.
- ASR: the fraction of triggered non-target rows predicted as the target label. Its floor is the same number for a
  model trained on clean data (its error on those rows): an ASR at the floor means the backdoor is gone.
- Detection: precision/recall/F1 of flagged items against ground truth, and AUROC of continuous scores
  (the Mann-Whitney statistic, ties counted half).
"""

from __future__ import annotations

import numpy as np


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty.")
    return array


def clean_accuracy(predictions, references) -> float:
    """Accuracy of ``predictions`` against ``references`` (CACC on a clean test split)."""
    predictions, references = _as_1d(predictions, "predictions"), _as_1d(references, "references")
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.size} predictions for {references.size} references.")
    return float(np.mean(predictions == references))


def attack_success_rate(predictions, target_label: int) -> float:
    """Fraction of predictions equal to ``target_label`` on an ASR set (triggered non-target rows)."""
    return float(np.mean(_as_1d(predictions, "predictions") == target_label))


def roc_auc(scores, labels) -> float:
    """AUROC of ``scores`` for binary ``labels`` (1 = positive, e.g. poisoned). Ties count one half."""
    scores, labels = _as_1d(scores, "scores").astype(float), _as_1d(labels, "labels").astype(int)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels.")
    num_pos, num_neg = int(labels.sum()), int((1 - labels).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError("AUROC needs both positive and negative items in the ground truth.")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over tied scores so that ties count half.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels == 1].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def detection_metrics(flagged, ground_truth, scores=None) -> dict[str, float]:
    """Precision, recall and F1 of ``flagged`` (0/1) against ``ground_truth`` (0/1); AUROC too if ``scores``."""
    flagged = _as_1d(flagged, "flagged").astype(bool)
    truth = _as_1d(ground_truth, "ground_truth").astype(bool)
    if flagged.shape != truth.shape:
        raise ValueError(f"{flagged.size} flags for {truth.size} ground-truth items.")
    true_pos = int(np.sum(flagged & truth))
    precision = true_pos / int(flagged.sum()) if flagged.any() else 0.0
    recall = true_pos / int(truth.sum()) if truth.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "num_flagged": int(flagged.sum()),
        "num_positive": int(truth.sum()),
    }
    if scores is not None:
        out["auroc"] = roc_auc(scores, truth)
    return out


def compute_classification_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for ``transformers.Trainer``: accuracy of the argmax of the logits."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": clean_accuracy(np.argmax(logits, axis=-1), labels)}
