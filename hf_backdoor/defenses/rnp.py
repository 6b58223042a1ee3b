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

Deviations, and why:

- Units. The official masks are BatchNorm scales, which transformers do not have (BackdoorBench's RNP refuses such
  models). ``units`` picks FFN intermediate neurons (``"ffn"``), attention heads (``"head"``), LayerNorm scale
  channels (``"layernorm"``, the literal BatchNorm-scale analogue) or a combination; see ``units.py``. The default
  is FFN neurons and LayerNorm channels together. On the small ViT (BadNets, seed 0, recovery lr 1.0, the
  clean-only threshold rule) the pair took ASR from 0.924 to 0.237; FFN neurons alone to 0.741, LayerNorm channels
  alone to 0.827, and attention heads (3 per layer there, 12 per MiniLM layer) were refused: their masks fall
  together and even threshold 0 costs 8 points of held-out accuracy.
- Recovery rate: ``recovering_lr`` is 1.0, not the official 0.2. In analysis runs on the small ViT (BadNets, seed
  0; not in the records) the masks of a few thousand transformer units barely moved in 20 epochs at 0.2 (mean
  0.98-0.99; the masked unlearned model's held-out accuracy reached 0.25 with FFN units, 0.44 with the pair), and
  at 1.0 the pair's recovery reached 0.55. The official log's recovery restores clean accuracy from 0.34 to 0.84:
  1.0 gives transformer units that room. 100 epochs at 0.2 gave nearly the same sweep as 20 at 1.0 (FFN units).
- Threshold. The official code reports a sweep scored on test data; here the threshold is chosen from clean data
  only: walking up the sweep, the last threshold before the first whose pruned model loses more than
  ``max_accuracy_drop`` of the unpruned model's held-out clean accuracy (pruning more units removes more of what
  the masks flagged, and the held-out rows say how far that can go). ``threshold=`` fixes it instead. A threshold
  that would prune every unit raises.
- Gradient clipping. The official code calls ``clip_grad_norm_(max_norm=20)`` before ``backward()``, so it never
  clips; here it clips after ``backward()`` as intended (a transformer under gradient ascent at lr 0.01 otherwise
  blows up).
- Stop check: the official code checks the epoch's *running* accuracy after each epoch. On the small ViT (BadNets,
  400 fit rows, 4 steps per epoch) that check saw 0.24 after epoch 2 while the held-out accuracy was already 0.09, so
  the ascent ran one more epoch: its mean loss went from 3.3 to 17.5 and the unlearned model's CE on the clean rows
  ended near 40, a saturated model whose masks cannot recover anything (mean mask 0.99 after 20 epochs, no unit
  below 0.2, ASR 0.923-0.925 at every threshold; FFN units, analysis run not in the records). The default
  ``unlearning_stop="step"`` re-evaluates the fit rows after every step and stops at the first step at or below the
  threshold (held-out 0.20, loss 1.7; the unlearned model sends 69 of 101 held-out rows to the target class).
  ``"running"`` restores the official check.
- Stop threshold: the official 0.20 is for 10 balanced classes, where a collapsed model scores 0.10. A collapsed
  binary model scores about 0.5 and would never reach 0.20 (measured on a small BERT: stuck at 0.475), so by default
  the threshold keeps its relative place between the collapse level and perfect accuracy
  (``sanitize.clean_threshold_for``): 0.20 on CIFAR-10, 0.556 on balanced binary data. Set ``clean_threshold``
  to use a fixed value.
- Clean split: masks are learned on the fit part of the clean set, the threshold is chosen on its held-out part.
- Pruning zeroes the weights through which a unit acts (see ``units.py``); the official code zeroes BatchNorm weights
  the same way.

Exposure hand-off (EBYD: Wang, Li et al., "Expose Before You Defend", 2024; official code
bboylyg/Expose-Before-You-Defend, by RNP's authors): step 1 is itself a clean unlearning, so EBYD's enhanced RNP
replaces it with the exposed model. ``trainer.sanitize(clean, RNPConfig(), exposed=trainer.expose(clean))`` learns
the masks on a copy of the CUL-exposed model and prunes the original as usual; the unlearning settings are then
unused, ``unlearning_history`` is empty and the report says ``"unlearned_by": "exposure (cul)"``. The official EBYD
code ships no RNP script, so nothing else changes: same recovery, same threshold rule.

What was measured (``benchmarks/sanitize_defenses.py``, records in ``benchmarks/results/sanitize_defenses.json``):

- Small ViT from scratch (CPU setting: patch 8, 20 epochs, CACC 0.467), BadNets 10%, seed 0, 500 clean training
  rows. With the official settings (running-accuracy stop, recovery lr 0.2, FFN units) nothing happened (ASR
  0.923). With these defaults the threshold rule pruned 113 of 6,912 units at mask <= 0.5: CACC 0.451, ASR 0.237.
  The scored sweep (``recipes/sanitize.py --score-sweep``) reaches ASR 0.111 at 0.6 and 0.068 at 0.65 (CACC 0.448,
  0.432), but the held-out rows, training rows the model memorised, lose accuracy much faster than the test set
  (0.604 -> 0.535 from 0.5 to 0.55, test 0.451 -> 0.446), so the clean-only rule stops at 0.5.
- The same ViT on seed 1: ASR 0.949 -> 0.931 (24 units), and no threshold of the sweep gets below ASR 0.807 within 5
  points of CACC. Its unlearned model did send the clean rows to the target (61% to class 0, report
  ``unlearned_prediction_shares``), but the masks that undo it fall on units that carry the clean function too. On
  Blended (seed 0) the rule refused: pruning the units already at mask 0 costs 4 points of held-out accuracy.
- MiniLM on SST-2 BadNet 10% (346 clean validation rows, ``unlearning_lr=0.05``): ASR 1.000 -> 0.444 at CACC
  0.889 -> 0.859 (347 of 13,824 units at 0.7). With FFN units and recovery lr 0.2, and on a random 2-layer BERT, the
  masks barely moved (mean >= 0.96) and ASR stayed at 0.99-1.0. The recovery step itself works: units sabotaged to
  break the clean function get masks near 0 (``tests/test_sanitize.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .sanitize import (
    SanitizeConfig,
    SanitizeContext,
    clean_threshold_for,
    cross_entropy_epoch,
    register_sanitizer,
    unlearn,
)
from .units import UNIT_KINDS, TransformerUnits

OFFICIAL_CLEAN_THRESHOLD = 0.20
OFFICIAL_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))  # 0.0, 0.05, ..., 0.9


@dataclass
class RNPConfig(SanitizeConfig):
    """Reconstructive Neuron Pruning (post-training, clean data only). See the module docstring.

    Args:
        units: unit kinds to mask and prune: any of ``"ffn"``, ``"head"``, ``"layernorm"``.
        unlearning_lr, unlearning_momentum, unlearning_weight_decay, unlearning_milestones: step 1's SGD and its
            step schedule (x0.1 at each milestone epoch).
        unlearning_max_epochs: give up (error, model untouched) if the clean accuracy has not fallen by then.
        clean_threshold: unlearning stops once the running clean accuracy is at or below this; ``None``: the
            official 0.20 carried over to this task's labels (see ``clean_threshold_for``: 0.20 on CIFAR-10, 0.556 on
            a balanced binary task).
        max_grad_norm: gradient clipping during unlearning (``None``: off).
        unlearning_stop: ``"step"`` (the fit rows' accuracy after every step: stops before the ascent overshoots) or
            ``"running"`` (the official check: the epoch's running accuracy, after the epoch).
        recovering_lr, recovering_momentum, recovering_epochs, alpha: step 2 (loss ``alpha * CE``).
        batch_size: batch size of both steps.
        threshold: prune units with mask <= this; ``None`` chooses it from the held-out clean rows.
        thresholds: the sweep (reported, and searched when ``threshold`` is ``None``).
        max_accuracy_drop: with ``threshold=None``, the held-out clean accuracy the pruning may cost.
    """

    units: tuple[str, ...] = ("ffn", "layernorm")
    unlearning_lr: float = 0.01
    unlearning_momentum: float = 0.9
    unlearning_weight_decay: float = 5e-4
    unlearning_milestones: tuple[int, ...] = (10, 20)
    unlearning_max_epochs: int = 20
    clean_threshold: float | None = None
    max_grad_norm: float | None = 20.0
    unlearning_stop: str = "step"
    recovering_lr: float = 1.0
    recovering_momentum: float = 0.9
    recovering_epochs: int = 20
    alpha: float = 0.2
    batch_size: int = 128
    threshold: float | None = None
    thresholds: tuple[float, ...] = OFFICIAL_THRESHOLDS
    max_accuracy_drop: float = 0.03

    name = "rnp"
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
        self._check_fraction("max_accuracy_drop")
        if self.clean_threshold is not None:
            self._check_fraction("clean_threshold")
        for field_name in ("unlearning_momentum", "recovering_momentum"):
            if not 0 <= getattr(self, field_name) < 1:
                raise ValueError(f"{field_name} must be in [0, 1), got {getattr(self, field_name)}.")
        if self.unlearning_weight_decay < 0:
            raise ValueError(f"unlearning_weight_decay must be >= 0, got {self.unlearning_weight_decay}.")
        if self.unlearning_stop not in ("running", "step"):
            raise ValueError(f"unlearning_stop must be 'running' or 'step', got {self.unlearning_stop!r}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}.")
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


def unlearn_for_rnp(context: SanitizeContext, config: RNPConfig, model: nn.Module) -> tuple[nn.Module, float, list]:
    """Step 1 on a copy of ``model``: the unlearned copy, the stop threshold used and the unlearning history."""
    unlearned = _copy(model)
    optimizer = torch.optim.SGD(
        unlearned.parameters(),
        lr=config.unlearning_lr,
        momentum=config.unlearning_momentum,
        weight_decay=config.unlearning_weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.unlearning_milestones))
    clean_threshold = config.clean_threshold
    if clean_threshold is None:
        clean_threshold = clean_threshold_for(OFFICIAL_CLEAN_THRESHOLD, context.fit_labels)
    unlearning = unlearn(
        context,
        unlearned,
        optimizer,
        batch_size=config.batch_size,
        max_epochs=config.unlearning_max_epochs,
        clean_threshold=clean_threshold,
        stop_on=config.unlearning_stop,
        max_grad_norm=config.max_grad_norm,
        scheduler=scheduler,
        desc="RNP unlearning",
    )
    return unlearned, clean_threshold, unlearning


def _run_rnp(context: SanitizeContext, config: RNPConfig, model: nn.Module) -> dict:
    units = TransformerUnits.discover(model, config.units)
    timings = {}

    start = time.perf_counter()
    handoff = {}
    if context.exposed is None:
        unlearned, clean_threshold, unlearning = unlearn_for_rnp(context, config, model)
        timings["unlearning"] = time.perf_counter() - start
    else:
        # EBYD: the exposed model has already lost the clean task; no unlearning, so no stop threshold and no time.
        unlearned, clean_threshold, unlearning = context.exposed.unlearned_copy(context), None, []
        handoff = context.exposed.report(context, unlearned)

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


def _per_layer(pruned: list[dict], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for unit in pruned:
        counts[unit["layer"]] += 1
    return counts


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


register_sanitizer(RNPConfig, _run_rnp)
