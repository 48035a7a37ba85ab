"""The offline extraction job: decode each video once, run every encoder, write the stores.

Unit of work: a shard of ``shard_size`` consecutive videos (rows sorted by split, then id),
decoded once, encoded by every encoder whose store lacks that shard, and written whole into each
of those stores; captions likewise in text shards. Re-running skips done shards and does no work
twice. A store whose attributes do not match the request raises ``StoreMismatchError``. Failed
videos get status 2 and their reason in the store (a short "kind: line", the decoders' raw messages
apart; ``failures.json`` next to the arrays of a local store lists both) and are skipped; the run
always finishes, and its report says what every store holds afterwards. ``retry_failed`` decodes
the shards holding failed videos again (when the files have appeared or been repaired).

Each video shard also gets its videos' thumbnails (``pipeline.thumbnails``, made by the decoder
workers from the frames they decoded for the encoders; ``thumbnails=0`` makes none); ``pipeline.thumbnail_backfill``
gives them to a store made before thumbnails existed, decoding the videos again but encoding nothing.
The row order is ``pipeline.rows``; batch encoding and the shard writer ``pipeline.encode_batches``.

A store's encoder identity records how its features were computed (``Encoder.store_identity``: the
compute precision and where frames were resized); a store is never grown, retried or finished with
features computed another way (``check_extraction``), nor is a store made before it recorded them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from core.errors import EncoderError, StoreError, StoreMismatchError, UsageError
from core.fileio import jsonable
from pipeline.config import ExtractConfig, decoder_workers
from pipeline.decode import DecodeFn, DecodeResult, decoder_order
from pipeline.decode_pool import DecodePool
from pipeline.encoder_base import EXTRACTION_KEY, Encoder, without_extraction
from pipeline.encoders import EncoderSpec, load_encoder, parse_encoder, with_token_layer
from pipeline.sampling import PAD_INDEX, PAD_TIME, strategy_name
from pipeline.encode_batches import EncodedBatch, ShardBuffer, ShardWriter, host_frames, start_batch
from pipeline.rows import Rows, existing_rows, manifest_rows
from pipeline.store import STATUS_FAILED, STATUS_OK, STATUS_PENDING, CacheStore, StoreLayout, local_path
from pipeline.store.failures import failure_list_location, write_failure_list
from pipeline.thumbnails import THUMBNAIL_BYTES, THUMBNAIL_SIDE

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class ExtractReport:
    """What one ``extract`` call did, and what its stores hold afterwards."""

    stores: list[str]
    videos: int = 0            # videos in the manifest
    ok: int = 0                # decoded and encoded in this run
    failed: int = 0            # failed in this run (reason in ``failures``)
    skipped: int = 0           # already done in every store
    retried: int = 0           # videos of shards decoded again for --retry-failed
    captions_encoded: int = 0  # captions encoded in this run (per encoder counted once)
    captions_skipped: int = 0
    seconds: float = 0.0
    decode_wait_seconds: float = 0.0   # time the encoder loop waited for decoded videos
    encode_seconds: float = 0.0        # video encoding incl. preprocessing
    text_seconds: float = 0.0
    write_seconds: float = 0.0         # store writes of video shards (in the writer thread unless write_queue=0)
    write_wait_seconds: float = 0.0    # time the encoder loop waited for the writer (its queue full)
    frames_encoded: int = 0            # per encoder
    precision: str = ""                # the encoders' compute precision (fp32, bf16, fp16)
    device: str = ""
    failures: dict[str, str] = field(default_factory=dict)  # failed in this run: short reason
    decoders: dict[str, int] = field(default_factory=dict)  # videos served by each decoder, this run
    totals: dict[str, dict] = field(default_factory=dict)   # per store: ok / failed / pending, failure list
    appended: dict[str, dict] = field(default_factory=dict)  # per grown store: {"videos", "captions"} appended

    def summary(self) -> str:
        """For humans: this run, then every store's totals and where its failure list is."""
        rate = self.ok / self.seconds if self.seconds > 0 else 0.0
        used = ", ".join(f"{n} by {d}" for d, n in sorted(self.decoders.items()))
        lines = [f"store {p}: grown by {n['videos']} videos and {n['captions']} captions (a grown manifest; "
                 f"the store's rows kept)" for p, n in self.appended.items()]
        lines += [f"this run: videos {self.ok} ok ({used or 'none decoded'}), {self.failed} failed, "
                 f"{self.skipped} skipped (done), {self.retried} retried, of {self.videos}; captions "
                 f"{self.captions_encoded} encoded, {self.captions_skipped} skipped; {self.seconds:.1f}s "
                 f"({rate:.2f} videos/s)"]
        if self.frames_encoded:
            lines.append(f"encoders at {self.precision} on {self.device}: {self.frames_encoded} frames in "
                         f"{self.encode_seconds:.1f}s; the loop waited {self.decode_wait_seconds:.1f}s for decoding "
                         f"and {self.write_wait_seconds:.1f}s for the store writer ({self.write_seconds:.1f}s of writes)")
        for path, t in self.totals.items():
            where = f"; failures listed in {t['failure_list']}" if t.get("failure_list") else ""
            lines.append(f"store {path}: {t['ok']} ok, {t['failed']} failed, {t['pending']} pending of "
                         f"{t['videos']} videos{where}")
        return "\n".join(lines)

    @property
    def store_failed(self) -> int:
        """The most failed videos any of the stores holds after the run."""
        return max((t["failed"] for t in self.totals.values()), default=0)

    @property
    def store_pending(self) -> int:
        """The most videos any store still lacks (shards of other parts, or not reached)."""
        return max((t["pending"] for t in self.totals.values()), default=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def merged(cls, reports: Sequence[dict]) -> "ExtractReport":
        """One report of several processes' parts of one job (``to_dict`` of each, the first one's
        stores, videos, precision and device): counts and times added up, ``seconds`` the longest,
        what was done before the run (``skipped``) as the process that looked first saw it (the others
        may see shards written meanwhile), per-video and per-decoder dicts joined; ``totals`` empty
        (the stores' totals come after consolidation)."""
        first = reports[0]
        out = cls(stores=list(first["stores"]), videos=first["videos"], precision=first["precision"],
                  device=first["device"])
        for f in fields(cls):
            name = f.name
            if name in ("stores", "videos", "precision", "device", "totals"):
                continue
            values = [r[name] for r in reports]
            if name in ("skipped", "captions_skipped"):
                setattr(out, name, min(values))
            elif name == "seconds":
                out.seconds = max(values)
            elif name == "decoders":
                for v in values:
                    for k, n in v.items():
                        out.decoders[k] = out.decoders.get(k, 0) + n
            elif isinstance(values[0], dict):
                for v in values:
                    getattr(out, name).update(v)
            else:
                setattr(out, name, sum(values))
        return out


def _in_part(i: int, part: tuple[int, int] | None) -> bool:
    return part is None or i % part[1] == part[0]


RESIZE_WHERE = ("auto", "worker", "device")


def _resize_mode(resize: str | None, device: str) -> str:
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


def _as_encoder(e: EncoderSpec | str | Encoder, device: str, token_layer: int | None) -> Encoder:
    """A built encoder, or the encoder of a spec with ``token_layer`` applied (``--token-layer``)."""
    if isinstance(e, Encoder):
        if token_layer is not None and getattr(e.spec, "token_layer", None) != token_layer:
            raise ValueError(f"token_layer={token_layer} but encoder {e.spec} was built with "
                             f"token layer {getattr(e.spec, 'token_layer', None)}")
        return e
    spec = parse_encoder(e) if isinstance(e, str) else e
    return load_encoder(with_token_layer(spec, token_layer), device=device)


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
    c = replace(config or ExtractConfig(), **options)
    resize = _resize_mode(c.resize, device)
    decoders = decoder_order(c.decoder)
    limits = c.decode_limits()  # a bad --max-* / --decoder-memory fails here, before any work
    if c.write_queue < 0:
        raise UsageError(f"--write-queue must be >= 0, got {c.write_queue}")
    if c.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {c.batch_size}")
    workers = decoder_workers(c.workers)
    num_frames, sample_fps, shard_size, timeout = c.num_frames, c.sample_fps, c.shard_size, c.timeout
    max_text_tokens, batch_size, text_batch_size = c.max_text_tokens, c.batch_size, c.text_batch_size
    text_shard_size, compressor, retry_failed = c.text_shard_size, c.compressor, c.retry_failed
    if c.thumbnails < 0:
        raise ValueError(f"thumbnails must be >= 0, got {c.thumbnails}")

    t_start = time.perf_counter()
    if len(encoders) != len(store_paths):
        raise ValueError(f"{len(encoders)} encoders but {len(store_paths)} store paths")
    if not encoders:
        raise ValueError("no encoders given")
    if len({os.fspath(p) for p in store_paths}) != len(store_paths):
        raise ValueError("each encoder needs its own store path")
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise ValueError(f"part must be (k, n) with 0 <= k < n, got {part}")
    msha = manifest.sha256()
    rows = manifest_rows(manifest, existing_rows(store_paths))
    encs = [_as_encoder(e, device, c.token_layer) for e in encoders]
    for enc in encs:
        enc.set_precision(c.precision)
        if c.compile:
            enc.compile()
    # frames come at the largest encoder size (PIL), or as decoded for a resize on the device
    short_side = max(e.image_size for e in encs) if resize == "worker" else None
    stores: list[CacheStore] = []
    thumbs = {"count": c.thumbnails, "max_side": THUMBNAIL_SIDE, "max_bytes": THUMBNAIL_BYTES} if c.thumbnails else None
    appended: dict[str, dict] = {}
    for enc, path in zip(encs, store_paths):
        identity = enc.store_identity(resize_record(resize, short_side, enc.image_size))
        layout = StoreLayout(dataset=manifest.dataset, manifest_sha256=msha,
                             encoder=identity, num_frames=num_frames,
                             num_tokens=enc.num_tokens, token_dim=enc.token_dim,
                             embed_dim=enc.embed_dim, text_dim=enc.text_dim,
                             max_text_tokens=max_text_tokens, shard_size=shard_size,
                             text_shard_size=text_shard_size, strategy=strategy_name(sample_fps),
                             compressor=compressor)
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
    report = ExtractReport(stores=[os.fspath(p) for p in store_paths], videos=len(rows.video_ids),
                           appended=appended, precision=encs[0].precision, device=str(encs[0].device))
    S = shard_size
    V = len(rows.video_ids)
    num_shards = stores[0].num_shards
    if retry_failed:
        for store in stores:
            again = sorted({int(r) // S for r in np.flatnonzero(store.status() == STATUS_FAILED)
                            if _in_part(int(r) // S, part)})
            store.reset_shards(again)
            report.retried = max(report.retried, sum(min(S, V - i * S) for i in again))
    done = [s.done_shards() for s in stores]
    todo: list[tuple[int, list[int]]] = []  # (shard, encoders that need it)
    for i in range(num_shards):
        need = [k for k in range(len(stores)) if i not in done[k]]
        if need and _in_part(i, part):
            todo.append((i, need))
        elif not need:
            report.skipped += min(S, V - i * S)
    # rows an append kept aside (old rows of a reopened partial shard) are not decoded again
    kept = {i: min(s.num_kept_rows("videos", i) for s in (stores[k] for k in need)) for i, need in todo}
    tasks = [rows.tasks[r] for i, _ in todo for r in range(i * S + kept[i], min(V, (i + 1) * S))]

    pool = None
    results = None
    try:
        if tasks:
            pool = DecodePool(num_frames, short_side, workers=workers, timeout=timeout, decode_fn=decode_fn,
                              sample_fps=sample_fps, decoders=decoders, limits=limits,
                              thumbnails=(c.thumbnails, THUMBNAIL_SIDE, THUMBNAIL_BYTES) if c.thumbnails else None)
            results = pool.map(tasks)  # decoding starts now, overlapping the text pass
        _extract_texts(encs, stores, rows, max_text_tokens, text_batch_size, part, report,
                       progress)
        if results is not None:
            _extract_videos(encs, stores, todo, results, num_frames, S, V, batch_size, report,
                            progress, c.thumbnails, kept, c.write_queue)
    finally:
        if results is not None:
            results.close()
        if pool is not None:
            pool.close()
    if finalize:
        finalize_stores(store_paths, report, stores)
    report.seconds = time.perf_counter() - t_start
    return report


def finalize_stores(store_paths: Sequence[str | os.PathLike], report: ExtractReport,
                    stores: Sequence[CacheStore] | None = None) -> ExtractReport:
    """The end of an extraction: each store's consolidated metadata, its failure list
    (``failures.json`` of a local store) and its totals in ``report``."""
    if stores is None:
        stores = [CacheStore.open(p, mode="r+") for p in store_paths]
    for store, path in zip(stores, store_paths):
        store.consolidate()
        status = write_failure_list(store)
        totals = {"videos": int(status.size), "ok": int((status == STATUS_OK).sum()),
                  "failed": int((status == STATUS_FAILED).sum()), "pending": int((status == STATUS_PENDING).sum()),
                  "failure_list": failure_list_location(path)}
        report.totals[os.fspath(path)] = totals
    return report


GROWER_WAIT = 3600.0  # seconds a --part K/N writer (K > 0) of a remote store waits for part 0 to grow it


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


def _extract_texts(encs: list[Encoder], stores: list[CacheStore], rows: Rows,
                   max_text_tokens: int, batch: int, part: tuple[int, int] | None,
                   report: ExtractReport, progress: bool) -> None:
    """Encode every pending text shard of every store."""
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    counted: set[int] = set()
    for enc, store in zip(encs, stores):
        done = store.done_text_shards()
        pending = [j for j in range(store.num_text_shards) if j not in done and _in_part(j, part)]
        sizes = [store.text_shard_range(j) for j in pending]
        bar = tqdm(total=sum(b - a for a, b in sizes),
                   unit="caption", desc=f"texts {enc.spec.short_name()}",
                   disable=not progress or not pending, leave=False)
        for j in range(store.num_text_shards):
            lo, hi = store.text_shard_range(j)
            if j not in pending:
                if j in done and j not in counted:
                    report.captions_skipped += hi - lo
                counted.add(j)
                continue
            keep = store.num_kept_rows("texts", j)  # rows an append kept aside: taken from there, not encoded
            shape = store.array("texts/tokens").shape[1:]
            toks = [np.zeros((keep,) + shape, np.float16)]
            masks = [np.zeros((keep, shape[0]), bool)]
            embs = [np.zeros((keep, store.array("texts/emb").shape[1]), np.float32)]
            bar.update(keep)
            for b in range(lo + keep, hi, batch):
                try:
                    with enc.autocast():
                        t, m, e = enc.encode_texts(rows.caption_texts[b:min(hi, b + batch)],
                                                   max_tokens=max_text_tokens)
                except torch.cuda.OutOfMemoryError as exc:
                    raise EncoderError(f"{enc.device.type.upper()} out of memory encoding {min(hi, b + batch) - b} "
                                       f"captions with {enc.spec}: lower --text-batch-size (now {batch})") from exc
                toks.append(t.to(torch.float16).cpu().numpy())
                masks.append(m.cpu().numpy())
                embs.append(e.float().cpu().numpy())
                bar.update(min(hi, b + batch) - b)
            store.write_text_shard(j, tokens=np.concatenate(toks), mask=np.concatenate(masks),
                                   emb=np.concatenate(embs))
            if j not in counted:
                report.captions_encoded += hi - lo - keep
                report.captions_skipped += keep
                counted.add(j)
        bar.close()
    report.text_seconds += time.perf_counter() - t0


def _extract_videos(encs: list[Encoder], stores: list[CacheStore],
                    todo: list[tuple[int, list[int]]], results: Any, T: int, S: int, V: int,
                    batch_size: int, report: ExtractReport, progress: bool, thumbnails: int = 0,
                    kept: dict[int, int] | None = None, write_queue: int = 2) -> None:
    """Consume decoded videos shard by shard; encode in frame batches; write whole shards (with
    ``thumbnails`` JPEGs of each video, when the stores hold them) through a :class:`ShardWriter`
    (``write_queue`` shards wait for its thread; 0: written here). While a batch's results travel
    back from the GPU the loop already collects the next one. ``kept[i]``: leading rows of shard
    ``i`` an append kept aside, neither decoded nor encoded (``write_shard`` takes them from the store)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(min(V, (i + 1) * S) - i * S for i, _ in todo), unit="video",
               desc="videos", disable=not progress)
    writer = ShardWriter(write_queue)
    try:
        for i, need in todo:
            _extract_shard(encs, stores, i, need, results, T, S, V, batch_size, report, bar, thumbnails, writer,
                           (kept or {}).get(i, 0))
        writer.close()
    except BaseException:
        writer.close(check=False)  # what was encoded before the error is still written
        raise
    finally:
        bar.close()
        report.write_seconds += writer.seconds
        report.write_wait_seconds += writer.wait_seconds


def _extract_shard(encs: list[Encoder], stores: list[CacheStore], i: int, need: list[int], results: Any,
                   T: int, S: int, V: int, batch_size: int, report: ExtractReport, bar: Any, thumbnails: int,
                   writer: ShardWriter, kept: int = 0) -> None:
    """Decode-wait, encode and hand shard ``i`` to the writer; its first ``kept`` rows are an append's
    kept rows (not decoded; ``write_shard`` takes them from the store)."""
    lo, hi = i * S, min(V, (i + 1) * S)
    n = hi - lo
    bufs = {k: ShardBuffer(n, T, encs[k]) for k in need}
    status = np.zeros(n, dtype=np.int8)
    error, detail, decoder = [""] * n, [""] * n, [""] * n
    mask = np.zeros((n, T), dtype=bool)
    index = np.full((n, T), PAD_INDEX, dtype=np.int32)
    times = np.full((n, T), PAD_TIME, dtype=np.float32)
    pending: list[tuple[int, DecodeResult]] = []
    pending_frames = 0
    thumbs: list[list[bytes]] = [[] for _ in range(n)]
    inflight: list[tuple[int, EncodedBatch]] = []

    def land() -> None:
        nonlocal inflight
        t0 = time.perf_counter()
        for k, batch in inflight:
            report.frames_encoded += batch.finish(bufs[k])
        inflight = []
        report.encode_seconds += time.perf_counter() - t0

    def flush() -> None:
        nonlocal pending, pending_frames, inflight
        if not pending:
            return
        t0 = time.perf_counter()
        frames = host_frames(pending, pin=any(encs[k].device.type == "cuda" for k in need))  # once, for every encoder
        started = [(k, start_batch(encs[k], pending, batch_size, frames)) for k in need]
        report.encode_seconds += time.perf_counter() - t0
        land()  # the previous batch's results, copied back while this one was launched
        inflight = started
        pending, pending_frames = [], 0

    for row in range(kept, n):
        t0 = time.perf_counter()
        res = next(results)
        report.decode_wait_seconds += time.perf_counter() - t0
        if res.video_id != stores[need[0]].video_ids[lo + row]:
            raise RuntimeError(f"decode results out of order: got {res.video_id!r} for "
                               f"row {lo + row}")
        if res.ok:
            status[row] = STATUS_OK
            mask[row], index[row], times[row] = res.mask, res.indices, res.times
            decoder[row] = res.decoder
            report.decoders[res.decoder or "?"] = report.decoders.get(res.decoder or "?", 0) + 1
            pending.append((row, res))
            pending_frames += int(res.mask.sum())
            if thumbnails:  # made by the decoder worker (DecodePool(thumbnails=...)), from the frames it decoded
                thumbs[row] = list(res.thumbnails or [])
            report.ok += 1
            if pending_frames >= batch_size:
                flush()
        else:
            status[row] = STATUS_FAILED
            error[row], detail[row] = res.reason or "decode error", res.detail
            report.failed += 1
            report.failures[res.video_id] = error[row]
        bar.update(1)
    flush()
    land()

    def write() -> None:
        for k in need:
            stores[k].write_shard(i, status=status, error=error, tokens=bufs[k].tokens,
                                  frame_emb=bufs[k].emb, frame_mask=mask, frame_index=index,
                                  frame_time=times, error_detail=detail, decoder=decoder,
                                  thumbnails=thumbs if thumbnails else None)

    writer.submit(i, write)

