"""Stage one over a whole collection: build a FAISS index of a split's stage-one video embeddings
(``index build``), grow it with its store (``index add``), search it with new text queries encoded by
the store's own frozen encoder, optionally re-ranking each query's candidates with a stage-two head
(``search``).

Index directories go to ``<work>/indexes/<store fingerprint[:12]>-<split>-<stage one sha256[:12]>-<kind>``
unless given; ``search`` builds the exact one there when it is missing.

What an index covers (index.json ``covers``, ``store_covers``): the store's digest and manifest version
when it was built, and for each video shard holding indexed rows (in index order) ``[shard, videos,
record sha256, inputs sha256]``: the sha256 of the shard's checksum record, and, for a shard without a
record or the store's partial last shard (the one shard an append reopens and rewrites), the sha256 of
the stage-one inputs (``frame_emb``, ``frame_mask``) of its indexed rows. An index can grow
(``index_growth``) when the store is its store or a grown version of it (its manifest history holds the
indexed version, and the fingerprint at that version is the index's), the split's committed videos start
with the indexed ones in their order, and each indexed shard is unchanged: the same record, or else the
same inputs. Anything else (a shard repaired or rewritten, a video gone or new among the indexed ones)
asks for ``index build``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.errors import StoreError, StoreMismatchError, UsageError
from core.fileio import sha256_file, write_json
from core.split import StagedSplit
from core.urls import redact_url
from heads.evaluation.index import VideoIndex, build_index, index_lock, is_index_dir, load_index, save_index, set_threads
from heads.evaluation.similarity import encode_texts, encode_videos
from heads.evaluation.sources import load_head
from heads.stage_one.checkpoint import CHECKPOINT_NAME, load_stage_one
from heads.training.common import checkpoint_file, evaluating
from heads.stage_two.scoring import score_pairs
from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

RECALL_QUERIES = 2000  # captions of the split an approximate index's recall is measured on


def stage_one_file(path: str | Path) -> Path:
    """The stage-one checkpoint file of ``path`` (a file or its run directory)."""
    return checkpoint_file(path, CHECKPOINT_NAME, "stage-one")


def default_index_dir(work: WorkDir, store_fingerprint: str, split: str, stage_one: str | Path,
                      kind: str = "flat") -> Path:
    return work.index_dir(f"{store_fingerprint[:12]}-{split}-{sha256_file(stage_one_file(stage_one))[:12]}-{kind}")


def build_video_index(work: WorkDir, store: str, stage_one: str | Path, split: str = "test", kind: str = "flat",
                      options: dict | None = None, out: str | Path | None = None, device: str = "cpu",
                      threads: int | None = None, seed: int = 0) -> VideoIndex:
    """Encode every extracted video of ``split`` with the stage-one head, index the unit embeddings
    (``heads.evaluation.index``) and save the index directory with what it covers of the store
    (``store_covers``); an approximate kind's recall@10/@100 against exact search is measured on (up
    to 2000 of) the split's captions and kept in index.json."""
    from pipeline.store import CacheStore

    set_threads(threads)
    data = work.stage(store, split)
    s1_path = stage_one_file(stage_one)
    ckpt = load_stage_one(s1_path, expect_encoder_identity=data.encoder_identity)
    queries = None
    with evaluating(ckpt.head):
        videos = encode_videos(ckpt.head, data, device=device).float().cpu().numpy()
        if kind != "flat" and len(data.caption_ids):
            queries = encode_texts(ckpt.head, data, slice(0, RECALL_QUERIES), device=device).float().cpu().numpy()
    s = CacheStore.open(store)
    rows, ids = split_videos(s, split)
    if ids != data.video_ids or s.fingerprint != data.store_fingerprint:
        raise StoreError(f"{redact_url(store)} changed while its split {split!r} was indexed: run `index build` again")
    meta = {"split": split, "store": redact_url(store), "store_fingerprint": data.store_fingerprint,
            "encoder_identity": data.encoder_identity, "coverage": dict(data.coverage),
            "covers": store_covers(s, rows, staged_inputs(data)),
            "stage_one": {"path": str(s1_path), "sha256": sha256_file(s1_path), "head": ckpt.config.get("name")}}
    vi = build_index(videos, data.video_ids, kind, options, meta=meta, recall_queries=queries, seed=seed)
    path = Path(out) if out else default_index_dir(work, data.store_fingerprint, split, s1_path, kind)
    path.mkdir(parents=True, exist_ok=True)
    with index_lock(path):
        save_index(vi, path)
    return vi


# -- what an index covers of its store, and growing it with the store ------------------------------
def split_videos(s: Any, split: str) -> tuple[np.ndarray, list[str]]:
    """The committed videos of ``split`` in store ``s`` (a ``CacheStore``) as a staged split holds them:
    ``(store rows, video ids)`` (none when the store has no video of the split)."""
    try:
        rows = s.split_rows(split)[0]
    except StoreError:
        return np.zeros(0, np.int64), []
    ids = s.video_ids
    return rows, [ids[int(r)] for r in rows]


def _inputs_sha256(frame_emb: np.ndarray, frame_mask: np.ndarray) -> str:
    """sha256 of the stage-one inputs of some videos (their frame embeddings and masks, as float32 / bool)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(frame_emb, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(frame_mask, dtype=bool).tobytes())
    return h.hexdigest()


def record_sha256(s: Any, shard: int) -> str | None:
    """sha256 of video shard ``shard``'s checksum record (``None``: none recorded)."""
    from pipeline.integrity import record_key

    data = s.read_object(record_key("videos", shard))
    return None if data is None else hashlib.sha256(data).hexdigest()


def shard_runs(s: Any, rows: np.ndarray) -> list[tuple[int, int, int]]:
    """``(shard, first position, count)`` of each video shard holding some of ``rows`` (sorted store rows)."""
    shards = np.asarray(rows, np.int64) // int(s.shard_size)
    if not len(shards):
        return []
    starts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist()]
    ends = [*starts[1:], len(shards)]
    return [(int(shards[a]), a, b - a) for a, b in zip(starts, ends)]


def staged_inputs(data: StagedSplit) -> Callable[[slice, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Stage-one inputs of the split positions ``sl`` read from a staged split (``rows`` unused)."""
    return lambda sl, rows: (data.frame_emb[sl], data.frame_mask[sl])


def store_inputs(s: Any) -> Callable[[slice, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Stage-one inputs of the store rows ``rows`` (of one shard) read from the store itself."""
    def read(sl: slice, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        pick = np.asarray(rows, np.int64) - lo
        return (np.asarray(s.array("videos/frame_emb")[lo:hi])[pick],
                np.asarray(s.array("videos/frame_mask")[lo:hi])[pick])
    return read


def store_covers(s: Any, rows: np.ndarray, inputs: Callable[[slice, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> dict:
    """What an index of the store rows ``rows`` (in index order) covers of store ``s`` (module docstring);
    ``inputs(positions, rows)`` reads the stage-one inputs of index positions ``positions`` (store rows
    ``rows``)."""
    from pipeline.integrity import store_digest

    shards = []
    for shard, start, count in shard_runs(s, rows):
        lo, hi = s.shard_range(shard)
        record = record_sha256(s, shard)
        sha = None
        if record is None or hi - lo < s.shard_size:  # unrecorded, or the partial last shard an append reopens
            sha = _inputs_sha256(*inputs(slice(start, start + count), rows[start:start + count]))
        shards.append([shard, count, record, sha])
    return {"store_digest": store_digest(s), "shard_size": int(s.shard_size),
            "manifest": {"manifest_sha256": s.attrs.get("manifest_sha256"), "num_videos": int(s.num_videos),
                         "num_captions": int(s.num_captions)},
            "video_shards": shards}


def lineage_problem(meta: dict, attrs: dict) -> str:
    """Why a store with root attributes ``attrs`` is neither the store an index (index.json ``meta``)
    was built from nor a grown version of it ("" when it is one of them)."""
    from pipeline.store import fingerprint_of

    have = str(meta.get("store_fingerprint"))
    now = fingerprint_of(attrs)
    if now == have:
        return ""
    version = ((meta.get("covers") or {}).get("manifest") or {}).get("manifest_sha256")
    history = [h.get("manifest_sha256") for h in attrs.get("manifest_history") or []]
    if version and version in history and fingerprint_of({**attrs, "manifest_sha256": version}) == have:
        return ""
    return (f"built from store {have[:12]}, and the store (fingerprint {now[:12]}) is neither it nor a grown "
            f"version of it")


@dataclass
class Growth:
    """How a store moved on from what an index covers (``index_growth``)."""

    store: Any                 # the CacheStore, opened read-only
    rows: np.ndarray           # the split's committed videos now: store rows, in order
    ids: list[str]             # ... and their ids
    indexed: int               # videos the index holds (the first of ``ids`` when there is no problem)
    problem: str = ""          # why the index cannot simply grow ("" when it can)
    other_store: bool = False  # the store is not the index's, nor a grown version of it

    @property
    def new(self) -> int:
        """Videos to add (0 when there is a problem)."""
        return 0 if self.problem else len(self.ids) - self.indexed


def index_growth(vi: VideoIndex, store: str) -> Growth:
    """Compare index ``vi`` with what ``store`` now holds of its split (module docstring)."""
    from pipeline.store import CacheStore

    s = CacheStore.open(store)
    split = str(vi.meta.get("split"))
    rows, ids = split_videos(s, split)
    n = len(vi.video_ids)
    g = Growth(s, rows, ids, n)
    g.problem = lineage_problem(vi.meta, s.attrs)
    if g.problem:
        g.other_store = True
        return g
    covers = vi.meta.get("covers")
    if ids[:n] != vi.video_ids:
        now = set(ids)
        gone = [v for v in vi.video_ids if v not in now]
        first = next((a for a, b in zip(ids, vi.video_ids) if a != b), None)
        g.problem = (f"{len(gone):,} of its videos are not committed in the store's split now (first: {gone[0]!r}; "
                     f"a repair or an extraction under way?)" if gone else
                     f"the split gained videos among the indexed ones (first: {first!r}), not only after them")
    elif not covers:
        if len(ids) > n or s.fingerprint != vi.meta.get("store_fingerprint"):
            g.problem = "its index.json records no coverage of the store (an index built before `index add`)"
    elif [(e[0], e[1]) for e in covers.get("video_shards", [])] != [(a, c) for a, _, c in shard_runs(s, rows[:n])]:
        g.problem = "its videos lie in other shards of the store than when it was built"
    else:
        read = store_inputs(s)
        for (shard, start, count), (_, _, record, sha) in zip(shard_runs(s, rows[:n]), covers["video_shards"]):
            if record is not None and record_sha256(s, shard) == record:
                continue
            if sha is not None and _inputs_sha256(*read(slice(start, start + count), rows[start:start + count])) == sha:
                continue
            g.problem = (f"video shard {shard} was rewritten since it was indexed (a repair or a retry?) and the "
                         f"stage-one inputs of its indexed videos "
                         + ("differ" if sha is not None else "were not recorded to compare"))
            break
    return g


def _short(digest: str | None) -> str:
    return f"{digest[:12]}..." if digest else "none"


def rebuild_command(vi: VideoIndex, store: str) -> str:
    """The `index build` command line that makes ``vi`` again from ``store``."""
    s1 = (vi.meta.get("stage_one") or {}).get("path", "RUN")
    return (f"python cli.py index build --store {redact_url(store)} --stage-one {s1} --split {vi.meta.get('split')} "
            f"--kind {vi.kind}" + (f" --out {vi.path}" if vi.path else ""))


def index_freshness(vi: VideoIndex, store: str) -> str | None:
    """``None`` when index ``vi`` covers what ``store`` now holds of its split; otherwise one line saying
    what moved on and what to run (``index add`` when the store only grew, else ``index build``).
    Reads the split's rows, the checksum records of the indexed shards and, when something moved, the
    store digest."""
    from pipeline.integrity import store_digest

    g = index_growth(vi, store)
    if not g.problem and not g.new:
        return None
    where, split = vi.path or "(not saved)", vi.meta.get("split")
    if g.other_store:
        return f"index {where} was {g.problem}: build one for it with `python cli.py index build`"
    moved = (f"store digest {_short((vi.meta.get('covers') or {}).get('store_digest'))} -> "
             f"{_short(store_digest(g.store))}")
    if g.problem:
        return (f"index {where} no longer matches the store's {split} videos ({moved}): {g.problem}; rebuild it: "
                f"`{rebuild_command(vi, store)}`")
    return (f"index {where} covers {g.indexed:,} of the store's {len(g.ids):,} {split} videos ({moved}): run "
            f"`python cli.py index add --index {where}`")


def open_index(work: WorkDir, store: str, stage_one: str | Path, split: str, index: str | Path | None,
               data: StagedSplit, nprobe: int | None = None, ef_search: int | None = None, device: str = "cpu",
               echo: Any = None, allow_stale: bool = False) -> VideoIndex:
    """The index ``index`` (or the default exact one, built now when missing), checked against
    ``data`` (the split it must hold) and the stage one. ``allow_stale``: an index of an earlier
    version of the store (``lineage_problem``) whose videos differ from the split's now is taken as it
    is (``search`` answers from it and prints ``index_freshness``)."""
    s1 = stage_one_file(stage_one)
    path = Path(index) if index else default_index_dir(work, data.store_fingerprint, split, s1)
    if index is None and not is_index_dir(path):
        if echo:
            echo(f"building the exact index of split {split!r}: {path}")
        build_video_index(work, store, s1, split=split, out=path, device=device)
    vi = load_index(path, nprobe=nprobe, ef_search=ef_search)
    if not allow_stale:
        vi.check(store_fingerprint=data.store_fingerprint, split=split, stage_one_sha256=sha256_file(s1),
                 video_ids=data.video_ids)
        return vi
    vi.check(split=split, stage_one_sha256=sha256_file(s1))
    problem = lineage_problem(vi.meta, data.store_attrs)
    if problem:
        raise StoreMismatchError(f"{path} was {problem}; build one with `python cli.py index build`")
    return vi


def query_split(data: StagedSplit, encoder: Any, queries: Sequence[str]) -> StagedSplit:
    """``data``'s videos with the ``queries`` as its captions, encoded by the store's frozen encoder
    (text tokens cut to the store's length), so that stage one and a stage-two head read them as
    they read the store's own captions."""
    import torch

    max_tokens = int(data.store_attrs.get("max_text_tokens") or
                     (data.text_tokens.shape[1] if data.text_tokens is not None else 32))
    with torch.no_grad():
        tokens, mask, emb = encoder.encode_texts(list(queries), max_tokens=max_tokens)
    return replace(data, caption_ids=[f"query-{i}" for i in range(len(queries))],
                   caption_video=np.zeros(len(queries), np.int64), text_emb=emb.float().cpu().numpy(),
                   text_tokens=tokens.float().cpu().numpy(), text_mask=mask.cpu().numpy(),
                   text_ids=None, text_ids_mask=None)


def query_encoder(work: WorkDir, identity: dict, encoder: str | None = None, device: str = "cpu") -> Any:
    """The store's frozen text encoder: ``encoder`` (a spec or checkpoint) when given, else rebuilt
    from the identity (open_clip tags, random weights) or found among ``<work>/encoders/**/*.pt``
    (the synthetic world's pretrained encoder) by its sha256."""
    from pipeline.encoders import encoder_for_identity

    if encoder:
        candidates = [encoder]
    else:
        candidates = [str(p) for p in sorted(work.encoders_dir.rglob("*.pt"))] if work.encoders_dir.is_dir() else []
    return encoder_for_identity(identity, candidates, device=device)


def search_videos(work: WorkDir, store: str, stage_one: str | Path, queries: Sequence[str],
                  stage_two: str | Path | None = None, split: str = "test", top: int = 10, candidates: int = 15,
                  index: str | Path | None = None, encoder: str | None = None, device: str = "cpu",
                  batch_size: int = 64, nprobe: int | None = None, ef_search: int | None = None,
                  echo: Any = None) -> Any:
    """The ``top`` videos of ``split`` for each text query: stage one's cosine from the index, and
    with a stage-two head (``stage_two``, a checkpoint) each query's ``candidates`` best re-ranked by cosine + head score (the
    re-ranking's final score). An index the store has moved on from (``index_freshness``) still
    answers, after ``echo`` says so. Returns a ``pyarrow.Table`` (query, rank, video_id, video_row (the
    index row), stage_one_rank, stage_one_score, head_score, final_score)."""
    import pyarrow as pa

    queries = [q for q in queries if q.strip()]
    if not queries:
        raise UsageError("give at least one non-empty query text")
    if top < 1 or candidates < 1:
        raise UsageError(f"--top and --candidates must be >= 1, got {top} and {candidates}")
    data = work.stage(store, split, STAGE_TWO_ARRAYS if stage_two else ("frame_emb", "text"))
    vi = open_index(work, store, stage_one, split, index, data, nprobe, ef_search, device, echo, allow_stale=True)
    stale = index_freshness(vi, store)
    if stale and echo:
        echo(stale)
    enc = query_encoder(work, data.encoder_identity, encoder, device=device)
    qsplit = query_split(data, enc, queries)
    s1 = load_stage_one(stage_one_file(stage_one), expect_encoder_identity=data.encoder_identity)
    with evaluating(s1.head):
        qemb = encode_texts(s1.head, qsplit, device=device).float().cpu().numpy()
    depth = max(top, candidates) if stage_two else top
    scores, rows = vi.search(qemb, depth)
    n = rows.shape[1]
    head_scores = np.full(rows.shape, np.nan, dtype=np.float32)
    final = scores.astype(np.float64)
    if stage_two:
        head, _, qs = load_head(stage_two, qsplit, captions=list(queries))
        kk = min(candidates, n)
        caps = np.repeat(np.arange(len(queries)), kk)
        at = {v: i for i, v in enumerate(data.video_ids)}  # index row -> split row (a stale index may differ)
        split_row = np.array([at.get(v, -1) for v in vi.video_ids] + [-1], dtype=np.int64)
        vids = split_row[rows[:, :kk].reshape(-1)]  # an index's -1 (nothing found) stays -1
        valid = vids >= 0
        h = np.full(vids.shape, np.nan, dtype=np.float32)
        h[valid] = score_pairs(head, qs, caps[valid], vids[valid], batch=batch_size, device=device)
        head_scores[:, :kk] = h.reshape(len(queries), kk)
        final[:, :kk] = scores[:, :kk] + head_scores[:, :kk]
    out: dict[str, list] = {c: [] for c in ("query", "rank", "video_id", "video_row", "stage_one_rank",
                                            "stage_one_score", "head_score", "final_score")}
    for qi, q in enumerate(queries):
        ok = np.flatnonzero(rows[qi] >= 0)
        kk = min(candidates, n) if stage_two else n
        reranked = ok[ok < kk]
        order = list(reranked[np.argsort(-final[qi, reranked], kind="stable")]) + [j for j in ok if j >= kk]
        for rank, j in enumerate(order[:top], 1):
            out["query"].append(q)
            out["rank"].append(rank)
            out["video_id"].append(vi.video_ids[int(rows[qi, j])])
            out["video_row"].append(int(rows[qi, j]))
            out["stage_one_rank"].append(int(j) + 1)
            out["stage_one_score"].append(float(scores[qi, j]))
            out["head_score"].append(None if np.isnan(head_scores[qi, j]) else float(head_scores[qi, j]))
            out["final_score"].append(float(final[qi, j]))
    return pa.table({"query": pa.array(out["query"], pa.string()), "rank": pa.array(out["rank"], pa.int32()),
                     "video_id": pa.array(out["video_id"], pa.string()),
                     "video_row": pa.array(out["video_row"], pa.int64()),
                     "stage_one_rank": pa.array(out["stage_one_rank"], pa.int32()),
                     "stage_one_score": pa.array(out["stage_one_score"], pa.float32()),
                     "head_score": pa.array(out["head_score"], pa.float32()),
                     "final_score": pa.array(out["final_score"], pa.float64())})


def write_results(table: Any, out: str | Path) -> Path:
    """The search results as ``.json`` (a list of rows) or ``.parquet``, by the file's suffix."""
    import pyarrow.parquet as pq

    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".parquet":
        pq.write_table(table, p)
    elif p.suffix == ".json":
        write_json(p, table.to_pylist())
    else:
        raise UsageError(f"--out {out}: give a .json or .parquet file")
    return p


def format_results(table: Any) -> str:
    """The results as text, one block per query."""
    rows = table.to_pylist()
    lines: list[str] = []
    has_head = any(r["head_score"] is not None for r in rows)
    for r in rows:
        if r["rank"] == 1:
            lines.append(f"query: {r['query']}")
            lines.append("  rank  video_id" + " " * 22 + ("stage1  (rank)    head    final" if has_head else "cosine"))
        extra = (f"  {r['stage_one_score']:6.3f}  ({r['stage_one_rank']:4d})  "
                 + (f"{r['head_score']:6.3f}" if r["head_score"] is not None else "     -")
                 + f"  {r['final_score']:7.3f}") if has_head else f"  {r['stage_one_score']:6.3f}"
        lines.append(f"  {r['rank']:4d}  {r['video_id'][:28]:28s}{extra}")
    return "\n".join(lines)
