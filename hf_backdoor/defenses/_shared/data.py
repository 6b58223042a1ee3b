"""Data plumbing shared by the defenses that run their own loops (ABL, exposure, the repairs).

Turns a raw, tokenized or transformed ``datasets.Dataset`` into model batches with the trainer's collator, predicts
logits, and reads labels and predicted-class shares. Imports no defense module.
"""

from __future__ import annotations

import inspect
import warnings

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from ...data.rows import ROW_INDEX, format_transform, in_row_order, length_order

LABEL_KEYS = ("labels", "label", "label_ids")


def _forward_columns(model) -> set[str]:
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(target.forward).parameters) | set(LABEL_KEYS)


def _is_tokenizer(processing_class) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(processing_class, PreTrainedTokenizerBase)


def training_augmentation(trainer) -> dict:
    """The crop padding and flip the trainer's model was trained through, for raw image rows given to a defense (the
    exposure's or a repair's clean set): a model trained without the random crop is then not exposed through one.
    Read from the transform of the trainer's image training set (``train_dataset``), else from the model's config,
    where ``BackdoorSafeTrainer`` records them and ``save_pretrained`` keeps them (a model read from disk, see
    :func:`~hf_backdoor.vision.record_training_augmentation`); empty (the transform's defaults: crop after 4-pixel
    padding, flip) when neither has them."""
    from ...vision.transforms import _augmenting_transform, recorded_training_augmentation

    transform = _augmenting_transform(getattr(trainer, "train_dataset", None))
    if transform is not None:
        return transform.augmentation_settings()
    return recorded_training_augmentation(trainer.accelerator.unwrap_model(trainer.model)) or {}


def check_training_augmentation(trainer, dataset, role: str) -> None:
    """Warn when ``dataset``'s image transform augments otherwise than the model was trained (its recorded crop and
    flip, :func:`training_augmentation`): rows prepared with ``prepare_image_dataset``'s default crop for a model
    trained without it would be exposed or repaired through a crop the model never saw."""
    from ...vision.transforms import ImageClassificationTransform

    transform = format_transform(dataset) if isinstance(dataset, datasets.Dataset) else None
    if not isinstance(transform, ImageClassificationTransform):
        return
    trained = training_augmentation(trainer)
    if trained and trained != transform.augmentation_settings():
        warnings.warn(
            f"The {role} rows augment with {transform.augmentation_settings()}, but the model was trained with "
            f"{trained}: prepare them with `prepare_image_dataset(..., crop_padding={trained['crop_padding']}, "
            f"horizontal_flip={trained['horizontal_flip']})`, or pass the raw image rows and let the defense "
            "prepare them.",
            stacklevel=3,
        )


def image_rows_dataset(trainer, dataset: datasets.Dataset) -> datasets.Dataset:
    """Raw ``image``/``label`` rows through the trainer's image processor (``processing_class``) and the crop and
    flip its model was trained through (:func:`training_augmentation`): the one way a defense prepares them, so the
    exposure and the repairs never augment otherwise than the training did."""
    from ...vision.transforms import ImageClassificationTransform

    return dataset.with_transform(
        ImageClassificationTransform(trainer.processing_class, **training_augmentation(trainer))
    )


def model_dataset(trainer, dataset: datasets.Dataset, augment: bool = False, max_length: int = 128):
    """``dataset`` in a form the trainer's collator turns into model inputs and labels.

    - A dataset with a format transform (images via ``with_transform``) is used as it is, except that
      hf-backdoor's :class:`~hf_backdoor.vision.ImageClassificationTransform` loses its augmentation unless
      ``augment`` (loss-based scores are read on the images as stored, as the official ABL code does).
    - Raw ``text``/``label`` rows are tokenized with the trainer's tokenizer (``max_length``); raw ``image``/``label``
      rows get the trainer's image processor (``processing_class``) and its training set's crop and flip settings
      (:func:`training_augmentation`).
    - Columns the model does not take (``text``, ``poisoned``, ``orig_label`` …) are dropped.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Expected a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    transform = format_transform(dataset)
    if transform is not None:
        if not augment and getattr(transform, "augment", False) and hasattr(transform, "without_augmentation"):
            dataset = dataset.with_transform(transform.without_augmentation())
        return dataset
    columns = dataset.column_names
    processing = trainer.processing_class
    if "input_ids" not in columns and "pixel_values" not in columns:
        if "text" in columns and processing is not None and _is_tokenizer(processing):
            from ...models import tokenize_dataset

            dataset = tokenize_dataset(dataset, processing, max_length)
        elif "image" in columns and processing is not None and not _is_tokenizer(processing):
            return image_rows_dataset(trainer, dataset)
        else:
            raise ValueError(
                f"Cannot make model inputs from columns {columns}: pass a tokenized dataset (input_ids), one with "
                "an image transform, or raw text/image rows together with the trainer's tokenizer/image processor "
                "as `processing_class`."
            )
    keep = _forward_columns(trainer.accelerator.unwrap_model(trainer.model)) | {ROW_INDEX}
    return dataset.select_columns([c for c in dataset.column_names if c in keep])


def augmented_view(dataset):
    """``dataset`` with its image transform's training augmentation switched on, and what that augmentation does;
    ``(dataset, None)`` when there is nothing to augment (text, or a transform without augmentation options).

    The official RNP, NAD, TSBD and EBYD codes train on their clean rows through the training transform (random crop
    after 4-pixel padding, horizontal flip); a clean set built for evaluation
    (``prepare_image_dataset(..., train=False)``) gets the same augmentation as the model's training, with its own
    ``crop_padding``.
    """
    transform = format_transform(dataset) if isinstance(dataset, datasets.Dataset) else None
    if not hasattr(transform, "with_augmentation"):
        return dataset, None
    augmented = transform.with_augmentation()
    description = augmented.describe_augmentation()
    if description == "none":
        return dataset, None
    return dataset.with_transform(augmented), description


def dataset_labels(dataset: datasets.Dataset) -> np.ndarray:
    """The label column of a (possibly transformed) dataset, read without the transform."""
    raw = dataset.with_format(None)
    for key in LABEL_KEYS:
        if key in raw.column_names:
            return np.asarray(raw[key], dtype=np.int64)
    raise ValueError(f"The dataset has no label column ({'/'.join(LABEL_KEYS)}); columns: {raw.column_names}.")


def iterate_batches(trainer, dataset: datasets.Dataset, batch_size: int, shuffle: bool = False, seed: int = 0):
    """Batches of model inputs on the trainer's device: yields ``(inputs, labels)`` (``row_index`` dropped).

    Not sharded across processes: every process iterates the whole dataset (these loops are small, and identical
    data keeps every rank's copy of the model identical).
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=trainer.data_collator
    )
    device = trainer.args.device
    for batch in loader:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs.pop(ROW_INDEX, None)
        labels = None
        for key in LABEL_KEYS:
            if key in inputs:
                labels = inputs.pop(key)
        yield inputs, labels


@torch.no_grad()
def predict_logits(
    trainer, model, dataset: datasets.Dataset, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (float32) and labels (``None`` without a label column) of ``model`` on a :func:`model_dataset`, in row
    order, in eval mode.

    Token-id rows are predicted in length order (and returned in row order), so that each batch pads little."""
    was_training = model.training
    model.eval()
    order = length_order(dataset)
    if order is not None:
        dataset = dataset.select(order)
    logits, labels = [], []
    for inputs, batch_labels in iterate_batches(trainer, dataset, batch_size):
        with trainer.accelerator.autocast():
            out = model(**inputs)
        logits.append(out.logits.float().cpu())
        if batch_labels is not None:
            labels.append(batch_labels.cpu())
    model.train(was_training)
    logits = in_row_order(torch.cat(logits).numpy(), order)
    labels = in_row_order(torch.cat(labels).numpy(), order) if labels else None
    return logits, labels


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of every row (no reduction)."""
    return torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels).long(), reduction="none"
    ).numpy()


def class_shares(predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """The fraction of ``predictions`` in each class."""
    return np.bincount(predictions, minlength=num_labels)[:num_labels] / max(1, len(predictions))
