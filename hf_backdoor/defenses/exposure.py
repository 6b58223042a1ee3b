"""Exposure of a trained model's backdoor ("Expose Before You Defend", EBYD), and what the exposed model tells.

``expose_model(trainer, clean_dataset, ExposeConfig(...))`` (also ``trainer.expose(...)``) returns an
:class:`ExposureResult`: an exposed **deep copy** of the trainer's model (the original is untouched), made by one of
the procedures in ``defenses/cul.py`` (Clean Unlearning, fine-tuning on random labels, or RNP's SGD clean
unlearning), and read three ways:

- backdoor label detection: the class the exposed model predicts for most clean inputs (``backdoor_label``);
- backdoor model detection: a per-model ``score``, the concentration of the predicted-class shares on the clean
  set, ``(K * sum(p_c^2) - 1) / (K - 1)`` (0 = uniform, 1 = every clean input in one class; a rescaling of EBYD's
  variance of the shares, comparable across class counts). Flag a model when its score exceeds a threshold chosen
  on clean models only (:func:`detection_threshold`), never on test ASR;
- per-row scores for removal defenses (:meth:`ExposureResult.score_rows`): the exposed model's logit margin of each
  row's own label (margins, not probabilities, which saturate after exposure).

The module also holds the data plumbing shared by the defenses that run their own loops (ABL, exposure): turning a
raw, tokenized or transformed dataset into model batches with the trainer's collator, and predicting logits.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

LABEL_KEYS = ("labels", "label", "label_ids")
ROW_INDEX = "row_index"


# ------------------------------------------------------------------------------------------------ data plumbing
def _format_transform(dataset: datasets.Dataset):
    fmt = dataset.format
    if fmt.get("type") != "custom":
        return None
    return (fmt.get("format_kwargs") or {}).get("transform")


def _forward_columns(model) -> set[str]:
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(target.forward).parameters) | set(LABEL_KEYS)


def _is_tokenizer(processing_class) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(processing_class, PreTrainedTokenizerBase)


def model_dataset(trainer, dataset: datasets.Dataset, augment: bool = False, max_length: int = 128):
    """``dataset`` in a form the trainer's collator turns into model inputs and labels.

    - A dataset with a format transform (images via ``with_transform``) is used as it is, except that
      hf-backdoor's :class:`~hf_backdoor.vision.ImageClassificationTransform` loses its augmentation unless
      ``augment`` (loss-based scores are read on the images as stored, as the official ABL code does).
    - Raw ``text``/``label`` rows are tokenized with the trainer's tokenizer (``max_length``); raw ``image``/``label``
      rows get the trainer's image processor (``processing_class``).
    - Columns the model does not take (``text``, ``poisoned``, ``orig_label`` …) are dropped.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Expected a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    transform = _format_transform(dataset)
    if transform is not None:
        if not augment and getattr(transform, "augment", False) and hasattr(transform, "without_augmentation"):
            dataset = dataset.with_transform(transform.without_augmentation())
        return dataset
    columns = dataset.column_names
    processing = trainer.processing_class
    if "input_ids" not in columns and "pixel_values" not in columns:
        if "text" in columns and processing is not None and _is_tokenizer(processing):
            from ..models import tokenize_dataset

            dataset = tokenize_dataset(dataset, processing, max_length)
        elif "image" in columns and processing is not None and not _is_tokenizer(processing):
            from ..vision.transforms import ImageClassificationTransform

            return dataset.with_transform(ImageClassificationTransform(processing))
        else:
            raise ValueError(
                f"Cannot make model inputs from columns {columns}: pass a tokenized dataset (input_ids), one with "
                "an image transform, or raw text/image rows together with the trainer's tokenizer/image processor "
                "as `processing_class`."
            )
    keep = _forward_columns(trainer.accelerator.unwrap_model(trainer.model)) | {ROW_INDEX}
    return dataset.select_columns([c for c in dataset.column_names if c in keep])


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
    order, in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for inputs, batch_labels in iterate_batches(trainer, dataset, batch_size):
        with trainer.accelerator.autocast():
            out = model(**inputs)
        logits.append(out.logits.float().cpu())
        if batch_labels is not None:
            labels.append(batch_labels.cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), (torch.cat(labels).numpy() if labels else None)


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of every row (no reduction)."""
    return torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels).long(), reduction="none"
    ).numpy()


# ------------------------------------------------------------------------------------------------- detection
def class_shares(predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """The fraction of ``predictions`` in each class."""
    return np.bincount(predictions, minlength=num_labels)[:num_labels] / max(1, len(predictions))


def concentration(shares: np.ndarray) -> float:
    """``(K * sum(p^2) - 1) / (K - 1)``: 0 for uniform shares, 1 when one class takes everything."""
    k = len(shares)
    return float((k * np.sum(np.square(shares)) - 1) / (k - 1))


def detection_threshold(clean_model_scores, quantile: float = 1.0) -> float:
    """A backdoor-model threshold from the scores of models known to be clean (never from backdoored ones).

    ``quantile=1.0`` takes their maximum: no clean model used for calibration is flagged. A lower quantile trades
    false positives for sensitivity.
    """
    scores = np.asarray(clean_model_scores, dtype=float)
    if scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"Calibrate on the scores of at least 2 clean models, got {scores.tolist()}.")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}.")
    return float(np.quantile(scores, quantile))


@dataclass
class ExposureResult:
    """What exposure produced. ``model`` is the exposed copy; the trainer's model is untouched.

    Attributes:
        backdoor_label: the class the exposed model predicts most often on the clean set.
        label_shares: the exposed model's predicted-class shares on the clean set.
        score: the concentration of those shares (see :func:`concentration`), the backdoor-model score.
        share_variance: EBYD's raw statistic, the variance of the shares.
        exposed: whether clean accuracy fell at least half way from its starting value to chance.
        clean_accuracy_before / clean_accuracy_after: on the clean set.
        history: per epoch of exposure: step, learning rate, loss, clean accuracy, shares.
    """

    model: Any
    method: str
    backdoor_label: int
    label_shares: list[float]
    score: float
    share_variance: float
    exposed: bool
    clean_accuracy_before: float
    clean_accuracy_after: float
    learning_rate: float
    num_clean_rows: int
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    config: dict = field(default_factory=dict)
    _trainer: Any = field(default=None, repr=False)

    def is_backdoored(self, threshold: float) -> bool:
        """Flag the model when its score exceeds a threshold calibrated on clean models."""
        return self.score > threshold

    def score_rows(
        self, dataset: datasets.Dataset, by: str = "label", label: int | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Per-row suspicion for removal defenses, from the exposed model's logit margins (margins, not
        probabilities: those saturate after exposure). Higher = more likely to carry the trigger.

        ``by="label"`` (default, needs a label column): the margin of each row's own label over the best other
        class. The exposed model has lost the clean task but kept the backdoor, so it still fits the rows whose
        label the trigger explains (poisoned rows) and not the clean ones. ``by="backdoor"``: the margin of
        ``label`` (default: the detected backdoor label), for unlabelled inputs; after exposure most clean inputs
        go there too, so it separates less.
        """
        if by not in ("label", "backdoor"):
            raise ValueError(f"by must be 'label' or 'backdoor', got {by!r}.")
        data = model_dataset(self._trainer, dataset)
        logits, labels = predict_logits(self._trainer, self.model, data, batch_size)
        if by == "label":
            if labels is None:
                raise ValueError("score_rows(by='label') needs a label column; use by='backdoor' for unlabelled rows.")
            columns = labels
        else:
            columns = np.full(len(logits), self.backdoor_label if label is None else label)
        rows = np.arange(len(logits))
        chosen = logits[rows, columns]
        masked = logits.copy()
        masked[rows, columns] = -np.inf
        return chosen - masked.max(axis=1)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable part (no model)."""
        return {
            "method": self.method,
            "backdoor_label": self.backdoor_label,
            "label_shares": self.label_shares,
            "score": self.score,
            "share_variance": self.share_variance,
            "exposed": self.exposed,
            "clean_accuracy_before": self.clean_accuracy_before,
            "clean_accuracy_after": self.clean_accuracy_after,
            "learning_rate": self.learning_rate,
            "num_clean_rows": self.num_clean_rows,
            "history": self.history,
            "wall_s": self.wall_s,
            "config": self.config,
        }


def check_clean_set(labels: np.ndarray, num_labels: int, min_rows: int, min_rows_per_class: int) -> None:
    """Raise when the clean set cannot support exposure: too few rows, or classes missing or too thin."""
    if len(labels) < min_rows:
        raise ValueError(
            f"The clean set has {len(labels)} rows; exposure needs at least {min_rows} (EBYD uses 1% of the "
            "training set, e.g. 500 CIFAR-10 images). Add clean rows or lower `min_rows` knowingly."
        )
    counts = np.bincount(labels, minlength=num_labels)[:num_labels]
    thin = [c for c in range(num_labels) if counts[c] < min_rows_per_class]
    if thin:
        described = ", ".join(f"{c}: {int(counts[c])}" for c in range(num_labels))
        raise ValueError(
            f"The clean set has fewer than {min_rows_per_class} row(s) of class(es) {thin} (rows per class: "
            f"{described}). Unlearning pushes predictions toward classes that are absent, which would then look "
            "like a backdoor label: use a clean set with every class (e.g. a stratified slice)."
        )


def expose_model(trainer, clean_dataset: datasets.Dataset, config=None) -> ExposureResult:
    """Expose the backdoor of ``trainer``'s model on ``clean_dataset`` (see the module docstring).

    ``clean_dataset`` may be raw (``text``/``label`` or ``image``/``label``), tokenized, or transformed.
    """
    from .cul import ExposeConfig, run_exposure

    config = config if config is not None else ExposeConfig()
    if isinstance(config, dict):
        config = ExposeConfig(**config)
    if not isinstance(config, ExposeConfig):
        raise TypeError(f"config must be an ExposeConfig, got {type(config).__name__}.")
    start = time.perf_counter()
    original = trainer.accelerator.unwrap_model(trainer.model)
    num_labels = int(original.config.num_labels)
    data = model_dataset(trainer, clean_dataset, max_length=config.max_length)
    labels = dataset_labels(data)
    check_clean_set(labels, num_labels, config.min_rows, config.min_rows_per_class)
    model = copy.deepcopy(original)
    with torch.random.fork_rng(devices=[]):  # exposure must not consume the caller's random numbers
        torch.manual_seed(config.seed)
        history, learning_rate = run_exposure(trainer, model, data, labels, num_labels, config)
    before, after = history[0]["clean_accuracy"], history[-1]["clean_accuracy"]
    chance = 1.0 / num_labels
    # Exposed: half way to chance, or down to the method's own stop (RNP's 0.20 can sit above half way).
    reached = chance + 0.5 * max(0.0, before - chance)
    if config.early_stop:
        reached = max(reached, history[0]["stop_accuracy"])
    exposed = after <= reached + 1e-9
    if before <= chance + 0.05:
        logger.warning(
            "The model's accuracy on the clean set is %.3f before exposure, near chance (%.3f) for %d classes: it "
            "looks untrained, so its exposure says nothing about a backdoor.",
            before,
            chance,
            num_labels,
        )
    elif not exposed:
        logger.warning(
            "Exposure (%s) did not expose the model: clean accuracy went from %.3f to only %.3f (chance %.3f) after "
            "%d epochs, final learning rate %.1e. The backdoor label and score below are unreliable; raise "
            "`learning_rate`, `epochs` or `escalate`.",
            config.method,
            before,
            after,
            chance,
            len(history) - 1,
            learning_rate,
        )
    shares = np.asarray(history[-1]["shares"])
    result = ExposureResult(
        model=model,
        method=config.method,
        backdoor_label=int(np.argmax(shares)),
        label_shares=[float(s) for s in shares],
        score=concentration(shares),
        share_variance=float(np.var(shares)),
        exposed=bool(exposed),
        clean_accuracy_before=float(before),
        clean_accuracy_after=float(after),
        learning_rate=float(learning_rate),
        num_clean_rows=len(labels),
        history=history,
        wall_s=time.perf_counter() - start,
        config=config.to_dict(),
        _trainer=trainer,
    )
    logger.info(
        "Exposure (%s): clean accuracy %.3f -> %.3f, backdoor label %d (shares %s), score %.3f",
        config.method,
        before,
        after,
        result.backdoor_label,
        np.round(shares, 3).tolist(),
        result.score,
    )
    return result
