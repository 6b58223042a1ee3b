"""Post-training backdoor removal with a small clean set: ``trainer.sanitize(clean_dataset, defense=...)``.

``sanitize_model(trainer, clean_dataset, defense)`` runs one registered post-training defense (``RNPConfig``,
``NADConfig``, ``NWCConfig``, ``FinetuneConfig``; see :data:`SANITIZERS`) on a deep copy of the trainer's model and
returns ``(model, report)``.

- The clean set is split (stratified, seeded) into a *fit* part the defense trains on and a *held-out* part
  (``holdout_fraction``) on which every threshold is chosen and every step's clean accuracy is measured. Nothing
  is ever chosen from test data or ASR.
- The defense works on a copy. If it raises, the trainer's model is exactly as it was. On success, with
  ``replace_model=True`` (the default), the repaired weights are loaded into ``trainer.model`` in place, so
  ``trainer.evaluate_backdoor``, ``save_model`` and ``push_to_hub`` see the repaired model and any wrapper the
  Trainer holds (DDP, compiled) keeps pointing at the same object; the returned model is ``trainer.model``. With
  ``replace_model=False`` the repaired copy is returned and the trainer is left alone.
- Every repair is written into ordinary weights (pruned units are zeroed weights, no hooks), so the repaired model
  saves and loads like any ``transformers`` model.
- The report (what was pruned or reset, per-step clean accuracy, the threshold sweep, timings) is written to
  ``output_dir/sanitize_report_<name>.json`` and its scalars are logged through ``trainer.log``; it is also kept as
  ``trainer.sanitize_report``.
- Under ``accelerate launch`` every process runs the same seeded computation on the whole clean set (it is small),
  and the main process's result is broadcast so that all ranks hold identical weights.
- Seeded: the defense runs under ``torch.random.fork_rng`` seeded with ``config.seed``, so it neither depends on
  nor disturbs the caller's random state.

Exposure hand-off (EBYD: Wang, Li et al., "Expose Before You Defend", 2024; official code
bboylyg/Expose-Before-You-Defend). RNP and TSBD/NWC both begin by unlearning the clean task by gradient ascent; EBYD's
enhanced variants start from a model whose backdoor has already been exposed instead.
``sanitize_model(..., exposed=trainer.expose(clean_set))`` (an :class:`~.exposure.ExposureResult`, or a bare model of
the same architecture) skips the defense's own unlearning and uses a deep copy of the exposed model in its place; the
report says ``"unlearned_by": "exposure (cul)"``. Only defenses with such a step accept it (:func:`exposed_defenses`:
``rnp``, ``nwc``); the others, and an exposed model whose parameters differ in name or shape, raise ``ValueError``
before any work. The exposed model itself is never modified.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .base import DefenseConfig
from .exposure import ExposureResult, class_shares

logger = logging.getLogger(__name__)

REPORT_NAME = "sanitize_report_{name}.json"
MIN_CLEAN_ROWS = 10


@dataclass
class SanitizeConfig(DefenseConfig):
    """Fields every post-training defense shares.

    Args:
        holdout_fraction: share of the clean set kept out of training to choose thresholds and measure clean
            accuracy (stratified by label, seeded).
        replace_model: on success, load the repaired weights into ``trainer.model`` (in place).
        seed: seeds the split, the batch order, dropout and every random choice.
    """

    holdout_fraction: float = 0.2
    replace_model: bool = True
    seed: int = 0

    name = "sanitize"
    # Whether the defense has a clean-unlearning step an exposed model can stand in for (EBYD's hand-off).
    accepts_exposed = False

    def __post_init__(self) -> None:
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}.")

    def _check_positive(self, *names: str) -> None:
        for field_name in names:
            value = getattr(self, field_name)
            if value is None or value <= 0:
                raise ValueError(f"{field_name} must be > 0, got {value}.")

    def _check_fraction(self, *names: str, closed: bool = True) -> None:
        for field_name in names:
            value = getattr(self, field_name)
            if not (0 <= value <= 1 if closed else 0 < value < 1):
                interval = "[0, 1]" if closed else "(0, 1)"
                raise ValueError(f"{field_name} must be in {interval}, got {value}.")


Sanitizer = Callable[["SanitizeContext", SanitizeConfig, nn.Module], dict]
SANITIZERS: dict[str, tuple[type[SanitizeConfig], Sanitizer]] = {}


def register_sanitizer(config_cls: type[SanitizeConfig], fn: Sanitizer) -> None:
    """Register a post-training defense: ``fn(context, config, model) -> report`` repairs ``model`` in place."""
    SANITIZERS[config_cls.name] = (config_cls, fn)


def get_sanitize_config(defense: SanitizeConfig | dict | str) -> SanitizeConfig:
    """A config from a config object, a name (default settings) or ``{"name": ..., **fields}``."""
    _load_builtin()
    if isinstance(defense, SanitizeConfig):
        if defense.name not in SANITIZERS:
            raise TypeError(f"{type(defense).__name__} is not registered; known: {sorted(SANITIZERS)}.")
        return defense
    if isinstance(defense, str):
        defense = {"name": defense}
    if isinstance(defense, dict):
        fields = dict(defense)
        name = fields.pop("name", None)
        if name not in SANITIZERS:
            raise ValueError(f"Unknown post-training defense {name!r}; registered: {sorted(SANITIZERS)}.")
        return SANITIZERS[name][0](**fields)
    raise TypeError(
        f"defense must be a post-training defense config ({', '.join(sorted(SANITIZERS))}), a name or a dict; got "
        f"{type(defense).__name__}."
    )


def _load_builtin() -> None:
    # The built-in defenses register themselves on import; importing here avoids a cycle with this module.
    from . import nad, nwc, rnp  # noqa: F401


def exposed_defenses() -> list[str]:
    """The registered defenses that accept ``exposed=`` (those with a clean-unlearning step to replace)."""
    _load_builtin()
    return sorted(name for name, (config_cls, _) in SANITIZERS.items() if config_cls.accepts_exposed)


# -- exposure hand-off (EBYD) ----------------------------------------------------------------------------------------


@dataclass
class ExposedModel:
    """An exposed model handed to a removal defense in place of its own clean unlearning (EBYD, Wang, Li et al.
    2024). Built by :func:`resolve_exposed` from an :class:`~.exposure.ExposureResult` or a bare model; the accuracy
    fields are the exposure's own, on the clean set it was exposed with (``None`` for a bare model)."""

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


def check_accepts_exposed(config: SanitizeConfig) -> None:
    """Raise unless ``config``'s defense has an unlearning step for an exposed model to replace."""
    if not config.accepts_exposed:
        raise ValueError(
            f"The {config.name!r} defense has no clean-unlearning step for an exposed model to replace; `exposed=` is "
            f"accepted by {', '.join(exposed_defenses())} only. Run {config.name!r} without it."
        )


def resolve_exposed(exposed, trainer, reference: nn.Module) -> ExposedModel:
    """``exposed`` (an ``ExposureResult`` or an ``nn.Module``) as an :class:`ExposedModel`, after checking that its
    parameters match ``reference``'s (the trainer's model) in name and shape: RNP hooks the unlearned model by
    module path and NWC subtracts its weights from the original's, so a different architecture cannot work."""
    if isinstance(exposed, ExposureResult):
        handoff = ExposedModel(
            model=exposed.model,
            method=exposed.method,
            clean_accuracy_before=exposed.clean_accuracy_before,
            clean_accuracy_after=exposed.clean_accuracy_after,
            exposed=exposed.exposed,
            wall_s=exposed.wall_s,
        )
    elif isinstance(exposed, nn.Module):
        handoff = ExposedModel(model=exposed)
    else:
        raise TypeError(
            "exposed must be an ExposureResult (from `trainer.expose(...)`) or an nn.Module, got "
            f"{type(exposed).__name__}."
        )
    handoff.model = trainer.accelerator.unwrap_model(handoff.model)
    if handoff.model is reference:
        raise ValueError(
            "exposed is the trainer's own model: pass the exposed copy, `trainer.expose(clean_set)` or its `.model`."
        )
    mismatch = _first_parameter_mismatch(handoff.model, reference)
    if mismatch is not None:
        raise ValueError(f"The exposed model does not match the trainer's model: {mismatch}.")
    if handoff.exposed is False:
        # Not an error: the caller may want the numbers anyway; but the defense is then close to running on the
        # backdoored model itself, and the report should not be read as EBYD's.
        warnings.warn(
            f"The exposure ({handoff.method}) did not expose the model (clean accuracy "
            f"{handoff.clean_accuracy_before:.3f} -> {handoff.clean_accuracy_after:.3f}); the defense will start from "
            "a model that still solves the clean task.",
            stacklevel=3,
        )
    return handoff


def _first_parameter_mismatch(model: nn.Module, reference: nn.Module) -> str | None:
    ours = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, shape in ours.items():
        if name not in theirs:
            return f"parameter {name!r} {shape} is missing from the exposed model"
        if theirs[name] != shape:
            return f"parameter {name!r} has shape {theirs[name]} in the exposed model and {shape} in the trainer's"
    extra = next((name for name in theirs if name not in ours), None)
    return None if extra is None else f"the exposed model has a parameter {extra!r} the trainer's model lacks"


class SanitizeContext:
    """What a post-training defense works with: the device, the clean rows split into ``fit`` and ``holdout``, the
    exposed model when one was handed over (``exposed``, else ``None``), and helpers for batches, forward passes and
    accuracy. One per ``sanitize_model`` call."""

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
        self.fit_labels = labels[fit_idx]
        self.holdout_labels = labels[holdout_idx]
        self.show_progress = trainer.is_local_process_zero() and not trainer.args.disable_tqdm

    # -- batches ---------------------------------------------------------------------------------------------------
    def loader(self, part: str = "fit", batch_size: int | None = None, shuffle: bool = False, epoch: int = 0):
        """Batches of ``fit`` or ``holdout``; a shuffled loader is seeded by ``(seed, epoch)``."""
        dataset = {"fit": self.fit, "holdout": self.holdout}[part]
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


def sanitize_model(
    trainer, clean_dataset, defense: SanitizeConfig | dict | str, exposed: ExposureResult | nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Repair ``trainer``'s (backdoored) model with a post-training defense and a small clean set.

    Args:
        trainer: a ``transformers.Trainer`` (``BackdoorSafeTrainer`` or not) holding the model; its device, data
            collator, eval batch size, logging and ``output_dir`` are used.
        clean_dataset: clean labelled rows in the format the trainer trains on (tokenized text, or images through
            the same transform). A ``datasets.Dataset`` with a ``text`` column and no ``input_ids`` is tokenized
            with the trainer's tokenizer (max length 128).
        defense: ``RNPConfig(...)``, ``NADConfig(...)``, ``NWCConfig(...)``, ``FinetuneConfig(...)``, a registered
            name (``"rnp"``) or ``{"name": ..., **fields}``.
        exposed: EBYD's hand-off (RNP and NWC only): an ``ExposureResult`` from ``trainer.expose(...)`` or an exposed
            model of the same architecture; the defense uses a deep copy of it instead of running its own clean
            unlearning. ``None`` (default): the defense as published.

    Returns:
        ``(model, report)``. See the module docstring for what happens to ``trainer.model``.

    Raises:
        ValueError: unsupported model, clean set with one class or too few rows, a threshold that prunes everything,
            ``exposed`` given to a defense without an unlearning step or not matching the trainer's model.
        RuntimeError: a defense that cannot do its job on this model and data (e.g. unlearning never lowers the clean
            accuracy); the message says which numbers it reached. The trainer's model is untouched in every case.
    """
    config = get_sanitize_config(defense)
    _, fn = SANITIZERS[config.name]
    original = trainer.accelerator.unwrap_model(trainer.model)
    handoff = None
    if exposed is not None:  # checked before any work, so a wrong call costs nothing and changes nothing
        check_accepts_exposed(config)
        handoff = resolve_exposed(exposed, trainer, original)
    num_labels = getattr(getattr(original, "config", None), "num_labels", None)
    start = time.perf_counter()
    context = SanitizeContext(trainer, clean_dataset, config, num_labels, exposed=handoff)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        working = copy.deepcopy(original).to(context.device)
        before = context.accuracy(working)
        report = fn(context, config, working)
        after = context.accuracy(working)
    _broadcast_from_main(trainer, working)
    wall = time.perf_counter() - start
    report = {
        "defense": config.name,
        "config": config.to_dict(),
        "num_fit_rows": len(context.fit),
        "num_holdout_rows": len(context.holdout),
        "holdout_accuracy_before": before,
        "holdout_accuracy_after": after,
        **report,
        "wall_s": wall,
        "device": str(context.device),
        "replaced_model": config.replace_model,
    }
    report = _broadcast_object(trainer, _jsonable(report))
    if config.replace_model:
        original.load_state_dict(working.state_dict())
        model = trainer.model
    else:
        model = working
    trainer.sanitize_report = report
    _log_and_write(trainer, config.name, report)
    return model, report


# -- data --------------------------------------------------------------------------------------------------------------


def _prepare_dataset(trainer, dataset):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return dataset
    if isinstance(dataset, datasets.Dataset):
        columns = set(dataset.column_names)
        tokenizer = getattr(trainer, "processing_class", None)
        if "text" in columns and "input_ids" not in columns and hasattr(tokenizer, "pad_token_id"):
            from ..models import tokenize_dataset

            logger.info("Tokenizing the clean set's `text` column with the trainer's tokenizer (max length 128).")
            dataset = tokenize_dataset(dataset, tokenizer, 128)
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


# -- shared training pieces ----------------------------------------------------------------------------------------------


def cross_entropy_epoch(
    context: SanitizeContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    epoch: int,
    sign: float = 1.0,
    scale: float = 1.0,
    max_grad_norm: float | None = None,
    after_step: Callable[[], None] | None = None,
    stop_fn: Callable[[], bool] | None = None,
) -> tuple[float, float]:
    """One epoch over ``fit`` minimising ``sign * scale * CE`` (``sign=-1``: gradient ascent).

    ``stop_fn``, called after every step, ends the epoch early when it returns true. Returns the epoch's mean CE and
    its running accuracy (as the official codes report them).
    """
    model.train()
    total_loss = correct = seen = 0
    for batch in context.loader("fit", batch_size, shuffle=True, epoch=epoch):
        inputs, labels = context.split_batch(batch)
        logits, _ = context.logits(model, inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        (sign * scale * loss).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.detach().argmax(-1) == labels).sum())
        seen += len(labels)
        if stop_fn is not None and stop_fn():
            model.train()  # stop_fn may evaluate the model
            break
    return total_loss / max(seen, 1), correct / max(seen, 1)


def finetune(
    context: SanitizeContext,
    model: nn.Module,
    *,
    epochs: int,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    nesterov: bool = False,
    desc: str = "fine-tuning",
) -> list[dict]:
    """Plain SGD fine-tuning on ``fit``; returns one record per epoch with the held-out clean accuracy."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    history = []
    for epoch in context.progress(range(epochs), desc):
        loss, train_acc = cross_entropy_epoch(context, model, optimizer, batch_size, epoch)
        history.append(
            {"epoch": epoch + 1, "loss": loss, "train_accuracy": train_acc, "holdout_accuracy": context.accuracy(model)}
        )
    return history


def collapse_level(labels: np.ndarray) -> float:
    """The accuracy of a constant prediction of the majority class: where a model that lost the task lands."""
    return float(np.bincount(labels).max() / max(len(labels), 1))


def clean_threshold_for(official: float, labels: np.ndarray) -> float:
    """An unlearning stop threshold set for CIFAR-10 (10 balanced classes, collapse at 0.10) carried over to these
    labels: the same relative position between the collapse level ``c`` and perfect accuracy,
    ``c + (official - 0.1) / 0.9 * (1 - c)``. CIFAR-10 gets the official value back; on a balanced binary task RNP's
    0.20 becomes 0.556 and TSBD's 0.10 becomes 0.5 (a collapsed binary model sits at 0.5 and can never reach 0.2
    without learning the inverted task).
    """
    c = collapse_level(labels)
    return c + (official - 0.1) / 0.9 * (1 - c)


def unlearn(
    context: SanitizeContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    max_epochs: int,
    clean_threshold: float,
    stop_on: str,
    max_grad_norm: float | None = None,
    scheduler=None,
    desc: str = "unlearning",
) -> list[dict]:
    """Gradient ascent on the clean CE until the clean accuracy is ``<= clean_threshold``.

    ``stop_on``: ``"running"`` reads the epoch's running training accuracy (RNP's code); ``"fit"`` re-evaluates the
    fit rows after each epoch (TSBD's code); ``"step"`` re-evaluates them after every step, so the ascent stops at the
    first step that gets there instead of running on to the end of the epoch. Raises ``RuntimeError`` with the
    accuracy reached if ``max_epochs`` pass without getting there: continuing would hand a model that still solves
    the task to the next stage.
    """
    history = []
    reached = float("nan")
    stop_fn = None
    if stop_on == "step":

        def stop_fn():
            return context.accuracy(model, "fit") <= clean_threshold

    for epoch in context.progress(range(max_epochs), desc):
        loss, running_acc = cross_entropy_epoch(
            context,
            model,
            optimizer,
            batch_size,
            epoch,
            sign=-1.0,
            max_grad_norm=max_grad_norm,
            stop_fn=stop_fn,
        )
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch + 1, "loss": loss, "train_accuracy": running_acc}
        if stop_on in ("fit", "step"):
            record["fit_accuracy"] = context.accuracy(model, "fit")
        record["holdout_accuracy"] = context.accuracy(model)
        history.append(record)
        if not np.isfinite(loss):
            raise RuntimeError(f"Unlearning diverged at epoch {epoch + 1} (loss {loss}); lower the unlearning lr.")
        reached = record["fit_accuracy"] if stop_on in ("fit", "step") else running_acc
        if reached <= clean_threshold:
            return history
    raise RuntimeError(
        f"Clean unlearning did not bring the clean accuracy to <= {clean_threshold:.3f} within {max_epochs} epochs "
        f"(last: {reached:.3f}, held-out {history[-1]['holdout_accuracy']:.3f}). Raise the unlearning learning rate "
        "or its epochs; the model was left untouched."
    )


# -- output ------------------------------------------------------------------------------------------------------------


def _broadcast_from_main(trainer, model: nn.Module) -> None:
    if trainer.accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    for tensor in model.state_dict().values():
        dist.broadcast(tensor.data, src=0)


def _broadcast_object(trainer, obj):
    if trainer.accelerator.num_processes <= 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if torch.is_tensor(value):
        return _jsonable(value.tolist())
    return value


def _log_and_write(trainer, name: str, report: dict) -> None:
    scalars = {
        f"sanitize/{name}/{k}": float(v)
        for k, v in report.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for phase, seconds in (report.get("timings_s") or {}).items():
        scalars[f"sanitize/{name}/time_{phase}_s"] = float(seconds)
    trainer.log(scalars)
    if trainer.is_world_process_zero():
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        path = os.path.join(trainer.args.output_dir, REPORT_NAME.format(name=name))
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


@dataclass
class FinetuneConfig(SanitizeConfig):
    """Plain fine-tuning on the clean set: the baseline every removal defense must beat.

    The defaults are TSBD's fine-tuning stage (SGD lr 0.01, momentum 0.9, 20 epochs, batch 256; Lin et al., NeurIPS
    2024, linweiii/TSBD) without its zeroing and without the activeness-aware term, so ``finetune`` against ``nwc``
    isolates what TSBD adds.
    """

    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 256

    name = "finetune"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("learning_rate", "epochs", "batch_size")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")


def _run_finetune(context: SanitizeContext, config: FinetuneConfig, model: nn.Module) -> dict:
    start = time.perf_counter()
    history = finetune(
        context,
        model,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
    )
    return {"finetune_history": history, "timings_s": {"finetune": time.perf_counter() - start}}


register_sanitizer(FinetuneConfig, _run_finetune)
