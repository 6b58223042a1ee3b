"""Clean accuracy (CACC) as an ``evaluate`` metric module, usable offline: ``hf_backdoor.metrics.load_metric``."""

import datasets
import evaluate

from hf_backdoor.metrics.backdoor import clean_accuracy

_DESCRIPTION = "Clean accuracy (CACC): the fraction of clean test rows classified correctly."
_KWARGS = """
Args:
    predictions (list of int): predicted label ids.
    references (list of int): true label ids.
Returns:
    cacc (float): accuracy in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class CleanAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"cacc": clean_accuracy(predictions, references)}
