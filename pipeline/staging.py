"""Staging: one split of a cache store copied into local ``.npy`` files, opened as memory maps.

Trainers and evaluation read batches of rows many times; a local memory-mapped copy of exactly one
split (only its videos whose extraction succeeded, and their captions) makes that cheap whatever
the store is (local disk, NFS, HTTP, S3). ``frame_emb``, ``frame_mask``, ``frame_time`` and
``text_emb`` are always staged; ``"tokens"`` adds the visual tokens, ``"text"`` (or
``"text_tokens"``) the text tokens and mask. The copy goes shard by shard, never a whole array in
memory. Idempotent: ``staged.json`` records the store fingerprint, the arrays, the status of the split's videos
and the digests of the checksum records of every shard it read (so a shard rewritten since, by a
resume, ``--repair`` or an append, is staged again); an identical request just reopens the memory maps.
Only committed rows are staged (``CacheStore.split_rows``, docs/STORE.md). Resumable: ``progress.json`` records
how many rows of each array are copied (after each block), so a staging interrupted midway (a remote
store, a long copy) continues where it stopped instead of reading again what it has.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StoreError
from core.fileio import write_text
from core.urls import redact_url
from core.split import StagedSplit

STAGE_ARRAYS = ("frame_emb", "tokens", "text")
_STAGE_NAMES = {"frame_emb", "frame_mask", "text_emb", "tokens", "text", "text_tokens"}
_STAGE_BLOCK_BYTES = 128 << 20  # read at most this much of one array at a time when staging
PROGRESS_JSON = "progress.json"  # rows of each array copied so far (an interrupted staging resumes there)


IN_PLACE_ARRAYS = {"tokens": "videos/tokens", "text_tokens": "texts/tokens"}  # what may be read in place


def stage_split(store: Any, split: str, stage_dir: str | os.PathLike,
                arrays: Sequence[str] = STAGE_ARRAYS, in_place: Sequence[str] = ()) -> StagedSplit:
    """Copy ``split`` of ``store`` (a ``pipeline.store.CacheStore``) into ``stage_dir/<split>/*.npy``
    and return it as a ``StagedSplit`` of read-only memory maps (see the module docstring); the arrays
    named in ``in_place`` (``tokens``, ``text_tokens``: a local store's uncompressed arrays) are not
    copied but read where they lie (``pipeline.store.inplace.MappedRows``)."""
    unknown = set(arrays) - _STAGE_NAMES
    if unknown:
        raise ValueError(f"unknown staged arrays {sorted(unknown)} (known: "
                         f"{sorted(_STAGE_NAMES)})")
    want_tokens = "tokens" in arrays
    want_text = "text" in arrays or "text_tokens" in arrays
    out = Path(stage_dir) / split
    rows, crows, caption_video = store.split_rows(split)
    needed_text = sorted({int(c) // store.text_shard_size for c in crows})
    missing = sorted(set(needed_text) - store.done_text_shards())
    if missing:
        raise StoreError(f"{store.url}: text shards {missing[:5]} not written yet; finish the "
                         f"extraction first")
    staged_large = {"tokens"} if want_tokens else set()
    if want_text:
        staged_large.add("text_tokens")
    in_place = sorted(set(in_place) & staged_large)
    key = {"fingerprint": store.fingerprint, "split": split, "tokens": want_tokens,
           "text_tokens": want_text, "in_place": in_place,
           "status_sha256": hashlib.sha256(store.split_status(split).tobytes()).hexdigest(),
           "num_videos": int(rows.size), "num_captions": int(crows.size),
           **_shard_digests(store, rows, needed_text)}
    meta_path = out / "staged.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("key") == key and "coverage" in meta:
            return _with_in_place(_load_staged(out, meta), store, rows, crows, in_place)
    progress_path = out / PROGRESS_JSON
    try:
        progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    except ValueError:
        progress = {}
    if progress.get("key") != key:  # nothing to resume: start afresh
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        progress = {"key": key, "rows": {}}
        write_text(progress_path, json.dumps(progress))
    ids, cids = store.video_ids, store.caption_ids
    T = int(store.attrs["sampling"]["num_frames"])
    dims = store.attrs["dims"]
    L = int(store.attrs["max_text_tokens"])
    plan: list[tuple[str, str, tuple, Any, np.ndarray, int]] = [
        ("frame_emb", "videos/frame_emb", (T, dims["embed_dim"]), np.float32, rows, store.shard_size),
        ("frame_mask", "videos/frame_mask", (T,), np.bool_, rows, store.shard_size),
        ("frame_time", "videos/frame_time", (T,), np.float32, rows, store.shard_size),
        ("text_emb", "texts/emb", (dims["embed_dim"],), np.float32, crows, store.text_shard_size)]
    if want_tokens:
        plan.append(("tokens", "videos/tokens", (T, dims["num_tokens"], dims["token_dim"]),
                     np.float16, rows, store.shard_size))
    if want_text:
        plan += [("text_tokens", "texts/tokens", (L, dims["text_dim"]), np.float16, crows,
                  store.text_shard_size),
                 ("text_mask", "texts/mask", (L,), np.bool_, crows, store.text_shard_size)]
    for fname, src, shape, dtype, sel, block in plan:
        if fname in in_place:
            continue
        done = int(progress["rows"].get(fname, 0))
        if done >= len(sel) and (out / f"{fname}.npy").is_file():
            continue  # copied whole by an earlier, interrupted run
        resume = done > 0 and (out / f"{fname}.npy").is_file()
        mm = np.lib.format.open_memmap(out / f"{fname}.npy", mode="r+" if resume else "w+", dtype=dtype,
                                       shape=None if resume else (len(sel),) + tuple(shape))
        pos = 0
        for lo, part in _blocks(sel, block, int(np.prod(shape)) * np.dtype(dtype).itemsize):
            if resume and pos + len(part) <= done:
                pos += len(part)
                continue
            data = np.asarray(store.array(src)[lo:int(part[-1]) + 1])
            mm[pos:pos + len(part)] = data[part - lo]
            pos += len(part)
            mm.flush()
            progress["rows"][fname] = pos  # what a re-run after an interruption need not read again
            write_text(progress_path, json.dumps(progress))
        mm.flush()
        del mm
        progress["rows"][fname] = len(sel)
        write_text(progress_path, json.dumps(progress))
    if _shard_digests(store, rows, needed_text) != {k: key[k] for k in ("video_shards", "text_shards")}:
        # a writer rewrote one of the shards while they were copied: copy again from what is committed now
        shutil.rmtree(out, ignore_errors=True)
        return stage_split(store, split, stage_dir, arrays, in_place)
    np.save(out / "caption_video.npy", caption_video)
    meta = {"key": key, "video_ids": [ids[r] for r in rows],
            "caption_ids": [cids[c] for c in crows], "store_url": redact_url(store.url),
            "encoder_identity": store.encoder_identity, "store_attrs": store.attrs,
            "coverage": store.split_coverage(split)}
    write_text(meta_path, json.dumps(meta))
    progress_path.unlink(missing_ok=True)
    return _with_in_place(_load_staged(out, meta), store, rows, crows, in_place)


def _with_in_place(staged: StagedSplit, store: Any, rows: np.ndarray, crows: np.ndarray,
                   in_place: Sequence[str]) -> StagedSplit:
    """``staged`` with its ``in_place`` arrays mapped from the store's own files, and ``access`` saying
    how each large array is read."""
    from pipeline.store.backend import local_path
    from pipeline.store.inplace import MappedRows

    root = local_path(store.url)
    for name in in_place:
        setattr(staged, name, MappedRows(root, IN_PLACE_ARRAYS[name], rows if name == "tokens" else crows))
    staged.access = {name: ("in place" if name in in_place else "staged") for name in IN_PLACE_ARRAYS
                     if getattr(staged, name) is not None}
    return staged


def _shard_digests(store: Any, rows: np.ndarray, text_shards: Sequence[int]) -> dict[str, str]:
    """The digests of the committed shards a staged copy of ``rows`` reads (``CacheStore.shard_digests``):
    part of the staging key, so that a shard rewritten since (resume, ``--repair``, append) is staged again."""
    video_shards = sorted({int(r) // store.shard_size for r in rows})
    return {"video_shards": store.shard_digests("videos", video_shards),
            "text_shards": store.shard_digests("texts", text_shards)}


def _load_staged(out: Path, meta: dict) -> StagedSplit:
    def mm(name: str) -> np.ndarray | None:
        p = out / f"{name}.npy"
        return np.load(p, mmap_mode="r") if p.is_file() else None

    key = meta["key"]
    return StagedSplit(
        store_fingerprint=key["fingerprint"], encoder_identity=meta["encoder_identity"],
        split=key["split"], video_ids=list(meta["video_ids"]),
        caption_ids=list(meta["caption_ids"]), caption_video=np.load(out / "caption_video.npy"),
        frame_emb=mm("frame_emb"), frame_mask=mm("frame_mask"), text_emb=mm("text_emb"),
        tokens=mm("tokens"), text_tokens=mm("text_tokens"), text_mask=mm("text_mask"),
        frame_time=mm("frame_time"), store_attrs=meta.get("store_attrs", {}), coverage=meta.get("coverage", {}))


def _blocks(sel: np.ndarray, shard: int, row_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """Split sorted row indices ``sel`` into runs inside one shard and at most
    ``_STAGE_BLOCK_BYTES`` of rows; yields ``(first_row_of_run, rows)``."""
    if not len(sel):
        return
    max_rows = max(1, _STAGE_BLOCK_BYTES // max(1, row_bytes))
    shard_of = sel // shard
    start = 0
    for k in range(1, len(sel) + 1):
        if (k == len(sel) or shard_of[k] != shard_of[start]
                or sel[k] - sel[start] >= max_rows):
            part = sel[start:k]
            yield int(part[0]), part
            start = k
