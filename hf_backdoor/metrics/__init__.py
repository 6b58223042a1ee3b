"""Backdoor metrics: CACC, ASR (with its floor), detection precision/recall/F1/AUROC, and local ``evaluate`` modules."""

from pathlib import Path

from .backdoor import attack_success_rate, clean_accuracy, compute_classification_metrics, detection_metrics, roc_auc
from .evaluation import BackdoorEvaluation, evaluate_backdoor, predict_labels

MODULES_DIR = Path(__file__).parent / "modules"
METRIC_MODULES = tuple(sorted(p.name for p in MODULES_DIR.iterdir() if (p / f"{p.name}.py").exists()))


def load_metric(name: str, **kwargs):
    """Load one of the packaged ``evaluate`` metric modules offline (``evaluate.load`` on its local path)."""
    import evaluate

    if name not in METRIC_MODULES:
        raise ValueError(f"Unknown metric {name!r}; packaged metric modules: {METRIC_MODULES}.")
    return evaluate.load(str(MODULES_DIR / name), **kwargs)


__all__ = [
    "METRIC_MODULES",
    "BackdoorEvaluation",
    "attack_success_rate",
    "clean_accuracy",
    "compute_classification_metrics",
    "detection_metrics",
    "evaluate_backdoor",
    "load_metric",
    "predict_labels",
    "roc_auc",
]
