"""ABL: Anti-Backdoor Learning, run during supervised fine-tuning.

Li et al., "Anti-Backdoor Learning: Training Clean Models on Poisoned Data", NeurIPS 2021; official code
bboylyg/ABL (``backdoor_isolation.py``, ``backdoor_unlearning.py``, ``config.py``).

The procedure, through ``BackdoorSafeTrainer``'s hooks:

1. Isolation phase (the first ``isolation_epochs`` = T_te epochs of the Trainer's own training): the loss is local
   gradient ascent (LGA), ``sign(CE - gamma) * CE`` with ``gamma = 0.5``. Poisoned rows are learned fastest; LGA
   holds every row's loss near gamma instead of letting it fall to zero, which keeps the easily learned (poisoned)
   rows apart from the rest. The paper writes LGA per example (the default, ``lga="per_example"``); the official
   code applies it to the batch mean (``lga="batch"``).
2. Backdoor isolation (end of epoch T_te): the ``isolation_ratio`` (official 1%) of training rows with the lowest
   loss are isolated. With ground truth (a ``poisoned`` column) the report gives isolation precision, recall, F1,
   the loss AUROC, and the precision/recall the other ratios would have had.
3. The remaining epochs train on the rest (``isolated_rows="mask"``: isolated rows are masked out of the loss; the
   official code's "fine-tuning on the other examples").
4. Backdoor unlearning (after training): gradient ascent on the isolated rows, read without augmentation (official:
   SGD lr 5e-4, momentum 0.9, Nesterov, weight decay 1e-4, batch 64; its loop runs 5 epochs of which the first only
   evaluates).

Deviations and options, and why:

- The official code trains the isolation model and the final model in separate scripts with their own schedules
  (10 LGA epochs, then 60 fine-tuning epochs with SGD lr 0.1). Here both are the user's ``Trainer`` run (its
  optimizer, schedule and epochs): ABL must fit into ordinary fine-tuning.
- LGA is computed with plain cross-entropy even when the Trainer uses label smoothing: with smoothing 0.1 over 10
  classes the smallest reachable loss is about 0.5, i.e. gamma itself, and LGA would be meaningless. After isolation
  the Trainer's label smoothing applies.
- ``isolated_rows="ascend"`` is the paper's joint objective for t >= T_te: the isolated rows' cross-entropy is
  subtracted in the same batches (unbounded, as written); ``"none"`` keeps training on them.
- ``unlearning_objective="ascent_descent"`` runs the paper's global gradient ascent objective, CE(retained) -
  CE(isolated), in the unlearning phase: each ascent batch of isolated rows is paired with a descent batch of as many
  retained rows. The official code ascends the isolated rows alone (``"ascent"``, the default); on a binary text task
  whose isolated rows all carry the target label that ascent can simply move every row off the target label.
- ``unlearning_objective="complementary"`` replaces the unbounded ascent with the complementary-label loss
  ``-log(1 - p(y))`` on the isolated rows (Kim et al., "NLNL: Negative Learning for Noisy Labels", ICCV 2019),
  paired with the same retained-row descent. It stops pushing once the isolated rows are off their label, so it does
  not drag the whole model off that label. Not in the paper; added because both ascents collapsed MiniLM on SST-2.
  It worked on one seed and broke the other (below). On the ViT it is the objective that meets ABL's bar on the
  three seeds measured (seed 2 held out): its gradient on the label's logit is p(label), strongest on the confidently
  fit isolated rows where the ascent's (1 - p) is almost nothing, so it unlearns in fewer epochs and overshoots less.
- ``unlearning_stop_accuracy`` ends the ascent early once the isolated rows are no longer predicted as their
  (poisoned) labels; official: no early stop. ``unlearning_epochs`` counts ascent epochs (official 5 loop
  iterations = 4 ascent epochs).
- ``unlearning_guard_drop`` (not in the paper) checks, after every unlearning step, the accuracy of up to
  ``unlearning_guard_rows`` clean held-out rows (the Trainer's ``eval_dataset``). A step that costs them more than
  ``unlearning_guard_drop`` below their accuracy before unlearning is undone, the optimizer's momentum is cleared and
  its learning rate halved; after ``unlearning_guard_backtracks`` undone steps the unlearning ends. Why: on the
  two-class text task the isolated rows' accuracy can fall to zero within one epoch and the model with it, so a
  check between epochs comes too late. The guard reads clean rows only, never the ASR rows. It bounds the damage of
  the unlearning; it does not make it remove a backdoor it cannot isolate.
- Rows are recognised across epochs by the trainer's row ids (``trainer.batch_row_ids``, from the ``row_index``
  column the poisoner or the trainer adds; the image transform passes it through with
  ``prepare_image_dataset(..., keep_row_index=True)``), because augmentation changes pixels and duplicate texts share
  token ids.
- Under several processes the main process isolates and broadcasts the result; unlearning runs identically on every
  process (same rows, same order).

What these settings did on the packaged data (MiniLM on SST-2, the CPU ViT on CIFAR-10; text and image BadNet,
Style, Syntactic and SIG) is measured in the README ("Vision, ABL and CUL") and ``benchmarks/results/``: on both
models the official code's batch LGA isolates poisoned rows far better than per-example LGA, the ViT wants
``lga="batch"``, ``unlearning_epochs=20``, ``unlearning_stop_accuracy=0.0`` and
``unlearning_objective="complementary"``, and on the text model no unlearning objective is reliable across seeds; on
paraphrase triggers the isolation itself fails. :meth:`ABLDefense.unlearn` runs the unlearning alone on a model an
ABL run saved with ``unlearning_epochs=0``, to compare settings on the same weights
(``benchmarks/abl_unlearning.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..metrics import detection_metrics, roc_auc
from ._shared.data import dataset_labels, iterate_batches, model_dataset, per_example_loss, predict_logits
from .base import Defense, DefenseConfig, register_defense

logger = logging.getLogger(__name__)

LGA_MODES = ("per_example", "batch", "none")
ISOLATED_ROWS = ("mask", "ascend", "none")
OPTIMIZERS = ("sgd", "adamw")
UNLEARNING_OBJECTIVES = ("ascent", "ascent_descent", "complementary")
PAIRED_WITH_RETAINED = ("ascent_descent", "complementary")  # objectives that also descend the retained rows
REPORT_RATIOS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
LOSS_HISTOGRAM_BINS = 40


@dataclass
class ABLConfig(DefenseConfig):
    """Anti-Backdoor Learning (see the module docstring for the official values and deviations).

    Args:
        isolation_epochs: T_te, the epochs trained with LGA before isolation (must be fewer than the Trainer's).
        isolation_ratio: fraction of the training rows isolated (lowest loss first); official 0.01.
        gamma: the LGA loss threshold; official 0.5.
        lga: ``"per_example"`` (the paper), ``"batch"`` (the official code) or ``"none"`` (plain CE; isolation
            by loss only).
        isolated_rows: after isolation, ``"mask"`` them out of the loss, ``"ascend"`` (subtract their loss, the
            paper's joint objective) or ``"none"``.
        unlearning_epochs: ascent epochs on the isolated rows after training (0 skips unlearning).
        unlearning_learning_rate, unlearning_optimizer, unlearning_batch_size, unlearning_momentum,
        unlearning_weight_decay: the ascent's optimizer (official: SGD, 5e-4, batch 64, momentum 0.9 Nesterov,
            weight decay 1e-4).
        unlearning_stop_accuracy: stop the ascent once the isolated rows' accuracy on their labels is at or below
            this (``None``: run every epoch, as the official code).
        unlearning_objective: ``"ascent"`` (the official code: ascend the isolated rows' CE only) or
            ``"ascent_descent"`` (every ascent batch is paired with a batch of as many retained rows whose CE is
            descended: the paper's global gradient ascent objective, CE(retained) - CE(isolated), run after
            training). A dirty-label isolated set carries one label, so ascending it alone can push the whole model
            off that label; the retained rows hold the clean task in place. ``"complementary"`` descends the
            bounded complementary-label loss ``-log(1 - p(y))`` on the isolated rows instead of ascending their CE,
            paired with the same retained-row descent (see the module docstring).
        unlearning_guard_drop: largest fall of the clean held-out rows' accuracy (the Trainer's ``eval_dataset``)
            that one unlearning step may cause; a step beyond it is undone and the learning rate halved. ``None``
            (default, as the paper): no guard.
        unlearning_guard_rows: how many ``eval_dataset`` rows the guard scores after each step (a seeded sample).
        unlearning_guard_backtracks: undone steps after which the unlearning ends.
        isolation_batch_size: batch size of the loss pass that ranks the rows.
        seed: seeds the unlearning's batch order and the guard's sample.
    """

    isolation_epochs: int = field(
        default=1,
        metadata={"help": "T_te, the epochs trained with LGA before isolation (must be fewer than the Trainer's)."},
    )
    isolation_ratio: float = field(
        default=0.01, metadata={"help": "fraction of the training rows isolated (lowest loss first); official 0.01."}
    )
    gamma: float = field(default=0.5, metadata={"help": "the LGA loss threshold; official 0.5."})
    lga: str = field(
        default="per_example",
        metadata={
            "help": '`"per_example"` (the paper), `"batch"` (the official code) or `"none"` (plain CE; isolation by loss only).'
        },
    )
    isolated_rows: str = field(
        default="mask",
        metadata={
            "help": 'after isolation, `"mask"` them out of the loss, `"ascend"` (subtract their loss, the paper\'s joint objective) or `"none"`.'
        },
    )
    unlearning_epochs: int = field(
        default=5,
        metadata={
            "help": "ascent epochs on the isolated rows after training (0 skips unlearning). unlearning_learning_rate, unlearning_optimizer, unlearning_batch_size, unlearning_momentum,"
        },
    )
    unlearning_learning_rate: float = field(
        default=5e-4, metadata={"help": "Learning rate of the unlearning optimizer (official 5e-4)."}
    )
    unlearning_optimizer: str = field(
        default="sgd", metadata={"help": "Unlearning optimizer: `sgd` (official, Nesterov momentum) or `adamw`."}
    )
    unlearning_batch_size: int = field(
        default=64, metadata={"help": "Batch size of the unlearning steps (official 64)."}
    )
    unlearning_momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the unlearning (official 0.9)."})
    unlearning_weight_decay: float = field(
        default=1e-4,
        metadata={"help": "Weight decay of the unlearning optimizer (official 1e-4)."},
    )
    unlearning_stop_accuracy: float | None = field(
        default=None,
        metadata={
            "help": "stop the ascent once the isolated rows' accuracy on their labels is at or below this (`None`: run every epoch, as the official code)."
        },
    )
    unlearning_objective: str = field(
        default="ascent",
        metadata={
            "help": '`"ascent"` (the official code: ascend the isolated rows\' CE only) or `"ascent_descent"` (every ascent batch is paired with a batch of as many retained rows whose CE is descended: the paper\'s global gradient ascent objective, CE(retained) - CE(isolated), run after training). A dirty-label isolated set carries one label, so ascending it alone can push the whole model off that label; the retained rows hold the clean task in place. `"complementary"` descends the bounded complementary-label loss `-log(1 - p(y))` on the isolated rows instead of ascending their CE, paired with the same retained-row descent (see the module docstring).'
        },
    )
    unlearning_guard_drop: float | None = field(
        default=None,
        metadata={
            "help": "largest fall of the clean held-out rows' accuracy (the Trainer's `eval_dataset`) that one unlearning step may cause; a step beyond it is undone and the learning rate halved. `None` (default, as the paper): no guard."
        },
    )
    unlearning_guard_rows: int = field(
        default=256,
        metadata={"help": "how many `eval_dataset` rows the guard scores after each step (a seeded sample)."},
    )
    unlearning_guard_backtracks: int = field(
        default=4, metadata={"help": "undone steps after which the unlearning ends."}
    )
    isolation_batch_size: int = field(
        default=256, metadata={"help": "batch size of the loss pass that ranks the rows."}
    )
    seed: int = field(default=0, metadata={"help": "seeds the unlearning's batch order and the guard's sample."})

    name = "abl"

    def __post_init__(self) -> None:
        if self.isolation_epochs < 1:
            raise ValueError(f"isolation_epochs (T_te) must be >= 1, got {self.isolation_epochs}.")
        self._check_interval("(0, 1)", "isolation_ratio")
        self._check_at_least(0, "gamma", "unlearning_epochs", "unlearning_guard_backtracks")
        self._check_choice("lga", LGA_MODES)
        self._check_choice("isolated_rows", ISOLATED_ROWS)
        self._check_choice("unlearning_optimizer", OPTIMIZERS)
        self._check_choice("unlearning_objective", UNLEARNING_OBJECTIVES)
        self._check_positive("unlearning_learning_rate")
        self._check_at_least(1, "unlearning_batch_size", "isolation_batch_size", "unlearning_guard_rows")
        self._check_interval("[0, 1)", "unlearning_stop_accuracy", optional=True)
        self._check_interval("(0, 1)", "unlearning_guard_drop", optional=True)

    def detection_only(self) -> ABLConfig:
        """This config without the unlearning after training: what ``hf-backdoor scan`` runs (it keeps no model)."""
        return dataclasses.replace(self, unlearning_epochs=0)


def lga_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, per_example: bool = True) -> torch.Tensor:
    """Local gradient ascent: ``sign(CE - gamma) * CE``, per example then averaged (the paper) or on the batch mean
    (the official code)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if per_example:
        return (torch.sign(ce - gamma) * ce).mean()
    mean = ce.mean()
    return torch.sign(mean - gamma) * mean


def complementary_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log(1 - p(label))``: pushes each row off its label and, unlike ``-CE``, stops pushing once the
    label's probability is near 0 (Kim et al., "NLNL: Negative Learning for Noisy Labels", ICCV 2019)."""
    logits = logits.float()
    # log(1 - p(y)) as logsumexp over the other classes minus logsumexp over all: exact where p(y) is near 1, where
    # log1p(-p) would lose every digit.
    others = logits.masked_fill(F.one_hot(labels, logits.shape[-1]).bool(), float("-inf"))
    return (torch.logsumexp(logits, dim=-1) - torch.logsumexp(others, dim=-1)).mean()


class ABLDefense(Defense):
    config: ABLConfig
    owns_loss = True  # LGA before isolation, masking or ascending the isolated rows after it
    needs_row_ids = True

    def __init__(self, config: ABLConfig):
        super().__init__(config)
        self.isolated_indices: list[int] = []
        self.isolation_done = False
        self.isolation_epoch: int | None = None
        self.isolation: dict[str, Any] = {}
        self.unlearning: list[dict[str, Any]] = []
        self.unlearning_guard: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.epochs_seen = 0
        self.isolation_step: int | None = None
        self.loss_history: list[dict[str, float]] = []
        self._isolated_positions: set[int] = set()

    # ----------------------------------------------------------------------------------------------- hooks
    def on_train_begin(self, trainer) -> None:
        dataset = trainer.train_dataset
        if dataset is None:
            raise ValueError("ABL needs the training set: pass `train_dataset` to the trainer.")
        if self.config.unlearning_guard_drop is not None and self.config.unlearning_epochs:
            _guard_dataset(trainer)  # fail before training, not after it
        planned = getattr(trainer.state, "num_train_epochs", None) or trainer.args.num_train_epochs
        if planned <= self.config.isolation_epochs:
            logger.warning(
                "ABL isolates after %d LGA epoch(s) but training runs %s epoch(s): isolation happens at the end of "
                "training and only the unlearning step remains. Train for more epochs than isolation_epochs.",
                self.config.isolation_epochs,
                planned,
            )
        if self.isolation_done:  # resumed from a checkpoint
            self._index_isolated_rows(trainer)

    def on_epoch_end(self, trainer) -> None:
        self.epochs_seen = int(round(trainer.state.epoch or 0))
        if not self.isolation_done and self.epochs_seen >= self.config.isolation_epochs:
            self._isolate(trainer)

    def prepare_inputs(self, trainer, inputs: dict) -> dict:
        if not self.isolation_done or self.config.isolated_rows == "none":
            return inputs
        isolated = [p in self._isolated_positions for p in trainer.row_positions(trainer.batch_row_ids)]
        return {**inputs, "abl_isolated": torch.tensor(isolated, device=inputs["labels"].device)}

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        isolated = inputs.pop("abl_isolated", None)
        if self.isolation_done and isolated is None:
            return None  # isolated_rows="none": the Trainer's own loss
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        if not self.isolation_done:
            loss = (
                F.cross_entropy(logits.float(), labels)
                if self.config.lga == "none"
                else lga_loss(logits, labels, self.config.gamma, per_example=self.config.lga == "per_example")
            )
        else:
            smoothing = float(getattr(trainer.args, "label_smoothing_factor", 0.0) or 0.0)
            per_row = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
            keep = (~isolated).float()
            if self.config.isolated_rows == "mask":
                # Masking (not dropping) rows keeps every process's backward identical under DDP.
                loss = (per_row * keep).sum() / keep.sum().clamp(min=1.0)
            else:  # "ascend": the paper's joint objective for t >= T_te
                loss = (per_row * keep).sum() / len(per_row) - (per_row * (1 - keep)).sum() / len(per_row)
        return (loss, outputs) if return_outputs else loss

    def on_train_end(self, trainer) -> None:
        if not self.isolation_done:
            logger.warning(
                "ABL: training ended after %d epoch(s), before isolation_epochs=%d; isolating now.",
                self.epochs_seen,
                self.config.isolation_epochs,
            )
            self._isolate(trainer)
        # The Trainer's logged training loss: the report draws it with the isolation step marked.
        self.loss_history = [
            {"step": int(entry["step"]), "loss": float(entry["loss"])}
            for entry in trainer.state.log_history
            if "loss" in entry and "step" in entry
        ]
        if self.config.unlearning_epochs and self.isolated_indices and not self.unlearning:
            start = time.perf_counter()
            self._unlearn(trainer)
            self.timings["unlearning_s"] = time.perf_counter() - start

    # ------------------------------------------------------------------------------------------- isolation
    def _isolate(self, trainer) -> None:
        start = time.perf_counter()
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            data = model_dataset(trainer, trainer.train_dataset)
            logits, labels = predict_logits(trainer, model, data, self.config.isolation_batch_size)
            losses = per_example_loss(logits, labels)
            count = max(1, int(round(self.config.isolation_ratio * len(losses))))
            order = np.argsort(losses, kind="stable")
            self.isolated_indices = sorted(int(i) for i in order[:count])
            self.isolation = self._isolation_report(trainer, losses, order, count)
        self.isolation_epoch = self.epochs_seen
        self.isolation_step = int(trainer.state.global_step)
        self._sync(trainer)
        self.isolation_done = True
        self._index_isolated_rows(trainer)
        self.timings["isolation_s"] = time.perf_counter() - start
        logger.info(
            "ABL isolated %d rows after %d epoch(s): %s",
            len(self.isolated_indices),
            self.epochs_seen,
            {k: v for k, v in self.isolation.items() if k in ("precision", "recall")},
        )

    def _isolation_report(self, trainer, losses: np.ndarray, order: np.ndarray, count: int) -> dict[str, Any]:
        report: dict[str, Any] = {
            "num_rows": len(losses),
            "num_isolated": count,
            "loss_threshold": float(losses[order[count - 1]]),
            "loss_mean": float(losses.mean()),
        }
        # Log-spaced bins: the isolated rows sit orders of magnitude below the rest.
        edges = np.logspace(
            np.log10(max(losses.min(), 1e-8)), np.log10(max(losses.max(), 1e-7)), LOSS_HISTOGRAM_BINS + 1
        )
        report["loss_histogram"] = {
            "edges": [float(e) for e in edges],
            "counts": np.histogram(np.clip(losses, edges[0], edges[-1]), edges)[0].tolist(),
        }
        raw = trainer.train_dataset.with_format(None)
        if "poisoned" not in raw.column_names:
            return report
        truth = np.asarray(raw["poisoned"], dtype=bool)
        poisoned_counts, _ = np.histogram(np.clip(losses[truth], edges[0], edges[-1]), edges)
        report["loss_histogram"]["counts_poisoned"] = poisoned_counts.tolist()
        flagged = np.zeros(len(losses), dtype=bool)
        flagged[order[:count]] = True
        report.update(detection_metrics(flagged, truth))
        if truth.any() and not truth.all():
            report["loss_auroc"] = roc_auc(-losses, truth)  # low loss = suspicious
            report["loss_mean_poisoned"] = float(losses[truth].mean())
            report["loss_mean_clean"] = float(losses[~truth].mean())
        at_ratio = {}
        for ratio in REPORT_RATIOS:
            n = max(1, int(round(ratio * len(losses))))
            hits = int(truth[order[:n]].sum())
            at_ratio[str(ratio)] = {"precision": hits / n, "recall": hits / max(1, int(truth.sum()))}
        report["at_ratio"] = at_ratio
        return report

    def _index_isolated_rows(self, trainer) -> None:
        self._isolated_positions = set(self.isolated_indices)

    # ------------------------------------------------------------------------------------------ unlearning
    def unlearn(
        self,
        trainer,
        isolated_indices: Sequence[int],
        after_epoch: Callable[[int, torch.nn.Module], None] | None = None,
    ) -> list[dict[str, Any]]:
        """ABL's unlearning phase alone, with this config, on ``trainer.model`` as it stands.

        For a model an ABL run saved with ``unlearning_epochs=0``: its report's ``isolated_row_indices`` (positions
        in ``trainer.train_dataset``, the same poisoned training set) name the rows, so unlearning settings can be
        compared on the same weights without training again. ``after_epoch(epoch, model)`` is called after each
        epoch (e.g. to score a test set for a trace); it cannot change when the unlearning stops. Returns the
        per-epoch record that :meth:`report` gives as ``unlearning``.
        """
        if trainer.train_dataset is None:
            raise ValueError("ABL's unlearning reads the isolated rows from the training set: pass `train_dataset`.")
        rows = [int(i) for i in isolated_indices]
        if not rows:
            raise ValueError("No isolated rows to unlearn: `isolated_indices` is empty.")
        size = len(trainer.train_dataset)
        outside = [i for i in rows if not 0 <= i < size]
        if outside:
            raise ValueError(
                f"isolated_indices {outside[:5]} are outside the training set's {size} rows: pass the training set "
                "the ABL run isolated them from (same data, attack, poison rate and seed)."
            )
        self.isolated_indices, self.isolation_done, self.unlearning, self.unlearning_guard = rows, True, [], {}
        self._index_isolated_rows(trainer)
        self._unlearn(trainer, after_epoch)
        return self.unlearning

    def _unlearn(self, trainer, after_epoch: Callable[[int, torch.nn.Module], None] | None = None) -> None:
        cfg = self.config
        model = trainer.accelerator.unwrap_model(trainer.model)
        subset = model_dataset(trainer, trainer.train_dataset.select(self.isolated_indices))
        labels = dataset_labels(subset)
        retained = None
        if cfg.unlearning_objective in PAIRED_WITH_RETAINED:
            isolated = set(self.isolated_indices)
            rest = [i for i in range(len(trainer.train_dataset)) if i not in isolated]
            retained = model_dataset(trainer, trainer.train_dataset.select(rest))
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.unlearning_optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params,
                lr=cfg.unlearning_learning_rate,
                momentum=cfg.unlearning_momentum,
                nesterov=cfg.unlearning_momentum > 0,
                weight_decay=cfg.unlearning_weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(
                params, lr=cfg.unlearning_learning_rate, weight_decay=cfg.unlearning_weight_decay
            )
        was_training = model.training

        def measure(epoch: int, train_loss: float | None) -> dict[str, Any]:
            logits, _ = predict_logits(trainer, model, subset, cfg.isolation_batch_size)
            return {
                "epoch": epoch,
                "isolated_accuracy": float(np.mean(logits.argmax(axis=1) == labels)),
                "isolated_loss": float(per_example_loss(logits, labels).mean()),
                "train_loss": train_loss,
            }

        guard = _UnlearningGuard(trainer, model, cfg) if cfg.unlearning_guard_drop is not None else None
        self.unlearning = [measure(0, None)]
        if guard is not None:
            self.unlearning[0]["guard_accuracy"] = guard.baseline
        stopped = False
        with torch.random.fork_rng(devices=[]):  # dropout draws must not shift the caller's random stream
            torch.manual_seed(cfg.seed)
            for epoch in range(1, cfg.unlearning_epochs + 1):
                if stopped or (
                    cfg.unlearning_stop_accuracy is not None
                    and self.unlearning[-1]["isolated_accuracy"] <= cfg.unlearning_stop_accuracy
                ):
                    break
                model.train()
                losses, retained_losses = [], []
                retained_batches = (
                    _endless_batches(trainer, retained, cfg.unlearning_batch_size, seed=cfg.seed + epoch)
                    if retained is not None
                    else None
                )
                for step, (inputs, batch_labels) in enumerate(
                    iterate_batches(trainer, subset, cfg.unlearning_batch_size, shuffle=True, seed=cfg.seed + epoch)
                ):
                    with trainer.accelerator.autocast():
                        logits = model(**inputs).logits.float()
                    loss = F.cross_entropy(logits, batch_labels)
                    if cfg.unlearning_objective == "complementary":
                        objective = complementary_label_loss(logits, batch_labels)
                    else:
                        objective = -loss  # gradient ascent on the isolated (suspected poisoned) rows
                    if retained_batches is not None:
                        retained_inputs, retained_labels = next(retained_batches)
                        with trainer.accelerator.autocast():
                            retained_logits = model(**retained_inputs).logits.float()
                        retained_loss = F.cross_entropy(retained_logits, retained_labels)
                        objective = objective + retained_loss
                        retained_losses.append(float(retained_loss.detach()))
                    if guard is not None:
                        guard.remember(params)
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    if guard is not None and not guard.check(params, optimizer, epoch, step):
                        stopped = True
                        break
                self.unlearning.append(measure(epoch, float(np.mean(losses))))
                if retained_losses:
                    self.unlearning[-1]["retained_train_loss"] = float(np.mean(retained_losses))
                if guard is not None:
                    self.unlearning[-1]["guard_accuracy"] = guard.current
                if after_epoch is not None:
                    after_epoch(epoch, model)
        if guard is not None:
            self.unlearning_guard = guard.report()
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------- plumbing
    def _sync(self, trainer) -> None:
        if trainer.accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast_object_list

        payload = [{"isolated_indices": self.isolated_indices, "isolation": self.isolation}]
        broadcast_object_list(payload, from_process=0)
        self.isolated_indices = payload[0]["isolated_indices"]
        self.isolation = payload[0]["isolation"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "isolated_indices": self.isolated_indices,
            "isolation_done": self.isolation_done,
            "isolation_epoch": self.isolation_epoch,
            "isolation": self.isolation,
            "isolation_step": self.isolation_step,
            "timings": self.timings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "isolation_epoch": self.isolation_epoch,
            "isolation_step": self.isolation_step,
            "isolation_cut": self.isolation.get("loss_threshold"),
            "loss_history": self.loss_history,
            "num_isolated_rows": len(self.isolated_indices),
            "isolated_row_indices": self.isolated_indices,
            "isolation": self.isolation,
            "unlearning": self.unlearning,
            "unlearning_guard": self.unlearning_guard,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    # ------------------------------------------------------------------------------------------- rendering
    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        isolation = report.get("isolation") or {}
        cut = isolation.get("loss_threshold")
        lines = [
            f"- Isolated after epoch {report.get('isolation_epoch')}: **{report.get('num_isolated_rows', 0)}** "
            f"training rows of {isolation.get('num_rows', '?')} (the lowest per-row loss under LGA"
            + (f"; cut at loss {cut:.3g})." if cut is not None else ").")
        ]
        if "precision" in isolation:
            lines.append(
                f"- Against the data's ground truth: precision {isolation['precision']:.2f}, recall "
                f"{isolation['recall']:.2f}"
                + (f", loss AUROC {isolation['loss_auroc']:.2f}." if "loss_auroc" in isolation else ".")
            )
        unlearning = report.get("unlearning") or []
        if len(unlearning) > 1:
            lines.append(
                f"- Unlearning (gradient ascent on the isolated rows, {len(unlearning) - 1} epochs): their accuracy "
                f"on their own labels {unlearning[0]['isolated_accuracy']:.2f} -> {unlearning[-1]['isolated_accuracy']:.2f}."
            )
        guard = report.get("unlearning_guard") or {}
        if guard:
            lines.append(
                f"- Unlearning guard ({guard['rows']} clean held-out rows, accuracy {guard['baseline_accuracy']:.3f} "
                f"before unlearning): {len(guard['undone_steps'])} step(s) undone for costing them too much accuracy."
            )
        return "\n".join(lines)

    @classmethod
    def card_limits(cls, report: dict[str, Any]) -> list[str]:
        ratio = (report.get("config") or {}).get("isolation_ratio")
        share = f"the {ratio:.1%}" if isinstance(ratio, (int, float)) else "a fixed share of"
        return [
            f"- ABL isolates {share} training rows with the lowest loss early in training: poisoned rows beyond that "
            "share, or poisoned rows the model does not learn faster than clean ones, stay in the training data."
        ]

    @classmethod
    def figures(cls, report: dict[str, Any], output_dir) -> list:
        from ._shared.figures import new_figure, save_figure

        figures = []
        history = report.get("loss_history")
        if history:
            steps = [entry["step"] for entry in history]
            fig, ax = new_figure()
            ax.plot(
                steps, [entry["loss"] for entry in history], color="#2e86c1", marker="." if len(steps) < 30 else None
            )
            if report.get("isolation_step") is not None:
                ax.axvline(report["isolation_step"], color="#c0392b", linestyle="--", linewidth=1, label="isolation")
                ax.legend(fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (logged)")
            ax.set_title("Training loss (LGA before the isolation step)", fontsize=10)
            figures.append(
                save_figure(fig, output_dir, "abl_loss_curve.png", "ABL training loss with the isolation step")
            )
        histogram = (report.get("isolation") or {}).get("loss_histogram")
        if histogram:
            import numpy as np

            edges = np.asarray(histogram["edges"])
            fig, ax = new_figure()
            ax.stairs(histogram["counts"], edges, fill=True, color="#9db4d0", label="all rows")
            if "counts_poisoned" in histogram:
                ax.stairs(
                    histogram["counts_poisoned"], edges, color="#c0392b", linewidth=1.5, label="poisoned (ground truth)"
                )
            if report.get("isolation_cut") is not None:
                ax.axvline(report["isolation_cut"], color="black", linestyle="--", linewidth=1, label="isolation cut")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("per-row loss at isolation")
            ax.set_ylabel("rows")
            ax.legend(fontsize=8)
            ax.set_title("Rows left of the cut are isolated", fontsize=10)
            figures.append(
                save_figure(fig, output_dir, "abl_isolation_losses.png", "ABL per-row loss at isolation with the cut")
            )
        return figures

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        isolation = report.get("isolation") or {}
        lines = [
            f"ABL: isolated {report.get('num_isolated_rows', 0)} of {isolation.get('num_rows', '?')} training rows "
            f"after epoch {report.get('isolation_epoch')}"
        ]
        if "precision" in isolation:
            lines.append(
                f"ABL: isolated rows against the ground truth: precision {isolation['precision']:.3f}, recall "
                f"{isolation['recall']:.3f}"
            )
        unlearning = report.get("unlearning") or []
        if len(unlearning) > 1:
            lines.append(
                f"ABL: unlearning, {len(unlearning) - 1} epochs: isolated rows' accuracy on their labels "
                f"{unlearning[0]['isolated_accuracy']:.2f} -> {unlearning[-1]['isolated_accuracy']:.2f}"
            )
        guard = report.get("unlearning_guard") or {}
        if guard:
            lines.append(f"ABL: unlearning guard undid {len(guard['undone_steps'])} step(s)")
        return lines


def _guard_dataset(trainer):
    dataset = trainer.eval_dataset
    if dataset is None or isinstance(dataset, dict):
        raise ValueError(
            "ABLConfig(unlearning_guard_drop=...) scores clean held-out rows after every unlearning step: pass one "
            "`eval_dataset` (a clean validation split, not the test rows you report) to the trainer, or set "
            f"unlearning_guard_drop=None. Got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError("ABL's unlearning guard got an empty eval_dataset: pass clean held-out rows.")
    return dataset


class _UnlearningGuard:
    """Undoes an unlearning step that costs the clean held-out rows more than ``unlearning_guard_drop`` of accuracy,
    clears the optimizer's state (momentum that carried the step) and halves its learning rate."""

    def __init__(self, trainer, model, config: ABLConfig):
        dataset = _guard_dataset(trainer)
        rows = np.random.default_rng(config.seed).permutation(len(dataset))[: config.unlearning_guard_rows]
        self.trainer, self.model, self.config = trainer, model, config
        self.dataset = model_dataset(trainer, dataset.select(np.sort(rows)))
        self.labels = dataset_labels(self.dataset)
        self.baseline = self.accuracy()
        self.current = self.baseline  # the accuracy of the weights as they stand after the last check
        self.undone: list[dict[str, Any]] = []
        self._saved: list[torch.Tensor] = []

    def accuracy(self) -> float:
        logits, _ = predict_logits(self.trainer, self.model, self.dataset, self.config.isolation_batch_size)
        return float(np.mean(logits.argmax(axis=1) == self.labels))

    def remember(self, params: list[torch.Tensor]) -> None:
        if not self._saved:
            self._saved = [p.detach().clone() for p in params]
            return
        with torch.no_grad():  # reuse the buffers: this runs before every unlearning step
            for saved, param in zip(self._saved, params):
                saved.copy_(param)

    def check(self, params: list[torch.Tensor], optimizer, epoch: int, step: int) -> bool:
        """False once the unlearning must end."""
        accuracy = self.accuracy()
        if self.baseline - accuracy <= self.config.unlearning_guard_drop:
            self.current = accuracy
            return True
        with torch.no_grad():
            for param, saved in zip(params, self._saved):
                param.copy_(saved)
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
        self.undone.append(
            {"epoch": epoch, "step": step, "accuracy": accuracy, "learning_rate_after": optimizer.param_groups[0]["lr"]}
        )
        logger.info(
            "ABL unlearning guard: epoch %d step %d took the held-out accuracy %.3f -> %.3f; undone, lr now %.2e.",
            epoch,
            step,
            self.baseline,
            accuracy,
            optimizer.param_groups[0]["lr"],
        )
        return len(self.undone) < self.config.unlearning_guard_backtracks

    def report(self) -> dict[str, Any]:
        return {"rows": len(self.labels), "baseline_accuracy": self.baseline, "undone_steps": self.undone}


def _endless_batches(trainer, dataset, batch_size: int, seed: int):
    # Reshuffled passes, so a retained set smaller than the isolated one still pairs every ascent batch.
    for rounds in itertools.count():
        yield from iterate_batches(trainer, dataset, batch_size, shuffle=True, seed=seed + 7919 * rounds)


register_defense(ABLConfig, ABLDefense)
