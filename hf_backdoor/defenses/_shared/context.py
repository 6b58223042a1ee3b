"""What every post-training repair shares: its config fields, and the context it works in.

- :class:`SanitizeConfig`: the fields every repair config inherits (held-out split, in-place replacement, seed, and
  the held-out accuracy guard).
- :class:`SanitizeContext`: the clean set split (stratified, seeded) into a *fit* part the repair trains on and a
  *held-out* part on which thresholds are chosen and clean accuracy is measured, with helpers for batches, forward
  passes and accuracy. One per ``sanitize_model`` call.
- :class:`ExposedModel`: EBYD's hand-off, an exposed model standing in for a repair's own clean unlearning.

Imports no defense module (the defenses import this one).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..base import DefenseConfig
from .data import augmented_view, check_training_augmentation, class_shares, image_rows_dataset

logger = logging.getLogger(__name__)

MIN_CLEAN_ROWS = 10


@dataclass
class SanitizeConfig(DefenseConfig):
    """Fields every post-training repair shares (``RNPConfig``, ``NADConfig``, ``NWCConfig``, ``FinetuneConfig``)."""

    holdout_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Share of the clean set kept out of the repair's training (stratified by label, seeded): every "
            "threshold is chosen, and every clean accuracy measured, on it."
        },
    )
    replace_model: bool = field(
        default=True,
        metadata={
            "help": "On success, load the repaired weights into trainer.model in place (so evaluate_backdoor, "
            "save_model and push_to_hub see them); False returns a repaired copy and leaves the trainer's model alone."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds the clean split, the batch order, dropout and every random choice."}
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "Train on the fit rows with the training augmentation where they are images read through "
            "hf-backdoor's image transform (random crop with that transform's reflect padding, horizontal flip), as "
            "the official RNP, NAD and TSBD codes train on their clean rows; thresholds and accuracies are still "
            "read on the images as stored. No effect on text. False: the stored images (the setting before stop 47)."
        },
    )
    max_holdout_drop: float | None = field(
        default=0.1,
        metadata={
            "help": "Largest fall of the held-out clean accuracy the whole repair may cost (before minus after, as a "
            "fraction). A larger fall warns and sets `holdout_drop_exceeded` in the report; None: no check."
        },
    )
    refuse_holdout_drop: bool = field(
        default=False,
        metadata={
            "help": "With max_holdout_drop set, raise instead of warning when the repair costs more than it, "
            "leaving the trainer's model untouched."
        },
    )

    name: ClassVar[str] = "sanitize"
    # Whether the repair has a clean-unlearning step an exposed model can stand in for (EBYD's hand-off).
    accepts_exposed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self._check_interval("(0, 1)", "holdout_fraction")
        if self.max_holdout_drop is not None and not 0 < self.max_holdout_drop <= 1:
            raise ValueError(
                f"max_holdout_drop must be in (0, 1] (a fall of accuracy) or None (no check), got {self.max_holdout_drop}."
            )
        if self.refuse_holdout_drop and self.max_holdout_drop is None:
            raise ValueError("refuse_holdout_drop=True needs a max_holdout_drop to enforce; set one (e.g. 0.1).")


def check_holdout_drop(config: SanitizeConfig, before: float, after: float) -> bool:
    """Whether the repair cost the held-out rows more than ``config.max_holdout_drop`` of accuracy.

    When it did: warns (log and ``warnings.warn``), or raises ``RuntimeError`` with ``refuse_holdout_drop``, so the
    caller can leave the model untouched. A repair is judged on what it costs as a whole, like ABL's unlearning guard
    judges a step on the fall from the accuracy before unlearning.
    """
    limit = config.max_holdout_drop
    # A tolerance so that a fall of exactly the limit (e.g. 2 of 20 rows at 0.1) is not flagged by rounding.
    if limit is None or before - after <= limit + 1e-9:
        return False
    message = (
        f"{config.name!r} took the held-out clean accuracy from {before:.3f} to {after:.3f}, a fall of "
        f"{before - after:.3f}, more than max_holdout_drop={limit}."
    )
    if config.refuse_holdout_drop:
        raise RuntimeError(
            f"{message} Refused (refuse_holdout_drop=True): the trainer's model was left untouched. Make the repair "
            "gentler (e.g. RNP: threshold=None, a smaller max_accuracy_drop) or raise max_holdout_drop knowingly."
        )
    message += " The repaired model may have lost part of the clean task; the report records holdout_drop_exceeded."
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)
    return True


@dataclass
class ExposedModel:
    """An exposed model handed to a repair in place of its own clean unlearning (EBYD, Wang, Li et al. 2024).

    Built by ``sanitize.resolve_exposed`` from an ``ExposureResult`` or a bare model; the accuracy fields are the
    exposure's own, on the clean set it was exposed with (``None`` for a bare model)."""

    model: nn.Module
    method: str | None = None
    clean_accuracy_before: float | None = None
    clean_accuracy_after: float | None = None
    exposed: bool | None = None
    wall_s: float | None = None

    @property
    def unlearned_by(self) -> str:
        return f"exposure ({self.method or 'given model'})"

    def unlearned_copy(self, context: SanitizeContext) -> nn.Module:
        """A deep copy on the context's device: the defenses freeze, hook and move the model they unlearn, and the
        caller's exposed model must come back as it was (it may be handed to the next defense)."""
        return copy.deepcopy(self.model).to(context.device)

    def report(self, context: SanitizeContext, unlearned: nn.Module) -> dict:
        """The report fields of the hand-off. The held-out accuracy is measured here because a bare model carries
        no exposure numbers, and it shows whether the exposed model had really lost the clean task."""
        return {
            "unlearned_by": self.unlearned_by,
            "exposure_method": self.method,
            "exposure_clean_accuracy_before": self.clean_accuracy_before,
            "exposure_clean_accuracy_after": self.clean_accuracy_after,
            "exposure_exposed": self.exposed,
            "exposure_wall_s": self.wall_s,
            "exposed_holdout_accuracy": context.accuracy(unlearned),
            "unlearning_note": f"skipped: the {self.unlearned_by} model stands in for clean unlearning (EBYD)",
        }


class SanitizeContext:
    """What a repair works with: the device, the clean rows split into ``fit`` and ``holdout``, the exposed model
    when one was handed over (``exposed``, else ``None``), and helpers for batches, forward passes and accuracy.
    One per ``sanitize_model`` call."""

    def __init__(
        self,
        trainer,
        clean_dataset,
        config: SanitizeConfig,
        num_labels: int | None,
        exposed: ExposedModel | None = None,
    ):
        self.trainer = trainer
        self.config = config
        self.exposed = exposed  # EBYD's hand-off: replaces the defense's clean unlearning when set
        self.device = trainer.args.device
        self.collate_fn = trainer.data_collator
        self.eval_batch_size = trainer.args.per_device_eval_batch_size
        dataset = _prepare_dataset(trainer, clean_dataset)
        labels = _labels(dataset)
        _check_labels(labels, num_labels)
        self.num_labels = num_labels or int(labels.max()) + 1
        fit_idx, holdout_idx = _stratified_split(labels, config.holdout_fraction, config.seed)
        self.fit = _subset(dataset, fit_idx)
        self.holdout = _subset(dataset, holdout_idx)
        # What the repair's training loops read: the fit rows, augmented as the model was trained where that applies.
        self.train_rows, self.fit_augmentation = augmented_view(self.fit) if config.augment else (self.fit, None)
        self.fit_labels = labels[fit_idx]
        self.holdout_labels = labels[holdout_idx]
        self.show_progress = trainer.is_local_process_zero() and not trainer.args.disable_tqdm

    # -- batches ---------------------------------------------------------------------------------------------------
    def loader(self, part: str = "fit", batch_size: int | None = None, shuffle: bool = False, epoch: int = 0):
        """Batches of ``fit``, ``holdout`` or ``train`` (the fit rows as the repair trains on them: augmented images
        with ``augment``, see :attr:`fit_augmentation`); a shuffled loader is seeded by ``(seed, epoch)``."""
        dataset = {"fit": self.fit, "holdout": self.holdout, "train": self.train_rows}[part]
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collate_fn,
        )

    def split_batch(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Model inputs on the device, and the labels."""
        batch = dict(batch)
        labels = batch.pop("labels", None)
        if labels is None:
            labels = batch.pop("label", None)
        if labels is None:
            raise ValueError("The data collator produced no `labels`: the clean set needs a `label` column.")
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return inputs, labels.to(self.device)

    def logits(self, model: nn.Module, inputs: dict, **kwargs):
        with self.trainer.accelerator.autocast():
            outputs = model(**inputs, **kwargs)
        return outputs.logits.float(), outputs

    @torch.no_grad()
    def predictions(self, model: nn.Module, part: str = "holdout") -> tuple[np.ndarray, np.ndarray]:
        """``model``'s predicted classes on ``fit`` or ``holdout``, and the labels (eval mode; the training mode is
        restored)."""
        was_training = model.training
        model.eval()
        predicted, labels = [], []
        for batch in self.loader(part):
            inputs, batch_labels = self.split_batch(batch)
            logits, _ = self.logits(model, inputs)
            predicted.append(logits.argmax(-1).cpu().numpy())
            labels.append(batch_labels.cpu().numpy())
        model.train(was_training)
        return np.concatenate(predicted), np.concatenate(labels)

    def accuracy(self, model: nn.Module, part: str = "holdout") -> float:
        """Clean accuracy of ``model`` on ``fit`` or ``holdout``."""
        predicted, labels = self.predictions(model, part)
        return float(np.mean(predicted == labels)) if len(labels) else 0.0

    def prediction_shares(self, model: nn.Module) -> list[float]:
        """The share of all clean rows (fit and held-out) that ``model`` predicts as each class: where an unlearned
        model sends clean inputs (EBYD's backdoor-label reading, for free)."""
        predicted = np.concatenate([self.predictions(model, part)[0] for part in ("fit", "holdout")])
        return [round(float(share), 4) for share in class_shares(predicted, self.num_labels)]

    def progress(self, iterable, desc: str):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, disable=not self.show_progress, leave=False)


# -- the clean set ------------------------------------------------------------------------------------------------------


def _prepare_dataset(trainer, dataset):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return dataset
    if isinstance(dataset, datasets.Dataset):
        columns = set(dataset.column_names)
        tokenizer = getattr(trainer, "processing_class", None)
        if "text" in columns and "input_ids" not in columns and hasattr(tokenizer, "pad_token_id"):
            from ...models import tokenize_dataset

            logger.info("Tokenizing the clean set's `text` column with the trainer's tokenizer (max length 128).")
            dataset = tokenize_dataset(dataset, tokenizer, 128)
        elif (
            "image" in columns
            and "pixel_values" not in columns
            and dataset.format.get("type") != "custom"
            and tokenizer is not None
            and not hasattr(tokenizer, "pad_token_id")
        ):
            dataset = image_rows_dataset(trainer, dataset)
        else:
            check_training_augmentation(trainer, dataset, "repair's clean")
        if dataset.format.get("type") != "custom":  # a with_transform dataset needs its raw columns
            dataset = trainer._remove_unused_columns(dataset, description="sanitize")
    return dataset


def _labels(dataset) -> np.ndarray:
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            plain = dataset.with_format(None)  # bypasses a with_transform transform: labels only
            for column in ("label", "labels"):
                if column in plain.column_names:
                    return np.asarray(plain[column], dtype=np.int64)
            raise ValueError(f"The clean set needs a `label` column; it has {plain.column_names}.")
    except ImportError:  # pragma: no cover
        pass
    labels = []
    for i in range(len(dataset)):
        row = dataset[i]
        label = row.get("label", row.get("labels")) if isinstance(row, dict) else row[-1]
        labels.append(int(label))
    return np.asarray(labels, dtype=np.int64)


def _check_labels(labels: np.ndarray, num_labels: int | None) -> None:
    if len(labels) < MIN_CLEAN_ROWS:
        raise ValueError(
            f"The clean set has {len(labels)} rows; a post-training defense needs at least {MIN_CLEAN_ROWS}."
        )
    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2:
        raise ValueError(
            f"The clean set has a single class ({int(present[0])}, {len(labels)} rows). Unlearning or fine-tuning on "
            "it would teach the model to predict one class; pass clean rows of every class."
        )
    if num_labels is not None:
        if present.max() >= num_labels or present.min() < 0:
            raise ValueError(f"Clean labels {present.tolist()} fall outside the model's {num_labels} classes.")
        missing = sorted(set(range(num_labels)) - set(present.tolist()))
        if missing:
            warnings.warn(
                f"The clean set has no rows of classes {missing} (of {num_labels}); the repaired model is not checked "
                "on them.",
                stacklevel=3,
            )


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fit, holdout = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        k = int(round(fraction * len(rows)))
        k = min(max(k, 1), len(rows) - 1) if len(rows) > 1 else 0
        holdout.extend(rows[:k].tolist())
        fit.extend(rows[k:].tolist())
    return np.sort(np.asarray(fit, dtype=np.int64)), np.sort(np.asarray(holdout, dtype=np.int64))


def _subset(dataset, indices: np.ndarray):
    if hasattr(dataset, "select"):
        return dataset.select(indices.tolist())
    return Subset(dataset, indices.tolist())
