"""Reports for people: one self-contained HTML page per re-ranking (metrics, recall curves, rank changes,
training curves, within-group accuracy, sample queries with thumbnails).

Reads files only (a re-ranking's outputs, run directories, the store's thumbnails, the manifest), so a
report can be made on any machine that has them; imports ``core``, ``manifests`` and ``pipeline``'s store
(docs/ARCHITECTURE.md). ``python cli.py report`` is the command.
"""

from reports.build import ReportOptions, build_context, render_html, write_html_report

__all__ = ["ReportOptions", "build_context", "render_html", "write_html_report"]
