"""Within-group accuracy on the synthetic benchmark, torch-free: can a scorer tell near-duplicates apart?

The synthetic world (docs/SYNTHETIC.md) has groups of near-duplicate videos whose members differ in
exactly one attribute (the manifest's ``group_id`` and ``varied`` columns). A caption of a grouped
video is *right* when its own video is placed strictly above every other member of its group.

* :func:`within_group_accuracy`: from scores of each caption against its group's members (a
  benchmark computes them with a scorer; ties count against the caption).
* :func:`ranked_within_group`: from the ranked lists a re-ranking writes (each query's top K, with
  the re-ranked and the stage-one position of each candidate). Re-ranking only permutes the top K,
  so for a caption whose video is in its top K every member outside it is below that video in both
  orders, and the answer is exact; captions whose video is outside the top K are left out (the
  lists do not say where it is) and counted apart.

It imports nothing of ours (numpy only): it is the one ``synthetic`` module ``reports`` may import
(tests/test_layers.py). The torch side, stage one and heads scored on a split, is ``synthetic.head_groups``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["group_members", "within_group_accuracy", "ranked_within_group"]


def group_members(video_ids: Sequence[str], by_id: Mapping[str, Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per video (in ``video_ids`` order): its group label (-1 = not in a group) and the attribute its
    group varies; ``by_id``: the manifest's video rows by id (``KeyError`` naming a video it lacks)."""
    group = np.full(len(video_ids), -1, dtype=np.int64)
    varied = np.empty(len(video_ids), dtype=object)
    labels: dict = {}
    for i, vid in enumerate(video_ids):
        rec = by_id.get(vid)
        if rec is None:
            raise KeyError(f"video {vid!r} of the store is not in the manifest's videos.parquet")
        g = rec.get("group_id")
        if g is None or g == "" or (isinstance(g, (int, np.integer)) and g < 0):
            continue
        group[i] = labels.setdefault(g, len(labels))
        varied[i] = rec.get("varied")
    return group, varied


def member_columns(cand: np.ndarray) -> np.ndarray:
    """(Q, G) bool: column j of ``cand`` (each caption's group members, smaller groups padded by
    repeating a member) is a member in its own right, not the padding that repeats an earlier one."""
    cand = np.asarray(cand)
    valid = np.ones(cand.shape, dtype=bool)
    for j in range(1, cand.shape[1]):
        valid[:, j] = ~(cand[:, :j] == cand[:, j:j + 1]).any(axis=1)
    return valid


def within_group_accuracy(scores: Mapping[str, np.ndarray], caps: np.ndarray, cand: np.ndarray,
                          own: np.ndarray, attr: np.ndarray) -> dict[str, dict[str, float]]:
    """``scores[name]`` (Q, G): each caption's score against its group's members ``cand`` (Q, G);
    ``own`` (Q,) column of the right member; ``attr`` (Q,) the varied attribute.
    Returns {name: {attribute: accuracy %, "all": ...}} (strictly highest among the real members
    counts as right; the padding of a smaller group, a repeated member, is not a rival)."""
    out: dict[str, dict[str, float]] = {}
    rival = member_columns(cand) & (np.arange(np.asarray(cand).shape[1])[None, :] != own[:, None])
    for name, s in scores.items():
        pos = s[np.arange(len(own)), own]
        others = np.where(rival, s, -np.inf)
        right = pos > others.max(axis=1)
        res = {a: float(100.0 * right[attr == a].mean()) for a in sorted(set(attr.tolist()))}
        res["all"] = float(100.0 * right.mean())
        out[name] = res
    return out


def ranked_within_group(query_ids: Sequence[str], candidate_ids: Sequence[str], ranks: Sequence[int],
                        stage_one_ranks: Sequence[int], positive: Sequence[bool],
                        by_id: Mapping[str, Mapping[str, Any]],
                        caption_video: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Within-group accuracy of stage one and of the re-ranked order, per varied attribute, from a
    T2V ranked list (one row per query and candidate; ``by_id``: the manifest's video rows by id;
    ``caption_video``: each caption's video, to count the captions left out).

    Returns ``{attribute: {"n": captions, "stage one": %, "re-ranked": %}, ..., "all": {...}}`` and,
    with ``caption_video``, ``"outside top K": {"n": grouped captions whose video is not in their
    top K}``; empty when no caption of the lists belongs to a grouped video.
    """
    per_query: dict[str, list[tuple[str, int, int, bool]]] = defaultdict(list)
    for q, c, r, s, p in zip(query_ids, candidate_ids, ranks, stage_one_ranks, positive):
        per_query[q].append((c, int(r), int(s), bool(p)))
    group_of = {v: rec.get("group_id") for v, rec in by_id.items()
                if rec.get("group_id") not in (None, "") and not (isinstance(rec.get("group_id"), (int, np.integer))
                                                                   and rec.get("group_id") < 0)}
    right: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for rows in per_query.values():
        pos = [row for row in rows if row[3]]
        if not pos:  # the video is outside the top K
            continue
        video, rank, s1_rank, _ = pos[0]
        if video not in group_of:
            continue
        others = [row for row in rows if not row[3] and group_of.get(row[0]) == group_of[video]]
        attr = str(by_id[video].get("varied"))
        right[attr].append((all(s1_rank < o[2] for o in others), all(rank < o[1] for o in others)))
    if not right:
        return {}
    out: dict[str, dict[str, float]] = {}
    for attr in sorted(right):
        hits = np.asarray(right[attr], dtype=bool)
        out[attr] = {"n": int(hits.shape[0]), "stage one": float(100 * hits[:, 0].mean()),
                     "re-ranked": float(100 * hits[:, 1].mean())}
    every = np.asarray([h for v in right.values() for h in v], dtype=bool)
    out["all"] = {"n": int(every.shape[0]), "stage one": float(100 * every[:, 0].mean()),
                  "re-ranked": float(100 * every[:, 1].mean())}
    if caption_video is not None:
        out["outside top K"] = {"n": sum(1 for q, rows in per_query.items() if caption_video.get(q) in group_of
                                         and not any(row[3] for row in rows))}
    return out
