"""The numbers a report shows, computed from a re-ranking's outputs (no plotting, no HTML):
recall curves, the rank changes the re-ranker made, the sample of queries, within-group accuracy."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from reports.inputs import ManifestInfo, RerankOutputs
from synthetic.groups import ranked_within_group

__all__ = ["positive_ranks", "recall_curve", "rank_changes", "QuerySample", "Candidate", "sample_queries",
           "group_accuracy"]


def positive_ranks(rr: RerankOutputs, direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(query ids, stage-one ranks, re-ranked ranks, complete)`` of ``direction``'s queries (1-based).

    From ``positive_ranks.parquet`` (complete: ranks over the whole split); a re-ranking written before
    that file existed gives them from the ranked lists, for the queries whose positive is in the top K
    only (``complete`` False; the others get rank ``K + 1`` in both)."""
    if direction in rr.positive_ranks:
        p = rr.positive_ranks[direction]
        return p["query_id"], p["stage_one_rank"], p["reranked_rank"], True
    cols = rr.ranked.get(direction)
    if cols is None:
        return np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0, np.int64), True
    k = rr.k
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for q, r, s, pos in zip(cols["query_id"], cols["rank"], cols["stage_one_rank"], cols["positive"]):
        before.setdefault(q, k + 1)
        after.setdefault(q, k + 1)
        if pos:  # V2T: the best positive counts
            before[q] = min(before[q], int(s))
            after[q] = min(after[q], int(r))
    ids = np.asarray(list(before), dtype=object)
    return (ids, np.asarray([before[q] for q in ids], np.int64), np.asarray([after[q] for q in ids], np.int64),
            False)


def recall_curve(ranks: np.ndarray, max_k: int = 50) -> np.ndarray:
    """R@K (%) for K = 1..``max_k`` of 1-based ``ranks``."""
    r = np.asarray(ranks, dtype=np.int64)
    if not r.size:
        return np.full(max_k, np.nan)
    return np.array([100.0 * np.mean(r <= k) for k in range(1, max_k + 1)])


def rank_changes(before: np.ndarray, after: np.ndarray, k: int) -> dict[int, int]:
    """How many queries with their positive in stage one's top ``k`` moved it by how many places
    (positive: up, towards rank 1), ``{change: queries}`` sorted by change."""
    b, a = np.asarray(before), np.asarray(after)
    inside = b <= k
    values, counts = np.unique(b[inside] - a[inside], return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


@dataclass
class Candidate:
    video_id: str
    rank: int
    score: float
    stage_one_score: float
    head_score: float
    positive: bool


@dataclass
class QuerySample:
    """One T2V query shown in the report: why it was picked, its text and its two top-5 lists."""

    kind: str                 # "improved" / "hurt" / "random"
    query_id: str
    text: str | None
    video_id: str | None      # the ground-truth video (None when unknown: not in the top K, no manifest)
    stage_one_rank: int
    reranked_rank: int
    before: list[Candidate] = field(default_factory=list)
    after: list[Candidate] = field(default_factory=list)


def sample_queries(rr: RerankOutputs, manifest: ManifestInfo | None, improved: int = 5, hurt: int = 5,
                   random: int = 5, seed: int = 0, top: int = 5) -> list[QuerySample]:
    """T2V queries to show: the ``improved`` whose positive the re-ranker moved up most, the ``hurt``
    it moved down most (ties: the better stage-one rank first, then the id) and ``random`` others
    (``seed``), each with its top ``top`` before (stage-one order and scores) and after re-ranking."""
    cols = rr.ranked.get("t2v")
    if cols is None:
        return []
    ids, before, after, _ = positive_ranks(rr, "t2v")
    change = before - after
    order_up = sorted((i for i in range(ids.size) if change[i] > 0), key=lambda i: (-change[i], before[i], ids[i]))
    order_down = sorted((i for i in range(ids.size) if change[i] < 0), key=lambda i: (change[i], before[i], ids[i]))
    picked: list[tuple[str, int]] = [("improved", i) for i in order_up[:improved]]
    picked += [("hurt", i) for i in order_down[:hurt]]
    taken = {i for _, i in picked}
    rest = np.array([i for i in range(ids.size) if i not in taken], dtype=np.int64)
    if random and rest.size:
        rng = np.random.default_rng(seed)
        picked += [("random", int(i)) for i in np.sort(rng.choice(rest, size=min(random, rest.size), replace=False))]
    rows_of: dict[str, list[int]] = defaultdict(list)
    for j, q in enumerate(cols["query_id"]):
        rows_of[q].append(j)
    out = []
    for kind, i in picked:
        q = str(ids[i])
        rows = rows_of.get(q, [])
        cands = [Candidate(cols["candidate_id"][j], int(cols["rank"][j]), float(cols["final_score"][j]),
                           float(cols["stage_one_score"][j]), float(cols["head_score"][j]), bool(cols["positive"][j]))
                 for j in rows]
        video = next((c.video_id for c in cands if c.positive), None)
        if video is None and manifest is not None:
            video = manifest.caption_video.get(q)
        s1 = sorted(zip((int(cols["stage_one_rank"][j]) for j in rows), cands), key=lambda t: t[0])
        before_list = [Candidate(c.video_id, r, c.stage_one_score, c.stage_one_score, c.head_score, c.positive)
                       for r, c in s1[:top]]
        after_list = sorted(cands, key=lambda c: c.rank)[:top]
        out.append(QuerySample(kind, q, None if manifest is None else manifest.texts.get(q), video, int(before[i]),
                               int(after[i]), before_list, after_list))
    return out


def group_accuracy(rr: RerankOutputs, manifest: ManifestInfo | None) -> dict[str, dict[str, float]]:
    """Within-group accuracy per varied attribute, stage one vs re-ranked (``synthetic.groups``); empty
    without a manifest with groups (the synthetic benchmark has them)."""
    cols = rr.ranked.get("t2v")
    if manifest is None or cols is None or not manifest.has_groups:
        return {}
    return ranked_within_group(cols["query_id"], cols["candidate_id"], cols["rank"], cols["stage_one_rank"],
                               cols["positive"], manifest.videos, manifest.caption_video)
