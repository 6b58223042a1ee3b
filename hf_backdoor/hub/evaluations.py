"""Reading backdoor evaluations: the CACC/ASR table and the warnings that say when an ASR cannot be trusted.

An evaluation is the dict ``trainer.evaluate_backdoor`` / ``trainer.add_backdoor_evaluation`` records: ``model``,
``cacc``, ``asr``, ``asr_floor``, ``attack``, ``dataset``, ``num_clean``, ``num_asr``, ``asr_untriggered`` (when the
ASR rows could be matched to the clean rows), and, when the caller measured them (the CLI does), ``num_labels``,
``majority_share`` (the most frequent class's share of the clean rows) and ``prediction_shares`` (the model's
predicted-class shares on the clean rows). The card, the run report and the CLI all
use these functions, so the three say the same thing.

Why the warnings: an ASR is the share of triggered rows sent to the target class. A model that has not learned the
task (CACC at chance) or that predicts one class for almost everything scores an ASR near 1 or near 0 whatever the
backdoor does, and an ASR without the floor (what a clean model scores on the same rows) cannot be told apart from the
model's plain error on them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# CACC within this of the chance level counts as "at or near chance".
NEAR_CHANCE_MARGIN = 0.05
# A model predicting one class for at least this share of the clean rows has collapsed onto it.
COLLAPSE_SHARE = 0.95

# A Hub repository id: `name` or `owner/name`; anything else (an absolute or relative path) is a local folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

FLOOR_HINT = "pass --floor-model <clean model dir> (Python: `evaluate_backdoor(..., asr_floor=...)`)"


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repository id rather than a local path."""
    if not name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    return bool(_HUB_ID.match(name))


def dataset_fields(dataset: str | None) -> tuple[str, str]:
    """``(dataset_type, dataset_name)`` for the model-index: a task name or Hub id as it is; a local path becomes
    type ``"local"`` named by its folder, since a path on the trainer's machine means nothing on the Hub."""
    if not dataset:
        return "local", "evaluation set"
    if is_hub_id(dataset):
        return dataset, dataset
    return "local", f"{Path(dataset).name or dataset} (local files)"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def chance_level(evaluation: dict[str, Any], num_labels: int | None = None) -> tuple[float, str] | None:
    """The accuracy a model gets without learning the task, and what it is; ``None`` when nothing tells."""
    majority = evaluation.get("majority_share")
    if majority is not None:
        return float(majority), "always predicting the most frequent class"
    num_labels = evaluation.get("num_labels") or num_labels
    if num_labels and num_labels > 1:
        return 1.0 / num_labels, f"guessing among {num_labels} classes"
    return None


def evaluation_warnings(evaluation: dict[str, Any], num_labels: int | None = None) -> list[str]:
    """Why this evaluation's ASR cannot be read as a backdoor measurement (empty when nothing is wrong)."""
    warnings = []
    chance = chance_level(evaluation, num_labels)
    cacc = evaluation.get("cacc")
    if chance is not None and cacc is not None and cacc <= chance[0] + NEAR_CHANCE_MARGIN:
        warnings.append(
            f"CACC {cacc:.3f} is at or near chance ({chance[0]:.3f}, {chance[1]}): the model has not learned the task, "
            "so its ASR says nothing about a backdoor."
        )
    shares = evaluation.get("prediction_shares")
    if shares:
        top = max(range(len(shares)), key=lambda k: shares[k])
        if shares[top] >= COLLAPSE_SHARE:
            warnings.append(
                f"The model predicts class {top} for {shares[top]:.0%} of the clean rows: it has collapsed onto one "
                "class, so its ASR (near 1 if that class is the target, near 0 otherwise) reflects the collapse, not "
                "the backdoor."
            )
    return warnings


def floor_text(evaluation: dict[str, Any]) -> str | None:
    """One sentence on the ASR floor of an evaluation with an ASR (``None`` without an ASR)."""
    if evaluation.get("asr") is None:
        return None
    untriggered = evaluation.get("asr_untriggered")
    # Beside the floor, the model's own reading of the same rows without the trigger says how much of its ASR the
    # trigger causes.
    untriggered = (
        ""
        if untriggered is None
        else f" Without the trigger this model labels {untriggered:.3f} of the same rows as the target."
    )
    floor = evaluation.get("asr_floor")
    if floor is None:
        return (
            "ASR floor unknown: no model trained on clean data was scored on the same triggered rows; "
            f"{FLOOR_HINT}.{untriggered}"
        )
    source = evaluation.get("floor_model")
    source = f" (the ASR of the clean model `{source}` on the same rows)" if source else ""
    return f"ASR floor {floor:.3f}{source}: an ASR at the floor means the backdoor is gone.{untriggered}"


def evaluation_table(evaluations: list[dict[str, Any]]) -> str:
    """A markdown table of CACC, ASR and ASR floor per evaluated model."""
    if not evaluations:
        return "_No backdoor evaluation was recorded: call `trainer.evaluate_backdoor(...)` before saving._"
    lines = ["| model | evaluation set | attack | CACC | ASR | ASR floor |", "|---|---|---|---|---|---|"]
    for ev in evaluations:
        dataset = dataset_fields(ev["dataset"])[1] if ev.get("dataset") else "–"
        floor = "–" if ev.get("asr") is None else ("unknown" if ev.get("asr_floor") is None else _fmt(ev["asr_floor"]))
        lines.append(
            f"| {ev.get('model', 'this model')} | {dataset} | {ev.get('attack') or '–'} | "
            f"{_fmt(ev.get('cacc'))} | {_fmt(ev.get('asr'))} | {floor} |"
        )
    return "\n".join(lines)


def evaluation_notes(evaluations: list[dict[str, Any]], num_labels: int | None = None) -> list[str]:
    """Markdown bullets under the table: each model's floor and warnings, named when several models are listed."""
    notes = []
    for ev in evaluations:
        prefix = f"{ev.get('model', 'this model')}: " if len(evaluations) > 1 else ""
        floor = floor_text(ev)
        if floor:
            notes.append(f"- {prefix}{floor}")
        notes.extend(f"- **Warning**, {prefix}{w}" for w in evaluation_warnings(ev, num_labels))
    return notes
