"""Small matplotlib helpers for the figures defenses draw from their saved reports (``Defense.figures``).

matplotlib is imported when a figure is drawn, never at import. Figures are ``matplotlib.figure.Figure`` objects
saved straight to files: no pyplot, so the caller's backend and open figures are left alone.
"""

from __future__ import annotations

from pathlib import Path

from ..base import Figure

FIGURES_DIR = "figures"  # the run report's figure folder, relative to its output_dir


def new_figure(width: float = 5.0, height: float = 3.4, ncols: int = 1):
    """A figure and its axes (one axis, or an array of ``ncols``), drawn off-screen."""
    from matplotlib.figure import Figure as MatplotlibFigure

    fig = MatplotlibFigure(figsize=(width, height))
    return fig, fig.subplots(1, ncols, squeeze=True)


def save_figure(fig, output_dir: Path, name: str, caption: str) -> Figure:
    """Save ``fig`` as ``output_dir/figures/name``; the :class:`Figure` holds the path relative to ``output_dir``."""
    output_dir = Path(output_dir)
    (output_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    relative = f"{FIGURES_DIR}/{name}"
    fig.tight_layout()
    fig.savefig(output_dir / relative, dpi=110)
    return Figure(caption, relative)


def plot_holdout_accuracy(ax, histories: dict[str, list[dict]], before: float | None = None) -> bool:
    """Held-out clean accuracy per epoch of each named history (each its own model: teacher, unlearned copy, the
    repaired model...) on ``ax``, with the accuracy before the repair; whether any history had points."""
    drawn = False
    for label, history in histories.items():
        points = [(r["epoch"], r["holdout_accuracy"]) for r in history or [] if r.get("holdout_accuracy") is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
            drawn = True
    if before is not None:
        ax.axhline(before, color="black", linestyle=":", linewidth=1, label="before the repair")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out clean accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return drawn
