"""Attack success rate (ASR) as an ``evaluate`` metric module, usable offline: ``hf_backdoor.metrics.load_metric``."""

import datasets
import evaluate

from hf_backdoor.metrics.backdoor import attack_success_rate

_DESCRIPTION = (
    "Attack success rate (ASR): the fraction of triggered non-target rows that the model classifies as the attack's "
    "target label. Report it beside its floor, the same number for a model trained on clean data."
)
_KWARGS = """
Args:
    predictions (list of int): predicted label ids on the ASR set.
    target_label (int): the attack's target label.
Returns:
    asr (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class AttackSuccessRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64")}),
        )

    def _compute(self, predictions, target_label: int):
        return {"asr": attack_success_rate(predictions, target_label)}
