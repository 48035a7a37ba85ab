"""Thumbnails for a store made without them: its videos decoded again, nothing encoded (``cache thumbnails``)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from core.errors import StoreMismatchError
from pipeline.config import decoder_workers
from pipeline.decode import DecodeFn
from pipeline.decode_pool import DecodePool
from pipeline.sampling import strategy_fps
from pipeline.store import STATUS_OK, CacheStore
from pipeline.store.rows import manifest_rows
from pipeline.thumbnails import THUMBNAIL_BYTES, THUMBNAIL_COUNT, THUMBNAIL_SIDE


@dataclass
class ThumbnailReport:
    """What one ``add_thumbnails`` call did."""

    store: str
    shards_done: int = 0       # shards given thumbnails in this run
    shards_skipped: int = 0    # shards that had them already
    videos: int = 0            # videos given thumbnails in this run
    failed: dict[str, str] = field(default_factory=dict)   # decoding failed now: video id -> reason
    other_frames: int = 0      # videos whose frames decoded now differ from those the store sampled
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"thumbnails: {self.videos} videos in {self.shards_done} shards, {self.shards_skipped} shards had "
                 f"them already; {len(self.failed)} failed to decode; {self.seconds:.1f}s  ({self.store})"]
        if self.other_frames:
            lines.append(f"{self.other_frames} videos decoded to other frames than the store sampled (the video files "
                         f"changed?): their thumbnails show the frames decoded now")
        for vid, reason in list(self.failed.items())[:10]:
            lines.append(f"  {vid}: {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def add_thumbnails(store_path: str | os.PathLike, manifest: Any, *, workers: int = 0, timeout: float = 60.0,
                   count: int = THUMBNAIL_COUNT, max_side: int = THUMBNAIL_SIDE, max_bytes: int = THUMBNAIL_BYTES,
                   decode_fn: DecodeFn | None = None, progress: bool = True) -> ThumbnailReport:
    """Give every video of the store at ``store_path`` whose extraction succeeded its thumbnails, decoding
    the video files ``manifest`` (the store's own, checked by its hash) lists; shards that have them are
    skipped; the decoder workers (``workers``; 0: ``pipeline.config.decoder_workers``) make them.
    ``StoreMismatchError`` when the manifest is not the store's."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    store = CacheStore.open(store_path, mode="r+")
    want = store.attrs.get("manifest_sha256")
    have = manifest.sha256()
    if have != want:
        raise StoreMismatchError(f"{store_path}: the store was made from another manifest (store: sha256 "
                                 f"{str(want)[:12]}, --manifest: {have[:12]}); give the store's own manifest")
    rows = manifest_rows(manifest)
    if rows.video_ids != store.video_ids:
        raise StoreMismatchError(f"{store_path}: the manifest lists other videos than the store")
    store.add_thumbnail_arrays(count, max_side, max_bytes)
    info = store.attrs["thumbnails"]
    report = ThumbnailReport(store=os.fspath(store_path))
    done = store.thumbnail_shards()
    todo = [i for i in range(store.num_shards) if i not in done]
    report.shards_skipped = store.num_shards - len(todo)
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report
    status = store.status()
    sampling = store.attrs["sampling"]
    want_index = np.asarray(store.array("videos/frame_index")[...])
    jobs = [(i, [r for r in range(*store.shard_range(i)) if status[r] == STATUS_OK]) for i in todo]
    tasks = [rows.tasks[r] for _, rs in jobs for r in rs]
    # decoded as extraction decodes for this encoder, so the thumbnails are those extraction would make
    short_side = int(store.encoder_identity.get("image_size") or info["max_side"])
    made = (int(info["count"]), int(info["max_side"]), int(info["max_bytes"]))
    pool = DecodePool(int(sampling["num_frames"]), short_side, workers=decoder_workers(workers), timeout=timeout,
                      decode_fn=decode_fn, sample_fps=strategy_fps(sampling["strategy"]), thumbnails=made)
    results = pool.map(tasks) if tasks else iter(())
    bar = tqdm(total=len(tasks), unit="video", desc="thumbnails", disable=not progress)
    try:
        for i, ok_rows in jobs:
            lo, hi = store.shard_range(i)
            shard: list[list[bytes]] = [[] for _ in range(hi - lo)]
            for r in ok_rows:
                res = next(results)
                if res.video_id != store.video_ids[r]:
                    raise RuntimeError(f"decode results out of order: got {res.video_id!r} for row {r}")
                bar.update(1)
                if not res.ok:
                    report.failed[res.video_id] = res.reason or "decode error"
                    continue
                valid = want_index[r][want_index[r] >= 0]
                if not np.array_equal(np.asarray(res.indices)[np.asarray(res.mask, bool)], valid):
                    report.other_frames += 1
                shard[r - lo] = list(res.thumbnails or [])  # made by the decoder worker
                report.videos += 1
            store.write_thumbnails(i, shard)
            report.shards_done += 1
    finally:
        bar.close()
        if hasattr(results, "close"):
            results.close()
        pool.close()
    store.consolidate()
    report.seconds = time.perf_counter() - t0
    return report


def missing_thumbnails(store: CacheStore) -> int:
    """How many video shards of ``store`` lack thumbnails (all of them for a store without the arrays)."""
    return store.num_shards - len(store.thumbnail_shards())
