"""Detection quality of flagged samples or tokens as an ``evaluate`` metric module (offline)."""

import datasets
import evaluate

from hf_backdoor.metrics.backdoor import detection_metrics

_DESCRIPTION = "Precision, recall and F1 of flagged items against ground truth, and AUROC of continuous scores."
_KWARGS = """
Args:
    predictions (list of int): 1 where an item (sample or token) is flagged.
    references (list of int): 1 where it truly is poisoned / a trigger.
    scores (list of float, optional): continuous suspicion scores; adds ``auroc``.
Returns:
    precision, recall, f1, num_flagged, num_positive (and auroc).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class BackdoorDetection(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, scores=None):
        return detection_metrics(predictions, references, scores=scores)
