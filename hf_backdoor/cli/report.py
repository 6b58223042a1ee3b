"""``hf-backdoor report``: rebuild ``report.md`` and its figures from a saved run folder.

The folder must hold the run's model, and its ``run_info.json`` must vouch for the report files: a
``defense_report.json`` left by an earlier, interrupted run in the same folder is refused rather than reported as if it
described the model there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NAME = "report"
HELP = "rebuild report.md and its figures from a saved run"
DESCRIPTION = __doc__.split("\n\n", 1)[1]


@dataclass
class ReportArguments:
    run_dir: str = field(metadata={"help": "the --output-dir of a train or sanitize run"})


DATACLASSES = (ReportArguments,)


def run(args: ReportArguments, argv=None) -> int:
    from ..hub.reports import REPORT_NAME, report_from_folder

    figures = report_from_folder(args.run_dir)
    print(f"wrote {Path(args.run_dir) / REPORT_NAME} with {len(figures)} figures:")
    for figure in figures:
        print(f"  {figure.path}: {figure.caption}")
    return 0
