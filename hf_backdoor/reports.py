"""Run reports people would rather look at than read: ``report.md`` plus PNG figures, drawn with matplotlib.

``write_report(output_dir, defense_report, evaluations)`` draws what the report holds:

- BTU: the distribution of every token's embedding-drift score per exposure round (log scale) with the flagged
  tokens marked, and the flip rate of every judged candidate against the threshold;
- any defense: CACC and ASR (with its floor) of each evaluated model, side by side;
- ABL: the logged training loss with the isolation step marked (``loss_history`` + ``isolation_step``) and the
  per-row loss at isolation with the cut, poisoned rows drawn apart when the data has ground truth
  (``isolation.loss_histogram`` + ``isolation_cut``);
- RNP: a histogram of unit masks with the pruning threshold (``mask_values`` + ``prune_threshold``).
  Each figure is drawn when a report carries its fields.

The same figures are linked from the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .cards import CardFigure, _evaluation_table, _findings  # noqa: E402

FIGURES_DIR = "figures"


def _save(fig, output_dir: Path, name: str) -> str:
    (output_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    relative = f"{FIGURES_DIR}/{name}"
    fig.tight_layout()
    fig.savefig(output_dir / relative, dpi=110)
    plt.close(fig)
    return relative


def plot_token_scores(report: dict, output_dir: Path) -> CardFigure | None:
    rounds = [r for r in report.get("rounds", []) if r.get("score_histogram")]
    if not rounds:
        return None
    flagged = set(report.get("flagged_ids") or [])
    fig, axes = plt.subplots(1, len(rounds), figsize=(4.2 * len(rounds), 3.4), squeeze=False)
    for ax, record in zip(axes[0], rounds):
        hist = record["score_histogram"]
        edges = np.asarray(hist["log10_edges"])
        ax.stairs(hist["counts"], edges, fill=True, color="#9db4d0")
        ax.set_yscale("log")
        ax.set_xlabel("log10 embedding drift")
        ax.set_title(record["round"])
        for token_id, token, score in zip(record["top_ids"], record.get("top_tokens", []), record["top_scores"]):
            if token_id in flagged:
                x = np.log10(score + 1e-12)
                ax.axvline(x, color="#c0392b", linewidth=1)
                ax.annotate(token, (x, 1), rotation=90, fontsize=7, color="#c0392b", va="bottom")
    axes[0][0].set_ylabel("tokens")
    fig.suptitle("BTU token scores; flagged tokens in red", fontsize=10)
    return CardFigure("BTU token scores with the flagged tokens marked", _save(fig, output_dir, "btu_token_scores.png"))


def plot_flip_rates(report: dict, output_dir: Path) -> CardFigure | None:
    rates = report.get("flip_rates") or {}
    if not rates or report.get("flip_threshold") is None:
        return None
    flagged = set(report.get("flagged_tokens") or [])
    items = sorted(rates.items(), key=lambda kv: -kv[1])[:40]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.22 * len(items) + 1.5), 3.4))
    colors = ["#c0392b" if token in flagged else "#7f8c8d" for token, _ in items]
    ax.bar(range(len(items)), [v for _, v in items], color=colors)
    ax.axhline(report["flip_threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xticks(range(len(items)), [t for t, _ in items], rotation=90, fontsize=7)
    ax.set_ylabel("prediction flip rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Deleting each candidate: share of its rows whose prediction flips", fontsize=10)
    return CardFigure("BTU flip test per candidate token", _save(fig, output_dir, "btu_flip_rates.png"))


def plot_evaluations(evaluations: list[dict], output_dir: Path) -> CardFigure | None:
    if not evaluations:
        return None
    labels = [f"{ev.get('model', 'this model')}\n{ev.get('attack') or ''}".strip() for ev in evaluations]
    x = np.arange(len(evaluations))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(evaluations) + 1.5), 3.4))
    ax.bar(x - 0.2, [ev["cacc"] for ev in evaluations], width=0.4, label="CACC", color="#2e86c1")
    ax.bar(x + 0.2, [ev.get("asr") or 0.0 for ev in evaluations], width=0.4, label="ASR", color="#c0392b")
    for i, ev in enumerate(evaluations):
        if ev.get("asr_floor") is not None:
            ax.hlines(
                ev["asr_floor"], i, i + 0.4, colors="black", linestyles=":", label="ASR floor" if i == 0 else None
            )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Clean accuracy and attack success rate", fontsize=10)
    return CardFigure("CACC and ASR before and after the defense", _save(fig, output_dir, "cacc_asr.png"))


def plot_loss_history(report: dict, output_dir: Path) -> CardFigure | None:
    history = report.get("loss_history")
    if not history:
        return None
    steps = [entry["step"] for entry in history]
    losses = [entry["loss"] for entry in history]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.plot(steps, losses, color="#2e86c1", marker="." if len(steps) < 30 else None)
    if report.get("isolation_step") is not None:
        ax.axvline(report["isolation_step"], color="#c0392b", linestyle="--", linewidth=1, label="isolation")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (logged)")
    ax.set_title("Training loss (LGA before the isolation step)", fontsize=10)
    return CardFigure("Training loss with the isolation step", _save(fig, output_dir, "loss_curve.png"))


def plot_isolation_losses(report: dict, output_dir: Path) -> CardFigure | None:
    histogram = (report.get("isolation") or {}).get("loss_histogram")
    if not histogram:
        return None
    edges = np.asarray(histogram["edges"])
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.stairs(histogram["counts"], edges, fill=True, color="#9db4d0", label="all rows")
    if "counts_poisoned" in histogram:
        ax.stairs(histogram["counts_poisoned"], edges, color="#c0392b", linewidth=1.5, label="poisoned (ground truth)")
    if report.get("isolation_cut") is not None:
        ax.axvline(report["isolation_cut"], color="black", linestyle="--", linewidth=1, label="isolation cut")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-row loss at isolation")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    ax.set_title("Rows left of the cut are isolated", fontsize=10)
    return CardFigure("Per-row loss at isolation with the cut", _save(fig, output_dir, "isolation_losses.png"))


def plot_masks(report: dict, output_dir: Path) -> CardFigure | None:
    values = report.get("mask_values")
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.hist(values, bins=40, color="#7f8c8d")
    if report.get("prune_threshold") is not None:
        ax.axvline(report["prune_threshold"], color="#c0392b", linestyle="--", linewidth=1, label="prune threshold")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("mask value")
    ax.set_ylabel("units")
    ax.set_title("Unit masks after recovery", fontsize=10)
    return CardFigure("Unit mask histogram", _save(fig, output_dir, "mask_histogram.png"))


def write_report(output_dir: str | Path, defense_report: dict | None, evaluations: list[dict] | None = None):
    """Write ``report.md`` and its figures into ``output_dir``; returns the figures (for the model card)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    evaluations = evaluations or []
    report = defense_report or {}
    figures = [
        figure
        for figure in (
            plot_evaluations(evaluations, output_dir),
            plot_token_scores(report, output_dir),
            plot_flip_rates(report, output_dir),
            plot_loss_history(report, output_dir),
            plot_isolation_losses(report, output_dir),
            plot_masks(report, output_dir),
        )
        if figure is not None
    ]
    name = report.get("defense", "no defense")
    lines = [
        f"# Backdoor defense report: {name}",
        "",
        "## Evaluation",
        "",
        _evaluation_table(evaluations),
        "",
        "## What the defense found",
        "",
        _findings(defense_report),
        "",
    ]
    timings = report.get("timings_s") or {}
    if timings:
        lines += ["## Time per phase (s)", "", *(f"- {k}: {v:.1f}" for k, v in timings.items()), ""]
    for figure in figures:
        lines += [f"![{figure.title}]({figure.path})", ""]
    (output_dir / "report.md").write_text("\n".join(lines))
    return figures


def report_from_folder(folder: str | Path):
    """Rebuild ``report.md`` and the figures from a saved run (``defense_report.json`` and, when present,
    ``backdoor_evaluations.json``)."""
    folder = Path(folder)
    report_path = folder / "defense_report.json"
    if not report_path.exists():
        raise FileNotFoundError(
            f"{folder} has no defense_report.json: point at the output_dir of a BackdoorSafeTrainer run."
        )
    evaluations_path = folder / "backdoor_evaluations.json"
    evaluations = json.loads(evaluations_path.read_text()) if evaluations_path.exists() else []
    return write_report(folder, json.loads(report_path.read_text()), evaluations)
