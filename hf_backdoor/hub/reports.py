"""Run reports people would rather look at than read: ``report.md`` plus PNG figures, drawn with matplotlib.

``write_report(output_dir, defense_report, evaluations)`` draws:

- CACC and ASR of each evaluated model, with the ASR floor drawn where it is known (``cacc_asr.png``);
- each defense's own figures, drawn by the class that wrote its report (``figures(report, output_dir)``), so this
  module names no defense. A stack of defenses gets each defense's figures and one section per defense.

The same figures are linked from the model card. matplotlib is used through ``matplotlib.figure.Figure`` objects
saved to files: the caller's backend and open figures are left alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..defenses.base import Figure, reports_from_json
from .cards import defense_title, findings_markdown, renderer
from .evaluations import chance_level, evaluation_notes, evaluation_table
from .run_folder import DEFENSE_REPORT_NAME, EVALUATIONS_NAME, check_run_folder, make_readable, read_run_info

FIGURES_DIR = "figures"
REPORT_NAME = "report.md"


def _models_caption(evaluations: list[dict[str, Any]], num_labels: int | None = None) -> str:
    names = [str(ev.get("model", "this model")) for ev in evaluations]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    with_asr = [ev for ev in evaluations if ev.get("asr") is not None]
    if not with_asr:
        floor = "; no ASR was measured"
    elif all(ev.get("asr_floor") is not None for ev in with_asr):
        floor = "; the dotted line over each ASR bar is its floor (a clean model's ASR on the same rows)"
    elif any(ev.get("asr_floor") is not None for ev in with_asr):
        floor = "; a dotted line over an ASR bar is its floor, where known"
    else:
        floor = "; ASR floor unknown (no clean model scored on the same rows)"
    chance = (
        "; the dashed line over each CACC bar is chance"
        if any(chance_level(ev, num_labels) for ev in evaluations)
        else ""
    )
    return f"CACC and ASR of {listed}{floor}{chance}"


def plot_evaluations(evaluations: list[dict[str, Any]], output_dir: Path, num_labels: int | None = None):
    """CACC and ASR of each evaluated model side by side, the ASR floor dotted over its bar, chance dashed."""
    if not evaluations:
        return None
    from ..defenses._shared.figures import new_figure, save_figure

    fig, ax = new_figure(width=max(4.5, 1.4 * len(evaluations) + 1.5))
    labels = [f"{ev.get('model', 'this model')}\n{ev.get('attack') or ''}".strip() for ev in evaluations]
    positions = list(range(len(evaluations)))
    ax.bar([x - 0.2 for x in positions], [ev["cacc"] for ev in evaluations], width=0.4, label="CACC", color="#2e86c1")
    asr_positions = [x + 0.2 for x, ev in zip(positions, evaluations) if ev.get("asr") is not None]
    if asr_positions:
        asr_values = [ev["asr"] for ev in evaluations if ev.get("asr") is not None]
        ax.bar(asr_positions, asr_values, width=0.4, label="ASR", color="#c0392b")
    floor_drawn = chance_drawn = False
    for x, ev in zip(positions, evaluations):
        if ev.get("asr") is not None and ev.get("asr_floor") is not None:
            ax.hlines(
                ev["asr_floor"], x, x + 0.4, colors="black", linestyles=":", label=None if floor_drawn else "ASR floor"
            )
            floor_drawn = True
        chance = chance_level(ev, num_labels)
        if chance is not None:
            ax.hlines(chance[0], x - 0.4, x, colors="grey", linestyles="--", label=None if chance_drawn else "chance")
            chance_drawn = True
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Clean accuracy and attack success rate", fontsize=10)
    return save_figure(fig, output_dir, "cacc_asr.png", _models_caption(evaluations, num_labels))


def _num_labels_in(folder: Path) -> int | None:
    """The label count of the model saved in ``folder``, for the chance level (a default count is not written to
    config.json, so the config is read the way transformers reads it)."""
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder).num_labels
    except (OSError, ValueError):
        return None


def write_report(
    output_dir: str | Path,
    defense_report: dict | list | None,
    evaluations: list[dict] | None = None,
    num_labels: int | None = None,
) -> list[Figure]:
    """Write ``report.md`` and its figures into ``output_dir``; returns the figures (for the model card).

    ``defense_report``: one report, a stack ``{"defenses": [...]}`` or a list of reports. ``num_labels`` (for the
    chance level) defaults to the model saved in ``output_dir``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    evaluations = evaluations or []
    reports = reports_from_json(defense_report)
    num_labels = num_labels or _num_labels_in(output_dir)
    figures = [f for f in [plot_evaluations(evaluations, output_dir, num_labels)] if f is not None]
    for report in reports:
        figures.extend(renderer(report).figures(report, output_dir))
    names = ", ".join(str(r.get("defense")) for r in reports) or "no defense"
    run_id = (read_run_info(output_dir) or {}).get("run_id")
    lines = [f"# Backdoor defense report: {names}", ""]
    if run_id:
        lines += [f"Run `{run_id}` (see `run_info.json`).", ""]
    lines += ["## Evaluation", "", evaluation_table(evaluations), ""]
    notes = evaluation_notes(evaluations, num_labels)
    if notes:
        lines += [*notes, ""]
    lines += ["## What the defense found" if len(reports) <= 1 else "## What the defenses found", ""]
    lines += [findings_markdown(reports), ""]
    for report in reports:
        timings = report.get("timings_s") or {}
        if timings:
            title = f" of {defense_title(report)[0]}" if len(reports) > 1 else ""
            lines += [f"## Time per phase{title} (s)", "", *(f"- {k}: {v:.1f}" for k, v in timings.items()), ""]
    for figure in figures:
        lines += [f"![{figure.caption}]({figure.path})", ""]
    (output_dir / REPORT_NAME).write_text("\n".join(lines))
    for path in [output_dir / REPORT_NAME, output_dir / FIGURES_DIR]:
        if path.exists():
            make_readable(path)
    return figures


def report_from_folder(folder: str | Path) -> list[Figure]:
    """Rebuild ``report.md`` and the figures from a saved run (``defense_report.json`` and
    ``backdoor_evaluations.json``).

    The folder must hold the saved model, and a run record (``run_info.json``, written by the CLI) must vouch for the
    report files: a ``defense_report.json`` left over from an earlier run in the same folder is refused (see
    :func:`hf_backdoor.hub.run_folder.check_run_folder`).
    """
    folder = Path(folder)
    check_run_folder(folder)
    report_path, evaluations_path = folder / DEFENSE_REPORT_NAME, folder / EVALUATIONS_NAME
    if not report_path.exists() and not evaluations_path.exists():
        raise FileNotFoundError(
            f"{folder} has no {DEFENSE_REPORT_NAME} and no {EVALUATIONS_NAME}: nothing to report. Point at the "
            "output folder of a train or sanitize run."
        )
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    evaluations = json.loads(evaluations_path.read_text()) if evaluations_path.exists() else []
    return write_report(folder, report, evaluations)
