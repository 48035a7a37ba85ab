"""The Zarr v3 feature cache (docs/ARCHITECTURE.md, "Store"): create, open, read and write it.

Staging a split into local memory-mapped files is ``pipeline.staging``. The on-disk format stays in
one module (its layout below, creation, opening, reading and writing with their checks), which is
why it is longer than the others.

Layout (schema version 2; ``V`` videos, ``T`` frames, ``N`` visual tokens of width ``D``,
``E`` embedding width, ``C`` captions, ``L`` text tokens of width ``Dt``, ``S`` shard size,
``St`` text shard size)::

    <store>/                    attrs: format, schema_version, dataset, manifest_sha256, encoder,
                                sampling {num_frames, strategy}, max_text_tokens, shard_size,
                                num_shards, text_shard_size, num_text_shards, num_videos,
                                num_captions, dims, compressor, created_by
      videos/ids          (V, W) uint8        chunk S   UTF-8, zero-padded (every string array)
      videos/split        (V, W) uint8        chunk S
      videos/status       (V,) int8           chunk S   0 pending, 1 ok, 2 failed
      videos/error        (V, 200) uint8      chunk S   "kind: one line" ("" when ok)
      videos/error_detail (V, 1000) uint8     chunk S   the decoder's raw message
      videos/decoder      (V, 16) uint8       chunk S   which decoder served the video
      videos/tokens       (V,T,N,D) float16   chunk (1,T,N,D) inside shards (S,T,N,D)
      videos/frame_emb    (V,T,E) float32     chunk (S,T,E)
      videos/frame_mask   (V,T) bool          chunk (S,T)
      videos/frame_index  (V,T) int32         chunk (S,T)   -1 for padding
      videos/frame_time   (V,T) float32       chunk (S,T)   seconds, -1 for padding
      texts/ids           (C, W) uint8        chunk St
      texts/video_index   (C,) int64          chunk St  row of the caption's video
      texts/split         (C, W) uint8        chunk St
      texts/tokens        (C,L,Dt) float16    chunk (St,L,Dt)
      texts/mask          (C,L) bool          chunk (St,L)
      texts/emb           (C,E) float32       chunk (St,E)
      shards/done         (num_shards,) bool       chunk 1: video shard i written whole
      shards/text_done    (num_text_shards,) bool  chunk 1: text shard j written whole

    optional (stores made before them lack them): videos/source (V, 16) uint8, texts/source (C, 16) uint8
      each manifest row's digest (``row_digest``), which lets ``append`` tell a grown manifest from a
      changed one; attrs["manifest_history"]: every manifest version the store was extracted from.
    objects beside the arrays: checksums/<kind>/<i>.json (``pipeline.integrity``), failures.json,
      append/<kind>-<i>.npz (``append``), .lock (local stores, ``store_lock``).

    optional (stores made before thumbnails existed lack them; ``add_thumbnails`` adds them):
      videos/thumbnails       (V, K, B) uint8   chunk (S, K, B), zstd   K JPEGs per video, zero-padded
      videos/thumbnail_bytes  (V, K) int32      chunk (S, K)   length of each JPEG (0: none)
      shards/thumbnails_done  (num_shards,) bool chunk 1: thumbnails of video shard i written whole
                              attrs["thumbnails"] = {"count": K, "max_side": px, "max_bytes": B, "format": "jpeg"}

Every array is aligned to the shards, so video shard ``i`` (rows ``[i*S, (i+1)*S)``) and text
shard ``j`` are each written whole by exactly one writer, then marked done; separate processes
may fill disjoint shards of one store. Rows: videos sorted by (split, video_id); captions by
(video row, caption_id). Strings are fixed-width UTF-8 bytes (uint8, zero-padded), so any zarr v3
reader (tensorstore, zarr-python, ...) gets them; schema version 1 used zarr-python's
variable-length strings, which are still read. Arrays are
uncompressed unless a compressor is chosen (``"zstd"``, ``"blosc-zstd"`` or ``"blosc-lz4"``, applied to
the token arrays).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StoreError, StoreMismatchError
from core.fileio import jsonable
from core.split import StagedSplit
from pipeline import integrity
from pipeline.remote import is_read_only, storage_options as _storage_options_for
from pipeline.staging import STAGE_ARRAYS, stage_split

__all__ = ["CacheStore", "StoreLayout", "StagedSplit", "StoreError", "StoreMismatchError", "STAGE_ARRAYS",
           "THUMBNAIL_ARRAYS",
           "STATUS_PENDING", "STATUS_OK", "STATUS_FAILED", "fingerprint_of", "local_path", "layout_dict"]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 stored strings as zarr-python's variable-length strings
FORMAT = "crosstvr-feature-cache"
CREATED_BY = "pipeline.store (crosstvr-cache 0.1.0)"
STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
ERROR_BYTES = 200  # the short failure reason ("kind: one line")
DETAIL_BYTES = 1000  # the decoder's raw message
DECODER_BYTES = 16  # which decoder served the video (decord, pyav)
THUMBNAIL_ARRAYS = ("videos/thumbnails", "videos/thumbnail_bytes")
THUMBNAILS_DONE = "shards/thumbnails_done"
# what a video / text shard's checksum record covers (each array's object of that shard)
VIDEO_SHARD_ARRAYS = ("videos/ids", "videos/split", "videos/source", "videos/status", "videos/error", "videos/error_detail",
                      "videos/decoder", "videos/tokens", "videos/frame_emb", "videos/frame_mask",
                      "videos/frame_index", "videos/frame_time")
TEXT_SHARD_ARRAYS = ("texts/ids", "texts/split", "texts/source", "texts/video_index", "texts/tokens", "texts/mask", "texts/emb")
LOCK_FILE = ".lock"  # the local store's writer lock (store_lock); not part of the zarr hierarchy
COMPRESSORS = ("zstd", "blosc-zstd", "blosc-lz4")  # of the token arrays (--compressor); bench/store_size.py
SOURCE_BYTES = 16  # videos/source, texts/source: the first bytes of each manifest row's sha256
APPEND_PREFIX = "append"  # append/<kind>-<shard>.npz: old rows of a partial shard an append reopened
# Keys of the attrs that must equal the request for a store to be reused.
MATCH_KEYS = ("dataset", "manifest_sha256", "encoder", "sampling",
              "max_text_tokens", "shard_size", "text_shard_size", "num_videos", "num_captions")


@dataclass(frozen=True)
class StoreLayout:
    """What a store holds: identity of its content plus array sizes."""

    dataset: str
    manifest_sha256: str
    encoder: dict
    num_frames: int
    num_tokens: int
    token_dim: int
    embed_dim: int
    text_dim: int
    max_text_tokens: int = 32
    shard_size: int = 64
    text_shard_size: int = 1024
    strategy: str = "uniform-midpoint"
    compressor: str | None = None

    def attrs(self, num_videos: int, num_captions: int) -> dict:
        """The store's root attributes."""
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "manifest_sha256": self.manifest_sha256,
            "encoder": json.loads(json.dumps(self.encoder)),
            "sampling": {"num_frames": int(self.num_frames), "strategy": self.strategy},
            "max_text_tokens": int(self.max_text_tokens),
            "shard_size": int(self.shard_size),
            "num_shards": _ceil_div(num_videos, self.shard_size),
            "text_shard_size": int(self.text_shard_size),
            "num_text_shards": _ceil_div(num_captions, self.text_shard_size),
            "num_videos": int(num_videos),
            "num_captions": int(num_captions),
            "dims": {"num_tokens": self.num_tokens, "token_dim": self.token_dim,
                     "embed_dim": self.embed_dim, "text_dim": self.text_dim},
            "compressor": self.compressor,
            "created_by": CREATED_BY,
        }


def row_digest(*fields: Any) -> bytes:
    """The digest of one manifest row (its id and everything extraction reads from it) that a store
    keeps, so that a grown manifest can be told from one whose existing rows changed."""
    return hashlib.sha256(json.dumps([None if f is None else str(f) for f in fields]).encode()).digest()[:SOURCE_BYTES]


def _digest_rows(values: Sequence[bytes], n: int) -> np.ndarray:
    out = np.zeros((n, SOURCE_BYTES), dtype=np.uint8)
    for i, b in enumerate(values):
        out[i] = np.frombuffer(bytes(b)[:SOURCE_BYTES].ljust(SOURCE_BYTES, b"\0"), dtype=np.uint8)
    return out


def _manifest_version(sha: str, videos: int, captions: int) -> dict:
    return {"manifest_sha256": sha, "num_videos": int(videos), "num_captions": int(captions)}


def _thumbnail_info(count: int, max_side: int, max_bytes: int) -> dict:
    return {"count": int(count), "max_side": int(max_side), "max_bytes": int(max_bytes), "format": "jpeg"}


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def fingerprint_of(attrs: dict) -> str:
    """sha256 of what determines a store's content: schema, encoder identity, sampling,
    manifest hash and text length."""
    key = {k: attrs.get(k) for k in ("schema_version", "encoder", "sampling", "manifest_sha256",
                                     "max_text_tokens")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _codecs(compressor: str | None) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if compressor in (None, "", "none"):
        return None
    if compressor == "zstd":
        return (ZstdCodec(level=3),)
    if compressor == "blosc-zstd":
        return (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)
    if compressor == "blosc-lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    raise StoreError(f"unknown compressor {compressor!r} (none, {', '.join(COMPRESSORS)})")


def _set_attrs(group: Any, values: dict) -> None:
    """Add ``values`` to a group's root attributes in one write of its metadata. (``attrs.update``
    writes once per key, so another process could read a half-written set: ``format`` without
    ``schema_version`` while a store is being created, a new manifest hash with the old sizes while
    it grows.)"""
    group.update_attributes(dict(values))


def _is_url(s: str) -> bool:
    return "://" in s


def local_path(url_or_path: str | os.PathLike) -> Path | None:
    """The local directory of a store given as a path or ``file://`` URL; ``None`` for a remote URL."""
    s = os.fspath(url_or_path)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return None if _is_url(s) else Path(s)


def _open_group(url_or_path: str | os.PathLike, mode: str, storage_options: dict | None = None):
    import zarr

    local = local_path(url_or_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is not in the v3 spec yet
        if local is not None:
            if not (local / "zarr.json").is_file():
                raise StoreError(f"{url_or_path}: not a feature cache store (no zarr.json)")
            return zarr.open_group(str(local), mode=mode, zarr_format=3)
        if mode != "r" and is_read_only(url_or_path):
            raise StoreError(f"{url_or_path}: http(s) stores are read-only; write to a path, file:// or s3://")
        try:
            return zarr.open_group(os.fspath(url_or_path), mode=mode, zarr_format=3,
                                   storage_options=_storage_options_for(url_or_path, storage_options))
        except (FileNotFoundError, KeyError) as exc:
            raise StoreError(f"{url_or_path}: not a feature cache store ({exc})") from exc
        except ImportError as exc:
            raise StoreError(f"{url_or_path}: {exc} (pip install -r requirements.txt)") from exc
        except OSError as exc:
            raise StoreError(f"{url_or_path}: cannot open ({type(exc).__name__}: {exc})") from exc


@contextlib.contextmanager
def store_lock(url_or_path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock of a local store (``<store>/.lock``, ``fcntl.flock``) around the steps several
    writers of one store must not interleave (creating it, adding arrays); a no-op for remote stores,
    whose creation writes the same bytes whoever does it and never deletes (``CacheStore.create``)."""
    local = local_path(url_or_path)
    if local is None:
        yield
        return
    import fcntl

    local.mkdir(parents=True, exist_ok=True)
    with open(local / LOCK_FILE, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CacheStore:
    """Reader (and, when opened writable, writer) of one feature cache store."""

    def __init__(self, group: Any, url: str, writable: bool = False) -> None:
        self._g = group
        self.url = url
        self.writable = writable
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{url}: not a feature cache store (attrs format="
                             f"{attrs.get('format')!r}, expected {FORMAT!r})")
        if attrs.get("schema_version") not in READABLE_VERSIONS:
            raise StoreError(f"{url}: store schema_version {attrs.get('schema_version')!r} is not "
                             f"supported (this code reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        self.attrs: dict = attrs
        self._cache: dict[str, Any] = {}

    # -- opening / creation -----------------------------------------------------------------
    @classmethod
    def open(cls, url_or_path: str | os.PathLike, mode: str = "r",
             storage_options: dict | None = None) -> "CacheStore":
        """Open a store: local path, ``file://``, ``http(s)://`` (needs aiohttp and
        consolidated metadata) or ``s3://`` (needs s3fs). ``mode`` is ``"r"`` or ``"r+"``."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        group = _open_group(url_or_path, mode, storage_options)
        return cls(group, os.fspath(url_or_path), writable=mode == "r+")

    @classmethod
    def create(cls, path: str | os.PathLike, layout: StoreLayout, video_ids: Sequence[str],
               video_splits: Sequence[str], caption_ids: Sequence[str],
               caption_video: Sequence[int], caption_splits: Sequence[str],
               thumbnails: dict | None = None, storage_options: dict | None = None,
               video_source: Sequence[bytes] | None = None,
               caption_source: Sequence[bytes] | None = None) -> "CacheStore":
        """Create a new store with every array (data arrays empty, ids filled) and consolidated
        metadata (``thumbnails``: ``{"count", "max_side", "max_bytes"}`` adds the empty thumbnail
        arrays; ``video_source`` / ``caption_source``: each row's manifest digest, ``row_digest``,
        which lets a grown manifest be told from a changed one). Fails if something already exists at
        ``path``.

        The root attributes (``format`` among them) are written last: a store without them is still
        being created. Creation writes the same bytes whoever does it and deletes nothing, so two
        writers racing to create one remote store cannot damage it (the loser gets ``StoreError``
        and opens the winner's store, ``open_or_create``); local stores are created under a lock."""
        import zarr
        from zarr.errors import ContainsArrayError, ContainsGroupError

        local = local_path(path)
        if local is not None and local.exists() and any(p.name != LOCK_FILE for p in local.iterdir()):
            raise StoreError(f"{path}: already exists; open it instead")
        V, C = len(video_ids), len(caption_ids)
        if not (len(video_splits) == V and len(caption_video) == C and len(caption_splits) == C):
            raise ValueError("ids, splits and caption_video lengths disagree")
        S, St, T = layout.shard_size, layout.text_shard_size, layout.num_frames
        N, D, E = layout.num_tokens, layout.token_dim, layout.embed_dim
        L, Dt = layout.max_text_tokens, layout.text_dim
        if S < 1 or St < 1:
            raise ValueError("shard sizes must be >= 1")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if local is not None:
                    g = zarr.open_group(str(local), mode="a", zarr_format=3)  # emptiness checked above
                else:
                    g = zarr.open_group(os.fspath(path), mode="w-", zarr_format=3,
                                        storage_options=_storage_options_for(path, storage_options))
            big = _codecs(layout.compressor)
            vs, ts = max(1, S), max(1, St)

            def arr(name: str, shape: tuple, chunks: tuple, dtype: Any, fill: Any,
                    compressors: Any = None, shards: tuple | None = None) -> Any:
                return g.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                                      fill_value=fill, compressors=compressors)

            def text_arr(name: str, values: Sequence[str] | None, n: int, chunk: int, width: int = 0) -> None:
                data = encode_strings(values, width) if values is not None else None
                width = data.shape[1] if data is not None else width
                a = arr(name, (n, width), (chunk, width), "uint8", 0)
                if data is not None and n:
                    a[...] = data

            text_arr("videos/ids", video_ids, V, vs)
            text_arr("videos/split", video_splits, V, vs)
            arr("videos/status", (V,), (vs,), "int8", STATUS_PENDING)
            text_arr("videos/error", None, V, vs, ERROR_BYTES)
            text_arr("videos/error_detail", None, V, vs, DETAIL_BYTES)
            text_arr("videos/decoder", None, V, vs, DECODER_BYTES)
            arr("videos/tokens", (V, T, N, D), (1, T, N, D), "float16", 0, big, shards=(vs, T, N, D))
            arr("videos/frame_emb", (V, T, E), (vs, T, E), "float32", 0)
            arr("videos/frame_mask", (V, T), (vs, T), "bool", False)
            arr("videos/frame_index", (V, T), (vs, T), "int32", -1)
            arr("videos/frame_time", (V, T), (vs, T), "float32", -1.0)
            text_arr("texts/ids", caption_ids, C, ts)
            arr("texts/video_index", (C,), (ts,), "int64", -1)[...] = np.asarray(caption_video,
                                                                              dtype=np.int64)
            text_arr("texts/split", caption_splits, C, ts)
            arr("texts/tokens", (C, L, Dt), (ts, L, Dt), "float16", 0, big)
            arr("texts/mask", (C, L), (ts, L), "bool", False)
            arr("texts/emb", (C, E), (ts, E), "float32", 0)
            arr("shards/done", (_ceil_div(V, S),), (1,), "bool", False)
            arr("shards/text_done", (_ceil_div(C, St),), (1,), "bool", False)
            if video_source is not None:
                arr("videos/source", (V, SOURCE_BYTES), (vs, SOURCE_BYTES), "uint8", 0)[...] = \
                    _digest_rows(video_source, V)
            if caption_source is not None:
                arr("texts/source", (C, SOURCE_BYTES), (ts, SOURCE_BYTES), "uint8", 0)[...] = \
                    _digest_rows(caption_source, C)
            attrs = layout.attrs(V, C)
            attrs["manifest_history"] = [_manifest_version(layout.manifest_sha256, V, C)]
            if thumbnails:
                from zarr.codecs import ZstdCodec

                K, B = int(thumbnails["count"]), int(thumbnails["max_bytes"])
                arr("videos/thumbnails", (V, K, B), (vs, K, B), "uint8", 0, (ZstdCodec(level=3),))
                arr("videos/thumbnail_bytes", (V, K), (vs, K), "int32", 0)
                arr(THUMBNAILS_DONE, (_ceil_div(V, S),), (1,), "bool", False)
                attrs["thumbnails"] = _thumbnail_info(K, int(thumbnails["max_side"]), B)
        except (ContainsArrayError, ContainsGroupError, FileExistsError) as exc:
            raise StoreError(f"{path}: already exists or is being created by another writer ({exc})") from exc
        _set_attrs(g, attrs)  # last: the mark of a finished creation
        store = cls(g, os.fspath(path), writable=True)
        store.consolidate()
        return store

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, layout: StoreLayout,
                       video_ids: Sequence[str], video_splits: Sequence[str],
                       caption_ids: Sequence[str], caption_video: Sequence[int],
                       caption_splits: Sequence[str], thumbnails: dict | None = None,
                       storage_options: dict | None = None, wait: float = 120.0,
                       video_source: Sequence[bytes] | None = None,
                       caption_source: Sequence[bytes] | None = None) -> "CacheStore":
        """Open an existing store for writing after checking it was made for the same request
        (else :class:`StoreMismatchError`), or create it. Safe when several writers start at once:
        a local store is created under its lock; a remote one being created by another writer is
        waited for (up to ``wait`` seconds)."""
        if is_read_only(path):
            raise StoreError(f"{path}: http(s) stores are read-only; write to a path, file:// or s3://")
        with store_lock(path):
            store = cls._open_existing(path, storage_options, wait)
            if store is None:
                try:
                    return cls.create(path, layout, video_ids, video_splits, caption_ids, caption_video,
                                      caption_splits, thumbnails=thumbnails, storage_options=storage_options,
                                      video_source=video_source, caption_source=caption_source)
                except StoreError:
                    if local_path(path) is not None:
                        raise
                    store = cls._open_existing(path, storage_options, wait, must=True)
        assert store is not None
        store.check_request(layout, video_ids, caption_ids)
        return store

    @classmethod
    def _open_existing(cls, path: str | os.PathLike, storage_options: dict | None, wait: float,
                       must: bool = False) -> "CacheStore | None":
        """The writable store at ``path``; ``None`` when there is none (``must``: wait for it). A store
        without its root attributes yet is being created: waited for, up to ``wait`` seconds."""
        local = local_path(path)
        deadline = time.monotonic() + wait
        while True:
            if local is not None and not (local / "zarr.json").is_file():
                return None
            try:
                group = _open_group(path, "r+", storage_options)
            except StoreError:
                if local is not None:
                    raise
                if not must:
                    return None  # nothing there yet
                group = None
            if group is not None:
                if dict(group.attrs).get("format") is not None:
                    return cls(group, os.fspath(path), writable=True)
                if local is not None:  # created under the lock, so this creation was interrupted
                    raise StoreError(f"{path}: an interrupted store creation (no root attributes); delete it "
                                     f"and run again")
            if time.monotonic() > deadline:
                raise StoreError(f"{path}: a store is being created there and did not finish within {wait:.0f}s "
                                 f"(an interrupted creation? delete it and run again)")
            time.sleep(0.5)

    def check_request(self, layout: StoreLayout, video_ids: Sequence[str], caption_ids: Sequence[str]) -> None:
        """``StoreMismatchError`` unless this store was made for ``layout`` and these ids."""
        want = jsonable(layout.attrs(len(video_ids), len(caption_ids)))
        have = jsonable(self.attrs)
        diff = [k for k in MATCH_KEYS if want.get(k) != have.get(k)]
        if diff:
            details = "; ".join(f"{k}: store has {_short(have.get(k))}, request has "
                                f"{_short(want.get(k))}" for k in diff)
            raise StoreMismatchError(f"{self.url}: existing store was made for a different request "
                                     f"({details}); use another store path or delete it")
        if (self.video_ids != list(video_ids) or self.caption_ids != list(caption_ids)):
            raise StoreMismatchError(f"{self.url}: existing store lists other video/caption ids")

    def update_attrs(self, values: dict) -> None:
        """Set root attributes (``consolidate`` afterwards for http(s) readers)."""
        self._check_writable()
        _set_attrs(self._g, values)
        self.attrs.update(values)

    # -- growing -----------------------------------------------------------------------------
    def append(self, layout: StoreLayout, video_ids: Sequence[str], video_splits: Sequence[str],
               caption_ids: Sequence[str], caption_video: Sequence[int], caption_splits: Sequence[str],
               video_source: Sequence[bytes] | None = None, caption_source: Sequence[bytes] | None = None) -> dict:
        """Grow the store to a grown manifest's rows: the store's own rows first, unchanged (else
        ``StoreMismatchError`` saying to make a new store), then the new ones. Old shards stay done and
        untouched; a partial last shard (video or text) is reopened, its old rows kept aside in
        ``append/<kind>-<shard>.npz`` so that the next write of that shard takes them from there rather
        than recomputing them. ``attrs["manifest_history"]`` gains the new manifest version. Idempotent
        (an interrupted append is finished by the next). Returns ``{"videos", "captions"}`` added."""
        self._check_writable()
        want = jsonable(layout.attrs(len(video_ids), len(caption_ids)))
        have = jsonable(self.attrs)
        diff = [k for k in MATCH_KEYS if k not in ("manifest_sha256", "num_videos", "num_captions")
                and want.get(k) != have.get(k)]
        if diff:
            details = "; ".join(f"{k}: store has {_short(have.get(k))}, request has {_short(want.get(k))}"
                                for k in diff)
            raise StoreMismatchError(f"{self.url}: existing store was made for a different request ({details}); "
                                     f"use another store path or delete it")
        V0, C0, V, C = self.num_videos, self.num_captions, len(video_ids), len(caption_ids)
        problem = self._changed_rows(video_ids, video_splits, caption_ids, caption_video, caption_splits,
                                     video_source, caption_source)
        if problem:
            raise StoreMismatchError(f"{self.url}: the manifest {problem}; a store only grows (new videos and "
                                     f"captions are appended): make a new store for this manifest (another --store)")
        S, St = self.shard_size, self.text_shard_size
        with store_lock(self.url):
            self._reload_group()  # another writer of this store may have grown it meanwhile
            if self.attrs.get("manifest_sha256") == layout.manifest_sha256:
                return {"videos": 0, "captions": 0}
            # 1. old rows of partial last shards aside (before anything else changes)
            if V > V0 and V0 % S and (V0 // S) in self.done_shards():
                self._stash("videos", V0 // S, V0)
            if C > C0 and C0 % St and (C0 // St) in self.done_text_shards():
                self._stash("texts", C0 // St, C0)
            # 2. the arrays grow (chunks of old rows unchanged), new ids written
            for name in self._array_names():
                a = self.array(name)
                if name.startswith("videos/"):
                    a.resize((V,) + a.shape[1:])
                elif name.startswith("texts/"):
                    a.resize((C,) + a.shape[1:])
                elif name in ("shards/done", THUMBNAILS_DONE):
                    a.resize((_ceil_div(V, S),))
                elif name == "shards/text_done":
                    a.resize((_ceil_div(C, St),))
            if V > V0:
                self.array("videos/ids")[V0:V] = self._string_data("videos/ids", video_ids[V0:])
                self.array("videos/split")[V0:V] = self._string_data("videos/split", video_splits[V0:])
                if video_source is not None and self.has_array("videos/source"):
                    self.array("videos/source")[V0:V] = _digest_rows(video_source[V0:], V - V0)
                self.array("shards/done")[V0 // S] = False
                if self.has_thumbnails:
                    self.array(THUMBNAILS_DONE)[V0 // S] = False
            if C > C0:
                self.array("texts/ids")[C0:C] = self._string_data("texts/ids", caption_ids[C0:])
                self.array("texts/split")[C0:C] = self._string_data("texts/split", caption_splits[C0:])
                self.array("texts/video_index")[C0:C] = np.asarray(caption_video[C0:], dtype=np.int64)
                if caption_source is not None and self.has_array("texts/source"):
                    self.array("texts/source")[C0:C] = _digest_rows(caption_source[C0:], C - C0)
                self.array("shards/text_done")[C0 // St] = False
            # 3. last: the attributes say what the store now holds
            history = list(self.attrs.get("manifest_history")
                           or [_manifest_version(self.attrs["manifest_sha256"], V0, C0)])
            history.append(_manifest_version(layout.manifest_sha256, V, C))
            update = {"manifest_sha256": layout.manifest_sha256, "num_videos": V, "num_captions": C,
                      "num_shards": _ceil_div(V, S), "num_text_shards": _ceil_div(C, St),
                      "manifest_history": history}
            _set_attrs(self._g, update)
            self.attrs.update(update)
            self._cache = {k: v for k, v in self._cache.items() if not k.startswith("_")}
            self.consolidate()
        return {"videos": V - V0, "captions": C - C0}

    def _array_names(self) -> list[str]:
        names = [*VIDEO_SHARD_ARRAYS, *TEXT_SHARD_ARRAYS, "shards/done", "shards/text_done"]
        if self.has_thumbnails:
            names += [*THUMBNAIL_ARRAYS, THUMBNAILS_DONE]
        return [n for n in names if self.has_array(n)]

    def _changed_rows(self, video_ids: Sequence[str], video_splits: Sequence[str], caption_ids: Sequence[str],
                      caption_video: Sequence[int], caption_splits: Sequence[str],
                      video_source: Sequence[bytes] | None, caption_source: Sequence[bytes] | None) -> str:
        """What the grown manifest removes or changes of the store's rows ("" when nothing)."""
        V0, C0 = self.num_videos, self.num_captions
        old_v, old_c = self.video_ids, self.caption_ids
        if len(video_ids) < V0 or list(video_ids[:V0]) != old_v:
            gone = sorted(set(old_v) - set(video_ids))
            return f"lacks {len(gone)} of the store's videos (first: {gone[0]!r})" if gone else \
                "lists the store's videos in another order"
        if len(caption_ids) < C0 or list(caption_ids[:C0]) != old_c:
            gone = sorted(set(old_c) - set(caption_ids))
            return f"lacks {len(gone)} of the store's captions (first: {gone[0]!r})" if gone else \
                "lists the store's captions in another order"
        splits = self.strings("videos/split")
        moved = [v for v, a, b in zip(old_v, splits, video_splits) if a != b]
        if moved:
            return f"moves {len(moved)} of the store's videos to another split (first: {moved[0]!r})"
        vidx = np.asarray(self.array("texts/video_index")[...]) if C0 else np.zeros(0, np.int64)
        changed = [c for c, a, b in zip(old_c, vidx.tolist(), caption_video) if a != b]
        if changed:
            return f"gives {len(changed)} of the store's captions another video (first: {changed[0]!r})"
        for name, ids, source in (("videos", old_v, video_source), ("texts", old_c, caption_source)):
            if source is None or not self.has_array(f"{name}/source") or not ids:
                continue
            stored = np.asarray(self.array(f"{name}/source")[...])
            given = _digest_rows(source[:len(ids)], len(ids))
            diff = np.flatnonzero((stored != given).any(axis=1))
            if diff.size:
                what = "videos (start, end or split)" if name == "videos" else "captions (text)"
                return f"changes {diff.size} of the store's {what} (first: {ids[int(diff[0])]!r})"
        return ""

    def _stash(self, kind: str, index: int, end: int) -> None:
        """Keep the rows ``[start of shard, end)`` of shard ``index`` aside (``append/<kind>-<index>.npz``)."""
        import io

        key = f"{APPEND_PREFIX}/{kind}-{int(index)}.npz"
        if self.read_object(key) is not None:
            return
        if kind == "videos":
            lo = index * self.shard_size
            names = [n for n in (*VIDEO_SHARD_ARRAYS, *(THUMBNAIL_ARRAYS if self.has_thumbnails else ()))
                     if self.has_array(n) and n not in ("videos/ids", "videos/split", "videos/source")]
        else:
            lo = index * self.text_shard_size
            names = [n for n in TEXT_SHARD_ARRAYS if n not in ("texts/ids", "texts/split", "texts/source",
                                                                "texts/video_index")]
        buf = io.BytesIO()
        np.savez(buf, **{n.replace("/", "__"): np.asarray(self.array(n)[lo:end]) for n in names})
        self.write_object(key, buf.getvalue())

    def kept_rows(self, kind: str, index: int) -> dict[str, np.ndarray]:
        """The rows of shard ``index`` an append kept aside (array name -> rows from the shard's first),
        which the shard's next write takes instead of recomputing them; ``{}`` when none."""
        import io

        if int(index) not in self.reopened_shards(kind):
            return {}
        data = self.read_object(f"{APPEND_PREFIX}/{kind}-{int(index)}.npz")
        if data is None:
            return {}
        with np.load(io.BytesIO(data)) as z:
            return {n.replace("__", "/"): z[n] for n in z.files}

    def reopened_shards(self, kind: str) -> set[int]:
        """The shards of ``kind`` (videos / texts) an append reopened: each earlier manifest version's
        partial last shard (``attrs["manifest_history"]``); only they can have rows kept aside."""
        count, size = (("num_videos", self.shard_size) if kind == "videos" else
                       ("num_captions", self.text_shard_size))
        history = self.attrs.get("manifest_history") or []
        return {int(v[count]) // size for v in history[:-1] if int(v[count]) % size}

    def num_kept_rows(self, kind: str, index: int) -> int:
        """How many leading rows of shard ``index`` an append kept aside (0: none)."""
        kept = self.kept_rows(kind, index)
        return len(next(iter(kept.values()))) if kept else 0

    def _merge_kept(self, kind: str, index: int, data: dict[str, np.ndarray]) -> bool:
        """Put the rows an append kept aside over ``data`` (one shard's arrays); whether there were any."""
        kept = self.kept_rows(kind, index)
        for name, rows in kept.items():
            if name in data:
                data[name] = np.array(data[name], copy=True)
                data[name][:len(rows)] = rows
        return bool(kept)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def encoder_identity(self) -> dict:
        return self.attrs["encoder"]

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.attrs)

    @property
    def num_videos(self) -> int:
        return int(self.attrs["num_videos"])

    @property
    def num_captions(self) -> int:
        return int(self.attrs["num_captions"])

    @property
    def shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    @property
    def num_shards(self) -> int:
        return int(self.attrs["num_shards"])

    @property
    def text_shard_size(self) -> int:
        return int(self.attrs["text_shard_size"])

    @property
    def num_text_shards(self) -> int:
        return int(self.attrs["num_text_shards"])

    def array(self, name: str) -> Any:
        """The zarr array ``name`` (e.g. ``"videos/tokens"``)."""
        if name not in self._cache:
            self._cache[name] = self._g[name]
        return self._cache[name]

    def has_array(self, name: str) -> bool:
        """Whether the store has array ``name`` (stores of schema version 1 lack some)."""
        try:
            self.array(name)
        except KeyError:
            return False
        return True

    # -- stored objects (checksums, copying) ------------------------------------------------
    def read_object(self, key: str) -> bytes | None:
        """The stored bytes of ``key`` (a path inside the store, e.g. ``"videos/tokens/c/0/0/0/0"``);
        ``None`` when there is no such object."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buf = sync(self._g.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def write_object(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (whole: a reader sees the old object or the new one)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        self._check_writable()
        sync(self._g.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def delete_object(self, key: str) -> None:
        """Remove the object ``key`` (nothing when there is none)."""
        from zarr.core.sync import sync

        self._check_writable()
        sync(self._g.store.delete(key))

    def chunk_key(self, name: str, index: int) -> str:
        """The object holding rows of shard ``index`` of array ``name`` (every array is aligned to the
        shards: one stored chunk, or one zarr shard for the tokens, per store shard)."""
        arr = self.array(name)
        return f"{arr.path}/{arr.metadata.encode_chunk_key((int(index),) + (0,) * (arr.ndim - 1))}"

    def shard_objects(self, kind: str, index: int) -> dict[str, str]:
        """Array name -> object key of everything shard ``index`` of ``kind`` (videos / texts /
        thumbnails) holds, as its checksum record covers it."""
        if kind == "videos":
            names = [n for n in VIDEO_SHARD_ARRAYS if self.has_array(n)]
        elif kind == "texts":
            names = [n for n in TEXT_SHARD_ARRAYS if self.has_array(n)]
        else:
            names = list(THUMBNAIL_ARRAYS)
        return {n: self.chunk_key(n, index) for n in names}

    def record_checksums(self, kind: str, index: int) -> dict:
        """Read back shard ``index`` of ``kind`` and store its checksum record (``pipeline.integrity``)."""
        rows = self.shard_range(index) if kind != "texts" else self.text_shard_range(index)
        record = integrity.make_record(kind, index, rows, self.shard_objects(kind, index), self.read_object)
        self.write_object(integrity.record_key(kind, index), integrity.encode_record(record))
        return record

    def checksum_record(self, kind: str, index: int) -> dict | None:
        """The checksum record of shard ``index`` of ``kind`` (``None``: none recorded)."""
        return integrity.decode_record(self.read_object(integrity.record_key(kind, index)))

    def strings(self, name: str, sel: slice = slice(None)) -> list[str]:
        """The rows ``sel`` of the fixed-width string array ``name`` (e.g. ``videos/split``), decoded."""
        arr = self.array(name)
        if not arr.shape[0]:
            return []
        return decode_strings(arr[sel])

    @property
    def video_ids(self) -> list[str]:
        if "_vids" not in self._cache:
            self._cache["_vids"] = self.strings("videos/ids")
        return self._cache["_vids"]

    @property
    def caption_ids(self) -> list[str]:
        if "_cids" not in self._cache:
            self._cache["_cids"] = self.strings("texts/ids")
        return self._cache["_cids"]

    def splits(self) -> list[str]:
        """Split names present among the videos (train, val, test order first)."""
        present = set(self.strings("videos/split"))
        order = ["train", "val", "test"]
        return [s for s in order if s in present] + sorted(present - set(order))

    def shard_range(self, i: int) -> tuple[int, int]:
        """Video rows ``[lo, hi)`` of shard ``i``."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range 0..{self.num_shards - 1}")
        return i * self.shard_size, min((i + 1) * self.shard_size, self.num_videos)

    def text_shard_range(self, j: int) -> tuple[int, int]:
        """Caption rows ``[lo, hi)`` of text shard ``j``."""
        if not 0 <= j < self.num_text_shards:
            raise IndexError(f"text shard {j} out of range 0..{self.num_text_shards - 1}")
        return j * self.text_shard_size, min((j + 1) * self.text_shard_size, self.num_captions)

    def done_shards(self) -> set[int]:
        """Video shards written whole."""
        if not self.num_shards:
            return set()
        return set(np.flatnonzero(self.array("shards/done")[...]).tolist())

    def done_text_shards(self) -> set[int]:
        """Text shards written whole."""
        if not self.num_text_shards:
            return set()
        return set(np.flatnonzero(self.array("shards/text_done")[...]).tolist())

    def is_complete(self) -> bool:
        return (len(self.done_shards()) == self.num_shards
                and len(self.done_text_shards()) == self.num_text_shards)

    def status(self) -> np.ndarray:
        """(V,) int8 status per video."""
        return np.asarray(self.array("videos/status")[...])

    def failures(self, detail: bool = False) -> dict[str, Any]:
        """``{video_id: reason}`` for videos with status failed; ``detail=True``: ``{video_id:
        {"reason": ..., "detail": <the decoder's raw message>}}`` (stores of schema version 1 kept
        no raw message)."""
        rows = np.flatnonzero(self.status() == STATUS_FAILED)
        if not rows.size:
            return {}
        ids = self.video_ids
        reasons = self.strings("videos/error")
        if not detail:
            return {ids[r]: reasons[r] for r in rows}
        raw = self.strings("videos/error_detail") if self.has_array("videos/error_detail") else [""] * len(ids)
        return {ids[r]: {"reason": reasons[r], "detail": raw[r]} for r in rows}

    # -- writing ----------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.url}: store opened read-only")

    def _string_data(self, name: str, values: Sequence[str]) -> np.ndarray:
        """``values`` in the array's own string encoding (fixed-width UTF-8 bytes; variable-length
        strings in stores of schema version 1)."""
        arr = self.array(name)
        if arr.ndim == 2:
            return encode_strings(values, arr.shape[1])
        return np.asarray(list(values), dtype=str).reshape(-1)

    def write_shard(self, i: int, *, status: np.ndarray, error: Sequence[str],
                    tokens: np.ndarray, frame_emb: np.ndarray, frame_mask: np.ndarray,
                    frame_index: np.ndarray, frame_time: np.ndarray,
                    error_detail: Sequence[str] | None = None, decoder: Sequence[str] | None = None,
                    thumbnails: Sequence[Sequence[bytes]] | None = None) -> None:
        """Write every array of video shard ``i`` at once, then mark it done. ``error``: the short
        failure reason of each video ("" when ok), ``error_detail``: the raw message, ``decoder``:
        which decoder served each video, ``thumbnails``: each video's JPEGs (written, and marked
        done, when the store has thumbnail arrays)."""
        self._check_writable()
        lo, hi = self.shard_range(i)
        n = hi - lo
        data = {"videos/status": np.asarray(status, dtype=np.int8),
                "videos/error": self._string_data("videos/error", error),
                "videos/tokens": np.asarray(tokens, dtype=np.float16),
                "videos/frame_emb": np.asarray(frame_emb, dtype=np.float32),
                "videos/frame_mask": np.asarray(frame_mask, dtype=bool),
                "videos/frame_index": np.asarray(frame_index, dtype=np.int32),
                "videos/frame_time": np.asarray(frame_time, dtype=np.float32)}
        if self.has_array("videos/error_detail"):
            data["videos/error_detail"] = self._string_data("videos/error_detail", error_detail or [""] * n)
        if self.has_array("videos/decoder"):
            data["videos/decoder"] = self._string_data("videos/decoder", decoder or [""] * n)
        for name, value in data.items():
            want = (n,) + self.array(name).shape[1:]
            if value.shape != want:
                raise ValueError(f"shard {i}: {name} has shape {value.shape}, expected {want}")
        kept = self._merge_kept("videos", i, data)
        self._forget_chunks(data, i)
        for name, value in data.items():
            self.array(name)[lo:hi] = value
        if thumbnails is not None and self.has_thumbnails:
            self.write_thumbnails(i, thumbnails)
        self.record_checksums("videos", i)
        self.array("shards/done")[i] = True
        if kept:
            self.delete_object(f"{APPEND_PREFIX}/videos-{int(i)}.npz")

    # -- thumbnails -------------------------------------------------------------------------
    @property
    def has_thumbnails(self) -> bool:
        """Whether the store has the thumbnail arrays (filled or not: see ``thumbnail_shards``)."""
        return all(self.has_array(n) for n in (*THUMBNAIL_ARRAYS, THUMBNAILS_DONE))

    def add_thumbnail_arrays(self, count: int, max_side: int, max_bytes: int) -> None:
        """Create the (empty) thumbnail arrays when the store lacks them, ``count`` JPEGs of at most
        ``max_bytes`` bytes per video; a store that has them keeps its own sizes."""
        from zarr.codecs import ZstdCodec

        self._check_writable()
        if self.has_thumbnails:
            return
        if count < 1 or max_bytes < 1:
            raise ValueError("thumbnail count and bytes must be >= 1")
        with store_lock(self.url):
            self._reload_group()  # another writer may have added them since this store was opened
            if not self.has_thumbnails:
                V, S = self.num_videos, max(1, self.shard_size)
                from zarr.errors import ContainsArrayError

                try:
                    # kept in the cache: this open group reads its children from the consolidated metadata it
                    # was opened with, which the consolidation below updates only for later readers
                    self._cache["videos/thumbnails"] = self._g.create_array(
                        "videos/thumbnails", shape=(V, count, max_bytes), chunks=(S, count, max_bytes),
                        dtype="uint8", fill_value=0, compressors=(ZstdCodec(level=3),))
                    self._cache["videos/thumbnail_bytes"] = self._g.create_array(
                        "videos/thumbnail_bytes", shape=(V, count), chunks=(S, count), dtype="int32", fill_value=0)
                    self._cache[THUMBNAILS_DONE] = self._g.create_array(
                        THUMBNAILS_DONE, shape=(self.num_shards,), chunks=(1,), dtype="bool", fill_value=False)
                except ContainsArrayError:  # a remote writer added them at the same moment: use theirs
                    self._cache.clear()
                    self._reload_group()
                    return
                info = _thumbnail_info(count, max_side, max_bytes)
                _set_attrs(self._g, {"thumbnails": info})
                self.attrs["thumbnails"] = info
                self.consolidate()

    def _reload_group(self) -> None:
        """Read the group's metadata again from the stored objects (not the consolidated copy)."""
        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = zarr.open_group(store=self._g.store, mode="r+" if self.writable else "r", zarr_format=3,
                                use_consolidated=False)
        self._g = g
        self.attrs = dict(g.attrs)
        self._cache = {k: v for k, v in self._cache.items() if k.startswith("_")}

    def thumbnail_shards(self) -> set[int]:
        """Video shards whose thumbnails are written (none for a store without thumbnail arrays)."""
        if not self.has_thumbnails or not self.num_shards:
            return set()
        return set(np.flatnonzero(self.array(THUMBNAILS_DONE)[...]).tolist())

    def write_thumbnails(self, i: int, thumbnails: Sequence[Sequence[bytes]]) -> None:
        """Write the JPEGs of every video of shard ``i`` at once (``thumbnails[row]``: that video's, at
        most ``count``; empty for a failed video), then mark the shard's thumbnails done."""
        self._check_writable()
        lo, hi = self.shard_range(i)
        if len(thumbnails) != hi - lo:
            raise ValueError(f"shard {i}: {len(thumbnails)} thumbnail lists for {hi - lo} videos")
        arr = self.array("videos/thumbnails")
        _, count, width = arr.shape
        data = np.zeros((hi - lo, count, width), dtype=np.uint8)
        sizes = np.zeros((hi - lo, count), dtype=np.int32)
        for r, jpegs in enumerate(thumbnails):
            if len(jpegs) > count:
                raise ValueError(f"video row {lo + r}: {len(jpegs)} thumbnails, the store holds {count}")
            for k, b in enumerate(jpegs):
                if len(b) > width:
                    raise ValueError(f"video row {lo + r}: thumbnail of {len(b)} bytes, the store holds {width}")
                data[r, k, :len(b)] = np.frombuffer(b, dtype=np.uint8)
                sizes[r, k] = len(b)
        merged = {"videos/thumbnails": data, "videos/thumbnail_bytes": sizes}
        self._merge_kept("videos", i, merged)
        data, sizes = merged["videos/thumbnails"], merged["videos/thumbnail_bytes"]
        self._forget_chunks(THUMBNAIL_ARRAYS, i)
        arr[lo:hi] = data
        self.array("videos/thumbnail_bytes")[lo:hi] = sizes
        self.record_checksums("thumbnails", i)
        self.array(THUMBNAILS_DONE)[i] = True

    def thumbnails(self, rows: Sequence[int]) -> list[list[bytes]]:
        """The JPEGs of the video ``rows`` (an empty list for a video without any)."""
        rows = [int(r) for r in rows]
        if not self.has_thumbnails or not rows:
            return [[] for _ in rows]
        order = np.unique(rows)
        sizes = np.asarray(self.array("videos/thumbnail_bytes").get_orthogonal_selection((order, slice(None))))
        data = np.asarray(self.array("videos/thumbnails").get_orthogonal_selection((order, slice(None), slice(None))))
        at = {r: j for j, r in enumerate(order.tolist())}
        return [[data[at[r], k, :n].tobytes() for k, n in enumerate(sizes[at[r]]) if n > 0] for r in rows]

    def _forget_chunks(self, names: Sequence[str], index: int) -> None:
        """Delete the stored chunk (or shard) ``index`` of every array in ``names`` before it is
        written again: an unfinished earlier write may have left it torn, and a sharded array reads
        what is there before writing."""
        from zarr.core.sync import sync

        for name in names:
            arr = self.array(name)
            key = arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))
            sync((arr.store_path / key).delete())

    def reset_shards(self, shards: Sequence[int]) -> None:
        """Mark video shards not done, so the next extraction decodes and writes them again whole."""
        self._check_writable()
        for i in shards:
            self.array("shards/done")[int(i)] = False

    def reset_text_shards(self, shards: Sequence[int]) -> None:
        """Mark text shards not done, so the next extraction encodes and writes them again whole."""
        self._check_writable()
        for j in shards:
            self.array("shards/text_done")[int(j)] = False

    def reset_thumbnail_shards(self, shards: Sequence[int]) -> None:
        """Mark shards' thumbnails not done (``cache thumbnails`` or extraction writes them again)."""
        self._check_writable()
        for i in shards:
            self.array(THUMBNAILS_DONE)[int(i)] = False

    def write_text_shard(self, j: int, *, tokens: np.ndarray, mask: np.ndarray,
                         emb: np.ndarray) -> None:
        """Write every array of text shard ``j`` at once, then mark it done."""
        self._check_writable()
        lo, hi = self.text_shard_range(j)
        n = hi - lo
        data = {"texts/tokens": np.asarray(tokens, dtype=np.float16),
                "texts/mask": np.asarray(mask, dtype=bool),
                "texts/emb": np.asarray(emb, dtype=np.float32)}
        for name, value in data.items():
            want = (n,) + self.array(name).shape[1:]
            if value.shape != want:
                raise ValueError(f"text shard {j}: {name} has shape {value.shape}, "
                                 f"expected {want}")
        kept = self._merge_kept("texts", j, data)
        self._forget_chunks(data, j)
        for name, value in data.items():
            self.array(name)[lo:hi] = value
        self.record_checksums("texts", j)
        self.array("shards/text_done")[j] = True
        if kept:
            self.delete_object(f"{APPEND_PREFIX}/texts-{int(j)}.npz")

    def consolidate(self) -> None:
        """Write consolidated metadata (needed by HTTP readers)."""
        import zarr

        self._check_writable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self._g.store)

    # -- reading one split ------------------------------------------------------------------
    def split_rows(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of ``split`` as a staged split holds them: ``(video rows, caption rows, caption_video)``.

        Video rows: the split's videos whose extraction succeeded, in store order; caption rows:
        their captions in store order; ``caption_video``: each caption's index into the video rows.
        Raises ``StoreError`` when the store has no video of ``split``.
        """
        splits = np.array(self.strings("videos/split"), dtype=object)
        in_split = splits == split
        if not in_split.any():
            raise StoreError(f"{self.url}: no videos of split {split!r} (splits: {self.splits()})")
        rows = np.flatnonzero(in_split & (self.status() == STATUS_OK))
        vidx = np.asarray(self.array("texts/video_index")[...]) if self.num_captions \
            else np.zeros(0, dtype=np.int64)
        crows = np.flatnonzero(np.isin(vidx, rows)) if rows.size else np.zeros(0, np.int64)
        return rows, crows, np.searchsorted(rows, vidx[crows]).astype(np.int64)

    def split_coverage(self, split: str) -> dict[str, Any]:
        """How much of ``split`` a staged copy holds: videos and captions of the split in the store
        (all of the manifest's) and those usable (videos extracted ok, their captions), and every
        missing video with why (its failure reason, or ``pending`` when not extracted yet)."""
        rows, crows, _ = self.split_rows(split)
        in_split = np.flatnonzero(np.array(self.strings("videos/split"), dtype=object) == split)
        vidx = np.asarray(self.array("texts/video_index")[...]) if self.num_captions else np.zeros(0, np.int64)
        status = self.status()
        ids = self.video_ids
        reasons = self.strings("videos/error")
        missing = {ids[r]: (reasons[r] or "failed") if status[r] == STATUS_FAILED else "pending"
                   for r in np.setdiff1d(in_split, rows)}
        return {"split": split, "videos_total": int(in_split.size), "videos_scored": int(rows.size),
                "captions_total": int(np.isin(vidx, in_split).sum()), "captions_scored": int(crows.size),
                "complete": not missing, "missing_videos": missing}

    def split_status(self, split: str) -> np.ndarray:
        """Status (pending / ok / failed) of every video of ``split``, in store order."""
        return self.status()[np.array(self.strings("videos/split"), dtype=object) == split]

    def stage(self, split: str, stage_dir: str | os.PathLike,
              arrays: Sequence[str] = STAGE_ARRAYS) -> StagedSplit:
        """Copy one split into local memory-mapped ``.npy`` files (``pipeline.staging.stage_split``)."""
        return stage_split(self, split, stage_dir, arrays)


def encode_strings(values: Sequence[str], width: int = 0) -> np.ndarray:
    """``values`` as zero-padded UTF-8 bytes, ``uint8 (N, width)`` (``width`` 0: the longest); a
    longer value is cut at a character boundary. Any zarr reader gets the row -> id mapping."""
    raw = [str(v).encode("utf-8") for v in values]
    w = int(width) or max([len(b) for b in raw] + [1])
    out = np.zeros((len(raw), w), dtype=np.uint8)
    for i, b in enumerate(raw):
        if len(b) > w:
            b = b[:w].decode("utf-8", "ignore").encode("utf-8")
        out[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def decode_strings(values: Any) -> list[str]:
    """The strings of ``encode_strings`` (or of a variable-length string array, schema version 1)."""
    a = np.asarray(values)
    if a.dtype == np.uint8 and a.ndim == 2:
        a = np.ascontiguousarray(a)
        return [b.decode("utf-8", "replace") for b in a.view(f"S{a.shape[1]}").reshape(-1).tolist()]
    return [str(v) for v in a.tolist()]


def _short(value: Any) -> str:
    s = json.dumps(value, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


def layout_dict(layout: StoreLayout) -> dict:
    """A layout as a plain dict (for reports)."""
    return asdict(layout)
