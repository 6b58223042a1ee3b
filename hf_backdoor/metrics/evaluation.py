"""Evaluate a trained classifier for a backdoor: CACC on clean rows, ASR on triggered rows, beside the floor."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from ..data.rows import ROW_INDEX, in_row_order, length_order
from .backdoor import attack_success_rate, clean_accuracy

logger = logging.getLogger(__name__)


@dataclass
class BackdoorEvaluation:
    """CACC and ASR of one model, and ASR's floor (a clean model's ASR on the same rows) when known.

    ``asr_untriggered`` is the model's own rate of the target label on the ASR rows *without* their trigger (read from
    its predictions on the clean rows they were made from). Where an ASR sits above the floor, it tells a model that
    calls those rows the target anyway (a CACC problem) from one that does so only with the trigger (a backdoor)."""

    cacc: float
    asr: float | None = None
    asr_floor: float | None = None
    num_clean: int = 0
    num_asr: int = 0
    asr_untriggered: float | None = None

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

    ``target_label`` defaults to the ASR set's label (all its rows carry the target). ``asr_untriggered`` is filled
    when the ASR set's rows can be found in ``clean_dataset``: both carry a ``row_index`` column (give the test split
    one with ``add_row_index`` before ``make_asr_dataset``, which keeps it), every ASR row's id is there, and the
    clean row of that id has the ASR row's ``orig_label``.
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
        rows = untriggered_positions(clean_dataset, asr_dataset)
        if rows is not None:
            result.asr_untriggered = attack_success_rate(clean_preds[rows], target_label)
    return result


def untriggered_positions(clean_dataset, asr_dataset) -> np.ndarray | None:
    """Positions in ``clean_dataset`` of the rows the ASR set's rows were made from, matched by ``row_index``;
    ``None`` (logged) where they cannot be matched safely: a column missing, an id not in the clean rows (the ASR set
    was made from other rows), or a clean row whose label is not the ASR row's ``orig_label`` (the ids number
    another split)."""
    columns = (getattr(clean_dataset, "column_names", None) or [], getattr(asr_dataset, "column_names", None) or [])
    if not all(ROW_INDEX in names for names in columns):
        return None
    clean_ids = np.asarray(clean_dataset.with_format(None)[ROW_INDEX])
    asr_ids = np.asarray(asr_dataset.with_format(None)[ROW_INDEX])
    position = {int(i): p for p, i in enumerate(clean_ids)}
    missing = [int(i) for i in asr_ids if int(i) not in position]
    if missing:
        logger.info(
            "asr_untriggered not measured: %d of the ASR set's %d rows (row_index %s) are not in the clean dataset.",
            len(missing),
            len(asr_ids),
            missing[:5],
        )
        return None
    rows = np.array([position[int(i)] for i in asr_ids], dtype=np.int64)
    if "orig_label" in columns[1] and "label" in columns[0]:
        clean_labels = np.asarray(clean_dataset.with_format(None)["label"])[rows]
        differ = int((clean_labels != np.asarray(asr_dataset.with_format(None)["orig_label"])).sum())
        if differ:
            logger.info(
                "asr_untriggered not measured: %d of the ASR set's %d rows carry another label than the clean row "
                "of the same row_index, so the ids number another split.",
                differ,
                len(rows),
            )
            return None
    return rows
