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
- :class:`RowSignals` (in ``_shared/row_signals.py``, re-exported here): a per-row number (a weight, the expert's confidence) recorded as each row is trained on,
  indexed by ``trainer.batch_row_ids``, and scored against a ``poisoned`` ground-truth column when there is one.
"""

from __future__ import annotations

import copy
import inspect
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._shared.row_signals import RowSignals, fmt, ground_truth, last_epoch_value  # noqa: F401  (re-exported)

# Attribute paths (from the model and from its ``base_model``) of the stack of transformer layers.
LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "h", "transformer.h", "decoder.layers")
SUPPORTED_ARCHITECTURES = (
    "BERT-style encoders (BERT, MiniLM, RoBERTa, XLM-RoBERTa, ELECTRA, DeBERTa, MPNet: `encoder.layer`), DistilBERT "
    "(`transformer.layer`) and decoder LMs with a sequence-classification head (Llama, Mistral, Qwen: `layers`; "
    "GPT-2: `h`)"
)
EXPERT_KINDS = ("attention", "mlp", "linear")
EXPERT_INPUTS = ("model", "pretrained")
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
        self.input = getattr(config, "expert_input", "model")
        self.shared = bool(getattr(config, "train_lower_layers", False)) and self.input == "model"
        self.layer = config.layer
        self.frozen = frozen_lower_layers(model, config.layer) if self.input == "pretrained" else None
        self.seconds = 0.0
        self.steps = 0

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.expert.parameters())

    def states(self, outputs, inputs: dict) -> torch.Tensor:
        """The states the expert reads: the model's own ``hidden_states[layer]`` (``expert_input="model"``) or those of
        the frozen pretrained copy of its lower layers (``"pretrained"``)."""
        if self.frozen is None:
            return outputs.hidden_states[self.layer]
        with torch.no_grad():
            return self.frozen(inputs)

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


class FrozenLowerLayers(nn.Module):
    """A frozen copy of a model's embeddings and its first ``layer`` transformer layers (``layer = 0``: the
    embeddings only): the pretrained representation a shallow expert reads when it must not follow fine-tuning."""

    def __init__(self, model: nn.Module, layer: int):
        super().__init__()
        base = copy.deepcopy(getattr(model, "base_model", model))
        layers = transformer_layers(base)
        for module in base.modules():
            for name, child in list(module.named_children()):
                if child is layers:
                    setattr(module, name, nn.ModuleList(list(layers)[:layer]))
        if hasattr(base.config, "num_hidden_layers"):
            base.config.num_hidden_layers = layer
        base.requires_grad_(False).eval()
        self.base = base
        self.accepted = set(inspect.signature(base.forward).parameters)

    def train(self, mode: bool = True):
        return super().train(False)  # always in eval mode: no dropout on the expert's input

    def forward(self, inputs: dict) -> torch.Tensor:
        kwargs = {k: v for k, v in inputs.items() if k in self.accepted and k != "labels"}
        # With every layer cut, some encoders return no hidden_states; their last state is then the embeddings'.
        return self.base(**kwargs).last_hidden_state


def frozen_lower_layers(model: nn.Module, layer: int) -> FrozenLowerLayers:
    return FrozenLowerLayers(model, layer).to(next(model.parameters()).device)


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
