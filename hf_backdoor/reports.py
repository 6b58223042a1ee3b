"""Moved to :mod:`hf_backdoor.hub.reports`; this name keeps old imports working."""

from .hub.reports import plot_evaluations, report_from_folder, write_report

__all__ = ["plot_evaluations", "report_from_folder", "write_report"]
