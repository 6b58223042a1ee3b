"""Evaluate a trained classifier for a backdoor: CACC on clean rows, ASR on triggered rows, beside the floor."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..data.rows import in_row_order, length_order
from .backdoor import attack_success_rate, clean_accuracy


@dataclass
class BackdoorEvaluation:
    """CACC and ASR of one model, and ASR's floor (a clean model's ASR on the same rows) when known."""

    cacc: float
    asr: float | None = None
    asr_floor: float | None = None
    num_clean: int = 0
    num_asr: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def predict_labels(trainer, dataset) -> np.ndarray:
    """Argmax predictions of a ``transformers.Trainer`` on a (tokenized) dataset, gathered across processes, in row
    order.

    Token-id rows are predicted in length order, so that the collator pads each batch little."""
    order = length_order(dataset)
    if order is not None:
        dataset = dataset.select(order)
    output = trainer.predict(dataset, metric_key_prefix="predict")
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return in_row_order(np.argmax(logits, axis=-1), order)


def evaluate_backdoor(
    trainer, clean_dataset, asr_dataset=None, target_label: int | None = None, asr_floor: float | None = None
) -> BackdoorEvaluation:
    """CACC of ``trainer``'s model on ``clean_dataset`` and ASR on ``asr_dataset`` (see ``make_asr_dataset``).

    ``target_label`` defaults to the ASR set's label (all its rows carry the target).
    """
    clean_preds = predict_labels(trainer, clean_dataset)
    result = BackdoorEvaluation(
        cacc=clean_accuracy(clean_preds, np.asarray(clean_dataset["label"])),
        num_clean=len(clean_dataset),
        asr_floor=asr_floor,
    )
    if asr_dataset is not None:
        labels = np.asarray(asr_dataset["label"])
        if target_label is None:
            if np.unique(labels).size != 1:
                raise ValueError("The ASR set's labels differ: pass `target_label`.")
            target_label = int(labels[0])
        result.asr = attack_success_rate(predict_labels(trainer, asr_dataset), target_label)
        result.num_asr = len(asr_dataset)
    return result
