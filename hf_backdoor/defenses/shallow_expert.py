"""A small classifier on a lower layer of the model being fine-tuned, trained beside it: the shared part of the
defenses that fight paraphrase triggers (syntactic, style) with a *shallow* model (``honeypot``, ``dpoe``).

Both defenses rest on one observation: the lower layers of a pretrained encoder already tell a rewritten text (a
rare syntactic template, a Bible style) apart from an ordinary one, while they carry less of the task. A small
classifier reading those layers therefore fits the poisoned rows' (target) label from the trigger, and the defense
uses that classifier to keep the trigger out of the main model.

What lives here:

- :func:`transformer_layers` / :func:`check_attachable`: where the expert attaches, with a clear error naming the
  supported architectures when a model has no stack of transformer layers to read.
- :class:`ShallowExpert`: the classifier. It reads the *detached* hidden states of one layer (``output_hidden_states``
  on the model's own forward pass, so reading them costs nothing extra), so its training never changes the model.
- :class:`ExpertTrainer`: the expert's own AdamW. The Trainer's optimizer is created before the callbacks'
  ``on_train_begin`` (transformers' ``_inner_training_loop`` calls ``_prepare_for_training``, which runs
  ``create_optimizer``, and only then ``callback_handler.on_train_begin``), so a module attached there is not in it.
  The expert's loss reads only detached tensors, so its gradient is taken and applied inside ``compute_loss``,
  separately from the model's backward pass. Under several processes its gradients are averaged across them.
- :class:`RowSignals`: a per-row number (a weight, the expert's confidence) recorded as each row is trained on,
  indexed by ``trainer.batch_row_ids``, and scored against a ``poisoned`` ground-truth column when there is one.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..metrics import roc_auc

# Attribute paths (from the model and from its ``base_model``) of the stack of transformer layers.
LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "h", "transformer.h", "decoder.layers")
SUPPORTED_ARCHITECTURES = (
    "BERT-style encoders (BERT, MiniLM, RoBERTa, XLM-RoBERTa, ELECTRA, DeBERTa, MPNet: `encoder.layer`), DistilBERT "
    "(`transformer.layer`) and decoder LMs with a sequence-classification head (Llama, Mistral, Qwen: `layers`; "
    "GPT-2: `h`)"
)
EXPERT_KINDS = ("attention", "mlp", "linear")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


def transformer_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of transformer layers, or ``None`` when none is found at the known paths."""
    roots = [model]
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        roots.insert(0, base)
    for root in roots:
        for path in LAYER_PATHS:
            obj: Any = root
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList) and len(obj) > 0:
                return obj
    return None


def check_attachable(model: nn.Module, layer: int, defense: str) -> tuple[int, int, int]:
    """``(num_layers, hidden_size, num_labels)`` of a model the expert can read at ``layer``, else a ValueError that
    names the supported architectures (or the valid layers)."""
    layers = transformer_layers(model)
    config = getattr(model, "config", None)
    hidden = next((getattr(config, k) for k in HIDDEN_SIZE_KEYS if isinstance(getattr(config, k, None), int)), None)
    if layers is None or hidden is None:
        raise ValueError(
            f"{defense} attaches a small classifier to the hidden states of a lower transformer layer, and "
            f"{type(model).__name__} has no stack of transformer layers it recognises (looked for "
            f"{', '.join(LAYER_PATHS)} and a hidden size in its config). Supported: {SUPPORTED_ARCHITECTURES}. "
            "For another text model, use a defense that needs no layer access (e.g. BTUConfig for token triggers)."
        )
    if not 0 <= layer < len(layers):
        raise ValueError(
            f"{defense}: layer={layer} is not a lower layer of {type(model).__name__}, which has {len(layers)} "
            f"transformer layers; pick 0 (the embeddings) to {len(layers) - 1} (hidden_states index; a layer in the "
            "lower third is the intended use)."
        )
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    if num_labels < 2:
        raise ValueError(f"{defense} needs a classification model with >= 2 labels; its config has {num_labels}.")
    return len(layers), int(hidden), num_labels


class ShallowExpert(nn.Module):
    """A classifier over one layer's token states: ``"attention"`` (one fresh pre-LN transformer block, then the first
    token and the masked mean, then a linear layer), ``"mlp"`` (first token and masked mean into a two-layer MLP) or
    ``"linear"`` (first token and masked mean into a linear layer)."""

    def __init__(self, hidden_size: int, num_labels: int, kind: str = "attention", num_heads: int = 1, dropout=0.1):
        super().__init__()
        if kind not in EXPERT_KINDS:
            raise ValueError(f"expert must be one of {EXPERT_KINDS}, got {kind!r}.")
        self.kind = kind
        if kind == "attention":
            heads = num_heads if num_heads > 0 and hidden_size % num_heads == 0 else 1
            self.block = nn.TransformerEncoderLayer(
                hidden_size, heads, 2 * hidden_size, dropout=dropout, batch_first=True, norm_first=True
            )
        self.norm = nn.LayerNorm(hidden_size)
        if kind == "mlp":
            self.head = nn.Sequential(
                nn.Linear(2 * hidden_size, hidden_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, num_labels),
            )
        else:
            self.head = nn.Linear(2 * hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = attention_mask.bool()
        if self.kind == "attention":
            hidden = self.block(hidden, src_key_padding_mask=~mask)
        hidden = self.norm(hidden)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.cat([hidden[:, 0], mean], dim=-1))


class ExpertTrainer:
    """The expert, its AdamW and its device, created in ``on_train_begin`` from the model it reads."""

    def __init__(self, model: nn.Module, config, defense: str):
        self.num_layers, hidden, self.num_labels = check_attachable(model, config.layer, defense)
        heads = int(getattr(model.config, "num_attention_heads", 0) or 0)
        device = next(model.parameters()).device
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)  # the expert's initialisation does not move the Trainer's random stream
        self.expert = ShallowExpert(hidden, self.num_labels, config.expert, heads).to(device)
        torch.random.set_rng_state(generator_state)
        self.optimizer = torch.optim.AdamW(
            self.expert.parameters(), lr=config.expert_learning_rate, weight_decay=config.expert_weight_decay
        )
        self.max_grad_norm = config.expert_max_grad_norm
        self.shared = bool(getattr(config, "train_lower_layers", False))
        self.seconds = 0.0
        self.steps = 0

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.expert.parameters())

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The expert's logits on one layer's states: detached states (the expert alone learns from them) unless
        ``shared`` (its loss then also trains the model's layers below it, through the Trainer's backward pass)."""
        self.expert.train()
        if not self.shared:
            hidden = hidden.detach()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.expert(hidden.float(), attention_mask)

    def step(self, loss: torch.Tensor) -> None:
        """Detached mode: one AdamW step of the expert on ``loss`` (a graph over the expert's parameters only)."""
        start = time.perf_counter()
        params = [p for p in self.expert.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        self._apply(params)
        self.seconds += time.perf_counter() - start

    def flush(self) -> None:
        """Shared mode: apply the gradients the Trainer's last backward pass left on the expert (called before each
        forward pass and at the end of training; the Trainer's optimizer does not hold the expert)."""
        params = [p for p in self.expert.parameters() if p.grad is not None]
        if params:
            start = time.perf_counter()
            self._apply(params)
            self.seconds += time.perf_counter() - start

    def _apply(self, params: list[torch.Tensor]) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        if self.max_grad_norm and self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"expert": self.expert.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.expert.load_state_dict(state["expert"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state.get("steps", 0))


def model_forward_with_hidden_states(model, inputs: dict):
    """``(outputs, labels)``: the model's forward pass on ``inputs`` without its labels, with all hidden states."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    outputs = model(**inputs, output_hidden_states=True)
    if getattr(outputs, "hidden_states", None) is None:
        raise ValueError(
            f"{type(model).__name__} returned no hidden_states for output_hidden_states=True; the shallow expert "
            f"needs them. Supported: {SUPPORTED_ARCHITECTURES}."
        )
    return outputs, labels


def gce_loss(logits: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row generalized cross-entropy ``(1 - p_y^q) / q`` (Zhang & Sabuncu, NeurIPS 2018): ``q -> 0`` is CE,
    ``q = 1`` is MAE; large ``q`` fits the easy rows and gives up on the hard ones."""
    p_label = F.softmax(logits.float(), dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)
    return (1.0 - p_label.clamp(min=1e-8) ** q) / q


class RowSignals:
    """Per-row values recorded as rows are trained on: ``{name: {epoch: {position: value}}}``.

    Positions come from ``trainer.row_positions(trainer.batch_row_ids)``; with no row ids (a trainer without the row
    protocol) nothing is recorded and the report says so.
    """

    def __init__(self):
        self.values: dict[str, dict[int, dict[int, float]]] = {}
        self.missing_row_ids = False

    def record(self, trainer, **named: torch.Tensor) -> None:
        row_ids = getattr(trainer, "batch_row_ids", None)
        if row_ids is None:
            self.missing_row_ids = True
            return
        positions = trainer.row_positions(row_ids)
        epoch = int(math.floor(float(getattr(trainer.state, "epoch", 0.0) or 0.0)))
        for name, tensor in named.items():
            per_epoch = self.values.setdefault(name, {}).setdefault(epoch, {})
            for position, value in zip(positions, tensor.detach().float().cpu().tolist()):
                per_epoch[int(position)] = float(value)

    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain containers only, so the checkpoint loads with torch.load(weights_only=True).
        out = {}
        for name, epochs in self.values.items():
            out[name] = {
                str(epoch): torch.tensor([[p, v] for p, v in rows.items()], dtype=torch.float64).reshape(-1, 2)
                for epoch, rows in epochs.items()
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {
            name: {int(epoch): {int(p): float(v) for p, v in table.tolist()} for epoch, table in epochs.items()}
            for name, epochs in state.items()
        }

    def summary(
        self, truth: np.ndarray | None, suspicious_when: dict[str, str], labels: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Per signal and epoch: mean over rows, means over poisoned and clean rows, and the AUROC of the signal
        against ``truth`` (oriented by ``suspicious_when[name]``: ``"low"`` or ``"high"`` values flag a row). With
        ``labels``, also the AUROC among the rows carrying the poisoned rows' (most common) label only
        (``auroc_same_label``): a signal that only tells the target class from the others scores 0.5 there."""
        out: dict[str, Any] = {}
        for name, epochs in self.values.items():
            per_epoch = {}
            for epoch in sorted(epochs):
                rows = epochs[epoch]
                positions = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
                values = np.fromiter(rows.values(), dtype=np.float64, count=len(rows))
                entry: dict[str, Any] = {
                    "rows": int(len(values)),
                    "mean": float(values.mean()) if len(values) else None,
                }
                if len(values):
                    entry["quantiles"] = {
                        str(q): float(np.quantile(values, q)) for q in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
                    }
                if truth is not None and len(values):
                    flags = truth[positions].astype(bool)
                    if flags.any():
                        entry["mean_poisoned"] = float(values[flags].mean())
                    if (~flags).any():
                        entry["mean_clean"] = float(values[~flags].mean())
                    if flags.any() and (~flags).any():
                        oriented = -values if suspicious_when.get(name, "high") == "low" else values
                        entry["auroc"] = roc_auc(oriented, flags)
                        if labels is not None:
                            row_labels = labels[positions]
                            target = np.bincount(row_labels[flags]).argmax()
                            same = row_labels == target
                            if (~flags[same]).any():
                                entry["auroc_same_label"] = roc_auc(oriented[same], flags[same])
                per_epoch[f"epoch_{epoch + 1}"] = entry
            out[name] = per_epoch
        return out


def ground_truth(trainer) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The training set's ``poisoned`` column (0/1, dataset order) and its labels, or ``(None, None)`` without a
    ``poisoned`` column."""
    dataset = getattr(trainer, "train_dataset", None)
    columns = getattr(dataset, "column_names", None) or []
    if "poisoned" not in columns:
        return None, None
    raw = dataset.with_format(None)
    label_column = next((c for c in ("label", "labels") if c in columns), None)
    labels = np.asarray(raw[label_column], dtype=np.int64) if label_column else None
    return np.asarray(raw["poisoned"], dtype=np.int64), labels


def last_epoch_value(summary: dict[str, Any], signal: str, key: str):
    """``key`` of the last epoch recorded for ``signal`` in a :meth:`RowSignals.summary` (``None`` when absent)."""
    epochs = summary.get(signal) or {}
    if not epochs:
        return None
    return epochs[max(epochs, key=lambda e: int(e.split("_")[1]))].get(key)


def fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
