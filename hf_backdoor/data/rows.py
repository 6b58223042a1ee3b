"""Row identity: one ``row_index`` column that names a row the same way for text and images.

Defenses that act on rows (ABL isolates them, exposure scores them, reports list them) must recognise a row after
shuffling, selection, tokenization and augmentation. Token ids do not identify an image row (augmentation changes its
pixels) and positions change under ``select``/``shuffle``, so every row carries its position in the split it came
from, as an int64 ``row_index`` column. :func:`hf_backdoor.poison_dataset` and :func:`hf_backdoor.make_asr_dataset`
add it, ``prepare_image_dataset(..., keep_row_index=True)`` adds it when missing, and a column that is already there
is kept (so ids survive a save/load round trip or a second pass), after checking that it still identifies rows.
Prediction passes may visit token-id rows in length order (:func:`length_order`) and hand results back in row order
(:func:`in_row_order`).

A leaf module: it imports nothing from ``hf_backdoor``.
"""

from __future__ import annotations

import datasets
import numpy as np

ROW_INDEX = "row_index"


def check_row_index(dataset: datasets.Dataset) -> None:
    """Raise if an existing ``row_index`` column cannot identify rows (not integers, or repeated ids)."""
    if ROW_INDEX not in dataset.column_names:
        return
    ids = np.asarray(dataset.with_format(None)[ROW_INDEX])
    if ids.dtype.kind not in "iu":
        raise ValueError(
            f"The dataset's {ROW_INDEX!r} column holds {ids.dtype} values, not integer row ids. Remove it "
            f"(`dataset.remove_columns({ROW_INDEX!r})`) and it is rebuilt as each row's position."
        )
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        repeated = unique[counts > 1]
        raise ValueError(
            f"The dataset's {ROW_INDEX!r} column repeats {len(repeated)} id(s) (e.g. {int(repeated[0])}), so rows "
            "cannot be told apart (was it concatenated from several splits?). Remove the column "
            f"(`dataset.remove_columns({ROW_INDEX!r})`) to number rows by position, or give every row its own id."
        )


def add_row_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` with an int64 ``row_index`` column (each row's position); an existing, valid one is kept."""
    if ROW_INDEX in dataset.column_names:
        check_row_index(dataset)
        return dataset
    return dataset.add_column(ROW_INDEX, np.arange(len(dataset), dtype=np.int64))


def format_transform(dataset: datasets.Dataset):
    """The transform a ``with_transform``/``set_transform`` format applies to the rows on access, or ``None``."""
    fmt = dataset.format
    if fmt.get("type") != "custom":
        return None
    return (fmt.get("format_kwargs") or {}).get("transform")


def length_order(dataset) -> np.ndarray | None:
    """The stable order that sorts a token-id dataset's rows by length, so that prediction batches pad little; ``None``
    where the rows are not token ids the model reads as stored (no ``input_ids`` column, or a format transform that
    makes them on the fly). Undo it with :func:`in_row_order`."""
    if not isinstance(dataset, datasets.Dataset) or "input_ids" not in dataset.column_names:
        return None
    if format_transform(dataset) is not None:
        return None
    return np.argsort([len(ids) for ids in dataset.with_format(None)["input_ids"]], kind="stable")


def in_row_order(values: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """``values`` computed on ``dataset.select(order)``, put back in the dataset's row order (unchanged for ``None``)."""
    if order is None:
        return values
    restored = np.empty_like(values)
    restored[order] = values
    return restored
