"""TSBD: neuron weight change (NWC) zeroing and activeness-aware fine-tuning, on transformer encoders.

Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight Changes and Backdoor
Activeness", NeurIPS 2024; official code linweiii/TSBD (on BackdoorBench).

The procedure (official defaults in brackets):

1. Clean unlearning: gradient ascent on the clean CE of a copy of the backdoored model [SGD lr 1e-4, momentum 0.9,
   batch 256, at most 1000 epochs] until the clean accuracy of the clean rows (re-evaluated after each epoch) is
   <= ``clean_threshold`` [0.10].
2. Neuron weight change: for every output neuron k of every layer, ``NWC_k = sum_j |W_unlearned[k, j] - W[k, j]|``
   [conv layers except shortcuts, one neuron per output channel]. Neurons that move most under clean unlearning are
   the backdoor's (the paper's observation 1).
3. Zero reinitialisation: on the *original* model, take the top ``n`` neurons by NWC, pool the weight changes of
   all their weights, and set to zero the weights whose change is among the top ``m`` fraction of that pool
   [m = 0.7; the code sweeps n over 1% ... 90% of the neurons and reports test ACC/ASR for each].
4. Activeness-aware fine-tuning on the clean rows [SGD lr 0.01, momentum 0.9, 20 epochs]: with ``g1 = grad CE(theta)``
   and ``theta' = theta + r * g1 / ||g1||`` (norm per tensor) [r = 0.05], step with
   ``(1 - alpha) * g1 + alpha * grad CE(theta')`` [alpha = 0.7]: a penalty on the gradient norm, which keeps
   backdoor neurons from becoming active again (observation 2).

On transformers the neurons are the rows of every ``nn.Linear`` in the encoder layers (query, key, value, attention
output, FFN in and out); embeddings, pooler and classifier are left out as the official code leaves out shortcuts
and the final layer.

Deviations, and why:

- n is chosen from clean data only: the official code reports a sweep scored on test data. Here the sweep of
  ``n_ratios`` zeroes the original model for each n and measures the held-out clean accuracy (cheap: no
  fine-tuning); walking up the sweep, the last n before the first whose zeroed model loses more than
  ``max_zeroing_drop`` is used (stage 1 is meant to sacrifice some accuracy, stage 2 repairs it). ``n_ratio=``
  fixes it instead.
- Stop threshold: the official 0.10 is CIFAR-10's collapse level (one class of ten); by default it is carried over
  to the task's own labels (``_shared.loops.clean_threshold_for``: 0.5 on balanced binary data). Set ``clean_threshold``
  for a fixed value.
- Unlearning epochs are capped at ``unlearning_max_epochs`` (100, not 1000) and reaching the cap is an error with
  the accuracy reached (a pre-trained transformer at SGD lr 1e-4 may need a larger rate: raise ``unlearning_lr``).
- Fine-tuning runs ``finetune_epochs`` epochs; the official loop runs ``ft_epoch + 1``.
- The perturbed forward pass reuses the model (parameters saved, perturbed, restored) instead of deep-copying it at
  every step: the same gradients, without a model copy per batch.

Exposure hand-off (EBYD: Wang, Li et al., "Expose Before You Defend", 2024; official code
bboylyg/Expose-Before-You-Defend): stage 1 is a clean unlearning, and EBYD's enhanced TSBD takes the exposed model in
its place. ``trainer.sanitize(clean, NWCConfig(), exposed=trainer.expose(clean))`` ranks the neurons by
``|W_exposed - W|`` instead of ``|W_unlearned - W|``; zeroing, the choice of n and the fine-tuning are unchanged, the
unlearning settings are unused, and the report says ``"unlearned_by": "exposure (cul)"``. The official EBYD code
ships no TSBD script; this is the paper's recipe (expose, then apply the defense to the exposed model) applied to
the one stage that needs an unlearned model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import register_defense
from ._shared.context import SanitizeConfig, SanitizeContext
from ._shared.repair import RepairDefense, fmt, unlearn_or_take_exposed
from .base import Figure
from .units import TransformerUnits

OFFICIAL_CLEAN_THRESHOLD = 0.10
OFFICIAL_N_RATIOS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)


@dataclass
class NWCConfig(SanitizeConfig):
    """TSBD: NWC-based zeroing, then activeness-aware fine-tuning (post-training, clean data only). See the module
    docstring."""

    unlearning_lr: float = field(default=1e-4, metadata={"help": "Stage 1's SGD learning rate (official 1e-4)."})
    unlearning_momentum: float = field(default=0.9, metadata={"help": "Stage 1's SGD momentum (official 0.9)."})
    unlearning_max_epochs: int = field(
        default=100,
        metadata={
            "help": "Give up (error, model untouched) if the clean accuracy has not fallen by then (official 1000)."
        },
    )
    clean_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Unlearning stops once the fit rows' clean accuracy is at or below this; None: the official 0.10 "
            "carried over to this task's labels (0.10 on CIFAR-10, 0.5 on a balanced binary task)."
        },
    )
    m: float = field(
        default=0.7,
        metadata={
            "help": "Fraction, in (0, 1], of the pooled weights of the top-n neurons zeroed by weight change (official 0.7)."
        },
    )
    n_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of all neurons taken as the top n; None chooses it from n_ratios on held-out rows."
        },
    )
    n_ratios: tuple[float, ...] = field(
        default=OFFICIAL_N_RATIOS,
        metadata={"help": "The sweep of n: reported, and searched when n_ratio is None (the official sweep)."},
    )
    max_zeroing_drop: float = field(
        default=0.10,
        metadata={
            "help": "With n_ratio=None, the held-out clean accuracy the zeroing alone may cost (fine-tuning repairs it)."
        },
    )
    finetune_lr: float = field(default=0.01, metadata={"help": "Stage 2's SGD learning rate (official 0.01)."})
    finetune_momentum: float = field(default=0.9, metadata={"help": "Stage 2's SGD momentum (official 0.9)."})
    finetune_epochs: int = field(
        default=20, metadata={"help": "Stage 2's epochs, >= 0 (official 20, run as ft_epoch + 1)."}
    )
    r: float = field(
        default=0.05, metadata={"help": "Size of the normalised gradient perturbation of stage 2 (official 0.05)."}
    )
    alpha: float = field(
        default=0.7, metadata={"help": "Weight of the perturbed gradient in stage 2's step, in [0, 1] (official 0.7)."}
    )
    batch_size: int = field(default=256, metadata={"help": "Batch size of both stages (official 256)."})

    name = "nwc"
    title = "TSBD (neuron weight change zeroing and activeness-aware fine-tuning)"
    citation = "Lin et al., NeurIPS 2024"
    accepts_exposed = True  # stage 1 is a clean unlearning: EBYD's exposed model can take its place

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("unlearning_lr", "unlearning_max_epochs", "finetune_lr", "batch_size")
        self._check_interval("[0, 1]", "alpha", "max_zeroing_drop")
        self._check_interval("[0, 1]", "clean_threshold", optional=True)
        self._check_at_least(0, "finetune_epochs", "r")
        self._check_interval("(0, 1]", "m")
        self.n_ratios = tuple(sorted(float(n) for n in self.n_ratios))
        if not self.n_ratios or not all(0 < n <= 1 for n in self.n_ratios):
            raise ValueError(f"n_ratios must be fractions in (0, 1], got {self.n_ratios}.")
        self._check_interval("(0, 1]", "n_ratio", optional=True)
        self._check_interval("[0, 1)", "unlearning_momentum", "finetune_momentum")


@dataclass
class NeuronChanges:
    """NWC of every neuron (row) of the chosen Linear layers, sorted from most to least changed."""

    names: list[str]  # Linear module paths
    change: list[torch.Tensor]  # per layer: |W_unlearned - W| (out x in), on CPU
    order: list[tuple[int, int, float]]  # (layer index, row, NWC), descending NWC

    @property
    def num_neurons(self) -> int:
        return len(self.order)


def neuron_weight_changes(original: nn.Module, unlearned: nn.Module, names: list[str]) -> NeuronChanges:
    """``NWC_k = sum_j |W_unlearned[k, j] - W[k, j]|`` for every row k of each named Linear."""
    changes, order = [], []
    for index, name in enumerate(names):
        delta = (unlearned.get_submodule(name).weight - original.get_submodule(name).weight).detach().abs().cpu()
        changes.append(delta.float())
        for row, value in enumerate(delta.sum(dim=1).tolist()):
            order.append((index, row, value))
    order.sort(key=lambda item: -item[2])
    return NeuronChanges(list(names), changes, order)


@torch.no_grad()
def zero_top_weights(model: nn.Module, changes: NeuronChanges, top_n: int, m: float) -> dict:
    """Zero, in ``model``, the top ``m`` fraction (by weight change) of the pooled weights of the top ``top_n``
    neurons. Returns the numbers: neurons, pooled weights, zeroed weights, and the change cut-off."""
    top = changes.order[:top_n]
    if not top:
        return {"top_n": 0, "pooled_weights": 0, "zeroed_weights": 0, "cutoff": None}
    pooled = torch.cat([changes.change[layer][row] for layer, row, _ in top])
    k = int(pooled.numel() * m)
    if k == 0:
        return {"top_n": len(top), "pooled_weights": int(pooled.numel()), "zeroed_weights": 0, "cutoff": None}
    cutoff = torch.topk(pooled, k).values.min()
    zeroed = 0
    for layer, row, _ in top:
        select = changes.change[layer][row] >= cutoff
        weight = model.get_submodule(changes.names[layer]).weight
        weight[row, select.to(weight.device)] = 0.0
        zeroed += int(select.sum())
    return {"top_n": len(top), "pooled_weights": int(pooled.numel()), "zeroed_weights": zeroed, "cutoff": float(cutoff)}


def activeness_aware_step(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, r: float, alpha: float):
    """One TSBD fine-tuning step. ``loss_fn(model)`` returns the loss on the current batch.

    ``g1 = grad L(theta)``; ``theta' = theta + r * g1 / ||g1||`` per tensor; ``g2 = grad L(theta')``; the optimizer
    steps from ``theta`` with ``(1 - alpha) * g1 + alpha * g2``. Returns the loss at ``theta``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    g1 = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g1):
            if g is not None:
                norm = g.norm()
                if norm > 0:  # a tensor with a zero gradient is not perturbed (the official code would divide by 0)
                    p.add_(g, alpha=r / float(norm))
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    with torch.no_grad():
        for p, original, g in zip(params, saved, g1):
            p.copy_(original)
            if g is None:
                continue
            g2 = p.grad if p.grad is not None else torch.zeros_like(g)
            p.grad = (1 - alpha) * g + alpha * g2
    optimizer.step()
    return loss.detach()


def choose_n(sweep: list[dict], base_accuracy: float, config: NWCConfig) -> tuple[float, str]:
    """Walking up the sweep, the last n before the first whose zeroed model loses more than ``max_zeroing_drop`` of
    the held-out accuracy (larger n zero supersets; a small held-out set must not let the rule jump past a drop)."""
    chosen = None
    for record in sorted(sweep, key=lambda r: r["n_ratio"]):
        if record["holdout_accuracy"] < base_accuracy - config.max_zeroing_drop:
            break
        chosen = record["n_ratio"]
    if chosen is None:
        return config.n_ratios[0], "even the smallest n costs more than max_zeroing_drop: the smallest n of the sweep"
    return (
        chosen,
        f"largest n before the first with held-out accuracy < {base_accuracy:.3f} - {config.max_zeroing_drop}",
    )


def activeness_aware_finetune(context: SanitizeContext, config: NWCConfig, model: nn.Module) -> list[dict]:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.finetune_lr, momentum=config.finetune_momentum)
    history = []
    for epoch in context.progress(range(config.finetune_epochs), "TSBD fine-tuning"):
        model.train()
        total = seen = 0
        for batch in context.loader("train", config.batch_size, shuffle=True, epoch=epoch):
            inputs, labels = context.split_batch(batch)

            def loss_fn(net, inputs=inputs, labels=labels):
                logits, _ = context.logits(net, inputs)
                return nn.functional.cross_entropy(logits, labels)

            loss = activeness_aware_step(model, loss_fn, optimizer, config.r, config.alpha)
            total += float(loss) * len(labels)
            seen += len(labels)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "holdout_accuracy": context.accuracy(model)})
    return history


def unlearn_for_nwc(
    context: SanitizeContext, config: NWCConfig, model: nn.Module, timings: dict[str, float]
) -> tuple[nn.Module, float | None, list, dict]:
    """Stage 1 on a copy of ``model`` (or EBYD's exposed model): the unlearned copy, the stop threshold used, the
    unlearning history and the hand-off's report fields."""

    def make_optimizer(unlearned: nn.Module):
        return torch.optim.SGD(
            unlearned.parameters(), lr=config.unlearning_lr, momentum=config.unlearning_momentum
        ), None

    return unlearn_or_take_exposed(
        context, model, config, OFFICIAL_CLEAN_THRESHOLD, timings, make_optimizer, stop_on="fit", desc="TSBD unlearning"
    )


class NWCDefense(RepairDefense):
    """Unlearn (or take the exposed model), zero the most-changed weights of the original, fine-tune it in place."""

    holdout_histories = {
        "unlearning (the unlearned copy)": "unlearning_history",
        "activeness-aware fine-tuning": "finetune_history",
    }
    limitations = (
        "- TSBD zeroes the weights that clean unlearning moved most; a backdoor whose weights clean unlearning "
        "leaves in place is not among them, and the fine-tuning alone does not remove it.",
    )

    def repair(self, context: SanitizeContext, model: nn.Module) -> dict[str, Any]:
        config = self.config
        units = TransformerUnits.discover(model, ("ffn",))  # raises for unsupported models before any work
        names = [name for name, _ in units.linear_layers(model)]
        timings = {}

        # EBYD: with a hand-off, the exposed model's weight changes rank the neurons.
        unlearned, clean_threshold, unlearning, handoff = unlearn_for_nwc(context, config, model, timings)
        start = time.perf_counter()
        changes = neuron_weight_changes(model, unlearned, names)
        del unlearned

        base_accuracy = context.accuracy(model)
        sweep = []
        for ratio in config.n_ratios:
            zeroed_model = copy.deepcopy(model)
            numbers = zero_top_weights(zeroed_model, changes, int(changes.num_neurons * ratio), config.m)
            sweep.append({"n_ratio": ratio, **numbers, "holdout_accuracy": context.accuracy(zeroed_model)})
            del zeroed_model
        if config.n_ratio is not None:
            chosen, how = config.n_ratio, "fixed"
        else:
            chosen, how = choose_n(sweep, base_accuracy, config)
        top_n = int(changes.num_neurons * chosen)
        zeroing = zero_top_weights(model, changes, top_n, config.m)
        top_neurons = [
            {"module": changes.names[layer], "row": row, "nwc": value} for layer, row, value in changes.order[:top_n]
        ]
        after_zeroing = context.accuracy(model)
        timings["zeroing"] = time.perf_counter() - start

        start = time.perf_counter()
        finetuning = activeness_aware_finetune(context, config, model)
        timings["finetune"] = time.perf_counter() - start
        return {
            "num_neurons": changes.num_neurons,
            "layers": names,
            "clean_threshold": clean_threshold,
            "unlearning_history": unlearning,
            "unlearning_epochs": len(unlearning),
            "n_sweep": sweep,
            "n_ratio": chosen,
            "n_rule": how,
            **{f"zeroing_{k}": v for k, v in zeroing.items()},
            "holdout_accuracy_after_zeroing": after_zeroing,
            "top_neurons": top_neurons[:200],  # the full list can be tens of thousands; the top 200 show where
            "top_neurons_per_module": _per_module(changes, top_n),
            "finetune_history": finetuning,
            **handoff,
            "timings_s": timings,
        }

    # -- rendering of a saved report ----------------------------------------------------------------------------
    @classmethod
    def findings(cls, report: dict[str, Any]) -> list[str]:
        lines = cls.unlearning_line(report)
        if report.get("num_neurons") is not None:
            lines.append(
                f"- Neurons ranked by weight change: {report['num_neurons']} rows of {len(report.get('layers') or [])} "
                "Linear layers in the encoder."
            )
        if report.get("zeroing_zeroed_weights") is not None:
            lines.append(
                f"- Zeroed **{report['zeroing_zeroed_weights']}** weights of the top {report.get('zeroing_top_n')} "
                f"neurons (n ratio {report.get('n_ratio')}: {report.get('n_rule')}); held-out clean accuracy after "
                f"zeroing {fmt(report.get('holdout_accuracy_after_zeroing'))}."
            )
        finetuning = report.get("finetune_history")
        if finetuning is not None:
            lines.append(f"- Then {len(finetuning)} epoch(s) of activeness-aware fine-tuning on the clean rows.")
        return lines

    @classmethod
    def summary(cls, report: dict[str, Any]) -> str | None:
        if report.get("zeroing_zeroed_weights") is None:
            return None
        return (
            f"zeroed {report['zeroing_zeroed_weights']} weights of the top {report.get('zeroing_top_n')} neurons "
            f"(n ratio {report.get('n_ratio')}), then fine-tuned {len(report.get('finetune_history') or [])} epoch(s)"
        )

    @classmethod
    def method_figures(cls, report: dict[str, Any], output_dir: Path) -> list[Figure]:
        sweep = report.get("n_sweep") or []
        if not sweep:
            return []
        from ._shared.figures import new_figure, save_figure

        fig, ax = new_figure()
        ax.plot([r["n_ratio"] for r in sweep], [r["holdout_accuracy"] for r in sweep], marker=".", color="#2e86c1")
        if report.get("holdout_accuracy_before") is not None:
            ax.axhline(report["holdout_accuracy_before"], color="black", linestyle=":", linewidth=1, label="before")
        if report.get("n_ratio") is not None:
            ax.axvline(report["n_ratio"], color="#c0392b", linestyle="--", linewidth=1, label="chosen n")
        if len({r["n_ratio"] for r in sweep}) > 1:  # the official sweep spans 0.01 to 0.9
            ax.set_xscale("log")
        ax.set_xlabel("n: fraction of neurons zeroed in")
        ax.set_ylabel("held-out clean accuracy after zeroing")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        ax.set_title("TSBD zeroing sweep (held-out clean rows only)", fontsize=10)
        return [save_figure(fig, output_dir, "nwc_n_sweep.png", "TSBD zeroing sweep")]


def _per_module(changes: NeuronChanges, top_n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer, _, _ in changes.order[:top_n]:
        counts[changes.names[layer]] = counts.get(changes.names[layer], 0) + 1
    return counts


register_defense(NWCConfig, NWCDefense)
