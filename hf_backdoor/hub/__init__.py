"""What a run publishes: the model card, the run report with its figures, and the run folder's bookkeeping.

Rendering reads saved reports and evaluations only, and names no defense: each defense report is rendered by the
class that wrote it (``hf_backdoor.defenses.base.Defense.card_section`` and friends).
"""

from .cards import build_model_card, card_metadata
from .evaluations import evaluation_table, evaluation_warnings
from .reports import report_from_folder, write_report
from .run_folder import check_run_folder, make_readable

__all__ = [
    "build_model_card",
    "card_metadata",
    "check_run_folder",
    "evaluation_table",
    "evaluation_warnings",
    "make_readable",
    "report_from_folder",
    "write_report",
]
