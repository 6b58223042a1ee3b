"""Post-training backdoor removal with a small clean set: ``trainer.sanitize(clean_dataset, defense=...)``.

``sanitize_model(trainer, clean_dataset, defense)`` runs one registered repair-stage defense (``RNPConfig``,
``NADConfig``, ``NWCConfig``, ``FinetuneConfig``, or any config registered with ``register_defense`` whose defense
has ``stage = "repair"``; see :data:`SANITIZERS`) on a deep copy of the trainer's model, by calling its
``repair(context, model)``, and returns ``(model, report)``.

- The clean set is split (stratified, seeded) into a *fit* part the defense trains on and a *held-out* part
  (``holdout_fraction``) on which every threshold is chosen and every step's clean accuracy is measured. Nothing
  is ever chosen from test data or ASR.
- The defense works on a copy. If it raises, the trainer's model is exactly as it was. On success, with
  ``replace_model=True`` (the default), the repaired weights are loaded into ``trainer.model`` in place, so
  ``trainer.evaluate_backdoor``, ``save_model`` and ``push_to_hub`` see the repaired model and any wrapper the
  Trainer holds (DDP, compiled) keeps pointing at the same object; the returned model is ``trainer.model``. With
  ``replace_model=False`` the repaired copy is returned and the trainer is left alone.
- Held-out guard: when the held-out clean accuracy after the repair is more than ``max_holdout_drop`` (default 0.1)
  below the accuracy before it, a warning is logged and raised as a ``UserWarning``, and the report says
  ``"holdout_drop_exceeded": true``; with ``refuse_holdout_drop=True`` it raises instead and the trainer's model is
  left untouched.
- Every repair is written into ordinary weights (pruned units are zeroed weights, no hooks), so the repaired model
  saves and loads like any ``transformers`` model.
- The report (what was pruned or reset, per-step clean accuracy, the threshold sweep, timings) is written to
  ``output_dir/sanitize_report_<name>.json`` and its scalars (the defense's ``report_scalars``) are logged through
  ``trainer.log`` under ``sanitize/<name>/``; it is also kept as ``trainer.sanitize_report``.
- Under ``accelerate launch`` every process runs the same seeded computation on the whole clean set (it is small),
  and the main process's result is broadcast so that all ranks hold identical weights.
- Seeded: the defense runs under ``torch.random.fork_rng`` seeded with ``config.seed``, so it neither depends on
  nor disturbs the caller's random state.

Exposure hand-off (EBYD: Wang, Li et al., "Expose Before You Defend", 2024; official code
bboylyg/Expose-Before-You-Defend). RNP and TSBD/NWC both begin by unlearning the clean task by gradient ascent; EBYD's
enhanced variants start from a model whose backdoor has already been exposed instead.
``sanitize_model(..., exposed=trainer.expose(clean_set))`` (an :class:`~.exposure.ExposureResult`, or a bare model of
the same architecture) skips the defense's own unlearning and uses a deep copy of the exposed model in its place; the
report says ``"unlearned_by": "exposure (cul)"``. Only defenses with such a step accept it (:func:`exposed_defenses`:
``rnp``, ``nwc``); the others, and an exposed model whose parameters differ in name or shape, raise ``ValueError``
before any work. The exposed model itself is never modified.

This module is a caller, like ``exposure.py``: no defense module imports it, and it finds the defenses through the
registry (``hf_backdoor.defenses`` imports every built-in one).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..registry import DEFENSES, RegistryEntry, defense_entry
from ..registry_view import RegistryView
from ._shared.context import (
    ExposedModel,
    SanitizeConfig,
    SanitizeContext,
    check_holdout_drop,
)
from ._shared.loops import clean_threshold_for  # noqa: F401  (re-exported for existing imports)
from ._shared.output import broadcast_from_main, broadcast_object, jsonable, log_and_write
from .base import Defense, DefenseConfig
from .exposure import ExposureResult

REPORT_NAME = "sanitize_report_{name}.json"


class _RepairRegistryView(RegistryView):
    """A live, read-only view of the registered repairs that ``sanitize_model`` runs: ``name -> (config_class,
    defense_class)`` for every registered defense with ``stage == "repair"`` and a :class:`SanitizeConfig`."""

    def _entries(self) -> dict[str, RegistryEntry]:
        return {
            name: entry
            for name, entry in DEFENSES.items()
            if entry.method_class.stage == "repair" and issubclass(entry.config_class, SanitizeConfig)
        }

    def __repr__(self) -> str:
        return f"SANITIZERS({sorted(self)})"


SANITIZERS: Mapping[str, RegistryEntry] = _RepairRegistryView()


def _not_a_repair(name: str) -> ValueError:
    """The error for a registered defense that ``sanitize_model`` cannot run, saying where it runs instead."""
    entry = DEFENSES[name]
    if entry.method_class.stage != "repair":
        return ValueError(
            f"{name.upper()} runs during training: pass it to BackdoorSafeTrainer(defense=...). Post-training "
            f"defenses: {sorted(SANITIZERS)}."
        )
    return ValueError(
        f"{name!r} ({entry.config_class.__name__}) leaves the trainer's model as it is and returns an exposed copy: "
        f"call `trainer.expose(clean_dataset, {entry.config_class.__name__}(...))`. Post-training repairs: "
        f"{sorted(SANITIZERS)}."
    )


def build_repair(defense: SanitizeConfig | dict | str) -> Defense:
    """The repair-stage defense for a config, a registered name (default settings) or ``{"name": ..., **fields}``.

    Raises ``ValueError`` for an unknown name or a defense ``sanitize_model`` cannot run (a training-stage defense,
    or the exposure), ``TypeError`` for anything else.
    """
    if isinstance(defense, str):
        defense = {"name": defense}
    if isinstance(defense, dict):
        fields = dict(defense)
        name = fields.pop("name", None)
        if name not in DEFENSES:
            raise ValueError(f"Unknown post-training defense {name!r}; registered: {sorted(SANITIZERS)}.")
        if name not in SANITIZERS:
            raise _not_a_repair(name)
        config = SANITIZERS[name].config_class(**fields)
    elif isinstance(defense, DefenseConfig):
        config = defense
        try:
            defense_entry(config)
        except TypeError:
            raise TypeError(
                f"{type(config).__name__} is not registered; known post-training defenses: {sorted(SANITIZERS)}. "
                "Register it with `hf_backdoor.registry.register_defense(ConfigClass, DefenseClass)`."
            ) from None
        if config.name not in SANITIZERS:
            raise _not_a_repair(config.name)
    else:
        raise TypeError(
            f"defense must be a post-training defense config ({', '.join(sorted(SANITIZERS))}), a name or a dict; got "
            f"{type(defense).__name__}."
        )
    return defense_entry(config).method_class(config)


def get_sanitize_config(defense: SanitizeConfig | dict | str) -> SanitizeConfig:
    """A repair config from a config object, a name (default settings) or ``{"name": ..., **fields}``."""
    return build_repair(defense).config


def exposed_defenses() -> list[str]:
    """The registered repairs that accept ``exposed=`` (those with a clean-unlearning step to replace)."""
    return sorted(name for name, entry in SANITIZERS.items() if entry.config_class.accepts_exposed)


# -- exposure hand-off (EBYD) ----------------------------------------------------------------------------------------


def check_accepts_exposed(config: SanitizeConfig) -> None:
    """Raise unless ``config``'s defense has an unlearning step for an exposed model to replace."""
    if not config.accepts_exposed:
        raise ValueError(
            f"The {config.name!r} defense has no clean-unlearning step for an exposed model to replace; `exposed=` is "
            f"accepted by {', '.join(exposed_defenses())} only. Run {config.name!r} without it."
        )


def resolve_exposed(exposed, trainer, reference: nn.Module) -> ExposedModel:
    """``exposed`` (an ``ExposureResult`` or an ``nn.Module``) as an :class:`ExposedModel`, after checking that its
    parameters match ``reference``'s (the trainer's model) in name and shape: RNP hooks the unlearned model by
    module path and NWC subtracts its weights from the original's, so a different architecture cannot work."""
    if isinstance(exposed, ExposureResult):
        handoff = ExposedModel(
            model=exposed.model,
            method=exposed.method,
            clean_accuracy_before=exposed.clean_accuracy_before,
            clean_accuracy_after=exposed.clean_accuracy_after,
            exposed=exposed.exposed,
            wall_s=exposed.wall_s,
        )
    elif isinstance(exposed, nn.Module):
        handoff = ExposedModel(model=exposed)
    else:
        raise TypeError(
            "exposed must be an ExposureResult (from `trainer.expose(...)`) or an nn.Module, got "
            f"{type(exposed).__name__}."
        )
    handoff.model = trainer.accelerator.unwrap_model(handoff.model)
    if handoff.model is reference:
        raise ValueError(
            "exposed is the trainer's own model: pass the exposed copy, `trainer.expose(clean_set)` or its `.model`."
        )
    mismatch = _first_parameter_mismatch(handoff.model, reference)
    if mismatch is not None:
        raise ValueError(f"The exposed model does not match the trainer's model: {mismatch}.")
    if handoff.exposed is False:
        # Not an error: the caller may want the numbers anyway; but the defense is then close to running on the
        # backdoored model itself, and the report should not be read as EBYD's.
        warnings.warn(
            f"The exposure ({handoff.method}) did not expose the model (clean accuracy "
            f"{handoff.clean_accuracy_before:.3f} -> {handoff.clean_accuracy_after:.3f}); the defense will start from "
            "a model that still solves the clean task.",
            stacklevel=3,
        )
    return handoff


def _first_parameter_mismatch(model: nn.Module, reference: nn.Module) -> str | None:
    ours = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, shape in ours.items():
        if name not in theirs:
            return f"parameter {name!r} {shape} is missing from the exposed model"
        if theirs[name] != shape:
            return f"parameter {name!r} has shape {theirs[name]} in the exposed model and {shape} in the trainer's"
    extra = next((name for name in theirs if name not in ours), None)
    return None if extra is None else f"the exposed model has a parameter {extra!r} the trainer's model lacks"


# -- the caller --------------------------------------------------------------------------------------------------------


def sanitize_model(
    trainer, clean_dataset, defense: SanitizeConfig | dict | str, exposed: ExposureResult | nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Repair ``trainer``'s (backdoored) model with a post-training defense and a small clean set.

    Args:
        trainer: a ``transformers.Trainer`` (``BackdoorSafeTrainer`` or not) holding the model; its device, data
            collator, eval batch size, logging and ``output_dir`` are used.
        clean_dataset: clean labelled rows in the format the trainer trains on (tokenized text, or images through
            the same transform). A ``datasets.Dataset`` with a ``text`` column and no ``input_ids`` is tokenized
            with the trainer's tokenizer (max length 128).
        defense: ``RNPConfig(...)``, ``NADConfig(...)``, ``NWCConfig(...)``, ``FinetuneConfig(...)``, a registered
            name (``"rnp"``) or ``{"name": ..., **fields}``.
        exposed: EBYD's hand-off (RNP and NWC only): an ``ExposureResult`` from ``trainer.expose(...)`` or an exposed
            model of the same architecture; the defense uses a deep copy of it instead of running its own clean
            unlearning. ``None`` (default): the defense as published.

    Returns:
        ``(model, report)``. See the module docstring for what happens to ``trainer.model``.

    Raises:
        ValueError: unsupported model, clean set with one class or too few rows, a threshold that prunes everything,
            ``exposed`` given to a defense without an unlearning step or not matching the trainer's model, a
            training-stage defense (it belongs in ``BackdoorSafeTrainer(defense=...)``).
        RuntimeError: a defense that cannot do its job on this model and data (e.g. unlearning never lowers the clean
            accuracy), or, with ``refuse_holdout_drop=True``, a repair that cost more than ``max_holdout_drop`` of
            held-out accuracy; the message says which numbers it reached. The trainer's model is untouched in every
            case.
    """
    repair = build_repair(defense)
    config = repair.config
    original = trainer.accelerator.unwrap_model(trainer.model)
    handoff = None
    if exposed is not None:  # checked before any work, so a wrong call costs nothing and changes nothing
        check_accepts_exposed(config)
        handoff = resolve_exposed(exposed, trainer, original)
    num_labels = getattr(getattr(original, "config", None), "num_labels", None)
    start = time.perf_counter()
    context = SanitizeContext(trainer, clean_dataset, config, num_labels, exposed=handoff)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        working = copy.deepcopy(original).to(context.device)
        before = context.accuracy(working)
        fields = repair.repair(context, working)
        after = context.accuracy(working)
    broadcast_from_main(trainer, working)
    wall = time.perf_counter() - start
    report = {
        **repair.report(),  # "defense" and "config"
        "num_fit_rows": len(context.fit),
        "num_holdout_rows": len(context.holdout),
        "fit_augmentation": context.fit_augmentation,
        "holdout_accuracy_before": before,
        "holdout_accuracy_after": after,
        **fields,
        "wall_s": wall,
        "device": str(context.device),
        "replaced_model": config.replace_model,
    }
    report = broadcast_object(trainer, jsonable(report))
    # Judged on the broadcast numbers, so every process warns, or refuses, alike; a refusal leaves the model as it was.
    report["holdout_drop_exceeded"] = check_holdout_drop(
        config, report["holdout_accuracy_before"], report["holdout_accuracy_after"]
    )
    if config.replace_model:
        original.load_state_dict(working.state_dict())
        model = trainer.model
    else:
        model = working
    trainer.sanitize_report = report
    path = os.path.join(trainer.args.output_dir, REPORT_NAME.format(name=config.name))
    log_and_write(trainer, f"sanitize/{config.name}", type(repair).report_scalars(report), path, report)
    return model, report
