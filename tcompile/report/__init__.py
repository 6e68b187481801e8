"""Compilation reports: what tcompile did to a model and what it bought.

The :class:`Report` is plain, JSON-round-trippable data; ``Report.summary()`` prints it for a
terminal and ``Report.save()`` renders it as JSON, Markdown or a self-contained HTML page.
"""
from __future__ import annotations

from tcompile.report.report import CandidateRecord, PassRecord, Report

__all__ = ["CandidateRecord", "PassRecord", "Report"]
