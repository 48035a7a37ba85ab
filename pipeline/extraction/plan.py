"""What an extraction does: its stores opened (grown, checked), the shards still to do, the videos to decode."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import StoreError, StoreMismatchError, UsageError
from core.fileio import jsonable
from pipeline.config import ExtractConfig
from pipeline.decode import DecodeTask
from pipeline.encoder_base import EXTRACTION_KEY, Encoder, without_extraction
from pipeline.sampling import strategy_name
from pipeline.store import STATUS_FAILED, CacheStore, StoreLayout, local_path
from pipeline.store.rows import Rows, existing_rows, manifest_rows
from pipeline.thumbnails import THUMBNAIL_BYTES, THUMBNAIL_SIDE

RESIZE_WHERE = ("auto", "worker", "device")
GROWER_WAIT = 3600.0  # seconds a --part K/N writer (K > 0) of a remote store waits for part 0 to grow it


def check_options(c: ExtractConfig) -> None:
    """``UsageError`` for a ``--write-queue`` or ``--batch-size`` no run can take (before any work)."""
    if c.write_queue < 0:
        raise UsageError(f"--write-queue must be >= 0, got {c.write_queue}")
    if c.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {c.batch_size}")


def check_request(c: ExtractConfig, encoders: Sequence[Any], store_paths: Sequence[str | os.PathLike],
                  part: tuple[int, int] | None) -> None:
    """``ValueError`` unless thumbnails are >= 0, each encoder has its own store path and ``part`` is (k, n)."""
    if c.thumbnails < 0:
        raise ValueError(f"thumbnails must be >= 0, got {c.thumbnails}")
    if len(encoders) != len(store_paths):
        raise ValueError(f"{len(encoders)} encoders but {len(store_paths)} store paths")
    if not encoders:
        raise ValueError("no encoders given")
    if len({os.fspath(p) for p in store_paths}) != len(store_paths):
        raise ValueError("each encoder needs its own store path")
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise ValueError(f"part must be (k, n) with 0 <= k < n, got {part}")


def in_part(i: int, part: tuple[int, int] | None) -> bool:
    """Whether shard ``i`` is this process's under ``part=(k, n)`` (``i % n == k``; all of them for ``None``)."""
    return part is None or i % part[1] == part[0]


def resize_mode(resize: str | None, device: str) -> str:
    """``worker`` (the decoder processes resize with PIL) or ``device`` (the encoder's device does);
    ``auto``: device on CUDA (the decoders' CPU time is what bounds a GPU job), worker elsewhere."""
    r = (resize or "auto").lower()
    if r not in RESIZE_WHERE:
        raise UsageError(f"--resize must be one of {', '.join(RESIZE_WHERE)}, got {resize!r}")
    if r == "auto":
        import torch

        return "device" if torch.device(device).type == "cuda" else "worker"
    return r


def resize_record(resize: str, short_side: int | None, image_size: int) -> str:
    """Where an encoder's frames were resized, as its store records it (``EXTRACTION_KEY``):
    ``device``, ``worker`` (the decoders brought them to its size), or, when the decoders brought them
    to a larger encoder's size, that size and then the device (its tokens depend on it)."""
    if resize == "device" or short_side is None:
        return "device"
    return "worker" if int(short_side) == int(image_size) else f"worker to {int(short_side)} px, then device"


def _extraction_text(x: dict) -> str:
    return f"precision {x.get('precision')}, resize {x.get('resize')}"


def check_extraction(path: str | os.PathLike, identity: dict) -> None:
    """``StoreMismatchError`` (one line naming both) when the store at ``path`` holds features of this
    encoder computed another way than ``identity`` (a ``store_identity``) computes them: another
    compute precision or resize mode (growing, retrying or finishing it would mix them), or a store
    made before stores recorded either (its way is unknown). Nothing there, or another encoder (which
    ``CacheStore.open_or_create`` names), passes."""
    try:
        have = CacheStore.open(path).encoder_identity
    except StoreError:
        return
    if jsonable(without_extraction(have)) != jsonable(without_extraction(identity)):
        return
    want, got = identity[EXTRACTION_KEY], have.get(EXTRACTION_KEY)
    if got is None:
        raise StoreMismatchError(f"{path}: the store was made before stores recorded their compute precision and "
                                 f"resize mode, so features computed now ({_extraction_text(want)}) could differ "
                                 f"from those it holds; finish it with the version that made it, or make a new "
                                 f"store (another --store path)")
    if got != want:
        raise StoreMismatchError(f"{path}: the store holds features computed at {_extraction_text(got)}, this run "
                                 f"computes them at {_extraction_text(want)}; one store never mixes them: run with "
                                 f"the store's --precision and --resize (and encoders), or use another --store path")


def store_rows(manifest: Any, store_paths: Sequence[str | os.PathLike]) -> Rows:
    """The manifest's videos and captions in the row order of the stores (sorted, a grown store's old rows first)."""
    return manifest_rows(manifest, existing_rows(store_paths))


def wait_for_grower(path: str | os.PathLike, manifest_sha256: str, thumbnails: bool,
                    wait: float = GROWER_WAIT) -> None:
    """Wait until the remote store at ``path`` holds the manifest ``manifest_sha256`` (and, with
    ``thumbnails``, its thumbnail arrays) with no append unfinished: the single-grower rule of a store
    without a lock, where only ``--part 0/N`` (or an unpartitioned run) creates, grows and adds arrays, so
    no two writers ever read-modify-write its root attributes."""
    from pipeline.store import JOURNAL_KEY

    deadline = time.monotonic() + wait
    while True:
        try:
            store = CacheStore.open(path)
            ready = (store.attrs.get("manifest_sha256") == manifest_sha256
                     and (not thumbnails or bool(store.attrs.get("thumbnails")))
                     and store.read_object(JOURNAL_KEY) is None)
        except StoreError:
            ready = False
        if ready:
            return
        if time.monotonic() > deadline:
            raise StoreError(f"{path}: waited {wait:.0f}s for --part 0/N to create or grow this store to the "
                             f"manifest {manifest_sha256[:12]}; start part 0 (it alone grows a remote store)")
        time.sleep(1.0)


def _grow(path: str | os.PathLike, layout: StoreLayout, rows: Rows, dataset: str) -> dict | None:
    """Append the manifest's new rows to the store at ``path`` when it holds an earlier version of the
    same dataset's manifest (``CacheStore.append``); ``None`` when there is nothing to grow."""
    try:
        old = CacheStore.open(path, mode="r+")
    except StoreError:
        return None
    if old.attrs.get("manifest_sha256") == layout.manifest_sha256 or old.attrs.get("dataset") != dataset:
        return None  # the same manifest, or another dataset (open_or_create names the difference)
    return old.append(layout, rows.video_ids, rows.video_splits, rows.caption_ids, rows.caption_video,
                      rows.caption_splits, rows.video_source, rows.caption_source)


def store_layout(dataset: str, manifest_sha256: str, enc: Encoder, identity: dict, c: ExtractConfig) -> StoreLayout:
    """What the store of ``enc`` (computing features as ``identity`` records) holds for a manifest."""
    return StoreLayout(dataset=dataset, manifest_sha256=manifest_sha256, encoder=identity,
                       num_frames=c.num_frames, num_tokens=enc.num_tokens, token_dim=enc.token_dim,
                       embed_dim=enc.embed_dim, text_dim=enc.text_dim, max_text_tokens=c.max_text_tokens,
                       shard_size=c.shard_size, text_shard_size=c.text_shard_size,
                       strategy=strategy_name(c.sample_fps), compressor=c.compressor)


def open_stores(manifest: Any, rows: Rows, encs: Sequence[Encoder], store_paths: Sequence[str | os.PathLike],
                c: ExtractConfig, resize: str, short_side: int | None,
                part: tuple[int, int] | None) -> tuple[list[CacheStore], dict[str, dict]]:
    """Each encoder's store, created, or grown to the manifest, or reopened (``StoreMismatchError`` when it
    holds something else, or features computed another way); with ``c.thumbnails``, its thumbnail arrays.
    Only an unpartitioned run or ``--part 0/N`` grows a remote store; the other parts wait for it
    (``wait_for_grower``). Also what each grown store appended (``{"videos", "captions"}`` by path)."""
    thumbs = {"count": c.thumbnails, "max_side": THUMBNAIL_SIDE, "max_bytes": THUMBNAIL_BYTES} if c.thumbnails else None
    msha = manifest.sha256()
    stores: list[CacheStore] = []
    appended: dict[str, dict] = {}
    for enc, path in zip(encs, store_paths):
        identity = enc.store_identity(resize_record(resize, short_side, enc.image_size))
        layout = store_layout(manifest.dataset, msha, enc, identity, c)
        grower = part is None or part[0] == 0 or local_path(path) is not None
        if not grower:  # a remote store has no lock: one writer grows it, the others wait (docs/STORE.md)
            wait_for_grower(path, msha, bool(c.thumbnails))
        check_extraction(path, identity)
        grow = _grow(path, layout, rows, manifest.dataset)
        if grow and (grow["videos"] or grow["captions"]):
            appended[os.fspath(path)] = grow
        stores.append(CacheStore.open_or_create(path, layout, rows.video_ids, rows.video_splits,
                                                rows.caption_ids, rows.caption_video,
                                                rows.caption_splits, thumbnails=thumbs,
                                                video_source=rows.video_source, caption_source=rows.caption_source))
        if c.thumbnails and grower:
            stores[-1].add_thumbnail_arrays(c.thumbnails, THUMBNAIL_SIDE, THUMBNAIL_BYTES)
    return stores, appended


@dataclass(frozen=True)
class ShardTask:
    """One video shard to extract: its store rows ``lo:hi``, the stores that lack it (indices into the run's
    stores), and its first ``kept`` rows, which an append kept aside (neither decoded nor encoded:
    ``write_shard`` takes them from the store)."""

    index: int
    lo: int
    hi: int
    need: tuple[int, ...]
    kept: int = 0


@dataclass
class ShardPlan:
    """The video shards a run extracts (in order), the videos it decodes for them, and what it skips."""

    shards: list[ShardTask] = field(default_factory=list)
    tasks: list[DecodeTask] = field(default_factory=list)  # the videos to decode, in the shards' order
    skipped: int = 0   # videos of shards done in every store
    retried: int = 0   # videos of shards reset for --retry-failed (the most of any store)


def plan_shards(stores: Sequence[CacheStore], rows: Rows, shard_size: int, part: tuple[int, int] | None,
                retry_failed: bool) -> ShardPlan:
    """The shards of this process (``part``) that a store lacks: skip-if-done against each store's committed
    shards; with ``retry_failed`` the shards holding failed videos are first reset (decoded again)."""
    S, V = shard_size, len(rows.video_ids)
    plan = ShardPlan()
    if retry_failed:
        for store in stores:
            again = sorted({int(r) // S for r in np.flatnonzero(store.status() == STATUS_FAILED)
                            if in_part(int(r) // S, part)})
            store.reset_shards(again)
            plan.retried = max(plan.retried, sum(min(S, V - i * S) for i in again))
    done = [s.done_shards() for s in stores]
    for i in range(stores[0].num_shards):
        need = tuple(k for k in range(len(stores)) if i not in done[k])
        if need and in_part(i, part):
            # rows an append kept aside (old rows of a reopened partial shard) are not decoded again
            kept = min(stores[k].num_kept_rows("videos", i) for k in need)
            plan.shards.append(ShardTask(i, i * S, min(V, (i + 1) * S), need, kept))
        elif not need:
            plan.skipped += min(S, V - i * S)
    plan.tasks = [rows.tasks[r] for t in plan.shards for r in range(t.lo + t.kept, t.hi)]
    return plan
