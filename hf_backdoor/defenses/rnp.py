"""RNP: Reconstructive Neuron Pruning, on transformer units.

Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023; official code bboylyg/RNP.

The procedure (official defaults in brackets):

1. Unlearn: maximise the CE of a copy of the backdoored model on the clean rows [SGD lr 0.01, momentum 0.9, weight
   decay 5e-4, batch 128, learning rate x0.1 at epochs 10 and 20, at most 20 epochs] until the epoch's running
   clean accuracy is <= ``clean_threshold`` [0.20, on CIFAR-10]. Clean features are erased first; the backdoor
   survives.
2. Recover: on the unlearned weights (frozen), learn one mask in [0, 1] per unit, initialised at 1, minimising
   ``alpha * CE`` [alpha 0.2, SGD lr 0.2 (1.0 here, see below), momentum 0.9, 20 epochs; masks clamped to [0, 1]
   after each step]. The units whose masks fall are the ones the unlearned model relies on to stay wrong: the
   backdoor's.
3. Prune the *original* model's units whose mask is <= a threshold [the official code sweeps 0 to 0.9 in steps of
   0.05 and reports test ACC/ASR for each].

Deviations, and why (the runs behind them are in the README, "Post-training removal on the ViT" and "on the text
model", with records in ``benchmarks/results/sanitize_defenses.json``; ``RNPConfig.paper()`` restores the official
stop check and recovery rate):

- Units. The official masks are BatchNorm scales, which transformers do not have (BackdoorBench's RNP refuses such
  models). ``units`` picks FFN intermediate neurons (``"ffn"``), attention heads (``"head"``), LayerNorm scale
  channels (``"layernorm"``, the literal BatchNorm-scale analogue) or a combination; see ``units.py``. The default
  is FFN neurons and LayerNorm channels together: on the small ViT the pair lowered the ASR further than either kind
  alone, and attention heads alone were refused there (their masks fall together, and even threshold 0 cost
  held-out accuracy beyond ``max_accuracy_drop``). Heads *among* the units (``("ffn", "head", "layernorm")``) are
  the setting for a ViT trained without the random crop: one head there copies the trigger out of its patch, and
  RNP + CUL pruned that head and met the removal bar on one of two such models (refused on the other, and on the
  crop-4 model that the default units repair).
- Recovery rate: ``recovering_lr`` is 1.0, not the official 0.2. At 0.2 the masks of a few thousand transformer
  units barely moved in 20 epochs, where the official log's recovery restores most of the clean accuracy; 1.0 gives
  transformer units that room (100 epochs at 0.2 gave nearly the same sweep as 20 at 1.0).
- Threshold. The official code reports a sweep scored on test data; here the threshold is chosen from clean data
  only: walking up the sweep, the last threshold before the first whose pruned model loses more than
  ``max_accuracy_drop`` of the unpruned model's held-out clean accuracy (pruning more units removes more of what
  the masks flagged, and the held-out rows say how far that can go). ``threshold=`` fixes it instead. A threshold
  that would prune every unit raises.
- Gradient clipping. The official code calls ``clip_grad_norm_(max_norm=20)`` before ``backward()``, so it never
  clips; here it clips after ``backward()`` as intended (a transformer under gradient ascent at lr 0.01 otherwise
  blows up).
- Stop check: the official code checks the epoch's *running* accuracy after each epoch. With few steps per epoch
  that check lags the model: on the small ViT the held-out accuracy had already collapsed when the running accuracy
  still read above the threshold, the ascent ran one more epoch and saturated the unlearned model, whose masks then
  recovered nothing. The default ``unlearning_stop="step"`` re-evaluates the fit rows after every step and stops at
  the first step at or below the threshold; ``"running"`` restores the official check.
- Stop threshold: the official 0.20 is for 10 balanced classes, where a collapsed model scores 0.10. A collapsed
  binary model scores about 0.5 and would never reach 0.20, so by default the threshold keeps its relative place
  between the collapse level and perfect accuracy (``_shared.loops.clean_threshold_for``): 0.20 on CIFAR-10, 0.556
  on balanced binary data. Set ``clean_threshold`` to use a fixed value.
- Clean split: masks are learned on the fit part of the clean set, the threshold is chosen on its held-out part.
- Pruning zeroes the weights through which a unit acts (see ``units.py``); the official code zeroes BatchNorm weights
  the same way.

Exposure hand-off (EBYD: Wang, Li et al., "Expose Before You Defend", 2024; official code
bboylyg/Expose-Before-You-Defend, by RNP's authors): step 1 is itself a clean unlearning, so EBYD's enhanced RNP
replaces it with the exposed model. ``trainer.sanitize(clean, RNPConfig(), exposed=trainer.expose(clean))`` learns
the masks on a copy of the CUL-exposed model and prunes the original as usual; the unlearning settings are then
unused, ``unlearning_history`` is empty and the report says ``"unlearned_by": "exposure (cul)"``. The official EBYD
code ships no RNP script, so nothing else changes: same recovery, same threshold rule.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..registry import register_defense
from ._shared.context import SanitizeConfig, SanitizeContext
from ._shared.loops import cross_entropy_epoch
from ._shared.repair import RepairDefense, unlearn_or_take_exposed
from .base import Figure
from .units import UNIT_KINDS, TransformerUnits

OFFICIAL_CLEAN_THRESHOLD = 0.20
OFFICIAL_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))  # 0.0, 0.05, ..., 0.9


@dataclass
class RNPConfig(SanitizeConfig):
    """Reconstructive Neuron Pruning (post-training, clean data only). See the module docstring."""

    units: tuple[str, ...] | str = field(
        default=("ffn", "layernorm"),
        metadata={
            "help": f"Unit kinds to mask and prune, any of {UNIT_KINDS} (official: BatchNorm scales). Add 'head' "
            "for a ViT trained without the random crop, where one attention head can carry the trigger."
        },
    )
    unlearning_lr: float = field(default=0.01, metadata={"help": "Step 1's SGD learning rate (official 0.01)."})
    unlearning_momentum: float = field(default=0.9, metadata={"help": "Step 1's SGD momentum (official 0.9)."})
    unlearning_weight_decay: float = field(
        default=5e-4, metadata={"help": "Step 1's SGD weight decay (official 5e-4)."}
    )
    unlearning_milestones: tuple[int, ...] = field(
        default=(10, 20), metadata={"help": "Epochs at which step 1's learning rate is multiplied by 0.1 (official)."}
    )
    unlearning_max_epochs: int = field(
        default=20,
        metadata={
            "help": "Give up (error, model untouched) if the clean accuracy has not fallen by then (official 20)."
        },
    )
    clean_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Unlearning stops once the clean accuracy is at or below this; None: the official 0.20 carried "
            "over to this task's labels (0.20 on CIFAR-10, 0.556 on a balanced binary task)."
        },
    )
    max_grad_norm: float | None = field(
        default=20.0,
        metadata={
            "help": "Gradient-norm clip during unlearning, after backward() (None: off; the official call is a no-op)."
        },
    )
    unlearning_stop: str = field(
        default="step",
        metadata={
            "help": "'step': the fit rows' accuracy after every step (stops before the ascent overshoots); "
            "'running': the official check, the epoch's running accuracy after the epoch."
        },
    )
    recovering_lr: float = field(
        default=1.0, metadata={"help": "Step 2's SGD learning rate for the masks (official 0.2; see the docstring)."}
    )
    recovering_momentum: float = field(default=0.9, metadata={"help": "Step 2's SGD momentum (official 0.9)."})
    recovering_epochs: int = field(default=20, metadata={"help": "Step 2's epochs (official 20)."})
    alpha: float = field(default=0.2, metadata={"help": "Step 2's loss is alpha * CE (official 0.2)."})
    batch_size: int = field(default=128, metadata={"help": "Batch size of both steps (official 128)."})
    threshold: float | None = field(
        default=None,
        metadata={"help": "Prune units with mask <= this, in [0, 1); None chooses it from the held-out clean rows."},
    )
    thresholds: tuple[float, ...] = field(
        default=OFFICIAL_THRESHOLDS,
        metadata={"help": "The threshold sweep: reported, and searched when threshold is None (official 0 to 0.9)."},
    )
    max_accuracy_drop: float = field(
        default=0.03,
        metadata={
            "help": "With threshold=None, the held-out clean accuracy the pruning may cost against the unpruned "
            "model (the sweep stops before the first threshold that costs more)."
        },
    )

    name = "rnp"
    title = "RNP (Reconstructive Neuron Pruning)"
    citation = "Li et al., ICML 2023"
    accepts_exposed = True  # step 1 is a clean unlearning: EBYD's exposed model can take its place

    @classmethod
    def paper(cls, **overrides) -> RNPConfig:
        """The official procedure's settings where this config departs from them: the running-accuracy stop check
        and recovery at lr 0.2. The units stay this config's (the official BatchNorm scales have no transformer
        equivalent; ``units=("layernorm",)`` is the literal analogue)."""
        fields = dict(unlearning_stop="running", recovering_lr=0.2)
        fields.update(overrides)
        return cls(**fields)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.units = (self.units,) if isinstance(self.units, str) else tuple(self.units)
        if not self.units or set(self.units) - set(UNIT_KINDS):
            raise ValueError(f"units must be a non-empty subset of {UNIT_KINDS}, got {self.units}.")
        self._check_positive(
            "unlearning_lr", "unlearning_max_epochs", "recovering_lr", "recovering_epochs", "alpha", "batch_size"
        )
        self._check_interval("[0, 1]", "max_accuracy_drop")
        self._check_interval("[0, 1]", "clean_threshold", optional=True)
        self._check_interval("[0, 1)", "unlearning_momentum", "recovering_momentum")
        self._check_at_least(0, "unlearning_weight_decay")
        if self.unlearning_stop not in ("running", "step"):
            raise ValueError(f"unlearning_stop must be 'running' or 'step', got {self.unlearning_stop!r}.")
        self._check_positive("max_grad_norm", optional=True)
        self.thresholds = tuple(sorted(float(t) for t in self.thresholds))
        if not self.thresholds or not all(0 <= t < 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be values in [0, 1), got {self.thresholds}.")
        if self.threshold is not None and not 0 <= self.threshold < 1:
            raise ValueError(
                f"threshold must be in [0, 1) (masks live in [0, 1]; 1 would prune every unit), got {self.threshold}."
            )


def mask_values(masks) -> np.ndarray:
    """All masks as one flat array, in the units' group order."""
    return np.concatenate([m.detach().float().cpu().numpy() for m in masks]) if len(masks) else np.zeros(0)


def prune_selection(units: TransformerUnits, masks, threshold: float) -> list[torch.Tensor]:
    """One bool vector per group: the units whose mask is <= ``threshold`` (the official rule)."""
    return [m.detach().cpu() <= threshold for m in masks]


def choose_threshold(values: np.ndarray, sweep: list[dict], base_accuracy: float, config: RNPConfig):
    """The pruning threshold and the rule that gave it, from the mask ``values``, the ``sweep`` (records with
    ``threshold``, ``num_pruned`` and, unless it prunes everything, ``holdout_accuracy``) and the unpruned model's
    held-out accuracy. Clean data only."""
    total = len(values)
    if config.threshold is not None:
        if int((values <= config.threshold).sum()) >= total:
            raise ValueError(
                f"threshold={config.threshold} would prune all {total} units (largest mask {values.max():.3f}); choose "
                "a threshold below the masks of the units to keep, or threshold=None to choose it from clean data."
            )
        return config.threshold, "fixed"
    scored = [r for r in sweep if "holdout_accuracy" in r]
    if not scored:
        raise ValueError(
            f"Every threshold of the sweep would prune all {total} units (largest mask {values.max():.3f}): the "
            "recovery kept no unit. Check the clean set and recovering_lr."
        )
    # Larger thresholds prune supersets: walk up the sweep and stop at the first one that costs too much, rather
    # than jumping past it to a larger threshold that a small held-out set happens to score well.
    chosen = None
    for record in sorted(sweep, key=lambda r: r["threshold"]):
        if record.get("holdout_accuracy", -1.0) < base_accuracy - config.max_accuracy_drop:
            break
        chosen = record["threshold"]
    if chosen is None:
        raise RuntimeError(
            f"Even the smallest threshold ({min(r['threshold'] for r in sweep)}) costs more than "
            f"{config.max_accuracy_drop} of the unpruned model's held-out accuracy {base_accuracy:.3f} (it scores "
            f"{scored[0]['holdout_accuracy']:.3f}); raise max_accuracy_drop or set threshold. The model was left "
            "untouched."
        )
    rule = (
        f"largest threshold before the first whose held-out accuracy < {base_accuracy:.3f} - {config.max_accuracy_drop}"
    )
    return chosen, rule


def prune_at_threshold(model: nn.Module, report: dict, threshold: float) -> int:
    """Prune ``model`` (the *unpruned* backdoored weights) at another ``threshold`` of an RNP ``report``'s sweep,
    without re-running the defense: the units whose recovered mask is <= ``threshold``. Returns the number pruned.

    What the official code's sweep does, for users who pick a point of the reported sweep themselves (on data of
    their own; the defense's choice uses its held-out clean rows only)."""
    units = TransformerUnits.discover(model, tuple(report["units"]))
    values = np.asarray(report["mask_values"], dtype=np.float32)  # the dtype the masks were learned and compared in
    if len(values) != units.num_units:
        raise ValueError(
            f"The report holds {len(values)} masks but the model has {units.num_units} {'/'.join(report['units'])} "
            "units: pass the model the report was made on."
        )
    if int((values <= threshold).sum()) >= len(values):
        raise ValueError(
            f"threshold={threshold} would prune all {len(values)} units (largest mask {values.max():.3f})."
        )
    bounds = np.cumsum([group.size for group in units.groups])[:-1]
    masks = [torch.from_numpy(part) for part in np.split(values, bounds)]
    return units.prune(model, prune_selection(units, masks, threshold))


def recover_masks(
    context: SanitizeContext, config: RNPConfig, units: TransformerUnits, unlearned: nn.Module
) -> tuple[nn.ParameterList, list[dict]]:
    """Step 2: learn the unit masks on the frozen unlearned model."""
    for param in unlearned.parameters():
        param.requires_grad_(False)
    masks = units.new_masks(device=context.device)
    optimizer = torch.optim.SGD(masks.parameters(), lr=config.recovering_lr, momentum=config.recovering_momentum)

    def clamp():
        with torch.no_grad():
            for mask in masks:
                mask.clamp_(0.0, 1.0)

    history = []
    with units.attach(unlearned, masks):
        for epoch in context.progress(range(config.recovering_epochs), "RNP recovering"):
            loss, running_acc = cross_entropy_epoch(
                context, unlearned, optimizer, config.batch_size, epoch, scale=config.alpha, after_step=clamp
            )
            values = mask_values(masks)
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss,
                    "train_accuracy": running_acc,
                    "holdout_accuracy": context.accuracy(unlearned),
                    "mask_mean": float(values.mean()),
                    "masks_below_0.2": int((values <= 0.2).sum()),
                }
            )
    return masks, history


def unlearn_for_rnp(
    context: SanitizeContext, config: RNPConfig, model: nn.Module, timings: dict[str, float]
) -> tuple[nn.Module, float | None, list, dict]:
    """Step 1 on a copy of ``model`` (or EBYD's exposed model): the unlearned copy, the stop threshold used, the
    unlearning history and the hand-off's report fields."""

    def make_optimizer(unlearned: nn.Module):
        optimizer = torch.optim.SGD(
            unlearned.parameters(),
            lr=config.unlearning_lr,
            momentum=config.unlearning_momentum,
            weight_decay=config.unlearning_weight_decay,
        )
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.unlearning_milestones))

    return unlearn_or_take_exposed(
        context,
        model,
        config,
        OFFICIAL_CLEAN_THRESHOLD,
        timings,
        make_optimizer,
        stop_on=config.unlearning_stop,
        max_grad_norm=config.max_grad_norm,
        desc="RNP unlearning",
    )


class RNPDefense(RepairDefense):
    """Unlearn (or take the exposed model), recover unit masks, prune the original model in place."""

    holdout_histories = {
        "unlearning (the unlearned copy)": "unlearning_history",
        "mask recovery (the masked unlearned copy)": "recovering_history",
    }
    limitations = (
        "- RNP prunes the units whose recovered masks fall. A backdoor carried by units that also carry the clean "
        "function stays: pruning them costs held-out accuracy, and the threshold rule stops before that.",
    )

    def repair(self, context: SanitizeContext, model: nn.Module) -> dict[str, Any]:
        config = self.config
        units = TransformerUnits.discover(model, config.units)
        timings = {}

        unlearned, clean_threshold, unlearning, handoff = unlearn_for_rnp(context, config, model, timings)

        # Whether the unlearning exposed a label: RNP's masks learn to undo whatever the unlearned model does instead.
        unlearned_shares = context.prediction_shares(unlearned)
        start = time.perf_counter()
        masks, recovering = recover_masks(context, config, units, unlearned)
        del unlearned
        timings["recovering"] = time.perf_counter() - start

        start = time.perf_counter()
        values = mask_values(masks)
        total = units.num_units
        base_accuracy = context.accuracy(model)
        sweep = []
        for threshold in config.thresholds:
            count = int((values <= threshold).sum())
            record = {"threshold": threshold, "num_pruned": count}
            if count < total:
                pruned_model = _copy(model)
                units.prune(pruned_model, prune_selection(units, masks, threshold))
                record["holdout_accuracy"] = context.accuracy(pruned_model)
                del pruned_model
            sweep.append(record)

        chosen, how = choose_threshold(values, sweep, base_accuracy, config)

        selection = prune_selection(units, masks, chosen)
        num_pruned = units.prune(model, selection)
        pruned = [
            {**units.describe(g, i), "mask": masks[g].detach()[i].item()}
            for g, selected in enumerate(selection)
            for i in torch.nonzero(selected).flatten().tolist()
        ]
        timings["pruning"] = time.perf_counter() - start
        return {
            "units": list(config.units),
            "unit_counts": units.counts(),
            "num_units": total,
            "clean_threshold": clean_threshold,
            "unlearning_history": unlearning,
            "unlearning_epochs": len(unlearning),
            "unlearned_prediction_shares": unlearned_shares,
            "unlearned_top_label": int(np.argmax(unlearned_shares)),
            "recovering_history": recovering,
            "mask_values": [float(v) for v in values],  # unrounded: prune_at_threshold re-selects units from them
            "threshold_sweep": sweep,
            "prune_threshold": chosen,
            "threshold_rule": how,
            "num_pruned": num_pruned,
            "pruned_units": pruned,
            "pruned_per_layer": _per_layer(pruned, units.num_layers),
            **handoff,
            "timings_s": timings,
        }

    # -- rendering of a saved report ----------------------------------------------------------------------------
    @classmethod
    def findings(cls, report: dict[str, Any]) -> list[str]:
        lines = []
        counts = report.get("unit_counts") or {}
        if report.get("num_units") is not None:
            described = ", ".join(f"{count} {kind}" for kind, count in counts.items())
            lines.append(f"- Units masked: {report['num_units']}" + (f" ({described})." if described else "."))
        lines += cls.unlearning_line(report)
        shares = report.get("unlearned_prediction_shares") or []
        if shares:
            lines.append(
                f"- The unlearned model predicted class {report.get('unlearned_top_label')} for {max(shares):.0%} of "
                "the clean rows (where clean unlearning sends clean inputs; EBYD reads it as the backdoor label)."
            )
        if report.get("num_pruned") is not None:
            lines.append(
                f"- Pruned **{report['num_pruned']}** of {report.get('num_units')} units: those whose recovered mask "
                f"is <= {report.get('prune_threshold')} ({report.get('threshold_rule')})."
            )
        per_layer = report.get("pruned_per_layer")
        if per_layer and report.get("num_pruned"):
            lines.append(f"- Pruned units per layer: {', '.join(str(n) for n in per_layer)}.")
        return lines

    @classmethod
    def summary(cls, report: dict[str, Any]) -> str | None:
        if report.get("num_pruned") is None:
            return None
        return (
            f"pruned {report['num_pruned']} of {report.get('num_units')} {'/'.join(report.get('units') or [])} units "
            f"at mask <= {report.get('prune_threshold')}"
        )

    @classmethod
    def method_figures(cls, report: dict[str, Any], output_dir: Path) -> list[Figure]:
        from ._shared.figures import new_figure, save_figure

        figures = []
        values = report.get("mask_values")
        if values:
            fig, ax = new_figure()
            ax.hist(values, bins=40, color="#7f8c8d")
            if report.get("prune_threshold") is not None:
                ax.axvline(
                    report["prune_threshold"], color="#c0392b", linestyle="--", linewidth=1, label="prune threshold"
                )
                ax.legend(fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("mask value")
            ax.set_ylabel("units")
            ax.set_title("Unit masks after recovery", fontsize=10)
            figures.append(save_figure(fig, output_dir, "mask_histogram.png", "Unit mask histogram"))
        sweep = [r for r in report.get("threshold_sweep") or [] if "holdout_accuracy" in r]
        if sweep:
            fig, ax = new_figure()
            ax.plot(
                [r["threshold"] for r in sweep], [r["holdout_accuracy"] for r in sweep], marker=".", color="#2e86c1"
            )
            ax.set_xlabel("mask threshold")
            ax.set_ylabel("held-out clean accuracy after pruning", color="#2e86c1")
            ax.set_ylim(0, 1.02)
            pruned = ax.twinx()
            pruned.plot([r["threshold"] for r in sweep], [r["num_pruned"] for r in sweep], color="#7f8c8d")
            pruned.set_ylabel("units pruned", color="#7f8c8d")
            if report.get("prune_threshold") is not None:
                ax.axvline(report["prune_threshold"], color="#c0392b", linestyle="--", linewidth=1, label="chosen")
                ax.legend(fontsize=8, loc="lower left")
            ax.set_title("RNP threshold sweep (held-out clean rows only)", fontsize=10)
            figures.append(save_figure(fig, output_dir, "rnp_threshold_sweep.png", "RNP threshold sweep"))
        return figures


def _per_layer(pruned: list[dict], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for unit in pruned:
        counts[unit["layer"]] += 1
    return counts


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


register_defense(RNPConfig, RNPDefense)
