"""One self-contained HTML retrieval report: the context from the inputs, rendered with the package's
Jinja2 template (``reports/templates/report.html.j2``); plots and thumbnails inlined as data URIs, so
the file opens anywhere without a network."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.fileio import write_text
from core.metrics import split_title
from core.urls import redact_url
from reports.analysis import group_accuracy, positive_ranks, rank_changes, recall_curve, sample_queries
from reports.inputs import (ManifestInfo, RerankOutputs, Thumbnails, guess_manifest_dir, load_manifest_info,
                            load_rerank_dir, load_run, load_thumbnails)
from reports.plots import group_svg, rank_change_svg, recall_svg, training_svg

__all__ = ["ReportOptions", "build_context", "render_html", "write_html_report", "TEMPLATE"]

TEMPLATE = "report.html.j2"
DIRECTION_NAMES = {"t2v": "T2V", "v2t": "V2T"}


@dataclass
class ReportOptions:
    """What the report shows: how many queries of each kind, the sample's seed, the recall curve's last K."""

    improved: int = 5
    hurt: int = 5
    random: int = 5
    seed: int = 0
    max_k: int = 50

    def check(self) -> None:
        from core.errors import UsageError

        for name in ("improved", "hurt", "random"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_k < 1:
            raise UsageError(f"--max-k: must be >= 1, got {self.max_k}")


def data_uri(data: bytes | str, mime: str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _fmt(metric: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return str(int(value)) if metric == "n" else f"{float(value):.1f}"


def metric_table(rr: RerankOutputs) -> tuple[list[str], list[dict]]:
    """Columns and rows (stage one, re-ranked, change) of each direction, numbers as text."""
    columns: list[str] = []
    for by_dir in rr.metrics.values():
        for m in by_dir.values():
            for key in m:
                if key not in columns:
                    columns.append(key)
    order = lambda c: (0, int(c[2:])) if c.startswith("R@") else (1, ["MdR", "MnR"].index(c)) \
        if c in ("MdR", "MnR") else (2, c)  # noqa: E731
    columns.sort(key=order)
    rows = []
    for d in ("t2v", "v2t"):
        before, after = rr.metrics["stage one"].get(d), rr.metrics["re-ranked"].get(d)
        if before is None or after is None:
            continue
        for name, m, css in (("stage one", before, "stage-one"), ("re-ranked", after, "reranked")):
            rows.append({"direction": d, "direction_name": DIRECTION_NAMES[d], "ranking": name, "css": css,
                         "cells": [{"metric": c, "text": _fmt(c, m.get(c)), "css": ""} for c in columns]})
        cells = []
        for c in columns:
            if c == "n" or before.get(c) is None or after.get(c) is None:
                cells.append({"metric": c, "text": "", "css": ""})
                continue
            delta = round(float(after[c]) - float(before[c]), 1) + 0.0  # + 0.0: no "-0.0"
            better = delta > 0 if c.startswith("R@") else delta < 0
            cells.append({"metric": c, "text": f"{delta:+.1f}", "css": "" if delta == 0 else
                          ("up" if better else "down")})
        rows.append({"direction": d, "direction_name": DIRECTION_NAMES[d], "ranking": "change", "css": "change",
                     "cells": cells})
    return columns, rows


def _thumb(thumbs: Thumbnails, video: str | None, which: int | None = None) -> list[str] | str | None:
    jpegs = thumbs.jpegs.get(video or "", [])
    if which is None:
        return [data_uri(j, "image/jpeg") for j in jpegs]
    return data_uri(jpegs[len(jpegs) // 2], "image/jpeg") if jpegs else None


def build_context(rerank_dir: str | os.PathLike, runs: Sequence[str | os.PathLike] = (), store: str | None = None,
                  manifest: str | os.PathLike | None = None, options: ReportOptions | None = None) -> dict:
    """Everything the template shows, read from the files (see ``reports.inputs`` for what is needed)."""
    opts = options or ReportOptions()
    opts.check()
    rr = load_rerank_dir(rerank_dir)
    curves_runs = [load_run(r) for r in runs]
    notes: list[str] = []
    store_url = store or rr.run.get("store")
    store_sha = None
    if store_url:
        try:
            from pipeline.store import CacheStore

            store_sha = CacheStore.open(store_url).attrs.get("manifest_sha256")
        except Exception:  # reported below by load_thumbnails
            store_sha = None
    info: ManifestInfo | None = None
    if manifest is not None:
        info = load_manifest_info(manifest, "--manifest", store_sha)
    else:
        guess = guess_manifest_dir(store_url)
        if guess is not None:
            try:
                info = load_manifest_info(guess, "--manifest", store_sha)
            except Exception:  # a guess that does not fit is no error: the report says what is missing
                info = None
        if info is None:
            notes.append("no manifest (give --manifest DIR): caption texts and within-group accuracy are not shown")

    # numbers
    curves, changes, complete = {}, {}, True
    for d in ("t2v", "v2t"):
        if d not in rr.ranked and d not in rr.positive_ranks:
            continue
        _, before, after, full = positive_ranks(rr, d)
        complete &= full
        last = opts.max_k if full else min(opts.max_k, rr.k)  # without the ranks file: known up to K only
        curves[d] = (recall_curve(before, last), recall_curve(after, last))
        changes[d] = rank_changes(before, after, rr.k)
    if not complete:
        notes.append(f"{rr.path} has no positive_ranks.parquet (written by `rerank` since reports exist): the "
                     f"recall curves are exact up to K = {rr.k} only; run `rerank` again for the whole curve")
    samples = sample_queries(rr, info, opts.improved, opts.hurt, opts.random, opts.seed)
    groups = group_accuracy(rr, info)

    # thumbnails of every video shown
    shown = sorted({v for q in samples for v in [q.video_id, *(c.video_id for c in q.before + q.after)] if v})
    thumbs = load_thumbnails(store_url, shown, manifest_hint=str(info.path) if info else "MANIFEST_DIR")
    if thumbs.note:
        notes.append(thumbs.note)
    for r in curves_runs:
        if not r.source.startswith("training_log"):
            notes.append(f"{r.name}: no training_log.jsonl (trained before training logs existed): its curves "
                         f"are per epoch, from history.json")

    columns, rows = metric_table(rr)
    plots = {"recall": data_uri(recall_svg(curves, rr.k, complete), "image/svg+xml"),
             "changes": data_uri(rank_change_svg(changes), "image/svg+xml"),
             "groups": data_uri(group_svg(groups), "image/svg+xml") if groups else None}
    group_rows = [{"name": a, "n": int(g["n"]), "stage_one": f"{g['stage one']:.1f}", "reranked": f"{g['re-ranked']:.1f}"}
                  for a, g in groups.items() if a != "outside top K"]
    sample_items = []
    for q in samples:
        sample_items.append({
            "kind": q.kind, "query_id": q.query_id, "text": q.text, "video_id": q.video_id,
            "stage_one_rank": q.stage_one_rank, "reranked_rank": q.reranked_rank,
            "truth": _thumb(thumbs, q.video_id),
            "before": [{"video_id": c.video_id, "rank": c.rank, "positive": c.positive, "score": f"{c.score:.3f}",
                        "thumb": _thumb(thumbs, c.video_id, 0)} for c in q.before],
            "after": [{"video_id": c.video_id, "rank": c.rank, "positive": c.positive,
                       "score": f"{c.score:.3f}" if rr.run.get("dsl") else
                       f"{c.score:.3f} = {c.stage_one_score:.3f} {c.head_score:+.3f}",
                       "thumb": _thumb(thumbs, c.video_id, 0)} for c in q.after]})
    kinds = {k: sum(q.kind == k for q in samples) for k in ("improved", "hurt", "random")}
    sample_line = (f"{kinds['improved']} most improved, {kinds['hurt']} most hurt and {kinds['random']} random "
                   f"queries (seed {opts.seed}).")
    split = rr.split
    title = f"Retrieval report: {split} split, stage one vs re-ranked top {rr.k}" + (" (DSL)" if rr.run.get("dsl") else "")
    return {
        "title": title, "rerank_dir": str(rr.path), "store": redact_url(store_url) if store_url else None,
        "manifest": str(info.path) if info else None,
        "coverage_line": split_title(rr.coverage).strip() if rr.coverage else f"split {split}",
        "notes": notes, "k": rr.k, "max_k": opts.max_k, "metric_columns": columns, "metric_rows": rows,
        "plots": plots, "groups": group_rows,
        "groups_outside": (groups.get("outside top K") or {}).get("n") if groups else None,
        "runs": [{"name": r.name, "path": str(r.path), "source": r.source, "selected": r.selected,
                  "svg": data_uri(training_svg(r), "image/svg+xml")} for r in curves_runs],
        "samples": sample_items, "sample_line": sample_line,
        "score_line": ("scores: stage one's before, the dual-softmax of cosine + head score after" if rr.run.get("dsl")
                       else "scores: stage one's cosine before, cosine + head score = final score after"),
    }


def render_html(context: dict) -> str:
    """The report page of ``context`` (``build_context``), from the package's template."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("reports", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE).render(**context)


def write_html_report(out: str | os.PathLike, rerank_dir: str | os.PathLike, runs: Sequence[str | os.PathLike] = (),
                      store: str | None = None, manifest: str | os.PathLike | None = None,
                      options: ReportOptions | None = None) -> tuple[Path, dict]:
    """Build and write the report to ``out`` (one HTML file); returns (path, context)."""
    context = build_context(rerank_dir, runs, store, manifest, options)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, render_html(context)), context
