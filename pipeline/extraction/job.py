"""``extract()``: the offline extraction job, its stages wired in order: plan, decode, encode, write, report.

Unit of work: a shard of ``shard_size`` consecutive videos (rows sorted by split, then id),
decoded once, encoded by every encoder whose store lacks that shard, and written whole into each
of those stores; captions likewise in text shards. Re-running skips done shards and does no work
twice. A store whose attributes do not match the request raises ``StoreMismatchError``. Failed
videos get status 2 and their reason in the store (a short "kind: line", the decoders' raw messages
apart; ``failures.json`` next to the arrays of a local store lists both) and are skipped; the run
always finishes, and its report says what every store holds afterwards. ``retry_failed`` decodes
the shards holding failed videos again (when the files have appeared or been repaired).

Each video shard also gets its videos' thumbnails (``pipeline.thumbnails``, made by the decoder
workers from the frames they decoded for the encoders; ``thumbnails=0`` makes none);
``pipeline.extraction.thumbnail_backfill`` gives them to a store made before thumbnails existed.

A store's encoder identity records how its features were computed (``Encoder.store_identity``: the
compute precision and where frames were resized); a store is never grown, retried or finished with
features computed another way (``plan.check_extraction``), nor is a store made before it recorded them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from pipeline.config import ExtractConfig, decoder_workers
from pipeline.decode import DecodeFn, DecodeResult, decoder_order
from pipeline.decode_pool import DecodePool
from pipeline.encoder_base import Encoder
from pipeline.encoders import EncoderSpec
from pipeline.extraction.captions import encode_captions
from pipeline.extraction.encode import ShardEncoder, load_encoders
from pipeline.extraction.plan import (ShardPlan, check_options, check_request, open_stores, plan_shards,
                                      resize_mode, store_rows)
from pipeline.extraction.report import ExtractReport, finalize_stores
from pipeline.extraction.write import ShardWriter, write_to_stores
from pipeline.store import CacheStore
from pipeline.thumbnails import THUMBNAIL_BYTES, THUMBNAIL_SIDE


def extract(manifest: Any, encoders: Sequence[EncoderSpec | str | Encoder],
            store_paths: Sequence[str | os.PathLike], config: ExtractConfig | None = None, *, device: str = "cpu",
            part: tuple[int, int] | None = None, progress: bool = True, decode_fn: DecodeFn | None = None,
            finalize: bool = True, **options: Any) -> ExtractReport:
    """Extract features of ``manifest`` for every encoder into its store (one path each).

    ``config`` (or its fields as keyword ``options``, which override it) sets the sampling, the
    shards and the decoders; ``part=(k, n)`` processes only shards with ``index % n == k`` (to split
    one store's work between processes that share it); ``decode_fn`` replaces
    :func:`pipeline.decode.decode_video` (tests). The report's ``totals`` say what each store holds
    afterwards (the caller decides whether failures are tolerated). ``finalize=False`` leaves the
    consolidated metadata, ``failures.json`` and the totals to one later ``finalize_stores`` call
    (processes sharing the stores: the last step, once, after they all finished).
    """
    # the request, checked before any work
    c = replace(config or ExtractConfig(), **options)
    resize = resize_mode(c.resize, device)
    decoders = decoder_order(c.decoder)
    limits = c.decode_limits()  # a bad --max-* / --decoder-memory fails here
    check_options(c)
    workers = decoder_workers(c.workers)
    t_start = time.perf_counter()
    check_request(c, encoders, store_paths, part)

    # 1. plan: the rows in store order, the encoders, their stores, the shards still to do
    rows = store_rows(manifest, store_paths)
    encs = load_encoders(encoders, device, c.token_layer, c.precision, c.compile)
    # frames come at the largest encoder size (PIL), or as decoded for a resize on the device
    short_side = max(e.image_size for e in encs) if resize == "worker" else None
    stores, appended = open_stores(manifest, rows, encs, store_paths, c, resize, short_side, part)
    report = ExtractReport(stores=[os.fspath(p) for p in store_paths], videos=len(rows.video_ids),
                           appended=appended, precision=encs[0].precision, device=str(encs[0].device))
    plan = plan_shards(stores, rows, c.shard_size, part, c.retry_failed)
    report.skipped, report.retried = plan.skipped, plan.retried

    pool = None
    results = None
    try:
        # 2. decode: worker processes start on the planned videos, overlapping the captions' pass
        if plan.tasks:
            pool = DecodePool(c.num_frames, short_side, workers=workers, timeout=c.timeout, decode_fn=decode_fn,
                              sample_fps=c.sample_fps, decoders=decoders, limits=limits,
                              thumbnails=(c.thumbnails, THUMBNAIL_SIDE, THUMBNAIL_BYTES) if c.thumbnails else None)
            results = pool.map(plan.tasks)
        # 3. encode and 4. write: the captions' text shards, then the video shards as they come decoded
        encode_captions(encs, stores, rows, c.max_text_tokens, c.text_batch_size, part, report, progress)
        if results is not None:
            _videos(plan, results, encs, stores, c, report, progress)
    finally:
        if results is not None:
            results.close()
        if pool is not None:
            pool.close()
    # 5. report: consolidation, failure lists and totals (or one later finalize_stores for many processes)
    if finalize:
        finalize_stores(store_paths, report, stores)
    report.seconds = time.perf_counter() - t_start
    return report


def _videos(plan: ShardPlan, results: Iterator[DecodeResult], encs: Sequence[Encoder], stores: Sequence[CacheStore],
            c: ExtractConfig, report: ExtractReport, progress: bool) -> None:
    """Encode the planned video shards as their videos come decoded (``ShardEncoder``), and hand each whole
    to a :class:`ShardWriter` (``c.write_queue`` shards wait for its thread; 0: written here), so one shard
    is written while the next is decoded and encoded; what was encoded before an error is still written."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(t.hi - t.lo for t in plan.shards), unit="video", desc="videos", disable=not progress)
    encoder = ShardEncoder(encs, c.num_frames, c.batch_size, bool(c.thumbnails), report, bar)
    writer = ShardWriter(c.write_queue)
    try:
        for task in plan.shards:
            shard = encoder.encode(task, results, stores[task.need[0]].video_ids)
            writer.submit(task.index, partial(write_to_stores, stores, shard))
        writer.close()
    except BaseException:
        writer.close(check=False)  # what was encoded before the error is still written
        raise
    finally:
        bar.close()
        report.write_seconds += writer.seconds
        report.write_wait_seconds += writer.wait_seconds
