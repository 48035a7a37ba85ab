"""The HTML retrieval report of a re-ranking (``reports``) where the work dir keeps things, and the
thumbnails a store made before they existed lacks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from reports import ReportOptions, write_html_report
from workflows.workdir import WorkDir

__all__ = ["ReportOptions", "retrieval_report", "demo_runs", "REPORT_NAME"]

REPORT_NAME = "report.html"


def retrieval_report(rerank_dir: str | os.PathLike, runs: Sequence[str | os.PathLike] = (),
                     out: str | os.PathLike | None = None, store: str | None = None,
                     manifest: str | os.PathLike | None = None, options: ReportOptions | None = None) -> tuple[Path, dict]:
    """Write the report of the re-ranking in ``rerank_dir`` (default ``<rerank_dir>/report.html``) with the
    training curves of ``runs``; ``store`` / ``manifest`` default to the re-ranking's store and the work
    dir's manifest of it. Returns (path, what it shows)."""
    path = Path(out) if out else Path(rerank_dir) / REPORT_NAME
    return write_html_report(path, rerank_dir, runs, store, manifest, options)


def demo_runs(work: WorkDir) -> list[Path]:
    """The demo's training runs (stage one, then stage two), those that exist."""
    return sorted(work.runs_dir().glob("stage1-*")) + sorted(work.runs_dir().glob("stage2-*"))
