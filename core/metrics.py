"""Retrieval metrics: pure numpy functions on similarity matrices.

Conventions (CLIP4Clip and its followers):

* ``sim`` is always ``(C, V)``: rows are captions, columns are videos, higher = more similar.
* The rank of a query is 0-based. ``R@K`` is the percentage of queries whose rank is ``< K``;
  ``MdR`` / ``MnR`` are the median / mean of ``rank + 1``.
* Ties never count in the query's favour: a candidate scoring *equal* to the ground truth is
  counted as ranked above it. With one positive, ``rank = #{candidates with score >= positive}
  - 1`` (the positive itself).
* Several positives (text->video never has more than one; video->text has one per caption of the
  video): the query is correct at the rank of its best positive, and only *negatives* count
  against it: ``rank = #{negatives with score >= best positive score}``. This is CLIP4Clip's
  multi-sentence V2T convention (each video is matched to its best caption); the other captions
  of the same video never push the best one down.
* Every caption is a T2V query. Every video that has at least one caption is a V2T query (a video
  without captions has no ground truth and is only a candidate).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from core.fileio import jsonable, write_text

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
_BLOCK = 1024  # rows per block when counting, bounds temporary memory to _BLOCK x N


def check_finite(sim: np.ndarray, name: str = "similarity matrix") -> np.ndarray:
    """Return ``sim`` as a 2-D float array; raise ``ValueError`` if it holds NaN or inf."""
    arr = np.asarray(sim)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (captions x videos), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/inf), "
            f"first at [{int(rows[0])}, {int(cols[0])}] = {arr[rows[0], cols[0]]!r}"
        )
    return arr


def rank_of_positives(sim: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of each row's best positive, ties counted against the query.

    ``sim``: (Q, N) scores; ``positives``: (Q, N) bool mask of correct candidates (at least one per
    row). Returns (Q,) int64: the number of negatives scoring ``>=`` the row's best positive.
    """
    sim = check_finite(sim)
    pos = np.asarray(positives, dtype=bool)
    if pos.shape != sim.shape:
        raise ValueError(f"positives shape {pos.shape} != sim shape {sim.shape}")
    empty = ~pos.any(axis=1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} row(s) have no positive, first row {int(np.argmax(empty))}")
    ranks = np.empty(sim.shape[0], dtype=np.int64)
    for start in range(0, sim.shape[0], _BLOCK):
        s = sim[start : start + _BLOCK]
        p = pos[start : start + _BLOCK]
        best = np.where(p, s, -np.inf).max(axis=1, keepdims=True)
        ranks[start : start + _BLOCK] = ((s >= best) & ~p).sum(axis=1)
    return ranks


def rank_of_single_positive(sim: np.ndarray, positive_index: np.ndarray) -> np.ndarray:
    """0-based rank of one positive per row (``positive_index[q]`` is its column), pessimistic ties."""
    sim = check_finite(sim)
    idx = np.asarray(positive_index, dtype=np.int64)
    if idx.shape != (sim.shape[0],):
        raise ValueError(f"positive_index must have shape ({sim.shape[0]},), got {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= sim.shape[1]):
        raise ValueError(f"positive_index out of range [0, {sim.shape[1]})")
    ranks = np.empty(sim.shape[0], dtype=np.int64)
    for start in range(0, sim.shape[0], _BLOCK):
        s = sim[start : start + _BLOCK]
        i = idx[start : start + _BLOCK]
        target = s[np.arange(s.shape[0]), i][:, None]
        ranks[start : start + _BLOCK] = (s >= target).sum(axis=1) - 1
    return ranks


def _check_pairs(sim: np.ndarray, caption_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = check_finite(sim)
    cv = np.asarray(caption_video, dtype=np.int64)
    if cv.shape != (sim.shape[0],):
        raise ValueError(
            f"caption_video must have shape ({sim.shape[0]},) to match sim {sim.shape}, got {cv.shape}"
        )
    if cv.size and (cv.min() < 0 or cv.max() >= sim.shape[1]):
        raise ValueError(f"caption_video holds indices outside [0, {sim.shape[1]})")
    return sim, cv


def t2v_ranks(sim: np.ndarray, caption_video: np.ndarray) -> np.ndarray:
    """(C,) rank of each caption's video among all videos."""
    sim, cv = _check_pairs(sim, caption_video)
    return rank_of_single_positive(sim, cv)


def v2t_ranks(sim: np.ndarray, caption_video: np.ndarray) -> np.ndarray:
    """(V',) rank of each captioned video's best caption among all captions.

    Videos without any caption are not queries and are left out (V' <= V), in video order.
    """
    sim, cv = _check_pairs(sim, caption_video)
    num_videos = sim.shape[1]
    has_caption = np.bincount(cv, minlength=num_videos) > 0
    query_videos = np.flatnonzero(has_caption)
    ranks = np.empty(query_videos.size, dtype=np.int64)
    for start in range(0, query_videos.size, _BLOCK):
        vids = query_videos[start : start + _BLOCK]
        s = sim[:, vids].T  # (b, C)
        p = cv[None, :] == vids[:, None]
        best = np.where(p, s, -np.inf).max(axis=1, keepdims=True)
        ranks[start : start + _BLOCK] = ((s >= best) & ~p).sum(axis=1)
    return ranks


def ranks_to_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"R@k": %, ..., "MdR": median(rank+1), "MnR": mean(rank+1), "n": #queries}``."""
    r = np.asarray(ranks, dtype=np.int64)
    out: dict[str, float] = {}
    if r.size == 0:
        for k in ks:
            out[f"R@{k}"] = float("nan")
        out.update(MdR=float("nan"), MnR=float("nan"), n=0)
        return out
    for k in ks:
        out[f"R@{k}"] = float(100.0 * np.mean(r < k))
    out["MdR"] = float(np.median(r) + 1)
    out["MnR"] = float(np.mean(r) + 1)
    out["n"] = int(r.size)
    return out


def t2v_metrics(sim: np.ndarray, caption_video: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Text-to-video metrics: every caption is a query over all videos."""
    return ranks_to_metrics(t2v_ranks(sim, caption_video), ks)


def v2t_metrics(sim: np.ndarray, caption_video: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Video-to-text metrics: every captioned video is a query; correct at its best caption."""
    return ranks_to_metrics(v2t_ranks(sim, caption_video), ks)


def retrieval_metrics(
    sim: np.ndarray, caption_video: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[str, float]]:
    """``{"t2v": t2v_metrics(...), "v2t": v2t_metrics(...)}``."""
    return {"t2v": t2v_metrics(sim, caption_video, ks), "v2t": v2t_metrics(sim, caption_video, ks)}


def rsum(metrics: Mapping[str, Mapping[str, float]], ks: Iterable[int] = DEFAULT_KS) -> float:
    """Sum of R@k over both directions (the usual model-selection score)."""
    return float(sum(metrics[d][f"R@{k}"] for d in ("t2v", "v2t") if d in metrics for k in ks))


def _flatten(rows: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
    """Turn ``{name: {"t2v": {...}, "v2t": {...}}}`` into ``{"name t2v": {...}, ...}``."""
    flat: dict[str, dict[str, float]] = {}
    for name, m in rows.items():
        if m and all(isinstance(v, Mapping) for v in m.values()):
            for direction, sub in m.items():
                flat[f"{name} {direction}"] = dict(sub)
        else:
            flat[name] = dict(m)
    return flat


def _fmt(v: object) -> str:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "-"
        return f"{float(v):.1f}"
    return str(v)


def format_table(rows: Mapping[str, Mapping]) -> str:
    """Aligned text table; one row per name (nested ``{"t2v", "v2t"}`` dicts become two rows)."""
    flat = _flatten(rows)
    if not flat:
        return "(no results)"
    columns: list[str] = []
    for m in flat.values():
        for key in m:
            if key not in columns:
                columns.append(key)
    header = ["name", *columns]
    body = [[name, *(_fmt(m.get(c, float("nan"))) for c in columns)] for name, m in flat.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def metrics_to_json(rows: Mapping[str, object], indent: int | None = 2) -> str:
    """Strict JSON text of a (nested) metrics dict; NaN/inf become ``null``."""
    return json.dumps(jsonable(rows, strict=True), indent=indent, sort_keys=False, allow_nan=False)


def write_report(results: Mapping[str, object], out_dir: str | Path, name: str = "report",
                 split: Mapping | None = None) -> tuple[Path, str]:
    """Write ``out_dir/<name>.json`` and ``out_dir/<name>.txt``; return (json path, table text).

    ``results`` maps a model name to its metrics (``{"t2v": {...}, "v2t": {...}}`` or flat).
    ``split`` (``core.split.check_complete``'s entry) is kept in the JSON under ``"split"`` and heads
    the table, which is labelled INCOMPLETE when videos of the split are missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = split_title(split) + format_table(results)
    data = {**results, "split": dict(split)} if split is not None else results
    json_path = write_text(out / f"{name}.json", metrics_to_json(data) + "\n")
    write_text(out / f"{name}.txt", table + "\n")
    return json_path, table


def split_title(split: Mapping | None) -> str:
    """The line that heads a metrics table: which split, how much of it was scored ("" without one)."""
    if split is None:
        return ""
    label = "" if split.get("complete", True) else (
        f"INCOMPLETE ({len(split.get('missing_video_ids', {}))} videos missing; not comparable with published "
        f"figures): ")
    return f"{label}{split['split']} split, {split['videos']} videos, {split['captions']} captions\n"
