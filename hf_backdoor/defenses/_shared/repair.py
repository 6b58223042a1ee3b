"""``RepairDefense``: the base of the post-training repairs that ``sanitize_model`` runs (RNP, NAD, NWC, fine-tuning).

A repair is a :class:`~hf_backdoor.defenses.base.Defense` with ``stage = "repair"``: ``repair(context, model)`` repairs
``model`` in place with the clean rows of a :class:`~.context.SanitizeContext` and returns its report fields.
``sanitize_model`` adds the fields every repair shares (rows, held-out accuracy before and after, the held-out guard,
timing) and this class renders them; a subclass adds its own findings (:meth:`findings`), limits
(``limitations``), summary line (:meth:`summary`) and figures.

Imports no defense module.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..base import Defense, Figure
from .context import SanitizeConfig, SanitizeContext
from .loops import clean_threshold_for, unlearn


def fmt(value: Any, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``, or ``–`` when the report does not have it."""
    if value is None:
        return "–"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def unlearn_or_take_exposed(
    context: SanitizeContext,
    model: nn.Module,
    config: SanitizeConfig,
    official_threshold: float,
    timings: dict[str, float],
    make_optimizer: Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]],
    **unlearn_options: Any,
) -> tuple[nn.Module, float | None, list[dict], dict[str, Any]]:
    """The first step of RNP and NWC: an unlearned copy of ``model``, which has lost the clean task.

    Without a hand-off, gradient ascent on a copy (:func:`~.loops.unlearn`, timed as ``timings["unlearning"]``) with
    the optimizer and scheduler (or ``None``) that ``make_optimizer(copy)`` returns, ``config.batch_size`` rows a step
    for at most ``config.unlearning_max_epochs``, until the clean accuracy is <= ``config.clean_threshold`` (``None``:
    ``official_threshold`` carried over to these labels by :func:`~.loops.clean_threshold_for`); ``unlearn_options``
    go to ``unlearn``. With EBYD's hand-off (``context.exposed``), a copy of the exposed model stands in: it has
    already lost the clean task, so there is no unlearning, no stop threshold and no time.

    Returns the unlearned copy, the stop threshold, the unlearning history and the hand-off's report fields.
    """
    if context.exposed is not None:
        unlearned = context.exposed.unlearned_copy(context)
        return unlearned, None, [], context.exposed.report(context, unlearned)
    start = time.perf_counter()
    unlearned = copy.deepcopy(model)
    optimizer, scheduler = make_optimizer(unlearned)
    clean_threshold = config.clean_threshold
    if clean_threshold is None:
        clean_threshold = clean_threshold_for(official_threshold, context.fit_labels)
    history = unlearn(
        context,
        unlearned,
        optimizer,
        batch_size=config.batch_size,
        max_epochs=config.unlearning_max_epochs,
        clean_threshold=clean_threshold,
        scheduler=scheduler,
        **unlearn_options,
    )
    timings["unlearning"] = time.perf_counter() - start
    return unlearned, clean_threshold, history, {}


class RepairDefense(Defense):
    """A post-training repair. Subclasses implement :meth:`repair` and their rendering hooks."""

    stage: ClassVar[str] = "repair"
    # Report keys of per-epoch histories with a `holdout_accuracy`, drawn in one figure: {legend label: key}.
    holdout_histories: ClassVar[dict[str, str]] = {}

    def repair(self, context, model) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement repair(context, model).")

    # -- rendering hooks for subclasses ---------------------------------------------------------------------------
    @classmethod
    def findings(cls, report: dict[str, Any]) -> list[str]:
        """Markdown bullet lines: what this repair found and did."""
        return []

    @classmethod
    def summary(cls, report: dict[str, Any]) -> str | None:
        """One console line on what the method did (``None``: nothing beyond the held-out accuracy)."""
        return None

    @classmethod
    def method_figures(cls, report: dict[str, Any], output_dir: Path) -> list[Figure]:
        """Figures of this method's own fields."""
        return []

    # -- the protocol's rendering, shared by every repair ---------------------------------------------------------
    @classmethod
    def _label(cls, report: dict[str, Any]) -> str:
        return str(report.get("defense") or "repair").upper()

    @classmethod
    def repair_lines(cls, report: dict[str, Any]) -> list[str]:
        """The lines every repair's report supports: clean rows, held-out accuracy and its guard, the hand-off."""
        lines = []
        if report.get("num_fit_rows") is not None:
            lines.append(
                f"- Repaired after training with {report['num_fit_rows']} clean rows; {report.get('num_holdout_rows')} "
                "more were held out to choose every threshold and to measure clean accuracy."
            )
        if report.get("fit_augmentation"):
            lines.append(f"- It trained on the clean rows with {report['fit_augmentation']}, as the model was trained.")
        before, after = report.get("holdout_accuracy_before"), report.get("holdout_accuracy_after")
        if before is not None and after is not None:
            line = f"- Held-out clean accuracy: {fmt(before)} -> {fmt(after)}."
            if report.get("holdout_drop_exceeded"):
                limit = (report.get("config") or {}).get("max_holdout_drop")
                line += (
                    f" **It fell by more than the allowed {limit}: the repair may have cost part of the clean task.**"
                )
            lines.append(line)
        if report.get("unlearned_by"):
            lines.append(
                f"- The method's own clean unlearning was replaced by the {report['unlearned_by']} model (EBYD); that "
                f"model's held-out clean accuracy: {fmt(report.get('exposed_holdout_accuracy'))}."
            )
        if report.get("replaced_model") is False:
            lines.append(
                "- `replace_model=False`: the repaired copy was returned; the trainer's model was not changed."
            )
        return lines

    @classmethod
    def unlearning_line(cls, report: dict[str, Any]) -> list[str]:
        """The line on the method's own clean unlearning (RNP, NWC), none when an exposed model stood in for it."""
        if report.get("unlearned_by") or report.get("unlearning_epochs") is None:
            return []
        return [
            f"- Clean unlearning: {report['unlearning_epochs']} epoch(s) of gradient ascent, stopped at clean "
            f"accuracy <= {fmt(report.get('clean_threshold'))}."
        ]

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        lines = cls.repair_lines(report) + cls.findings(report)
        return "\n".join(lines) if lines else "_See the repair's report._"

    @classmethod
    def card_limits(cls, report: dict[str, Any]) -> list[str]:
        rows = report.get("num_holdout_rows")
        return [
            f"- The repair was chosen and checked on {rows if rows is not None else 'a few'} held-out clean rows, "
            "never on triggered inputs: how much of the backdoor it removed is what the evaluation table measures.",
            *super().card_limits(report),
        ]

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        lines = []
        summary = cls.summary(report)
        if summary:
            lines.append(f"{cls._label(report)}: {summary}")
        line = (
            f"{cls._label(report)}: held-out clean accuracy {fmt(report.get('holdout_accuracy_before'))} -> "
            f"{fmt(report.get('holdout_accuracy_after'))}"
        )
        if report.get("holdout_drop_exceeded"):
            line += f" (more than max_holdout_drop={(report.get('config') or {}).get('max_holdout_drop')} lost)"
        return [*lines, line]

    @classmethod
    def figures(cls, report: dict[str, Any], output_dir: Path) -> list[Figure]:
        figures = []
        histories = {label: report.get(key) for label, key in cls.holdout_histories.items()}
        if any(histories.values()):
            from .figures import new_figure, plot_holdout_accuracy, save_figure

            fig, ax = new_figure()
            plot_holdout_accuracy(ax, histories, report.get("holdout_accuracy_before"))
            ax.set_title(f"{cls._label(report)}: held-out clean accuracy per epoch", fontsize=10)
            name = report.get("defense") or "repair"
            figures.append(
                save_figure(fig, output_dir, f"{name}_holdout_accuracy.png", f"{cls._label(report)} held-out accuracy")
            )
        return figures + cls.method_figures(report, output_dir)
