"""DPoE: a product of experts with a shallow, trigger-only expert; the model is trained to explain what it cannot.

Liu et al., "From Shortcuts to Triggers: Backdoor Defense with Denoised PoE", NAACL 2024; official code
luka-group/DPoE (``train_w_dpoe.py``, ``run_train.sh``).

The official procedure:

- A *shallow* expert (the first ``num_hidden_layers = 3`` layers of the same pretrained BERT, its own copy, with a
  classification head) is trained jointly with the main model. A backdoor trigger is a shortcut, and a shallow model
  learns shortcuts first.
- Both are trained only through the product-of-experts loss: ``p = softmax(log p_main + poe_alpha * log
  softmax(z_shallow / temperature))``, loss ``-log p[y]`` (official ``poe_alpha = 1``, ``temperature = 1``). Where the
  shallow expert already explains a row's label (a trigger row's target label), the joint prediction is right and
  the main model gets almost no gradient from that row, so it never learns the trigger.
- At test time only the main model predicts.
- The main model's AdamW runs at 2e-5, the shallow expert's at ``small_lr`` (5e-4 in the argument defaults, 8e-5 in
  ``run_train.sh``), linear warm-up over 10% of the steps then decay, gradient norms clipped at 1, batch 32 (16 in
  ``run_train.sh``), 10 epochs (3 in ``run_train.sh``).
- "Denoising" against dirty-label noise: R-Drop (a second forward pass of the main model, with a symmetric-KL term
  weighted by ``rdrop_alpha``, 1 or 3) and an optional reweighting (``do_reweight``, off by default): a row's main
  loss is scaled by ``1 - p_shallow[y]`` when ``p_shallow[y] > reweight_threshold`` (0.8).

Deviations, and why:

- The shallow expert is a small head (``expert``: one fresh pre-LN transformer block plus a linear layer, a two-layer
  MLP, or a linear layer, over the first token and the masked mean) on ``hidden_states[layer]`` of the main model,
  not a separate truncated copy of the encoder that is fine-tuned: a fine-tuned copy of three layers would add half
  of a 6-layer model's cost to every step (the wall-time budget of training-time defenses here is 1.5x plain
  training). By default the product's loss also trains the main model's layers below the expert
  (``train_lower_layers=True``), so expert and model share them; ``train_lower_layers=False`` reads detached states,
  and ``expert_input="pretrained"`` a frozen copy of the pretrained embeddings and first ``layer`` layers (one extra
  forward pass through them, no backward). The expert is not saved with the model.
- The expert has its own AdamW (constant rate, ``expert_learning_rate``): the Trainer's optimizer exists before
  ``on_train_begin`` (see ``shallow_expert.py``). With ``expert_objective="poe"`` (official) the expert's gradient is
  the product's loss gradient with respect to its parameters, as in the official joint training; ``"ce"`` and
  ``"gce"`` (not in the paper) train it on the labels on its own, the main model's product treating it as a
  constant. The main model learns through the Trainer's own optimizer, schedule and epochs.
- R-Drop is not used: its second forward pass doubles the cost of every step.
- ``reweight_threshold`` (``None`` = off, the official default) applies the official reweighting.
- ``expert_warmup_ratio`` (not in the paper, 0 = off) trains the expert alone for the first steps, the model's loss
  zeroed, so that it meets the shortcuts first.
- Under gradient accumulation the expert steps on every micro-batch.
- Per row the defense records the expert's confidence in the label (and its log-odds) and the main model's loss as
  the row is trained on; with a ``poisoned`` column in the training set the report scores them (AUROC) against it.

When it cannot work: the product only removes what the expert explains first. If the main model learns a trigger as
fast as the task, the expert's residual never concentrates on the trigger rows and the main model learns the trigger
as usual; the report's AUROC of the expert's confidence shows whether the expert singled them out.

Of the three model-based paraphrase defenses built in (this one, ``loss_truncation``, ``honeypot``) it measured best on
the same runs; how far it falls short of stopping the syntactic backdoor on MiniLM is measured in the README
("Paraphrase triggers"). The default stack (``recipes/text_stack.py``) now uses ``z_defense.py``, which measured
better still on the same runs.
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

EXPERT_OBJECTIVES = ("poe", "ce", "gce")


@dataclass
class DPoEConfig(DefenseConfig):
    """DPoE (Liu et al., NAACL 2024) for paraphrase triggers; see the module docstring."""

    name = "dpoe"
    title = "DPoE (product of experts with a shallow trigger expert)"
    citation = "Liu et al., From Shortcuts to Triggers: Backdoor Defense with Denoised PoE, NAACL 2024"

    layer: int = field(
        default=1,
        metadata={"help": "hidden_states index the shallow expert reads (0 = embeddings, 1 = first layer)."},
    )
    expert: str = field(
        default="attention",
        metadata={"help": f"shallow expert: one of {EXPERT_KINDS} (attention = one transformer block + linear head)."},
    )
    poe_alpha: float = field(
        default=1.0, metadata={"help": "weight of the shallow expert's log-probabilities in the product (official 1)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "temperature of the shallow expert's softmax in the product (official 1)."}
    )
    expert_objective: str = field(
        default="poe",
        metadata={
            "help": "what trains the shallow expert: 'poe' (the product's loss, jointly with the model: official), "
            "'ce' or 'gce' (its own cross-entropy / generalized cross-entropy on the labels, the model's PoE "
            "treating it as a constant)."
        },
    )
    gce_q: float = field(default=0.7, metadata={"help": "q of the expert's GCE when expert_objective='gce'."})
    reweight_threshold: float | None = field(
        default=None,
        metadata={
            "help": "official reweighting: scale a row's loss by 1 - p_shallow(y) when p_shallow(y) exceeds this "
            "(official 0.8 when enabled); None disables it (the official default)."
        },
    )
    expert_input: str = field(
        default="model",
        metadata={
            "help": "what the shallow expert reads: 'model' (the model's own hidden_states[layer], as it is fine-tuned) or "
            "'pretrained' (a frozen copy of the pretrained embeddings and first `layer` layers, taken at the start)."
        },
    )
    train_lower_layers: bool = field(
        default=True,
        metadata={
            "help": "the PoE loss also trains the model's layers up to `layer` through the expert (the expert is "
            "the model's lower layers plus a head, a shallow model sharing them); False reads detached states."
        },
    )
    expert_learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of the shallow expert (official small_lr 5e-4)."}
    )
    expert_weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay of the shallow expert (official 0.01)."}
    )
    expert_max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient-norm clip of the expert's steps (official 1; 0 disables)."}
    )
    expert_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "share of the training steps at the start during which only the shallow expert (and the layers "
            "below it, when shared) learns; the model's product loss is zeroed, so the expert meets the shortcuts "
            "before the model can (not in the paper; 0 = the official joint training from the first step). "
            "Measured on MiniLM/SST-2 syntactic at 0.2: no better (README, 'Paraphrase triggers')."
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the shallow expert's initialisation."})

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (a hidden_states index), got {self.layer}.")
        if self.expert_input not in EXPERT_INPUTS:
            raise ValueError(f"expert_input must be one of {EXPERT_INPUTS}, got {self.expert_input!r}.")
        if self.expert not in EXPERT_KINDS:
            raise ValueError(f"expert must be one of {EXPERT_KINDS}, got {self.expert!r}.")
        if self.expert_objective not in EXPERT_OBJECTIVES:
            raise ValueError(f"expert_objective must be one of {EXPERT_OBJECTIVES}, got {self.expert_objective!r}.")
        if not 0.0 < self.gce_q <= 1.0:
            raise ValueError(f"gce_q must be in (0, 1], got {self.gce_q}.")
        if self.poe_alpha <= 0:
            raise ValueError(f"poe_alpha must be > 0 (official 1.0), got {self.poe_alpha}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (official 1.0), got {self.temperature}.")
        if self.reweight_threshold is not None and not 0.0 <= self.reweight_threshold < 1.0:
            raise ValueError(
                f"reweight_threshold must be in [0, 1) (official 0.8) or None, got {self.reweight_threshold}."
            )
        if not 0.0 <= self.expert_warmup_ratio < 1.0:
            raise ValueError(f"expert_warmup_ratio must be in [0, 1), got {self.expert_warmup_ratio}.")
        if self.expert_learning_rate <= 0:
            raise ValueError(f"expert_learning_rate must be > 0, got {self.expert_learning_rate}.")
        if self.expert_weight_decay < 0 or self.expert_max_grad_norm < 0:
            raise ValueError("expert_weight_decay and expert_max_grad_norm must be >= 0.")


def poe_log_probs(main_logits: torch.Tensor, expert_logits: torch.Tensor, alpha: float, temperature: float):
    """Log-probabilities of the product ``softmax(log p_main + alpha * log softmax(z_expert / T))``."""
    combined = F.log_softmax(main_logits.float(), dim=-1) + alpha * F.log_softmax(
        expert_logits.float() / temperature, dim=-1
    )
    return F.log_softmax(combined, dim=-1)


class DPoEDefense(Defense):
    config: DPoEConfig
    owns_loss = True
    needs_row_ids = True  # the expert's per-row confidence is recorded by row id for the report

    def __init__(self, config: DPoEConfig):
        super().__init__(config)
        self.trainer_state: ExpertTrainer | None = None
        self.signals = RowSignals()
        self._pending_state: dict[str, Any] | None = None
        self._truth = None
        self._labels = None

    # -- hooks ------------------------------------------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        check_attachable(trainer.accelerator.unwrap_model(trainer.model), self.config.layer, "DPoEDefense")

    def on_train_begin(self, trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.trainer_state is None:
            self.trainer_state = ExpertTrainer(model, self.config, "DPoEDefense")
        if self._pending_state is not None:
            self.trainer_state.load_state_dict(self._pending_state["expert"])
            self.signals.load_state_dict(self._pending_state.get("signals", {}))
            self._pending_state = None

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        cfg = self.config
        expert = self.trainer_state
        expert.flush()  # shared mode: the last backward pass's gradients on the expert
        outputs, labels = model_forward_with_hidden_states(model, inputs)
        expert_logits = expert.logits(expert.states(outputs, inputs), inputs.get("attention_mask"))
        main_logits = outputs.logits.float()
        expert_loss = None
        warming_up = trainer.state.global_step < cfg.expert_warmup_ratio * max(1, trainer.state.max_steps)
        if warming_up:
            # The expert alone, on its own objective; the model's layers above the expert get no gradient.
            expert_loss = self._expert_loss(main_logits, expert_logits, labels)
            if not expert.shared:
                expert.step(expert_loss)
                expert_loss = main_logits.sum() * 0.0  # the Trainer still runs its backward and step
            joint = poe_log_probs(main_logits.detach(), expert_logits.detach(), cfg.poe_alpha, cfg.temperature)
        elif cfg.expert_objective == "poe" and expert.shared:
            # One product, one backward pass: the official joint training (the layers up to `layer` are shared).
            joint = poe_log_probs(main_logits, expert_logits, cfg.poe_alpha, cfg.temperature)
        else:
            expert_loss = self._expert_loss(main_logits, expert_logits, labels)
            if not expert.shared:
                expert.step(expert_loss)
                expert_loss = None
            # The model's share: the product with the expert's logits as constants, through the Trainer.
            joint = poe_log_probs(main_logits, expert_logits.detach(), cfg.poe_alpha, cfg.temperature)
        per_row = -joint.gather(1, labels.view(-1, 1)).squeeze(1)
        expert_log_probs = F.log_softmax(expert_logits.detach().float(), dim=-1)
        expert_confidence = expert_log_probs.gather(1, labels.view(-1, 1)).squeeze(1).exp()
        # Log-odds of the label rank rows without the ties of saturated probabilities (the AUROC reads them).
        others = expert_log_probs.masked_fill(F.one_hot(labels, expert_log_probs.shape[-1]).bool(), float("-inf"))
        log_odds = expert_log_probs.gather(1, labels.view(-1, 1)).squeeze(1) - torch.logsumexp(others, dim=-1)
        model_loss = F.cross_entropy(main_logits.detach(), labels, reduction="none")
        signals = {"expert_confidence": expert_confidence, "expert_log_odds": log_odds, "model_loss": model_loss}
        if cfg.reweight_threshold is not None:
            weights = torch.where(
                expert_confidence > cfg.reweight_threshold, 1.0 - expert_confidence, torch.ones_like(expert_confidence)
            )
            per_row = per_row * weights
            signals["weight"] = weights
        loss = per_row.new_zeros(()) if warming_up else per_row.mean()
        if expert_loss is not None:
            loss = loss + expert_loss  # shared mode: the expert and the layers below it learn in the same backward
        self.signals.record(trainer, **signals)
        return (loss, outputs) if return_outputs else loss

    def _expert_loss(self, main_logits, expert_logits, labels) -> torch.Tensor:
        cfg = self.config
        if cfg.expert_objective == "poe":
            # The expert's share of the joint gradient (the main model's logits as constants).
            expert_joint = poe_log_probs(main_logits.detach(), expert_logits, cfg.poe_alpha, cfg.temperature)
            return -expert_joint.gather(1, labels.view(-1, 1)).mean()
        if cfg.expert_objective == "ce":
            return F.cross_entropy(expert_logits, labels)
        return gce_loss(expert_logits, labels, cfg.gce_q).mean()

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
            {"expert_confidence": "high", "expert_log_odds": "high", "weight": "low", "model_loss": "high"},
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
                "expert_confidence_mean": last_epoch_value(summary, "expert_confidence", "mean"),
                "expert_confidence_poisoned": last_epoch_value(summary, "expert_confidence", "mean_poisoned"),
                "expert_confidence_clean": last_epoch_value(summary, "expert_confidence", "mean_clean"),
                "expert_confidence_auroc": last_epoch_value(summary, "expert_log_odds", "auroc"),
                "expert_confidence_auroc_same_label": last_epoch_value(summary, "expert_log_odds", "auroc_same_label"),
                "timings_s": {"expert": expert.seconds if expert else 0.0},
            }
        )
        return report

    # -- rendering --------------------------------------------------------------------------------------------------
    @classmethod
    def report_scalars(cls, report: dict[str, Any]) -> dict[str, float]:
        keys = (
            "expert_confidence_mean",
            "expert_confidence_poisoned",
            "expert_confidence_clean",
            "expert_confidence_auroc",
        )
        out = {k: float(report[k]) for k in keys if isinstance(report.get(k), (int, float))}
        seconds = (report.get("timings_s") or {}).get("expert")
        if isinstance(seconds, (int, float)):
            out["time_expert_s"] = float(seconds)
        return out

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        config = report.get("config", {})
        lines = [
            f"The model was trained in a product of experts with a shallow expert ({config.get('expert')} module, "
            f"{report.get('expert_parameters', 'n/a')} parameters) reading layer {report.get('layer')}'s hidden "
            f"states (poe_alpha {config.get('poe_alpha')}); rows whose label the shallow expert already explained "
            "(trigger shortcuts) taught the model little. Only the model predicts after training.",
            f"- The shallow expert's mean confidence in the training labels (last epoch): "
            f"{fmt(report.get('expert_confidence_mean'))}",
        ]
        if report.get("has_ground_truth"):
            lines.append(
                f"- Against the `poisoned` column: poisoned {fmt(report.get('expert_confidence_poisoned'))} / clean "
                f"{fmt(report.get('expert_confidence_clean'))}; AUROC {fmt(report.get('expert_confidence_auroc'))}"
            )
        if report.get("row_ids_missing"):
            lines.append("- Row ids were not available, so no per-row values were recorded.")
        return "\n".join(lines)

    @classmethod
    def card_limits(cls, report: dict[str, Any]) -> list[str]:
        return [
            "DPoE only removes what its shallow expert learns; a trigger the lower layer does not represent is "
            "learned by the model as usual.",
        ]

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        line = f"dpoe: shallow expert confidence {fmt(report.get('expert_confidence_mean'))}"
        if report.get("has_ground_truth"):
            line += (
                f" (poisoned {fmt(report.get('expert_confidence_poisoned'))}, clean "
                f"{fmt(report.get('expert_confidence_clean'))}, AUROC {fmt(report.get('expert_confidence_auroc'))})"
            )
        return [line]


register_defense(DPoEConfig, DPoEDefense)
