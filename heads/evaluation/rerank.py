"""Two-stage retrieval: re-rank each query's stage-one top K with a stage-two head.

Conventions (the same as ``core.metrics``): ``sim`` is the stage-one similarity ``(C, V)``,
captions x videos, higher = better.

* T2V: every caption's ``K`` best videos by ``sim``; V2T: every *captioned* video's ``K`` best
  captions (videos without a caption are not V2T queries, see ``core.metrics``). Ties in ``sim``
  are broken by the lower candidate index (stable sort), so the candidate sets are deterministic.
* Every distinct (caption, video) pair in the union of both candidate sets is scored ONCE by the
  scorer (a stage-two head's score ``h``), in order of (video, caption) so that a batch reads few
  distinct token rows from the memory-mapped split.
* Final score of a candidate = ``sim + h``. Re-ranking only permutes the top K: candidates beyond
  K keep their stage-one score and order. To let ``core.metrics`` rank the full lists, each
  direction gets its own full matrix in which a query's top-K entries are *lifted*:
  ``offset + sim + h`` with ``offset = (max(sim) - min(sim)) + max(0, -min(h)) + 1`` (one constant
  per matrix), so every re-ranked entry is above every other entry of that matrix by at least 1,
  while the order among the K lifted entries is that of ``sim + h``. T2V metrics are computed on
  the T2V matrix (rows), V2T on the V2T matrix (columns); a row (column) only ever holds its own
  query's lifted entries, so the two never interfere.
* Stage one's ``R@K`` (the share of queries whose positive is in the top K) is reported next to
  R@1/5/10: re-ranking cannot fix a query whose positive is outside the top K, so
  ``re-ranked R@K == stage-one R@K`` (up to ties at the K-th place, which metrics count against
  the query while candidate selection breaks them by index).
* ``dsl=True`` (dual softmax, ``heads.evaluation.postprocess.dual_softmax``): stage one is reported on
  ``dual_softmax(sim)``. For the re-ranked result the natural final score matrix of each direction
  (``sim + h`` on that direction's candidates, ``sim`` elsewhere) goes through ``dual_softmax``;
  the candidate sets stay the ones chosen by the raw stage-one ``sim``, so the top K are still
  lifted above the rest and only their order (and the order of the rest) follows the
  post-processed scores. DSL needs every query at once, which an offline evaluation has.

Outputs (``write_outputs``): ``ranked_t2v.parquet`` / ``ranked_v2t.parquet`` with the K re-ranked
candidates of every query (positions beyond K are the stage-one order: ``sim`` alone ranks them),
``positive_ranks.parquet`` (every query's positive's rank over the whole split, before and after),
``metrics.json`` (stage one vs re-ranked, T2V and V2T), ``metrics.txt`` (the printed table) and
``run.json`` (K, pair count, timings, identities).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from core.fileio import write_json, write_text
from core.metrics import (DEFAULT_KS, check_finite, format_table, metrics_to_json, ranks_to_metrics, split_title,
                          t2v_ranks, v2t_ranks)
from core.split import Split
from core.urls import redact_urls
from heads.evaluation.postprocess import dual_softmax

DEFAULT_K = 15
DIRECTIONS = ("t2v", "v2t")

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------ candidates
def top_k(scores: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """(Q, k') column indices of each row's ``k' = min(k, N)`` highest scores, best first.

    Ties are broken by the lower column index (a stable sort of the negated scores), so the result
    does not depend on the platform or on ``block`` (rows sorted per block to bound memory).
    """
    s = check_finite(scores, "stage-one similarity")
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    kk = min(int(k), s.shape[1])
    out = np.empty((s.shape[0], kk), dtype=np.int64)
    for start in range(0, s.shape[0], block):
        part = s[start:start + block]
        out[start:start + block] = np.argsort(-part, axis=1, kind="stable")[:, :kk]
    return out


def v2t_query_videos(caption_video: np.ndarray, num_videos: int) -> np.ndarray:
    """Videos with at least one caption (the V2T queries), ascending."""
    cv = np.asarray(caption_video, dtype=np.int64)
    return np.flatnonzero(np.bincount(cv, minlength=num_videos) > 0)


def unique_pairs(t2v_cand: np.ndarray | None, v2t_videos: np.ndarray | None,
                 v2t_cand: np.ndarray | None, num_videos: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (caption, video) pairs of both candidate sets, sorted by (video, caption)."""
    keys = []
    if t2v_cand is not None:
        caps = np.repeat(np.arange(t2v_cand.shape[0], dtype=np.int64), t2v_cand.shape[1])
        keys.append(caps * num_videos + t2v_cand.reshape(-1))
    if v2t_cand is not None:
        assert v2t_videos is not None
        vids = np.repeat(np.asarray(v2t_videos, dtype=np.int64), v2t_cand.shape[1])
        keys.append(v2t_cand.reshape(-1) * num_videos + vids)
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq = np.unique(np.concatenate(keys))
    caps, vids = np.divmod(uniq, num_videos)
    order = np.lexsort((caps, vids))
    return caps[order], vids[order]


def _lookup(pair_caps: np.ndarray, pair_vids: np.ndarray, scores: np.ndarray, num_videos: int,
            caps: np.ndarray, vids: np.ndarray) -> np.ndarray:
    """Scores of the pairs (caps, vids) (any shape) from the scored pair list."""
    keys = pair_caps * num_videos + pair_vids
    order = np.argsort(keys)
    want = (np.asarray(caps, np.int64) * num_videos + np.asarray(vids, np.int64)).reshape(-1)
    pos = order[np.searchsorted(keys, want, sorter=order)]
    if not np.array_equal(keys[pos], want):
        raise AssertionError("a candidate pair was not scored")
    return scores[pos].reshape(np.shape(caps))


def rerank_list(scores: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query's stage-one list (``scores``, best first) with its first ``K = len(head)`` entries
    re-ranked by ``scores + head`` (ties keep stage one's order) and the rest in their own order:
    ``(final scores, positions into the list in the new order)``, the rule of the module docstring
    for a single candidate list (a search's, from an index)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    head = np.asarray(head, dtype=np.float64).reshape(-1)
    k = head.size
    if k > scores.size:
        raise ValueError(f"{k} head scores for a list of {scores.size} candidates")
    final = scores.copy()
    final[:k] += head
    order = np.concatenate([np.argsort(-final[:k], kind="stable"), np.arange(k, scores.size)])
    return final, order


# ------------------------------------------------------------------------------ matrices
def lift(base: np.ndarray, rows: np.ndarray, cols: np.ndarray, extra: np.ndarray | float = 0.0) -> np.ndarray:
    """Full float64 copy of ``base`` with the entries ``(rows, cols)`` set to ``offset + base + extra``.

    ``offset = (max(base) - min(base)) + max(0, -min(extra)) + 1``: every lifted entry then exceeds
    every entry of ``base`` by at least 1, and lifted entries keep the order of ``base + extra``.
    """
    out = np.array(base, dtype=np.float64, copy=True)
    vals = out[rows, cols] + np.asarray(extra, dtype=np.float64)
    if out.size == 0:
        return out
    low = float(np.min(extra)) if np.size(extra) else 0.0
    offset = float(out.max() - out.min()) + max(0.0, -low) + 1.0
    out[rows, cols] = offset + vals
    return out


def _dual_softmax(sim: np.ndarray, temperature: float | None, direction: str) -> np.ndarray:
    """``dual_softmax`` for one ranking direction (T2V: prior = softmax over the captions; V2T: over
    the videos); C x V in and out, float64."""
    kwargs = {} if temperature is None else {"temperature": float(temperature)}
    m = np.asarray(dual_softmax(np.asarray(sim), direction=direction, **kwargs), dtype=np.float64)
    if m.shape != np.shape(sim):
        raise ValueError(f"dual_softmax returned a {direction} matrix of shape {m.shape} for input {np.shape(sim)}")
    return m


def _final_scores(sim: np.ndarray, rows: np.ndarray, cols: np.ndarray, head: np.ndarray, direction: str,
                  dsl: bool, temperature: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One direction's (stage-one ranking matrix, final scores of its candidates ``(rows, cols)``, full
    ranking matrix with the candidates lifted): ``sim + head``, or its dual softmax with ``dsl``."""
    stage_one = _dual_softmax(sim, temperature, direction) if dsl else sim
    if dsl:
        final = np.array(sim, dtype=np.float64)
        final[rows, cols] += head
        post = _dual_softmax(final, temperature, direction)
        return stage_one, post[rows, cols], lift(post, rows, cols)
    return stage_one, sim[rows, cols].astype(np.float64) + head, lift(sim, rows, cols, head)


# ------------------------------------------------------------------------------ result
@dataclass
class RerankResult:
    """Candidates, head scores and full ranking matrices of one re-ranking run."""

    k: int
    sim: np.ndarray  # (C, V) stage one
    caption_video: np.ndarray  # (C,)
    t2v_candidates: np.ndarray | None = None  # (C, K) video rows, stage-one order
    t2v_head: np.ndarray | None = None  # (C, K) head scores of those pairs
    t2v_final: np.ndarray | None = None  # (C, K) final scores (sim + h, or post-processed)
    v2t_videos: np.ndarray | None = None  # (V',) query video rows
    v2t_candidates: np.ndarray | None = None  # (V', K) caption rows, stage-one order
    v2t_head: np.ndarray | None = None  # (V', K)
    v2t_final: np.ndarray | None = None  # (V', K)
    t2v_matrix: np.ndarray | None = None  # (C, V) re-ranked ranking matrix (lifted top K)
    v2t_matrix: np.ndarray | None = None  # (C, V)
    stage_one_t2v: np.ndarray | None = None  # (C, V) stage-one ranking matrix (DSL'd when dsl)
    stage_one_v2t: np.ndarray | None = None
    dsl: bool = False
    num_pairs: int = 0
    num_candidates: int = 0
    seconds: dict = field(default_factory=dict)

    def ks(self) -> tuple[int, ...]:
        """R@k cut-offs reported: 1, 5, 10 and K."""
        return tuple(DEFAULT_KS) + (() if self.k in DEFAULT_KS else (self.k,))

    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{"stage one": {"t2v": ..., "v2t": ...}, "re-ranked": {...}}`` (directions that ran)."""
        ks = self.ks()
        out: dict[str, dict[str, dict[str, float]]] = {"stage one": {}, "re-ranked": {}}
        if self.t2v_matrix is not None:
            out["stage one"]["t2v"] = ranks_to_metrics(t2v_ranks(self.stage_one_t2v, self.caption_video), ks)
            out["re-ranked"]["t2v"] = ranks_to_metrics(t2v_ranks(self.t2v_matrix, self.caption_video), ks)
        if self.v2t_matrix is not None:
            out["stage one"]["v2t"] = ranks_to_metrics(v2t_ranks(self.stage_one_v2t, self.caption_video), ks)
            out["re-ranked"]["v2t"] = ranks_to_metrics(v2t_ranks(self.v2t_matrix, self.caption_video), ks)
        return out

    def positive_ranks(self, direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(query rows, stage-one ranks, re-ranked ranks)`` of ``direction``'s queries: the 1-based
        rank of each query's positive over the whole split, as the metrics count it (T2V: every
        caption; V2T: every captioned video, its best caption)."""
        if direction == "t2v" and self.t2v_matrix is not None:
            queries = np.arange(self.caption_video.size)
            before = t2v_ranks(self.stage_one_t2v, self.caption_video)
            after = t2v_ranks(self.t2v_matrix, self.caption_video)
        elif direction == "v2t" and self.v2t_matrix is not None:
            queries = v2t_query_videos(self.caption_video, self.sim.shape[1])
            before = v2t_ranks(self.stage_one_v2t, self.caption_video)
            after = v2t_ranks(self.v2t_matrix, self.caption_video)
        else:
            raise ValueError(f"direction {direction!r} was not re-ranked")
        return queries, before + 1, after + 1

    def side_by_side(self, metrics: Mapping | None = None) -> dict[str, dict[str, float]]:
        """Flat rows ``"t2v stage one"``, ``"t2v re-ranked"``, ``"v2t ..."`` for ``format_table``."""
        m = self.metrics() if metrics is None else metrics
        rows: dict[str, dict[str, float]] = {}
        for d in DIRECTIONS:
            for name in ("stage one", "re-ranked"):
                if d in m.get(name, {}):
                    rows[f"{d} {name}"] = m[name][d]
        return rows


def rerank(
    sim: np.ndarray,
    split: Split,
    scorer: PairScorer,
    k: int = DEFAULT_K,
    directions: Sequence[str] = DIRECTIONS,
    dsl: bool = False,
    dsl_temperature: float | None = None,
    t2v_candidates: np.ndarray | None = None,
) -> RerankResult:
    """Re-rank the stage-one top ``k`` of every query (see the module docstring).

    ``sim``: (C, V) stage-one similarities of ``split``'s captions and videos; ``scorer(caption_rows,
    video_rows) -> scores`` scores pairs (``heads.stage_two.scoring.pair_scorer`` runs a stage-two
    head on the split's cached tokens). ``t2v_candidates`` (C, K) video rows, best first: the T2V
    candidate lists from elsewhere (a vector index, ``heads.evaluation.index``) in place of ``sim``'s
    top K; ``sim`` still ranks everything beyond them for the metrics.
    """
    t_start = time.perf_counter()
    sim = check_finite(sim, "stage-one similarity")
    cv = np.asarray(split.caption_video, dtype=np.int64)
    num_c, num_v = sim.shape
    if cv.shape != (num_c,) or num_v != len(split.video_ids):
        raise ValueError(f"stage-one similarity has shape {sim.shape} but split {split.split!r} has "
                         f"{cv.shape[0]} captions and {len(split.video_ids)} videos")
    bad = set(directions) - set(DIRECTIONS)
    if bad or not directions:
        raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {list(directions)}")
    res = RerankResult(k=int(k), sim=sim, caption_video=cv, dsl=bool(dsl))
    t0 = time.perf_counter()
    if "t2v" in directions and t2v_candidates is not None:
        cand = np.asarray(t2v_candidates, dtype=np.int64)
        if cand.shape != (num_c, min(int(k), num_v)) or (cand < 0).any() or (cand >= num_v).any():
            raise ValueError(f"T2V candidate lists of shape {cand.shape} (rows {cand.min(initial=0)}.."
                             f"{cand.max(initial=0)}) for {num_c} captions, K={k} and {num_v} videos: every query "
                             f"needs K distinct video rows (an approximate index may find fewer: search wider)")
        if (np.sort(cand, axis=1)[:, 1:] == np.sort(cand, axis=1)[:, :-1]).any():
            raise ValueError("T2V candidate lists repeat a video within a query")
        res.t2v_candidates = cand
    elif "t2v" in directions:
        res.t2v_candidates = top_k(sim, k)
    if "v2t" in directions:
        res.v2t_videos = v2t_query_videos(cv, num_v)
        res.v2t_candidates = top_k(sim[:, res.v2t_videos].T, k)
    res.seconds["candidates"] = time.perf_counter() - t0

    caps, vids = unique_pairs(res.t2v_candidates, res.v2t_videos, res.v2t_candidates, num_v)
    res.num_pairs = int(caps.size)
    res.num_candidates = int(sum(c.size for c in (res.t2v_candidates, res.v2t_candidates) if c is not None))
    t0 = time.perf_counter()
    scores = np.asarray(scorer(caps, vids), dtype=np.float32).reshape(-1) if caps.size else np.zeros(0, np.float32)
    if scores.shape != caps.shape:
        raise ValueError(f"the scorer returned {scores.shape} scores for {caps.size} pairs")
    res.seconds["scoring"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if res.t2v_candidates is not None:
        cand = res.t2v_candidates
        rows = np.broadcast_to(np.arange(num_c)[:, None], cand.shape)
        res.t2v_head = _lookup(caps, vids, scores, num_v, rows, cand)
        res.stage_one_t2v, res.t2v_final, res.t2v_matrix = _final_scores(sim, rows, cand, res.t2v_head, "t2v",
                                                                          dsl, dsl_temperature)
    if res.v2t_candidates is not None:
        cand = res.v2t_candidates  # caption rows
        cols = np.broadcast_to(res.v2t_videos[:, None], cand.shape)
        res.v2t_head = _lookup(caps, vids, scores, num_v, cand, cols)
        res.stage_one_v2t, res.v2t_final, res.v2t_matrix = _final_scores(sim, cand, cols, res.v2t_head, "v2t",
                                                                          dsl, dsl_temperature)
    res.seconds["matrices"] = time.perf_counter() - t0
    res.seconds["total"] = time.perf_counter() - t_start
    return res


# ------------------------------------------------------------------------------ outputs
def ranked_table(res: RerankResult, split: Split, direction: str):
    """``pyarrow.Table`` of the re-ranked top K of every query in ``direction``.

    Columns: query_id, query_index, rank (1-based, final order), candidate_id, candidate_index,
    stage_one_rank (1-based), stage_one_score, head_score, final_score (``sim + h``; the
    post-processed value with DSL), positive.
    """
    import pyarrow as pa

    if direction == "t2v":
        cand, head_s, final = res.t2v_candidates, res.t2v_head, res.t2v_final
        if cand is None:
            raise ValueError("direction 't2v' was not re-ranked")
        queries = np.arange(res.sim.shape[0])
        s1 = np.take_along_axis(res.sim, cand, axis=1)
        qids, cids = list(split.caption_ids), list(split.video_ids)
        positive = cand == res.caption_video[:, None]
    elif direction == "v2t":
        cand, head_s, final = res.v2t_candidates, res.v2t_head, res.v2t_final
        if cand is None:
            raise ValueError("direction 'v2t' was not re-ranked")
        queries = res.v2t_videos
        s1 = res.sim[cand, queries[:, None]]
        qids, cids = list(split.video_ids), list(split.caption_ids)
        positive = res.caption_video[cand] == queries[:, None]
    else:
        raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}")
    q, kk = cand.shape
    order = np.argsort(-final, axis=1, kind="stable")  # ties: stage-one order
    take = lambda a: np.take_along_axis(np.asarray(a), order, axis=1)  # noqa: E731
    cand_o = take(cand)
    qi = np.repeat(queries, kk)
    return pa.table({
        "query_id": pa.array([qids[i] for i in qi], pa.string()),
        "query_index": pa.array(qi, pa.int64()),
        "rank": pa.array(np.tile(np.arange(1, kk + 1), q), pa.int32()),
        "candidate_id": pa.array([cids[i] for i in cand_o.reshape(-1)], pa.string()),
        "candidate_index": pa.array(cand_o.reshape(-1), pa.int64()),
        "stage_one_rank": pa.array(take(np.broadcast_to(np.arange(1, kk + 1), (q, kk))).reshape(-1), pa.int32()),
        "stage_one_score": pa.array(take(s1).reshape(-1).astype(np.float32), pa.float32()),
        "head_score": pa.array(take(head_s).reshape(-1).astype(np.float32), pa.float32()),
        "final_score": pa.array(take(final).reshape(-1), pa.float64()),
        "positive": pa.array(take(positive).reshape(-1), pa.bool_()),
    })



def write_outputs(res: RerankResult, split: Split, out_dir: str | Path, meta: Mapping | None = None,
                  title: str | None = None, coverage: Mapping | None = None) -> tuple[dict[str, Path], str]:
    """Write the ranked lists (Parquet), ``metrics.json``, ``metrics.txt`` and ``run.json``.
    ``coverage`` (``core.split.check_complete``'s entry) goes into ``metrics.json`` as ``"split"``
    and heads the table.

    Also ``positive_ranks.parquet``: per direction and query, the 1-based rank of its positive over
    the whole split before and after re-ranking (direction, query_id, query_index, stage_one_rank,
    reranked_rank), from which the metrics (and a report's recall curve) follow.

    ``meta`` goes into ``run.json``, every URL in it without credentials or signed query
    (``core.urls.redact_url``).

    Returns ``({"t2v": path, "v2t": path, "ranks": path, "metrics": path, "table": path, "run": path},
    table)``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for d in DIRECTIONS:
        cand = res.t2v_candidates if d == "t2v" else res.v2t_candidates
        if cand is None:
            continue
        paths[d] = out / f"ranked_{d}.parquet"
        pq.write_table(ranked_table(res, split, d), paths[d])
    ranks = []
    for d in DIRECTIONS:
        if (res.t2v_candidates if d == "t2v" else res.v2t_candidates) is None:
            continue
        queries, before, after = res.positive_ranks(d)
        ids = list(split.caption_ids) if d == "t2v" else list(split.video_ids)
        ranks.append(pa.table({"direction": pa.array([d] * queries.size, pa.string()),
                               "query_id": pa.array([ids[i] for i in queries], pa.string()),
                               "query_index": pa.array(queries, pa.int64()),
                               "stage_one_rank": pa.array(before, pa.int64()),
                               "reranked_rank": pa.array(after, pa.int64())}))
    if ranks:
        paths["ranks"] = out / "positive_ranks.parquet"
        pq.write_table(pa.concat_tables(ranks), paths["ranks"])
    metrics = res.metrics()
    table = split_title(coverage) + format_table(res.side_by_side(metrics))
    if title:
        table = f"{title}\n{table}"
    paths["metrics"] = out / "metrics.json"
    write_text(paths["metrics"], metrics_to_json({**metrics, "split": dict(coverage)} if coverage else metrics) + "\n")
    paths["table"] = out / "metrics.txt"
    write_text(paths["table"], table + "\n")
    run = {"split": str(split.split), "k": res.k, "dsl": res.dsl, "num_captions": int(res.sim.shape[0]),
           "num_videos": int(res.sim.shape[1]), "candidates": res.num_candidates,
           "pairs_scored": res.num_pairs, "seconds": {k: round(v, 3) for k, v in res.seconds.items()},
           **dict(meta or {})}
    paths["run"] = out / "run.json"
    write_json(paths["run"], redact_urls(run))  # a store URL without its credentials
    return paths, table
