"""Exposure of a trained model's backdoor ("Expose Before You Defend", EBYD), and what the exposed model tells.

``expose_model(trainer, clean_dataset, ExposeConfig(...))`` (also ``trainer.expose(...)``) runs the repair-stage
defense ``"expose"`` (``defenses/cul.py``: Clean Unlearning, fine-tuning on random labels, or RNP's SGD clean
unlearning) on a **deep copy** of the trainer's model (the original is untouched) and returns an
:class:`ExposureResult`, the exposed copy read three ways:

- backdoor label detection: the class the exposed model predicts for most clean inputs (``backdoor_label``);
- backdoor model detection: a per-model ``score``, the concentration of the predicted-class shares on the clean
  set, ``(K * sum(p_c^2) - 1) / (K - 1)`` (0 = uniform, 1 = every clean input in one class; a rescaling of EBYD's
  variance of the shares, comparable across class counts). Flag a model when its score exceeds a threshold chosen
  on clean models only (:func:`detection_threshold`), never on test ASR;
- per-row scores for removal defenses (:meth:`ExposureResult.score_rows`): the exposed model's logit margin of each
  row's own label (margins, not probabilities, which saturate after exposure).

``ExposureResult.report()`` is the defense report (``{"defense": "expose", ...}``) that cards and run reports
render through ``ExposeDefense``'s class methods.

The data plumbing the loops use (``model_dataset``, ``iterate_batches``, ``predict_logits``...) lives in
``defenses/_shared/data.py`` and is re-exported here for existing imports.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from ._shared.data import (  # noqa: F401  (re-exported: ABL and older callers import them from here)
    LABEL_KEYS,
    ROW_INDEX,
    class_shares,
    dataset_labels,
    iterate_batches,
    model_dataset,
    per_example_loss,
    predict_logits,
)
from .cul import ExposeConfig, ExposeDefense, ExposureContext, check_clean_set, concentration  # noqa: F401


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
        augmentation: what the exposure trained through (``None``: the rows as stored, e.g. text).
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
    augmentation: str | None = None
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

    def report(self) -> dict[str, Any]:
        """The defense report of this exposure, ``{"defense": "expose", "config": ..., **to_dict()}``: what
        ``trainer.defense_reports``, the card and the run report take (rendered by ``ExposeDefense``)."""
        fields = self.to_dict()
        return {"defense": ExposeConfig.name, "config": fields.pop("config"), **fields}

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
            "augmentation": self.augmentation,
            "history": self.history,
            "wall_s": self.wall_s,
            "config": self.config,
        }


def _expose_config(config) -> ExposeConfig:
    """``config`` as an ``ExposeConfig``: ``None`` (CUL defaults), a config, or its fields as a dict."""
    if config is None:
        return ExposeConfig()
    if isinstance(config, dict):
        fields = dict(config)
        name = fields.pop("name", ExposeConfig.name)
        if name != ExposeConfig.name:
            raise ValueError(f"expose_model runs the {ExposeConfig.name!r} defense; the dict names {name!r}.")
        return ExposeConfig(**fields)
    if not isinstance(config, ExposeConfig):
        raise TypeError(
            f"config must be an ExposeConfig (or its fields as a dict), got {type(config).__name__}; post-training "
            "repairs run with `trainer.sanitize(clean_dataset, config)`."
        )
    return config


def expose_model(trainer, clean_dataset: datasets.Dataset, config=None) -> ExposureResult:
    """Expose the backdoor of ``trainer``'s model on ``clean_dataset`` (see the module docstring).

    ``clean_dataset`` may be raw (``text``/``label`` or ``image``/``label``), tokenized, or transformed. ``config``:
    an ``ExposeConfig`` (default: CUL) or its fields as a dict. The trainer's model is not modified.
    """
    config = _expose_config(config)
    defense = ExposeDefense(config)
    start = time.perf_counter()
    original = trainer.accelerator.unwrap_model(trainer.model)
    num_labels = int(original.config.num_labels)
    context = ExposureContext.build(trainer, clean_dataset, config, num_labels)
    model = copy.deepcopy(original)
    with torch.random.fork_rng(devices=[]):  # exposure must not consume the caller's random numbers
        torch.manual_seed(config.seed)
        fields = defense.repair(context, model)
    return ExposureResult(
        model=model,
        **fields,
        wall_s=time.perf_counter() - start,
        config=config.to_dict(),
        _trainer=trainer,
    )
