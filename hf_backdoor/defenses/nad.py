"""NAD: Neural Attention Distillation, on transformer encoders.

Li et al., "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021; official
code bboylyg/NAD.

The procedure (official defaults in brackets):

1. Teacher: the backdoored model fine-tuned on the clean rows [5% of the training data, 10 epochs].
2. Student: the backdoored model trained on the same rows with ``CE + sum_i beta_i * MSE(A_s^i, A_t^i)`` [20
   epochs, SGD lr 0.1, momentum 0.9, weight decay 1e-4, Nesterov, batch 64; betas 500, 1000, 1000 on the three
   residual stages of a WideResNet; p = 2], the teacher frozen in eval mode.
   For a CNN feature map ``F`` (C x H x W), the attention map is ``A = sum_c |F_c|^p`` (H x W), divided by its L2
   norm per example; the loss is the mean squared difference over positions.

The transformer equivalent used here: the "stages" are the outputs of chosen encoder layers (``hidden_states``),
and the map is taken over tokens instead of pixels: for a layer output ``h`` (T tokens x D channels),
``A_t = sum_d |h_{t,d}|^p`` for every real token ``t`` (padding, from the attention mask, is zeroed), divided by its
L2 norm over the tokens of the same example. The MSE is averaged over the real tokens of the batch. For ViT the
tokens are the patches and the CLS token, exactly the spatial positions of the CNN map plus one. Default layers: three
evenly spaced layers ending at the last (MiniLM's 6: layers 2, 4, 6; a 12-layer BERT: 4, 8, 12), mirroring the three
WideResNet stages.

Deviations, and why:

- Learning rate: 0.01 for teacher and student instead of 0.1. The official 0.1 is a from-scratch CNN rate; a
  pre-trained transformer fine-tuned by SGD at 0.1 leaves its basin (0.01 is the rate TSBD fine-tunes with on the
  same benchmark). Set ``learning_rate=0.1`` for the published value. On the default MiniLM even 0.01 collapsed the
  teacher's fine-tuning, and the student followed it (README, "Post-training removal on the text model"): lower it
  for pre-trained text encoders.
- The official schedule divides the rate during training; here it is constant (20 short epochs on a few hundred rows).
- Teacher fine-tuning uses the student's optimiser settings (the paper does not give separate ones).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..registry import register_defense
from ._shared.context import SanitizeConfig, SanitizeContext
from ._shared.loops import sgd_finetune
from ._shared.repair import RepairDefense, fmt


@dataclass
class NADConfig(SanitizeConfig):
    """Neural Attention Distillation (post-training, clean data only). See the module docstring."""

    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "1-based encoder layers whose outputs are distilled; None: as many evenly spaced layers as betas, "
            "the last included (the official three WideResNet stages)."
        },
    )
    betas: tuple[float, ...] = field(
        default=(500.0, 1000.0, 1000.0),
        metadata={"help": "One attention-loss weight per distilled layer (official 500, 1000, 1000)."},
    )
    p: float = field(default=2.0, metadata={"help": "Power of the attention map, sum_d |h|^p (official 2)."})
    teacher_epochs: int = field(default=10, metadata={"help": "Epochs of the teacher's fine-tuning (official 10)."})
    epochs: int = field(default=20, metadata={"help": "Epochs of the student's distillation (official 20)."})
    learning_rate: float = field(
        default=0.01, metadata={"help": "SGD learning rate of teacher and student (official 0.1; see the docstring)."}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum of both (official 0.9)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay of both (official 1e-4)."})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum (official: on)."})
    batch_size: int = field(default=64, metadata={"help": "Clean rows per step (official 64)."})

    name = "nad"
    title = "NAD (Neural Attention Distillation)"
    citation = "Li et al., ICLR 2021"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("p", "teacher_epochs", "epochs", "learning_rate", "batch_size")
        self.betas = tuple(float(b) for b in self.betas)
        if not self.betas or any(b < 0 for b in self.betas):
            raise ValueError(f"betas must be non-negative weights, got {self.betas}.")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if any(i < 1 for i in self.layers):
                raise ValueError(f"layers are 1-based encoder layer indices, got {self.layers}.")
            if len(self.layers) != len(self.betas):
                raise ValueError(f"Give one beta per layer: {len(self.layers)} layers, {len(self.betas)} betas.")
        self._check_interval("[0, 1)", "momentum")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0.")

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers to distil for a model with ``num_layers`` encoder layers."""
        if self.layers is None:
            count = len(self.betas)
            layers = tuple(max(1, round(num_layers * (i + 1) / count)) for i in range(count))
        else:
            layers = self.layers
        if max(layers) > num_layers:
            raise ValueError(f"layers {layers} exceed the model's {num_layers} encoder layers.")
        return layers


def attention_map(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, p: float = 2.0, eps=1e-6):
    """NAD's attention map over tokens: ``sum_d |h|^p`` per token, padding zeroed, L2-normalised per example.

    ``hidden``: (batch, tokens, channels); returns (batch, tokens).
    """
    att = hidden.float().abs().pow(p).sum(-1)
    if attention_mask is not None:
        att = att * attention_mask.to(att.dtype)
    return att / (att.norm(dim=1, keepdim=True) + eps)


def attention_loss(student, teacher, attention_mask=None, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps over the real tokens."""
    diff = (attention_map(student, attention_mask, p) - attention_map(teacher, attention_mask, p)).pow(2)
    if attention_mask is None:
        return diff.mean()
    mask = attention_mask.to(diff.dtype)
    return (diff * mask).sum() / mask.sum().clamp(min=1.0)


def distillation_epoch(
    context: SanitizeContext, config: NADConfig, student, teacher, optimizer, layers, epoch: int
) -> dict:
    student.train()
    teacher.eval()
    totals = {"loss": 0.0, "ce": 0.0, "at": 0.0}
    correct = seen = 0
    for batch in context.loader("train", config.batch_size, shuffle=True, epoch=epoch):
        inputs, labels = context.split_batch(batch)
        mask = inputs.get("attention_mask")
        logits, outputs = context.logits(student, inputs, output_hidden_states=True)
        with torch.no_grad():
            _, teacher_outputs = context.logits(teacher, inputs, output_hidden_states=True)
        ce = nn.functional.cross_entropy(logits, labels)
        at = sum(
            beta * attention_loss(outputs.hidden_states[i], teacher_outputs.hidden_states[i], mask, config.p)
            for i, beta in zip(layers, config.betas)
        )
        loss = ce + at
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(labels)
        totals["loss"] += loss.item() * n
        totals["ce"] += ce.item() * n
        totals["at"] += (at.item() if torch.is_tensor(at) else float(at)) * n  # 0 when every beta is 0
        correct += int((logits.detach().argmax(-1) == labels).sum())
        seen += n
    return {
        "epoch": epoch + 1,
        **{k: v / max(seen, 1) for k, v in totals.items()},
        "train_accuracy": correct / max(seen, 1),
        "holdout_accuracy": context.accuracy(student),
    }


def _num_layers(context: SanitizeContext, model: nn.Module) -> int:
    batch = next(iter(context.loader("holdout", batch_size=2)))
    inputs, _ = context.split_batch(batch)
    with torch.no_grad():
        _, outputs = context.logits(model.eval(), inputs, output_hidden_states=True)
    hidden = getattr(outputs, "hidden_states", None)
    if not hidden:
        raise ValueError(
            f"{type(model).__name__} returns no hidden_states with output_hidden_states=True; NAD distils the "
            "outputs of encoder layers and needs them (BERT-family encoders, DistilBERT and ViT return them)."
        )
    return len(hidden) - 1  # hidden_states[0] is the embedding output


class NADDefense(RepairDefense):
    """Fine-tune a teacher on the clean rows, then distil its attention maps into the model in place."""

    holdout_histories = {"teacher fine-tuning": "teacher_history", "student distillation": "distillation_history"}
    limitations = (
        "- NAD's teacher is the backdoored model fine-tuned on a few clean rows; if that fine-tuning does not "
        "weaken the backdoor, distilling its attention does not either.",
    )

    def repair(self, context: SanitizeContext, model: nn.Module) -> dict[str, Any]:
        config = self.config
        layers = config.resolve_layers(_num_layers(context, model))
        timings = {}

        start = time.perf_counter()
        teacher = copy.deepcopy(model)
        teacher_history = sgd_finetune(
            context,
            teacher,
            epochs=config.teacher_epochs,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            batch_size=config.batch_size,
            nesterov=config.nesterov,
            desc="NAD teacher",
        )
        for param in teacher.parameters():
            param.requires_grad_(False)
        timings["teacher"] = time.perf_counter() - start

        start = time.perf_counter()
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )
        history = [
            distillation_epoch(context, config, model, teacher, optimizer, layers, epoch)
            for epoch in context.progress(range(config.epochs), "NAD distillation")
        ]
        timings["distillation"] = time.perf_counter() - start
        return {
            "layers": list(layers),
            "betas": list(config.betas),
            "teacher_history": teacher_history,
            "teacher_holdout_accuracy": teacher_history[-1]["holdout_accuracy"] if teacher_history else None,
            "distillation_history": history,
            "timings_s": timings,
        }

    # -- rendering of a saved report ----------------------------------------------------------------------------
    @classmethod
    def findings(cls, report: dict[str, Any]) -> list[str]:
        lines = []
        teacher = report.get("teacher_history") or []
        if report.get("teacher_history") is not None:
            lines.append(
                f"- Teacher: the model fine-tuned {len(teacher)} epoch(s) on the clean rows; its held-out clean "
                f"accuracy {fmt(report.get('teacher_holdout_accuracy'))}."
            )
        if report.get("layers") is not None:
            distillation = report.get("distillation_history") or []
            lines.append(
                f"- Student: the model itself, trained {len(distillation)} epoch(s) on CE plus the attention loss of "
                f"encoder layers {report['layers']} (betas {report.get('betas')})."
            )
        return lines

    @classmethod
    def summary(cls, report: dict[str, Any]) -> str | None:
        if report.get("layers") is None:
            return None
        return (
            f"distilled layers {report['layers']} from a teacher at held-out accuracy "
            f"{fmt(report.get('teacher_holdout_accuracy'))}"
        )


register_defense(NADConfig, NADDefense)
