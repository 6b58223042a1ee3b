"""Exposure procedures of "Expose Before You Defend" (EBYD): Clean Unlearning (CUL) and random-label fine-tuning.

Wang, Li, et al., "Expose Before You Defend: Unifying and Enhancing Backdoor Defenses via Exposed Models" (2024);
official code bboylyg/Expose-Before-You-Defend (``exposes/unlearn.py``, ``exposes/sfft.py``).

One repair-stage defense, ``ExposeConfig`` / :class:`ExposeDefense` (registered as ``"expose"``), whose ``method``
picks the procedure:

- **CUL** (``method="cul"``): maximise the cross-entropy of a small clean set (official: 1% of the training data,
  images read through the training augmentation (``augment``), Adam lr 1e-5, weight decay 5e-4, batch 128, 20
  epochs, dropout on). Clean functionality is unlearned faster than the backdoor, so the exposed model sends clean
  inputs to the backdoor label.
- **Random-label fine-tuning** (``method="random_label"``, the official ``ShuffleFT``): fine-tune on the clean set
  with uniformly random labels drawn afresh every batch (official: Adam lr 1e-4, weight decay 5e-4, 20 epochs).
- **RNP's clean unlearning** (``method="rnp_unlearning"``; Li et al., "Reconstructive Neuron Pruning for Backdoor
  Defense", ICML 2023, the same authors, whose step 1 EBYD generalises into CUL): the same ascent with SGD (lr 0.01,
  momentum 0.9, weight decay 5e-4), checked after every step and stopped at the first step whose clean accuracy is
  <= 0.20 on CIFAR-10 (carried over to other label sets by ``_shared.loops.clean_threshold_for``; the per-step
  check is this library's RNP default, see ``rnp.py``).

How the three compare at label and model detection, on the ViT and on text, and what a model trained on the same
dirty labels without the trigger or backdoored by a clean-label attack gives, is measured in the README ("EBYD
exposure on the ViT", "The control: dirty labels without the trigger", "A clean-label attack: SIG").

Use them through ``trainer.expose(clean_dataset, ExposeConfig(...))`` (``defenses/exposure.py``), which works on
any classifier the trainer holds (the default ViT, Hub ViT/DeiT, the text encoders) and returns an
``ExposureResult``; the trainer's model is never modified: :meth:`ExposeDefense.repair` exposes a copy.

Deviations by default (``ExposeConfig.paper()`` restores the official procedure):

- ``early_stop``: stop as soon as the clean set's accuracy falls to ``stop_accuracy`` (CUL default: chance, 1/K; the
  official code defines ``stop_acc = 0.1`` for CIFAR-10, which is chance, but never uses it; random labels: half way
  from the starting accuracy to chance). Ascent past the collapse only keeps damaging the model, and on text it
  drove the exposed model onto the wrong class.
- ``escalate``: when the official budget (``epochs`` at the official learning rate) leaves clean accuracy above
  ``stop_accuracy``, continue with the learning rate times 10, up to ``escalate`` times: a pretrained text encoder
  barely moves at CUL's 1e-5 and exposes at 1e-4.
- ``max_grad_norm``: the official code calls ``clip_grad_norm_(max_norm=20)`` *before* ``backward()``, on zeroed
  gradients, so it never clips; here the norm is clipped after ``backward()`` (set ``None`` to match the official
  behaviour).
- The learning-rate schedule (official ``MultiStepLR`` with milestones [20, 20], i.e. constant over 20 epochs) is
  constant here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from ..registry import register_defense
from ._shared.data import (
    augmented_view,
    check_training_augmentation,
    class_shares,
    dataset_labels,
    iterate_batches,
    model_dataset,
    predict_logits,
)
from ._shared.loops import clean_threshold_for
from ._shared.repair import fmt
from .base import Defense, DefenseConfig, Figure

logger = logging.getLogger(__name__)

EXPOSE_METHODS = ("cul", "random_label", "rnp_unlearning")
OFFICIAL_LEARNING_RATE = {"cul": 1e-5, "random_label": 1e-4, "rnp_unlearning": 0.01}
ASCENT_METHODS = ("cul", "rnp_unlearning")
RNP_CLEAN_THRESHOLD = 0.20  # RNP's unlearning stop on CIFAR-10
METHOD_NAMES = {
    "cul": "Clean Unlearning",
    "random_label": "fine-tuning on random labels",
    "rnp_unlearning": "RNP's clean unlearning",
}


@dataclass
class ExposeConfig(DefenseConfig):
    """How to expose a model (see the module docstring for the official values and the deviations)."""

    method: str = field(
        default="cul",
        metadata={
            "help": "'cul' (Clean Unlearning), 'random_label' (fine-tuning on random labels) or 'rnp_unlearning' "
            "(RNP's SGD ascent, stopped per step)."
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "The optimizer's learning rate (Adam; SGD for rnp_unlearning); None takes the official one "
            "(CUL 1e-5, random labels 1e-4, RNP 0.01)."
        },
    )
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (official 5e-4)."})
    momentum: float = field(
        default=0.9, metadata={"help": "SGD momentum of rnp_unlearning (official 0.9); unused by the Adam methods."}
    )
    epochs: int = field(default=20, metadata={"help": "Epochs over the clean set per learning rate (official 20)."})
    batch_size: int = field(default=128, metadata={"help": "Clean rows per step (official 128)."})
    max_grad_norm: float | None = field(
        default=20.0,
        metadata={
            "help": "Gradient-norm clip after backward(); None does not clip (as the official code, whose clip is a no-op)."
        },
    )
    early_stop: bool = field(
        default=True, metadata={"help": "Stop once the clean accuracy is at or below stop_accuracy (official: off)."}
    )
    stop_accuracy: float | None = field(
        default=None,
        metadata={
            "help": "None: chance (1/K) for CUL, half way from the starting accuracy to chance for random labels "
            "(which only bring accuracy near chance), RNP's 0.20 carried over to the task's labels for rnp_unlearning."
        },
    )
    escalate: int = field(
        default=2,
        metadata={
            "help": "How many times to multiply the learning rate by 10 and run `epochs` more while the model is not "
            "exposed (0: the official fixed budget)."
        },
    )
    check_every_step: bool | None = field(
        default=None,
        metadata={
            "help": "With early_stop, check the clean accuracy after every step instead of every epoch; None: only "
            "for rnp_unlearning, whose SGD ascent can overshoot within an epoch (as RNPConfig's default stop)."
        },
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "Train on images through the training augmentation of their transform (random crop, horizontal "
            "flip), as the official code trains on its clean rows (transform_train); the clean accuracy and the "
            "label shares are read on the images as stored. No effect on text. False: the stored images (the "
            "setting before stop 47)."
        },
    )
    min_rows: int = field(default=10, metadata={"help": "The smallest clean set accepted (an error below)."})
    min_rows_per_class: int = field(
        default=1, metadata={"help": "The fewest clean rows of every class accepted (an error below)."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncation when the clean set is raw text tokenized here."})
    seed: int = field(default=0, metadata={"help": "Seeds the batch order, dropout and the random labels."})

    name: ClassVar[str] = "expose"
    title: ClassVar[str] = "EBYD exposure"
    citation: ClassVar[str] = "Wang, Li et al., Expose Before You Defend, 2024"

    def __post_init__(self) -> None:
        self._check_choice("method", EXPOSE_METHODS)
        self._check_positive("learning_rate", optional=True)
        self._check_at_least(0, "weight_decay", "escalate")
        self._check_interval("[0, 1)", "momentum")
        self._check_at_least(1, "epochs", "batch_size", "min_rows", "min_rows_per_class", "max_length")
        self._check_positive("max_grad_norm", optional=True)
        self._check_interval("[0, 1)", "stop_accuracy", optional=True)

    @property
    def stop_every_step(self) -> bool:
        return self.method == "rnp_unlearning" if self.check_every_step is None else self.check_every_step

    @property
    def initial_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else OFFICIAL_LEARNING_RATE[self.method]

    @classmethod
    def paper(cls, method: str = "cul", **overrides) -> ExposeConfig:
        """The official procedure: a fixed budget of ``epochs`` at the official learning rate, no early stop, no
        escalation, no gradient clipping (the official clip is a no-op). RNP's unlearning keeps its stop, checked
        after each epoch as its code does."""
        fields = dict(method=method, early_stop=False, escalate=0, max_grad_norm=None)
        if method == "rnp_unlearning":
            fields.update(early_stop=True, check_every_step=False)
        fields.update(overrides)
        return cls(**fields)


# -- the clean set -------------------------------------------------------------------------------------------------


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


@dataclass
class ExposureContext:
    """What an exposure works with: the trainer (device, collator, autocast), the whole clean set as model inputs
    (exposure keeps no held-out part: it reads the model, it does not choose a threshold) and its labels."""

    trainer: Any
    data: Any
    labels: np.ndarray
    num_labels: int
    train_data: Any = None  # what the exposure trains on: ``data``, or its images augmented (``augmentation``)
    augmentation: str | None = None

    @classmethod
    def build(cls, trainer, clean_dataset, config: ExposeConfig, num_labels: int) -> ExposureContext:
        """Model inputs from a raw, tokenized or transformed clean set, checked to support exposure."""
        check_training_augmentation(trainer, clean_dataset, "exposure's clean")
        data = model_dataset(trainer, clean_dataset, max_length=config.max_length)
        labels = dataset_labels(data)
        check_clean_set(labels, num_labels, config.min_rows, config.min_rows_per_class)
        train_data, augmentation = augmented_view(data) if config.augment else (data, None)
        return cls(trainer, data, labels, num_labels, train_data, augmentation)


# -- the procedures ------------------------------------------------------------------------------------------------


def concentration(shares: np.ndarray) -> float:
    """``(K * sum(p^2) - 1) / (K - 1)``: 0 for uniform shares, 1 when one class takes everything."""
    k = len(shares)
    return float((k * np.sum(np.square(shares)) - 1) / (k - 1))


def _evaluate(trainer, model, data, labels, num_labels: int) -> tuple[float, list[float]]:
    logits, _ = predict_logits(trainer, model, data)
    predictions = logits.argmax(axis=1)
    return float(np.mean(predictions == labels)), [float(s) for s in class_shares(predictions, num_labels)]


def run_exposure(trainer, model, data, labels: np.ndarray, num_labels: int, config: ExposeConfig, train_data=None):
    """Run the configured exposure on ``model`` in place, training on ``train_data`` (default: ``data``) and reading
    the clean accuracy and shares on ``data``. Returns the per-epoch history (entry 0 = before) and the last learning
    rate used."""
    train_data = data if train_data is None else train_data
    accuracy, shares = _evaluate(trainer, model, data, labels, num_labels)
    chance = 1.0 / num_labels
    if config.stop_accuracy is not None:
        stop = config.stop_accuracy
    elif config.method == "cul":
        stop = chance  # ascent drives accuracy below chance; stop once it gets there
    elif config.method == "rnp_unlearning":
        stop = clean_threshold_for(RNP_CLEAN_THRESHOLD, labels)
    else:
        stop = chance + 0.5 * max(0.0, accuracy - chance)  # random labels only bring it near chance
    check_every_step = config.early_stop and config.stop_every_step
    history = [
        {
            "epoch": 0,
            "step": 0,
            "learning_rate": 0.0,
            "loss": None,
            "clean_accuracy": accuracy,
            "shares": shares,
            "stop_accuracy": stop,
        }
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    learning_rate = config.initial_learning_rate
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    step, epoch = 0, 0
    for stage in range(config.escalate + 1):
        if stage:
            learning_rate *= 10
            logger.info(
                "Exposure: clean accuracy %.3f is still above %.3f; continuing at learning rate %.1e",
                accuracy,
                stop,
                learning_rate,
            )
        if config.method == "rnp_unlearning":
            optimizer = torch.optim.SGD(
                params, lr=learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
            )
        else:
            optimizer = torch.optim.Adam(params, lr=learning_rate, weight_decay=config.weight_decay)
        for _ in range(config.epochs):
            epoch += 1
            losses = []
            for inputs, batch_labels in iterate_batches(
                trainer, train_data, config.batch_size, shuffle=True, seed=config.seed + epoch
            ):
                model.train()  # the per-step check evaluates in eval mode
                with trainer.accelerator.autocast():
                    logits = model(**inputs).logits.float()
                if config.method in ASCENT_METHODS:
                    loss = -F.cross_entropy(logits, batch_labels)  # gradient ascent on the clean rows
                else:
                    random_labels = torch.randint(0, num_labels, batch_labels.shape, generator=generator)
                    loss = F.cross_entropy(logits, random_labels.to(logits.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
                if check_every_step:
                    accuracy, shares = _evaluate(trainer, model, data, labels, num_labels)
                    if accuracy <= stop:
                        break
            if not check_every_step:
                accuracy, shares = _evaluate(trainer, model, data, labels, num_labels)
            history.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "learning_rate": learning_rate,
                    "loss": float(np.mean(losses)),
                    "clean_accuracy": accuracy,
                    "shares": shares,
                }
            )
            if config.early_stop and accuracy <= stop:
                model.eval()
                return history, learning_rate
        if not config.early_stop or accuracy <= stop:
            break
    model.eval()
    return history, learning_rate


class ExposeDefense(Defense):
    """Exposes ``model`` in place (``expose_model`` hands it a copy) and reads it: the backdoor label, the model's
    concentration score and whether the exposure worked."""

    limitations = (
        "- Exposure reads the model; it removes nothing. Its score means something only against a threshold "
        "calibrated on models known to be clean.",
        "- After dirty-label poisoning, a model trained on the shifted labels without any trigger can be sent to "
        "the target too, so the reading may reflect the label shift rather than the backdoor; a clean-label "
        "attack, which leaves the labels alone, can go unread.",
    )

    stage: ClassVar[str] = "repair"
    repair_entry_point: ClassVar[str] = "expose"

    def repair(self, context: ExposureContext, model) -> dict[str, Any]:
        config = self.config
        num_labels = context.num_labels
        history, learning_rate = run_exposure(
            context.trainer, model, context.data, context.labels, num_labels, config, train_data=context.train_data
        )
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
                "Exposure (%s) did not expose the model: clean accuracy went from %.3f to only %.3f (chance %.3f) "
                "after %d epochs, final learning rate %.1e. The backdoor label and score below are unreliable; raise "
                "`learning_rate`, `epochs` or `escalate`.",
                config.method,
                before,
                after,
                chance,
                len(history) - 1,
                learning_rate,
            )
        shares = np.asarray(history[-1]["shares"])
        fields = {
            "method": config.method,
            "backdoor_label": int(np.argmax(shares)),
            "label_shares": [float(s) for s in shares],
            "score": concentration(shares),
            "share_variance": float(np.var(shares)),
            "exposed": bool(exposed),
            "clean_accuracy_before": float(before),
            "clean_accuracy_after": float(after),
            "learning_rate": float(learning_rate),
            "num_clean_rows": len(context.labels),
            "augmentation": context.augmentation,
            "history": history,
        }
        logger.info(
            "Exposure (%s): clean accuracy %.3f -> %.3f, backdoor label %d (shares %s), score %.3f",
            config.method,
            before,
            after,
            fields["backdoor_label"],
            np.round(shares, 3).tolist(),
            fields["score"],
        )
        return fields

    # -- rendering of a saved report (``ExposureResult.report()``) --------------------------------------------------
    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        method = METHOD_NAMES.get(report.get("method"), report.get("method"))
        epochs = max(0, len(report.get("history") or []) - 1)
        lines = [
            f"- Exposure by {method} on {report.get('num_clean_rows')} clean rows (a copy of the model; the model "
            f"itself is unchanged): clean accuracy {fmt(report.get('clean_accuracy_before'))} -> "
            f"{fmt(report.get('clean_accuracy_after'))} in {epochs} epoch(s), final learning rate "
            f"{fmt(report.get('learning_rate'), '.1e')}"
            + (f", trained through {report['augmentation']}." if report.get("augmentation") else ".")
        ]
        shares = report.get("label_shares") or []
        if report.get("exposed"):
            share = max(shares) if shares else None
            lines.append(
                f"- The exposed model predicts class **{report.get('backdoor_label')}** for "
                f"{fmt(share, '.0%')} of the clean rows (the backdoor-label reading); concentration score "
                f"{fmt(report.get('score'))} (flag the model when it exceeds a threshold calibrated on clean models)."
            )
        else:
            lines.append(
                "- **Not exposed**: the clean accuracy did not fall half way to chance, so the backdoor label and the "
                "score are unreliable."
            )
        return "\n".join(lines)

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        line = (
            f"EXPOSE ({report.get('method')}): clean accuracy {fmt(report.get('clean_accuracy_before'))} -> "
            f"{fmt(report.get('clean_accuracy_after'))}; backdoor label {report.get('backdoor_label')}, score "
            f"{fmt(report.get('score'))}"
        )
        return [line if report.get("exposed") else line + " (NOT exposed: unreliable)"]

    @classmethod
    def figures(cls, report: dict[str, Any], output_dir: Path) -> list[Figure]:
        history = report.get("history") or []
        if not history:
            return []
        from matplotlib.ticker import MaxNLocator

        from ._shared.figures import new_figure, save_figure

        fig, (accuracy, shares) = new_figure(width=8.0, ncols=2)
        accuracy.plot([h["epoch"] for h in history], [h["clean_accuracy"] for h in history], marker=".")
        if history[0].get("stop_accuracy") is not None:
            accuracy.axhline(history[0]["stop_accuracy"], color="black", linestyle=":", linewidth=1, label="stop")
            accuracy.legend(fontsize=8)
        accuracy.xaxis.set_major_locator(MaxNLocator(integer=True))
        accuracy.set_xlabel("epoch")
        accuracy.set_ylabel("clean accuracy")
        accuracy.set_ylim(0, 1.02)
        accuracy.set_title(f"Exposure ({report.get('method')})", fontsize=10)
        label_shares = report.get("label_shares") or []
        colors = ["#c0392b" if c == report.get("backdoor_label") else "#7f8c8d" for c in range(len(label_shares))]
        shares.bar(range(len(label_shares)), label_shares, color=colors)
        shares.set_xticks(range(len(label_shares)))
        shares.set_xlabel("predicted class")
        shares.set_ylabel("share of clean rows")
        shares.set_ylim(0, 1.02)
        shares.set_title("Where the exposed model sends clean rows", fontsize=10)
        return [save_figure(fig, output_dir, "exposure.png", "EBYD exposure: clean accuracy and label shares")]


register_defense(ExposeConfig, ExposeDefense)
