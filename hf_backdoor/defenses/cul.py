"""Exposure procedures of "Expose Before You Defend" (EBYD): Clean Unlearning (CUL) and random-label fine-tuning.

Wang, Li, et al., "Expose Before You Defend: Unifying and Enhancing Backdoor Defenses via Exposed Models" (2024);
official code bboylyg/Expose-Before-You-Defend (``exposes/unlearn.py``, ``exposes/sfft.py``).

- **CUL**: maximise the cross-entropy of a small clean set (official: 1% of the training data, Adam lr 1e-5,
  weight decay 5e-4, batch 128, 20 epochs, dropout on). Clean functionality is unlearned faster than the backdoor,
  so the exposed model sends clean inputs to the backdoor label.
- **Random-label fine-tuning** (``method="random_label"``, the official ``ShuffleFT``): fine-tune on the clean set
  with uniformly random labels drawn afresh every batch (official: Adam lr 1e-4, weight decay 5e-4, 20 epochs).
- **RNP's clean unlearning** (``method="rnp_unlearning"``; Li et al., "Reconstructive Neuron Pruning for Backdoor
  Defense", ICML 2023, the same authors, whose step 1 EBYD generalises into CUL): the same ascent with SGD (lr 0.01,
  momentum 0.9, weight decay 5e-4), checked after every step and stopped at the first step whose clean accuracy is
  <= 0.20 on CIFAR-10 (carried over to other label sets by ``sanitize.clean_threshold_for``; the per-step check
  is this library's RNP default, see ``rnp.py``). Measured on the CPU-sized ViT (README, "EBYD exposure on the
  ViT"): on 5% clean rows it found the target of the seed-0 BadNets, Blended and WaNet models and separated them
  from three clean models (AUROC 1.000), but on models trained afterwards to check it (two more clean seeds, seed 1
  of each attack) it missed BadNets' label and a clean model outscored every new backdoored one: over all eleven
  models, 5 of 6 labels right and AUROC 0.867, against CUL's 4 of 6 and 0.567 at EBYD's 1%. A model trained on
  the same dirty labels without the trigger (``benchmarks/exposure_label_control.py``) is also sent to the target
  (80% of its clean rows, score 0.617): on that ViT the exposure reads the label shift of dirty-label poisoning,
  not the backdoor. On two ViTs backdoored by SIG, a clean-label attack that leaves the labels uniform (ASR 0.932
  / 0.960), none of the 12 exposures (three methods, 1% and 5%) named the target; only random-label fine-tuning on
  5% flagged both against five clean models (scores 0.102 / 0.044, clean at most 0.037; README, "A clean-label
  attack").

Use them through ``trainer.expose(clean_dataset, ExposeConfig(...))`` (``defenses/exposure.py``), which works on
any classifier the trainer holds: the default ViT, Hub ViT/DeiT, and the text encoders.

Deviations by default (``ExposeConfig.paper()`` restores the official procedure):

- ``early_stop``: stop as soon as the clean set's accuracy falls to ``stop_accuracy`` (CUL default: chance, 1/K; the
  official code defines ``stop_acc = 0.1`` for CIFAR-10, which is chance, but never uses it; random labels: half way
  from the starting accuracy to chance). Ascent past the
  collapse only keeps damaging the model, and on text it drove the exposed model onto the wrong class (reference
  measurements, ``../shared/reference/README.md``).
- ``escalate``: when the official budget (``epochs`` at the official learning rate) leaves clean accuracy above
  ``stop_accuracy``, continue with the learning rate times 10, up to ``escalate`` times. The reference found the
  pretrained text encoder barely moved at lr 1e-5 (clean accuracy 0.878 after 20 epochs) but exposed at 1e-4.
- ``max_grad_norm``: the official code calls ``clip_grad_norm_(max_norm=20)`` *before* ``backward()``, on zeroed
  gradients, so it never clips; here the norm is clipped after ``backward()`` (set ``None`` to match the official
  behaviour).
- The learning-rate schedule (official ``MultiStepLR`` with milestones [20, 20], i.e. constant over 20 epochs) is
  constant here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .exposure import class_shares, iterate_batches, predict_logits

logger = logging.getLogger(__name__)

EXPOSE_METHODS = ("cul", "random_label", "rnp_unlearning")
OFFICIAL_LEARNING_RATE = {"cul": 1e-5, "random_label": 1e-4, "rnp_unlearning": 0.01}
ASCENT_METHODS = ("cul", "rnp_unlearning")
RNP_CLEAN_THRESHOLD = 0.20  # RNP's unlearning stop on CIFAR-10


@dataclass
class ExposeConfig:
    """How to expose a model (see the module docstring for the official values and the deviations).

    Args:
        method: ``"cul"`` (Clean Unlearning), ``"random_label"`` (fine-tuning on random labels) or
            ``"rnp_unlearning"`` (RNP's SGD ascent, stopped per step).
        learning_rate: the optimizer's learning rate (Adam; SGD for ``rnp_unlearning``); ``None`` takes the official
            one (CUL 1e-5, random labels 1e-4, RNP 0.01).
        weight_decay: weight decay (official 5e-4).
        momentum: SGD momentum of ``rnp_unlearning`` (official 0.9); unused by the Adam methods.
        epochs: epochs over the clean set per learning rate (official 20).
        batch_size: clean rows per step (official 128).
        max_grad_norm: gradient-norm clip after ``backward()``; ``None`` does not clip (as the official code).
        early_stop: stop once clean accuracy is at or below ``stop_accuracy``.
        stop_accuracy: ``None`` means chance (1 / number of classes) for CUL, half way from the starting accuracy
            to chance for random labels (which only bring accuracy near chance, never below), and RNP's 0.20 carried
            over to the task's labels for ``rnp_unlearning`` (0.20 on 10 balanced classes).
        escalate: how many times to multiply the learning rate by 10 and run ``epochs`` more when the model is not
            exposed yet (0 = the official fixed budget).
        check_every_step: with ``early_stop``, check the clean accuracy after every step instead of every epoch;
            ``None``: only for ``rnp_unlearning``, whose SGD ascent is fast enough to overshoot within an epoch
            (as ``RNPConfig``'s default stop check).
        min_rows, min_rows_per_class: the smallest clean set accepted (errors below).
        max_length: truncation when the clean set is raw text tokenized here.
        seed: seeds the batch order, dropout and random labels.
    """

    method: str = "cul"
    learning_rate: float | None = None
    weight_decay: float = 5e-4
    momentum: float = 0.9
    epochs: int = 20
    batch_size: int = 128
    max_grad_norm: float | None = 20.0
    early_stop: bool = True
    stop_accuracy: float | None = None
    escalate: int = 2
    check_every_step: bool | None = None
    min_rows: int = 10
    min_rows_per_class: int = 1
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in EXPOSE_METHODS:
            raise ValueError(f"method must be one of {EXPOSE_METHODS}, got {self.method!r}.")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        for name in ("epochs", "batch_size", "min_rows", "min_rows_per_class", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}.")
        if self.stop_accuracy is not None and not 0 <= self.stop_accuracy < 1:
            raise ValueError(f"stop_accuracy must be in [0, 1) or None (chance), got {self.stop_accuracy}.")
        if self.escalate < 0:
            raise ValueError(f"escalate must be >= 0, got {self.escalate}.")

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

    def to_dict(self) -> dict:
        return asdict(self)


def _evaluate(trainer, model, data, labels, num_labels: int) -> tuple[float, list[float]]:
    logits, _ = predict_logits(trainer, model, data)
    predictions = logits.argmax(axis=1)
    return float(np.mean(predictions == labels)), [float(s) for s in class_shares(predictions, num_labels)]


def run_exposure(trainer, model, data, labels: np.ndarray, num_labels: int, config: ExposeConfig):
    """Run the configured exposure on ``model`` in place. Returns the per-epoch history (entry 0 = before) and the
    last learning rate used."""
    from .sanitize import clean_threshold_for

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
                trainer, data, config.batch_size, shuffle=True, seed=config.seed + epoch
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
