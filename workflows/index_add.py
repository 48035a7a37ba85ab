"""Growing an index with its store (``index add``): the videos a store gained in the index's split
since it was built (``workflows.search.index_growth``) are encoded with the same stage one and added,
and the index directory is rewritten as a new generation, whole or not at all."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StoreError, StoreMismatchError, UsageError
from core.fileio import sha256_file
from core.split import StagedSplit
from core.urls import redact_url
from heads.evaluation.index import (VideoIndex, add_vectors, index_lock, index_vectors, load_index, measure_recall,
                                    save_index, set_threads, write_meta)
from heads.evaluation.similarity import encode_texts, encode_videos
from heads.stage_one.checkpoint import load_stage_one
from heads.training.common import evaluating
from workflows.search import (RECALL_QUERIES, index_growth, rebuild_command, record_sha256, shard_runs, stage_one_file,
                              staged_inputs, store_covers, store_inputs)
from workflows.workdir import WorkDir


def _records(s: Any, rows: np.ndarray) -> list[tuple[int, int, str | None]]:
    """``(shard, videos, record sha256)`` of each video shard holding some of ``rows``."""
    return [(shard, count, record_sha256(s, shard)) for shard, _, count in shard_runs(s, rows)]


@dataclass
class Added:
    """What ``add_to_index`` did."""

    index: VideoIndex
    added: int       # vectors added (0: nothing new)
    seconds: float


def _videos_from(data: StagedSplit, start: int) -> StagedSplit:
    """The videos of ``data`` from position ``start`` on, as a split without captions (what stage one's
    video side reads)."""
    return replace(data, video_ids=list(data.video_ids[start:]), frame_emb=data.frame_emb[start:],
                   frame_mask=data.frame_mask[start:], frame_time=None, tokens=None, caption_ids=[],
                   caption_video=np.zeros(0, np.int64), text_emb=data.text_emb[:0], text_tokens=None,
                   text_mask=None, text_ids=None, text_ids_mask=None)


def add_to_index(work: WorkDir, index: str | Path, store: str | None = None, stage_one: str | Path | None = None,
                 device: str = "cpu", threads: int | None = None) -> Added:
    """Grow index ``index`` with the videos ``store`` (default: the one index.json names) gained in its split
    since it was built: only they are encoded, with the same stage one, and added (``add_vectors``); the
    directory is rewritten as a new generation (``save_index``: the old index stays whole until the new
    one replaces it). Refused (``StoreMismatchError``) for another stage one or store, and when the store
    changed other than by gaining videos after the indexed ones (``index_growth``)."""
    t0 = time.perf_counter()
    set_threads(threads)
    path = Path(index)
    with index_lock(path):
        vi = load_index(path)
        store = str(store or vi.meta.get("store") or "")
        if not store:
            raise UsageError(f"--store: {path / 'index.json'} names no store; give it")
        want = (vi.meta.get("stage_one") or {})
        if stage_one is None and not Path(str(want.get("path"))).exists():
            raise UsageError(f"--stage-one: the stage one {want.get('path')} that {path / 'index.json'} names is "
                             f"gone; give it")
        s1 = stage_one_file(stage_one or want["path"])
        if sha256_file(s1) != want.get("sha256"):
            raise StoreMismatchError(f"--stage-one {s1}: not the stage one index {path} was built with (sha256 "
                                     f"{sha256_file(s1)[:12]}, the index's {str(want.get('sha256'))[:12]}); build "
                                     f"a new index with `python cli.py index build`")
        g = index_growth(vi, store)
        if g.other_store:
            raise StoreMismatchError(f"--store {redact_url(store)}: index {path} was {g.problem}")
        if g.problem:
            raise StoreMismatchError(f"index {path} cannot grow with store {redact_url(store)}: {g.problem}; "
                                     f"rebuild it: `{rebuild_command(vi, store)}`")
        if not g.new:  # the split as indexed; what else moved (thumbnails, other splits) is recorded
            now = {"store_fingerprint": g.store.fingerprint,
                   "covers": store_covers(g.store, g.rows, store_inputs(g.store))}
            if any(vi.meta.get(k) != v for k, v in now.items()):
                vi.meta.update(now)
                write_meta(vi)
            return Added(vi, 0, time.perf_counter() - t0)
        split, n = str(vi.meta["split"]), g.indexed
        before = _records(g.store, g.rows)
        data = work.stage(store, split)
        if data.video_ids != g.ids:
            raise StoreError(f"{redact_url(store)} changed while index {path} grew: run `index add` again")
        ckpt = load_stage_one(s1, expect_encoder_identity=data.encoder_identity)
        queries = None
        with evaluating(ckpt.head):
            new = encode_videos(ckpt.head, _videos_from(data, n), device=device).float().cpu().numpy()
            if vi.kind != "flat" and len(data.caption_ids):
                queries = encode_texts(ckpt.head, data, slice(0, RECALL_QUERIES), device=device).float().cpu().numpy()
        covers = store_covers(g.store, g.rows, staged_inputs(data))
        if [tuple(e[:3]) for e in covers["video_shards"]] != before:  # a shard rewritten while it was staged
            raise StoreError(f"{redact_url(store)} changed while index {path} grew: run `index add` again")
        add_vectors(vi, new, data.video_ids[n:])
        if queries is not None:
            vi.meta["recall"] = measure_recall(vi.index, index_vectors(vi.index), queries)
        seconds = time.perf_counter() - t0
        vi.meta.update(store=redact_url(store), store_fingerprint=data.store_fingerprint,
                       encoder_identity=data.encoder_identity, coverage=dict(data.coverage), covers=covers)
        vi.meta["additions"] = list(vi.meta.get("additions") or []) + [
            {"videos": len(new), "seconds": round(seconds, 3), "store_digest": covers["store_digest"]}]
        save_index(vi, path)
    return Added(vi, len(new), seconds)
