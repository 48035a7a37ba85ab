"""Stage one over a whole collection: build a FAISS index of a split's stage-one video embeddings
(``index build``), search it with new text queries encoded by the store's own frozen encoder,
optionally re-ranking each query's candidates with a stage-two head (``search``).

Index directories go to ``<work>/indexes/<store fingerprint[:12]>-<split>-<stage one sha256[:12]>-<kind>``
unless given; ``search`` builds the exact one there when it is missing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.errors import UsageError
from core.fileio import sha256_file, write_json
from core.split import StagedSplit
from core.urls import redact_url
from heads.evaluation.index import VideoIndex, build_index, is_index_dir, load_index, save_index, set_threads
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
    (``heads.evaluation.index``) and save the index directory; an approximate kind's recall@10/@100
    against exact search is measured on (up to 2000 of) the split's captions and kept in index.json."""
    set_threads(threads)
    data = work.stage(store, split)
    s1_path = stage_one_file(stage_one)
    ckpt = load_stage_one(s1_path, expect_encoder_identity=data.encoder_identity)
    queries = None
    with evaluating(ckpt.head):
        videos = encode_videos(ckpt.head, data, device=device).float().cpu().numpy()
        if kind != "flat" and len(data.caption_ids):
            queries = encode_texts(ckpt.head, data, slice(0, RECALL_QUERIES), device=device).float().cpu().numpy()
    meta = {"split": split, "store": redact_url(store), "store_fingerprint": data.store_fingerprint,
            "encoder_identity": data.encoder_identity, "coverage": dict(data.coverage),
            "stage_one": {"path": str(s1_path), "sha256": sha256_file(s1_path), "head": ckpt.config.get("name")}}
    vi = build_index(videos, data.video_ids, kind, options, meta=meta, recall_queries=queries, seed=seed)
    save_index(vi, Path(out) if out else default_index_dir(work, data.store_fingerprint, split, s1_path, kind))
    return vi


def open_index(work: WorkDir, store: str, stage_one: str | Path, split: str, index: str | Path | None,
               data: StagedSplit, nprobe: int | None = None, ef_search: int | None = None, device: str = "cpu",
               echo: Any = None) -> VideoIndex:
    """The index ``index`` (or the default exact one, built now when missing), checked against
    ``data`` (the split it must hold) and the stage one."""
    s1 = stage_one_file(stage_one)
    path = Path(index) if index else default_index_dir(work, data.store_fingerprint, split, s1)
    if index is None and not is_index_dir(path):
        if echo:
            echo(f"building the exact index of split {split!r}: {path}")
        build_video_index(work, store, s1, split=split, out=path, device=device)
    vi = load_index(path, nprobe=nprobe, ef_search=ef_search)
    vi.check(store_fingerprint=data.store_fingerprint, split=split, stage_one_sha256=sha256_file(s1),
             video_ids=data.video_ids)
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
    re-ranking's final score). Returns a ``pyarrow.Table`` (query, rank, video_id, video_row,
    stage_one_rank, stage_one_score, head_score, final_score)."""
    import pyarrow as pa

    queries = [q for q in queries if q.strip()]
    if not queries:
        raise UsageError("give at least one non-empty query text")
    if top < 1 or candidates < 1:
        raise UsageError(f"--top and --candidates must be >= 1, got {top} and {candidates}")
    data = work.stage(store, split, STAGE_TWO_ARRAYS if stage_two else ("frame_emb", "text"))
    vi = open_index(work, store, stage_one, split, index, data, nprobe, ef_search, device, echo)
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
        vids = rows[:, :kk].reshape(-1)
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
