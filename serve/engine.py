"""The engine `serve` answers from: a store's split, stage one, an optional stage-two head and the index, loaded once.

``load_engine`` stages the split (with the token arrays when a head re-ranks), loads the stage one
and the head, opens the index (``workflows.search.open_index``: the exact one is built on first use)
and rebuilds the store's frozen text encoder; an index may also be handed in (a benchmark's synthetic
vectors). ``Engine`` answers a search (stage one from the index, the top ``candidates`` re-ranked by
cosine + head score), a video (its thumbnails with their times, its captions, its nearest videos by
stage one), the queries page (each caption's positive's rank before and after re-ranking, computed on
first request and kept) and a thumbnail's JPEG. An index the store has moved on from still answers
(``workflows.search.index_freshness`` gives the line every page shows); with a head, its videos the
split no longer holds are left out (no tokens to score). One lock serialises the torch and FAISS
work; a video is only ever found by its id in the split's own list, so no request names a file.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import EncoderError, UsageError
from core.metrics import t2v_ranks
from core.urls import redact_url
from heads.evaluation.index import VideoIndex
from heads.evaluation.rerank import rerank, rerank_list
from heads.evaluation.similarity import encode_texts, similarity
from heads.evaluation.sources import head_split
from heads.stage_one.checkpoint import load_stage_one
from heads.stage_two.checkpoint import load_stage_two
from heads.stage_two.scoring import pair_scorer
from heads.training.common import evaluating
from manifests import ManifestError
from pipeline.store import CacheStore, local_path
from pipeline.thumbnails import thumbnail_frames
from reports.inputs import guess_manifest_dir
from workflows.data import caption_texts
from workflows.search import index_freshness, open_index, query_encoder, query_split, stage_one_file
from workflows.workdir import STAGE_ONE_ARRAYS, STAGE_TWO_ARRAYS, WorkDir

MODES = ("stage-one", "reranked")
MAX_K = 100              # results one search may ask for
MAX_QUERY_CHARS = 1000   # longer queries are refused (the encoder keeps the store's text length anyway)
NEAREST = 8              # nearest videos shown on a video's page
THUMBNAIL_CACHE = 4096   # videos whose JPEGs are kept in memory


class NotFoundError(LookupError):
    """A request names a video, thumbnail or page this engine does not have (HTTP 404)."""


class Engine:
    """Answers searches, videos, the queries page and thumbnails from loaded parts (``load_engine``):
    ``data`` the staged split, ``store`` the opened store (thumbnails), ``stage_one`` and ``head`` the loaded
    checkpoints (the head's, ``StageTwoCheckpoint``, optional; ``head_data`` the split as it reads it),
    ``encoder`` the store's text encoder, ``index`` the ``VideoIndex`` searched, ``texts`` the captions' text
    in split row order (or ``None``), ``freshness`` the index's ``index_freshness`` line."""

    def __init__(self, *, data: Any, store: CacheStore, store_url: str, stage_one: Any, encoder: Any,
                 index: VideoIndex, head: Any = None, head_data: Any = None, texts: list[str] | None = None,
                 candidates: int = 15, top: int = 10, device: str = "cpu", batch_size: int = 64,
                 freshness: str | None = None, notes: list[str] | None = None) -> None:
        self.data, self.store, self.store_url = data, store, store_url
        self.stage_one, self.encoder, self.index = stage_one, encoder, index
        self.head, self.head_data, self.texts = head, head_data, texts
        self.candidates, self.top, self.device, self.batch_size = int(candidates), int(top), device, int(batch_size)
        self.freshness, self.notes = freshness, list(notes or [])
        self.split = data.split
        self.row_of = {v: i for i, v in enumerate(data.video_ids)}  # video id -> split row
        store_rows = {v: i for i, v in enumerate(store.video_ids)}
        self.store_row = np.array([store_rows[v] for v in data.video_ids], dtype=np.int64)
        self.split_row = np.array([self.row_of.get(v, -1) for v in index.video_ids], dtype=np.int64)  # index -> split
        self.index_row = {v: i for i, v in enumerate(index.video_ids)}
        self.captions_of: dict[int, list[int]] = {}
        for c, v in enumerate(np.asarray(data.caption_video, dtype=np.int64).tolist()):
            self.captions_of.setdefault(v, []).append(c)
        self.thumbnail_count = int((store.attrs.get("thumbnails") or {}).get("count", 0))
        self._lock = threading.Lock()            # torch and FAISS work, one request at a time
        self._queries_lock = threading.Lock()    # the queries page is computed once
        self._thumbs_lock = threading.Lock()
        self._thumbs: OrderedDict[int, list[bytes]] = OrderedDict()
        self._queries: dict | None = None

    @property
    def has_head(self) -> bool:
        return self.head is not None

    @property
    def default_mode(self) -> str:
        return "reranked" if self.has_head else "stage-one"

    # -- search --------------------------------------------------------------------------------
    def search(self, query: str, k: int | None = None, mode: str | None = None) -> dict:
        """The ``k`` best videos for ``query`` in ``mode`` order, each with its stage-one rank and (with a
        head) its re-ranked rank, and the milliseconds each stage took; ``UsageError`` for a bad request."""
        query, k, mode = self.check_search(query, k, mode)
        ms: dict[str, float] = {}
        with self._lock:
            t0 = time.perf_counter()
            qs = query_split(self.data, self.encoder, [query])
            with evaluating(self.stage_one.head):
                qemb = encode_texts(self.stage_one.head, qs, device=self.device).float().cpu().numpy()
            t1 = time.perf_counter()
            scores, rows = self.index.search(qemb, max(k, self.candidates) if self.has_head else k)
            t2 = time.perf_counter()
            found = rows[0] >= 0  # an approximate index may find fewer
            if self.has_head:  # a stale index's videos the split no longer holds have no tokens to score
                found &= self.split_row[np.maximum(rows[0], 0)] >= 0
            scores, rows = scores[0][found].astype(np.float64), rows[0][found]
            final, order, head_scores = scores, np.arange(rows.size), None
            if self.has_head and rows.size:
                kk = min(self.candidates, rows.size)
                scorer = pair_scorer(self.head.head, head_split(self.head, qs, [query]), batch_size=self.batch_size,
                                     device=self.device, progress=False)
                head_scores = scorer(np.zeros(kk, np.int64), self.split_row[rows[:kk]])
                final, order = rerank_list(scores, head_scores)
            t3 = time.perf_counter()
        ms["text encoder"] = 1000 * (t1 - t0)
        ms["index"] = 1000 * (t2 - t1)
        ms["stage one"] = 1000 * (t2 - t0)
        if self.has_head:
            ms["re-ranking"] = 1000 * (t3 - t2)
        reranked_rank = np.empty(rows.size, np.int64)
        reranked_rank[order] = np.arange(1, rows.size + 1)
        listed = (order if mode == "reranked" else np.arange(rows.size))[:k]
        t4 = time.perf_counter()
        thumbs = self.thumbnails_of([int(self.split_row[rows[j]]) for j in listed])
        ms["thumbnails"] = 1000 * (time.perf_counter() - t4)
        results = []
        for j, n_thumbs in zip(listed.tolist(), (len(t) for t in thumbs)):
            split_row = int(self.split_row[rows[j]])
            head_score = float(head_scores[j]) if head_scores is not None and j < head_scores.size else None
            results.append({"video_id": self.index.video_ids[int(rows[j])],
                            "split": self.split if split_row >= 0 else None,
                            "score": float(final[j] if mode == "reranked" else scores[j]),
                            "stage_one_score": float(scores[j]), "head_score": head_score,
                            "final_score": float(final[j]), "stage_one_rank": j + 1,
                            "reranked_rank": int(reranked_rank[j]) if self.has_head else None,
                            "thumbnails": n_thumbs, "in_store": split_row >= 0})
        ms["total"] = 1000 * (time.perf_counter() - t0)
        return {"query": query, "k": k, "mode": mode, "candidates": min(self.candidates, rows.size)
                if self.has_head else 0, "results": results, "timings_ms": {n: round(v, 2) for n, v in ms.items()}}

    def check_search(self, query: Any, k: Any, mode: Any) -> tuple[str, int, str]:
        """A search request's query, ``k`` and mode, checked (``UsageError`` naming the bad one)."""
        query = (query or "").strip()
        if not query:
            raise UsageError("q: the query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise UsageError(f"q: the query is {len(query)} characters long, at most {MAX_QUERY_CHARS} are taken")
        if k is None or k == "":
            k = self.top
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise UsageError(f"k: must be an integer from 1 to {MAX_K}, got {k!r}") from None
        if not 1 <= k <= MAX_K:
            raise UsageError(f"k: must be an integer from 1 to {MAX_K}, got {k}")
        mode = mode or self.default_mode
        if mode not in MODES:
            raise UsageError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "reranked" and not self.has_head:
            raise UsageError("mode: 'reranked' needs a stage-two head (start serve with --stage-two RUN)")
        return query, k, mode

    # -- videos --------------------------------------------------------------------------------
    def row(self, video_id: str) -> int:
        """The split row of ``video_id`` (``NotFoundError`` when the split has no such video)."""
        row = self.row_of.get(video_id)
        if row is None:
            raise NotFoundError(f"no video {video_id!r} in split {self.split!r} of the store")
        return row

    def video(self, video_id: str) -> dict:
        """A video of the split: its thumbnails (with each one's time in the video), its captions and its
        ``NEAREST`` nearest videos by stage one (the index's cosine)."""
        row = self.row(video_id)
        jpegs = self.thumbnails_of([row])[0]
        times = self.thumbnail_times(row, len(jpegs))
        captions = [{"caption_id": self.data.caption_ids[c], "text": self.texts[c] if self.texts else None}
                    for c in self.captions_of.get(row, [])]
        nearest = []
        at = self.index_row.get(video_id)
        if at is not None:
            with self._lock:
                vector = index_vector(self.index.index, int(at))[None, :]
                scores, rows = self.index.search(vector, NEAREST + 1)
            keep = [(float(s), int(r)) for s, r in zip(scores[0], rows[0]) if r >= 0 and r != at][:NEAREST]
            thumbs = self.thumbnails_of([int(self.split_row[r]) for _, r in keep])
            nearest = [{"video_id": self.index.video_ids[r], "split": self.split if self.split_row[r] >= 0 else None,
                        "score": s, "thumbnails": len(t)} for (s, r), t in zip(keep, thumbs)]
        return {"video_id": video_id, "split": self.split,
                "thumbnails": [{"index": i, "time": t} for i, t in enumerate(times)],
                "captions": captions, "nearest": nearest, "in_index": at is not None}

    def thumbnail_times(self, row: int, count: int) -> list[float | None]:
        """Seconds into the video of each of its ``count`` thumbnails: the sampled frames extraction made
        them from (``pipeline.thumbnails.thumbnail_frames``); ``None`` where the store does not say."""
        frame_time = getattr(self.data, "frame_time", None)
        if frame_time is None or not count:
            return [None] * count
        frames = thumbnail_frames(np.asarray(self.data.frame_mask[row]), self.thumbnail_count or count)
        if frames.size != count:
            return [None] * count
        return [round(float(frame_time[row, f]), 2) for f in frames]

    def thumbnail(self, video_id: str, index: int) -> bytes:
        """The JPEG bytes of thumbnail ``index`` of ``video_id`` (``NotFoundError`` when there is none)."""
        jpegs = self.thumbnails_of([self.row(video_id)])[0]
        if not 0 <= index < len(jpegs):
            raise NotFoundError(f"video {video_id!r} has no thumbnail {index} ({len(jpegs)} in the store)")
        return jpegs[index]

    def thumbnails_of(self, rows: list[int]) -> list[list[bytes]]:
        """The JPEGs of split ``rows`` (an empty list for a row of -1: a video the store does not hold),
        read from the store once and kept for the last ``THUMBNAIL_CACHE`` videos."""
        with self._thumbs_lock:
            missing = sorted({r for r in rows if r >= 0 and r not in self._thumbs})
            if missing:
                for r, jpegs in zip(missing, self.store.thumbnails(self.store_row[missing].tolist())):
                    self._thumbs[r] = jpegs
            for r in rows:
                if r >= 0:
                    self._thumbs.move_to_end(r)
            out = [self._thumbs[r] if r >= 0 else [] for r in rows]
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return out

    # -- the queries page ----------------------------------------------------------------------
    def queries(self) -> dict:
        """Every caption of the split with its video's rank over the whole split by stage one and, with a
        head, after re-ranking the top ``candidates``; computed on the first call and kept."""
        if not len(self.data.caption_ids):
            raise NotFoundError(f"split {self.split!r} has no captions with a known video: no queries page")
        with self._queries_lock:
            if self._queries is None:
                self._queries = self._rank_queries()
        return self._queries

    def _rank_queries(self) -> dict:
        t0 = time.perf_counter()
        cv = np.asarray(self.data.caption_video, dtype=np.int64)
        with self._lock:
            sim = similarity(self.stage_one.head, self.data, device=self.device)
            after = None
            if self.has_head:
                scorer = pair_scorer(self.head.head, self.head_data, batch_size=self.batch_size, device=self.device,
                                     progress=False)
                res = rerank(sim, self.head_data, scorer, k=self.candidates, directions=("t2v",))
                _, before, after = res.positive_ranks("t2v")
            else:
                before = t2v_ranks(sim, cv) + 1
        rows = []
        for c, cid in enumerate(self.data.caption_ids):
            b = int(before[c])
            a = int(after[c]) if after is not None else None
            rows.append({"caption_id": cid, "text": self.texts[c] if self.texts else None,
                         "video_id": self.data.video_ids[int(cv[c])], "stage_one_rank": b, "reranked_rank": a,
                         "change": (b - a) if a is not None else None})
        summary = {"captions": len(rows), "candidates": self.candidates if self.has_head else None,
                   "stage_one_r1": float(np.mean(before == 1)),
                   "reranked_r1": float(np.mean(after == 1)) if after is not None else None,
                   "improved": int(np.sum(before > after)) if after is not None else None,
                   "hurt": int(np.sum(before < after)) if after is not None else None,
                   "seconds": round(time.perf_counter() - t0, 3)}
        return {"split": self.split, "summary": summary, "queries": rows}

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        """What is served: the store, split, stage one, head, index (and whether it still covers the store)."""
        meta = self.index.meta
        return {"store": redact_url(self.store_url), "split": self.split, "videos": len(self.data.video_ids),
                "captions": len(self.data.caption_ids), "texts": self.texts is not None,
                "stage_one": str(self.stage_one.path), "stage_two": str(self.head.path) if self.has_head else None,
                "candidates": self.candidates if self.has_head else None, "top": self.top, "max_k": MAX_K,
                "modes": list(MODES if self.has_head else MODES[:1]), "default_mode": self.default_mode,
                "index": {"kind": self.index.kind, "size": self.index.size,
                          "path": str(self.index.path) if self.index.path else None, "dim": meta.get("dim")},
                "index_freshness": self.freshness, "device": self.device, "notes": self.notes}


def load_engine(work: WorkDir, store: str, stage_one: str | Path, stage_two: str | Path | None = None,
                split: str = "test", index: str | Path | VideoIndex | None = None, candidates: int = 15,
                top: int = 10, encoder: str | None = None, manifest: str | Path | None = None, device: str = "cpu",
                batch_size: int = 64, echo: Any = None) -> Engine:
    """Load everything a search needs once (see the module docstring). ``index``: an ``index build``
    directory (default: the exact index under the work dir, built when missing) or a ``VideoIndex``
    (whose videos need not be the split's: then no head may re-rank them, having no cached tokens)."""
    if candidates < 1:
        raise UsageError(f"--candidates must be >= 1, got {candidates}")
    if not 1 <= top <= MAX_K:
        raise UsageError(f"--top must be from 1 to {MAX_K}, got {top}")
    data = work.stage(store, split, STAGE_TWO_ARRAYS if stage_two else STAGE_ONE_ARRAYS)
    s1 = load_stage_one(stage_one_file(stage_one), expect_encoder_identity=data.encoder_identity)
    freshness = None
    if isinstance(index, VideoIndex):
        vi = index
    else:  # an index the store has moved on from still answers; every page says so
        vi = open_index(work, store, stage_one, split, index, data, device=device, echo=echo, allow_stale=True)
        freshness = index_freshness(vi, store)
    opened = CacheStore.open(store)
    texts, note = split_texts(work, store, data, manifest)
    head = head_data = None
    if stage_two:
        head = load_stage_two(stage_two, expect_encoder_identity=data.encoder_identity)
        if isinstance(index, VideoIndex) and not set(vi.video_ids) <= set(data.video_ids):
            raise UsageError(f"--stage-two: the index given holds videos that split {split!r} of the store does not: "
                             f"a head re-ranks only videos whose tokens the store holds")
        head_data = head_split(head, data, texts)
    return Engine(data=data, store=opened, store_url=store, stage_one=s1,
                  encoder=text_encoder(work, store, data.encoder_identity, encoder, device), index=vi,
                  head=head, head_data=head_data, texts=texts, candidates=candidates, top=top, device=device,
                  batch_size=batch_size, freshness=freshness, notes=[note] if note else [])


def split_texts(work: WorkDir, store: str, data: Any, manifest: str | Path | None) -> tuple[list[str] | None, str | None]:
    """The split's caption texts and, when there are none, a note saying why: from ``manifest`` (errors
    raised), else the work dir's manifest of the store's dataset or the one beside a local store."""
    if manifest:
        return caption_texts(work, data, manifest), None
    dataset = (getattr(data, "store_attrs", None) or {}).get("dataset")
    reason = "no manifest found beside the store or in the work dir"
    for directory in (work.manifest_dir(dataset) if dataset else None, guess_manifest_dir(store)):
        if directory is not None and (directory / "meta.json").is_file():
            try:
                return caption_texts(work, data, directory), None
            except (UsageError, ManifestError) as exc:
                reason = str(exc)
    return None, f"caption texts unknown ({reason}): give --manifest DIR"


def text_encoder(work: WorkDir, store: str, identity: dict, encoder: str | None, device: str) -> Any:
    """The store's frozen text encoder (``workflows.search.query_encoder``); without ``encoder``, local
    weights not under the work dir are also looked for in the work dir of a local store
    (``<dir>/stores/<name>.zarr``: ``<dir>/encoders``), so a store can be served from another work dir."""
    try:
        return query_encoder(work, identity, encoder, device=device)
    except EncoderError as first:
        local = local_path(store)
        home = local.resolve().parent.parent / "encoders" if local is not None else None
        if encoder or home is None or not home.is_dir() or home == work.encoders_dir.resolve():
            raise
        for candidate in sorted(home.rglob("*.pt")):
            try:
                return query_encoder(work, identity, str(candidate), device=device)
            except EncoderError:
                continue
        raise first


def index_vector(index: Any, row: int) -> np.ndarray:
    """The unit vector a FAISS index holds at ``row`` (an IVF index gets its map from rows to cells first)."""
    try:
        return np.asarray(index.reconstruct(row), dtype=np.float32)
    except RuntimeError:
        import faiss

        faiss.extract_index_ivf(index).make_direct_map()
        return np.asarray(index.reconstruct(row), dtype=np.float32)
