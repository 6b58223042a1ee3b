"""Honeypot: a trap classifier on a lower layer absorbs the backdoor; the model's loss down-weights what it catches.

Tang et al., "Setting the Trap: Capturing and Defeating Backdoors in Pretrained Language Models through Honeypots",
NeurIPS 2023. No official code was found in the public index this was written from, so the procedure follows the
paper's text:

- A honeypot module (a small classifier) is attached to a *lower* layer of the model being tuned. The paper's
  observation: lower layers carry enough of a trigger (words, sentences, style) to fit the poisoned rows but little of
  the task, so the honeypot fits the poisoned rows long before the clean ones.
- The honeypot is trained on the labels with the generalized cross-entropy (GCE, ``q = 0.7``, Zhang & Sabuncu's
  value), which fits the easy rows and gives up on the hard ones: it overfits the backdoor.
- The task classifier is trained with a weighted cross-entropy whose per-row weight grows with how much worse the
  honeypot fits the row than the task classifier does (the paper passes a ratio of the two losses through a sigmoid
  with a threshold). Rows the honeypot fits far better than the task model (poisoned rows) get a weight near 0.

How this implementation realises it:

- The honeypot (``expert``) is one fresh pre-LN transformer block plus a linear head (``"attention"``), a two-layer
  MLP (``"mlp"``) or a linear head (``"linear"``) over the first token and the masked mean of ``hidden_states[layer]``
  (0 = embeddings, 1 = the first layer's output). By default it reads the model's own states from its forward pass
  (``output_hidden_states=True``, no extra pass) and its loss also trains the layers below it
  (``train_lower_layers=True``: the honeypot and the model share them, as in the paper). ``train_lower_layers=False``
  reads detached states; ``expert_input="pretrained"`` reads a frozen copy of the pretrained embeddings and first
  ``layer`` layers (one extra forward pass through them, no backward).
- The honeypot has its own AdamW (``expert_learning_rate``): the Trainer's optimizer exists before ``on_train_begin``
  (see ``shallow_expert.py``), so the honeypot is stepped by the defense, and it is not saved with the model.
- The weight is ``W = sigmoid((log l_H - log l_T - threshold) / temperature)`` with ``l_H`` the honeypot's and
  ``l_T`` the task model's per-row cross-entropy (both detached): a sigmoid of the log of the loss ratio. With
  ``threshold = 0`` and ``temperature = 1`` it is ``l_H / (l_H + l_T)``: 1/2 for every row while neither model has
  learned anything (a uniform weight, so no warm-up phase is needed), near 1 for rows the task model fits and the
  honeypot does not, near 0 for rows the honeypot fits and the task model does not. The log form keeps the weight in
  (0, 1) without the floor ``sigmoid(-c)`` that a sigmoid of the plain ratio has.
- The weighted loss is ``sum(W * l_T) / max(sum(W), 1)`` over the micro-batch: a weighted mean, so the learning rate
  of the clean rows does not fall with the weights, and a batch made mostly of suspected rows is not amplified. In
  the shared mode the honeypot's loss is added, so one backward pass trains both.
- ``honeypot_objective="residual"`` (not in the paper) trains the honeypot on what the model does not explain: the
  product-of-experts loss of the honeypot with the model's logits as constants (DPoE's shallow-expert objective, see
  ``dpoe.py``). A label-trained honeypot that can fit the task fits every row, and then the weights starve the
  clean rows too; a residual honeypot only grows sure of rows the model gets wrong.
- Under gradient accumulation the honeypot steps on every micro-batch (its own optimizer, smaller batches).
- Per row the defense records the weight, its logit, the honeypot's loss and the model's loss as the row is trained
  on; with a ``poisoned`` column in the training set the report scores them against it (AUROC, also among the rows
  that share the poisoned rows' label).

When it cannot work: the weights only separate rows that the honeypot fits sooner than the model. A trigger the
model learns as fast as the task (so that its rows are never harder for the model than clean rows) or that the
honeypot's layer does not represent better than the task is not down-weighted; the report's AUROCs show whether the
weights singled the poisoned rows out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from ..registry import register_defense
from .base import Defense, DefenseConfig
from .shallow_expert import (
    EXPERT_INPUTS,
    EXPERT_KINDS,
    ExpertTrainer,
    RowSignals,
    check_attachable,
    fmt,
    gce_loss,
    ground_truth,
    last_epoch_value,
    model_forward_with_hidden_states,
)

logger = logging.getLogger(__name__)

HONEYPOT_OBJECTIVES = ("gce", "residual")


@dataclass
class HoneypotConfig(DefenseConfig):
    """Honeypot defense (Tang et al., NeurIPS 2023) for paraphrase triggers; see the module docstring."""

    name = "honeypot"
    title = "Honeypot (trap classifier on a lower layer)"
    citation = (
        "Tang et al., Setting the Trap: Capturing and Defeating Backdoors in Pretrained Language Models through "
        "Honeypots, NeurIPS 2023"
    )

    layer: int = field(
        default=1,
        metadata={"help": "hidden_states index the honeypot reads (0 = embeddings, 1 = first layer); a lower layer."},
    )
    expert: str = field(
        default="attention",
        metadata={"help": f"honeypot module: one of {EXPERT_KINDS} (attention = one transformer block + linear head)."},
    )
    honeypot_objective: str = field(
        default="gce",
        metadata={
            "help": "what trains the honeypot: 'gce' (the labels, generalized cross-entropy: the paper) or 'residual' "
            "(what the model does not explain: the product-of-experts loss with the model's logits as constants)."
        },
    )
    gce_q: float = field(
        default=0.7, metadata={"help": "q of the honeypot's generalized cross-entropy, in (0, 1] (the paper: 0.7)."}
    )
    threshold: float = field(
        default=0.0,
        metadata={"help": "log loss-ratio at which a row's weight is 1/2; higher down-weights more rows."},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "temperature of the weight's sigmoid (> 0; lower = closer to 0/1 weights)."}
    )
    expert_input: str = field(
        default="model",
        metadata={
            "help": "what the honeypot reads: 'model' (the model's own hidden_states[layer], as it is fine-tuned) or "
            "'pretrained' (a frozen copy of the pretrained embeddings and first `layer` layers, taken at the start)."
        },
    )
    train_lower_layers: bool = field(
        default=True,
        metadata={
            "help": "the honeypot's GCE also trains the model's layers up to `layer` (they are shared, as in the "
            "paper); False reads detached states, so only the honeypot learns from them."
        },
    )
    expert_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the honeypot."})
    expert_weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the honeypot."})
    expert_max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient-norm clip of the honeypot's steps (0 disables)."}
    )
    seed: int = field(default=0, metadata={"help": "seed of the honeypot's initialisation."})

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (a hidden_states index), got {self.layer}.")
        if self.expert_input not in EXPERT_INPUTS:
            raise ValueError(f"expert_input must be one of {EXPERT_INPUTS}, got {self.expert_input!r}.")
        if self.expert not in EXPERT_KINDS:
            raise ValueError(f"expert must be one of {EXPERT_KINDS}, got {self.expert!r}.")
        if self.honeypot_objective not in HONEYPOT_OBJECTIVES:
            raise ValueError(
                f"honeypot_objective must be one of {HONEYPOT_OBJECTIVES}, got {self.honeypot_objective!r}."
            )
        if not 0.0 < self.gce_q <= 1.0:
            raise ValueError(f"gce_q must be in (0, 1] (0.7 in the paper), got {self.gce_q}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (1.0 by default), got {self.temperature}.")
        if self.expert_learning_rate <= 0:
            raise ValueError(f"expert_learning_rate must be > 0 (1e-3 by default), got {self.expert_learning_rate}.")
        if self.expert_weight_decay < 0 or self.expert_max_grad_norm < 0:
            raise ValueError("expert_weight_decay and expert_max_grad_norm must be >= 0.")


def honeypot_weight_logits(
    honeypot_loss: torch.Tensor, task_loss: torch.Tensor, threshold: float, temperature: float
) -> torch.Tensor:
    """``(log l_H - log l_T - threshold) / temperature``, per row, detached: the weights' logits."""
    eps = 1e-6
    log_ratio = torch.log(honeypot_loss.detach().float() + eps) - torch.log(task_loss.detach().float() + eps)
    return (log_ratio - threshold) / temperature


def honeypot_weights(
    honeypot_loss: torch.Tensor, task_loss: torch.Tensor, threshold: float, temperature: float
) -> torch.Tensor:
    """``sigmoid((log l_H - log l_T - threshold) / temperature)``, per row, detached."""
    return torch.sigmoid(honeypot_weight_logits(honeypot_loss, task_loss, threshold, temperature))


class HoneypotDefense(Defense):
    config: HoneypotConfig
    owns_loss = True
    needs_row_ids = True  # the per-row weights are recorded by row id for the report

    def __init__(self, config: HoneypotConfig):
        super().__init__(config)
        self.trainer_state: ExpertTrainer | None = None
        self.signals = RowSignals()
        self._pending_state: dict[str, Any] | None = None
        self._truth = None
        self._labels = None
        self._num_rows: int | None = None

    # -- hooks ------------------------------------------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        check_attachable(trainer.accelerator.unwrap_model(trainer.model), self.config.layer, "HoneypotDefense")

    def on_train_begin(self, trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.trainer_state is None:
            self.trainer_state = ExpertTrainer(model, self.config, "HoneypotDefense")
        if self._pending_state is not None:
            self.trainer_state.load_state_dict(self._pending_state["expert"])
            self.signals.load_state_dict(self._pending_state.get("signals", {}))
            self._pending_state = None
        self._num_rows = len(trainer.train_dataset) if trainer.train_dataset is not None else None

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        cfg = self.config
        expert = self.trainer_state
        expert.flush()  # shared mode: the last backward pass's gradients on the honeypot
        outputs, labels = model_forward_with_hidden_states(model, inputs)
        honeypot_logits = expert.logits(expert.states(outputs, inputs), inputs.get("attention_mask"))
        logits = outputs.logits.float()
        if cfg.honeypot_objective == "gce":
            honeypot_loss = gce_loss(honeypot_logits, labels, cfg.gce_q).mean()
        else:  # what the model does not explain: the product of the two, the model's logits as constants
            joint = F.log_softmax(F.log_softmax(logits.detach(), -1) + F.log_softmax(honeypot_logits, -1), -1)
            honeypot_loss = -joint.gather(1, labels.view(-1, 1)).mean()
        task_loss = F.cross_entropy(logits, labels, reduction="none")
        honeypot_ce = F.cross_entropy(honeypot_logits.detach(), labels, reduction="none")
        weight_logits = honeypot_weight_logits(honeypot_ce, task_loss, cfg.threshold, cfg.temperature)
        weights = torch.sigmoid(weight_logits)
        loss = (weights * task_loss).sum() / weights.sum().clamp(min=1.0)
        if expert.shared:
            loss = loss + honeypot_loss  # one backward pass trains the honeypot and the layers below it
        else:
            expert.step(honeypot_loss)  # its own graph: it reads detached states
        # The logits rank rows without the ties of saturated weights (the AUROC reads them).
        self.signals.record(
            trainer, weight=weights, weight_logit=weight_logits, honeypot_loss=honeypot_ce, model_loss=task_loss
        )
        return (loss, outputs) if return_outputs else loss

    def on_train_end(self, trainer) -> None:
        if self.trainer_state is not None:
            self.trainer_state.flush()
        self._truth, self._labels = ground_truth(trainer)

    # -- state and report -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.trainer_state is None:
            # Restored but not yet attached (the expert is built at on_train_begin): hand the restored state on.
            return dict(self._pending_state or {})
        return {"expert": self.trainer_state.state_dict(), "signals": self.signals.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._pending_state = state

    def report(self) -> dict[str, Any]:
        report = super().report()
        summary = self.signals.summary(
            self._truth,
            {"weight": "low", "weight_logit": "low", "honeypot_loss": "low", "model_loss": "high"},
            self._labels,
        )
        expert = self.trainer_state
        report.update(
            {
                "layer": self.config.layer,
                "expert_parameters": expert.num_parameters if expert else None,
                "expert_steps": expert.steps if expert else 0,
                "has_ground_truth": self._truth is not None,
                "row_ids_missing": self.signals.missing_row_ids,
                "signals": summary,
                "weight_mean": last_epoch_value(summary, "weight", "mean"),
                "weight_mean_poisoned": last_epoch_value(summary, "weight", "mean_poisoned"),
                "weight_mean_clean": last_epoch_value(summary, "weight", "mean_clean"),
                "weight_auroc": last_epoch_value(summary, "weight_logit", "auroc"),
                "weight_auroc_same_label": last_epoch_value(summary, "weight_logit", "auroc_same_label"),
                "honeypot_loss_auroc": last_epoch_value(summary, "honeypot_loss", "auroc"),
                "timings_s": {"honeypot": expert.seconds if expert else 0.0},
            }
        )
        return report

    # -- rendering --------------------------------------------------------------------------------------------------
    @classmethod
    def report_scalars(cls, report: dict[str, Any]) -> dict[str, float]:
        keys = ("weight_mean", "weight_mean_poisoned", "weight_mean_clean", "weight_auroc", "honeypot_loss_auroc")
        out = {k: float(report[k]) for k in keys if isinstance(report.get(k), (int, float))}
        seconds = (report.get("timings_s") or {}).get("honeypot")
        if isinstance(seconds, (int, float)):
            out["time_honeypot_s"] = float(seconds)
        return out

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        config = report.get("config", {})
        lines = [
            f"A honeypot classifier ({config.get('expert', 'attention')} module, "
            f"{report.get('expert_parameters', 'n/a')} parameters) read layer {report.get('layer')}'s hidden states "
            f"during fine-tuning (GCE q={config.get('gce_q')}); each training row's loss was weighted by how much "
            "worse the honeypot fit it than the model did, so rows the honeypot caught (trigger-carrying rows) "
            "taught the model little.",
            f"- Mean row weight in the last epoch: {fmt(report.get('weight_mean'))}",
        ]
        if report.get("has_ground_truth"):
            lines.append(
                f"- Against the `poisoned` column: mean weight poisoned {fmt(report.get('weight_mean_poisoned'))} / "
                f"clean {fmt(report.get('weight_mean_clean'))}; AUROC of low weight {fmt(report.get('weight_auroc'))}, "
                f"of the honeypot's low loss alone {fmt(report.get('honeypot_loss_auroc'))}"
            )
        if report.get("row_ids_missing"):
            lines.append("- Row ids were not available, so no per-row weights were recorded.")
        return "\n".join(lines)

    @classmethod
    def card_limits(cls, report: dict[str, Any]) -> list[str]:
        return [
            "The honeypot only catches triggers that its lower layer represents and that it fits faster than the "
            "model; the weights are soft, so a trigger it fits no faster than the model is learned as usual.",
        ]

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        line = f"honeypot: mean row weight {fmt(report.get('weight_mean'))}"
        if report.get("has_ground_truth"):
            line += (
                f" (poisoned {fmt(report.get('weight_mean_poisoned'))}, clean {fmt(report.get('weight_mean_clean'))},"
                f" AUROC {fmt(report.get('weight_auroc'))})"
            )
        return [line]


register_defense(HoneypotConfig, HoneypotDefense)
