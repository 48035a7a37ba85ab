"""``CacheStore``: open or create a store, read what is committed, write shards through the commit protocol."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.errors import StoreError, StoreMismatchError
from core.fileio import jsonable
from pipeline import integrity
from pipeline.remote import is_read_only
from pipeline.store import backend, commit
from pipeline.store.append import AppendMixin
from pipeline.store.layout import (DECODER_BYTES, DETAIL_BYTES, ERROR_BYTES, FORMAT, LOCK_FILE, MATCH_KEYS,
                                   READABLE_VERSIONS, SOURCE_BYTES, STATUS_FAILED, STATUS_OK, STATUS_PENDING,
                                   TEXT_SHARD_ARRAYS, THUMBNAIL_ARRAYS, THUMBNAILS_DONE, VIDEO_SHARD_ARRAYS,
                                   StoreLayout, ceil_div, check_given_strings, codecs, decode_strings, digest_rows,
                                   encode_strings, fingerprint_of, manifest_version, short, thumbnail_info)
from pipeline.store.splits import SplitMixin
from pipeline.store.thumbnails import ThumbnailMixin

CUT_STRINGS = ("videos/error", "videos/error_detail", "videos/decoder")  # the store's own messages: shortened


class CacheStore(AppendMixin, ThumbnailMixin, SplitMixin):
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
        """Open a store: local path, ``file://``, ``http(s)://`` (needs aiohttp and consolidated
        metadata) or ``s3://`` (needs s3fs). ``mode`` is ``"r"`` or ``"r+"``. A writable open finishes (or
        rolls back) an append a killed writer left unfinished (``AppendMixin.recover``)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        group = backend.open_group(url_or_path, mode, storage_options)
        store = cls(group, os.fspath(url_or_path), writable=mode == "r+")
        if store.writable:
            store.recover()
        return store

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
        from zarr.errors import ContainsArrayError, ContainsGroupError

        local = backend.local_path(path)
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
        given = {"videos/ids": video_ids, "videos/split": video_splits, "texts/ids": caption_ids,
                 "texts/split": caption_splits}
        widths = {name: check_given_strings(name, values) for name, values in given.items()}
        try:
            g = backend.new_group(path, storage_options)
            big = codecs(layout.compressor)
            vs, ts = max(1, S), max(1, St)

            def arr(name: str, shape: tuple, chunks: tuple, dtype: Any, fill: Any,
                    compressors: Any = None, shards: tuple | None = None) -> Any:
                return g.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                                      fill_value=fill, compressors=compressors)

            def text_arr(name: str, n: int, chunk: int, width: int) -> None:
                a = arr(name, (n, width), (chunk, width), "uint8", 0)
                if name in given and n:
                    a[...] = encode_strings(given[name], width, name=name)

            text_arr("videos/ids", V, vs, widths["videos/ids"])
            text_arr("videos/split", V, vs, widths["videos/split"])
            arr("videos/status", (V,), (vs,), "int8", STATUS_PENDING)
            text_arr("videos/error", V, vs, ERROR_BYTES)
            text_arr("videos/error_detail", V, vs, DETAIL_BYTES)
            text_arr("videos/decoder", V, vs, DECODER_BYTES)
            arr("videos/tokens", (V, T, N, D), (1, T, N, D), "float16", 0, big, shards=(vs, T, N, D))
            arr("videos/frame_emb", (V, T, E), (vs, T, E), "float32", 0)
            arr("videos/frame_mask", (V, T), (vs, T), "bool", False)
            arr("videos/frame_index", (V, T), (vs, T), "int32", -1)
            arr("videos/frame_time", (V, T), (vs, T), "float32", -1.0)
            text_arr("texts/ids", C, ts, widths["texts/ids"])
            arr("texts/video_index", (C,), (ts,), "int64", -1)[...] = np.asarray(caption_video, dtype=np.int64)
            text_arr("texts/split", C, ts, widths["texts/split"])
            arr("texts/tokens", (C, L, Dt), (ts, L, Dt), "float16", 0, big)
            arr("texts/mask", (C, L), (ts, L), "bool", False)
            arr("texts/emb", (C, E), (ts, E), "float32", 0)
            arr("shards/done", (ceil_div(V, S),), (1,), "bool", False)
            arr("shards/text_done", (ceil_div(C, St),), (1,), "bool", False)
            if video_source is not None:
                arr("videos/source", (V, SOURCE_BYTES), (vs, SOURCE_BYTES), "uint8", 0)[...] = \
                    digest_rows(video_source, V)
            if caption_source is not None:
                arr("texts/source", (C, SOURCE_BYTES), (ts, SOURCE_BYTES), "uint8", 0)[...] = \
                    digest_rows(caption_source, C)
            attrs = layout.attrs(V, C)
            attrs["manifest_history"] = [manifest_version(layout.manifest_sha256, V, C)]
            if thumbnails:
                from zarr.codecs import ZstdCodec

                K, B = int(thumbnails["count"]), int(thumbnails["max_bytes"])
                arr("videos/thumbnails", (V, K, B), (vs, K, B), "uint8", 0, (ZstdCodec(level=3),))
                arr("videos/thumbnail_bytes", (V, K), (vs, K), "int32", 0)
                arr(THUMBNAILS_DONE, (ceil_div(V, S),), (1,), "bool", False)
                attrs["thumbnails"] = thumbnail_info(K, int(thumbnails["max_side"]), B)
        except (ContainsArrayError, ContainsGroupError, FileExistsError) as exc:
            raise StoreError(f"{path}: already exists or is being created by another writer ({exc})") from exc
        backend.set_attrs(g, attrs)  # last: the mark of a finished creation
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
        with backend.store_lock(path):
            store = cls._open_existing(path, storage_options, wait)
            if store is None:
                backend.clear_interrupted_creation(path)
                try:
                    return cls.create(path, layout, video_ids, video_splits, caption_ids, caption_video,
                                      caption_splits, thumbnails=thumbnails, storage_options=storage_options,
                                      video_source=video_source, caption_source=caption_source)
                except StoreError:
                    if backend.local_path(path) is not None:
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
        local = backend.local_path(path)
        deadline = time.monotonic() + wait
        while True:
            if local is not None and not (local / "zarr.json").is_file():
                return None
            try:
                group = backend.open_group(path, "r+", storage_options)
            except StoreError:
                if local is not None:
                    raise
                if not must:
                    return None  # nothing there yet
                group = None
            if group is not None:
                if dict(group.attrs).get("format") is not None:
                    store = cls(group, os.fspath(path), writable=True)
                    store.recover()
                    return store
                if local is not None:  # created under the lock (held now), so this creation was interrupted
                    return None
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
            details = "; ".join(f"{k}: store has {short(have.get(k))}, request has "
                                f"{short(want.get(k))}" for k in diff)
            raise StoreMismatchError(f"{self.url}: existing store was made for a different request "
                                     f"({details}); use another store path or delete it")
        if (self.video_ids != list(video_ids) or self.caption_ids != list(caption_ids)):
            raise StoreMismatchError(f"{self.url}: existing store lists other video/caption ids")

    def update_attrs(self, values: dict) -> None:
        """Set root attributes in one write (``consolidate`` afterwards for http(s) readers)."""
        self._check_writable()
        backend.set_attrs(self._g, values)
        self.attrs.update(values)

    def _reload_group(self) -> None:
        """Read the group's metadata again from the stored objects (not the consolidated copy)."""
        import warnings

        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = zarr.open_group(store=self._g.store, mode="r+" if self.writable else "r", zarr_format=3,
                                use_consolidated=False)
        self._g = g
        self.attrs = dict(g.attrs)
        self._cache = {}

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
        return backend.read_object(self._g, key)

    def write_object(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (whole: a reader sees the old object or the new one)."""
        self._check_writable()
        backend.write_object(self._g, key, data)

    def delete_object(self, key: str) -> None:
        """Remove the object ``key`` (nothing when there is none)."""
        self._check_writable()
        backend.delete_object(self._g, key)

    def chunk_keys(self, name: str, index: int) -> list[str]:
        """Every stored object holding rows of shard ``index`` of array ``name`` (every array is aligned to
        the shards: one stored chunk, or one zarr shard for the tokens, per store shard and per block of its
        other dimensions; a string array widened by an append has several along its width)."""
        arr = self.array(name)
        block = arr.shards or arr.chunks
        grid = [range(ceil_div(s, c)) if s else range(1) for s, c in zip(arr.shape[1:], block[1:])]
        return [f"{arr.path}/{arr.metadata.encode_chunk_key((int(index),) + rest)}"
                for rest in itertools.product(*grid)]

    def chunk_key(self, name: str, index: int) -> str:
        """The first object of ``chunk_keys``."""
        return self.chunk_keys(name, index)[0]

    def shard_objects(self, kind: str, index: int) -> dict[str, str]:
        """Label -> object key of everything shard ``index`` of ``kind`` (videos / texts / thumbnails)
        holds, as its checksum record covers it: the array name for its first object, ``name[k]`` for the
        k-th further one along a widened string array."""
        if kind == "videos":
            names = [n for n in VIDEO_SHARD_ARRAYS if self.has_array(n)]
        elif kind == "texts":
            names = [n for n in TEXT_SHARD_ARRAYS if self.has_array(n)]
        else:
            names = list(THUMBNAIL_ARRAYS)
        out = {}
        for n in names:
            for k, key in enumerate(self.chunk_keys(n, index)):
                out[n if k == 0 else f"{n}[{k}]"] = key
        return out

    def record_checksums(self, kind: str, index: int) -> dict:
        """Read back shard ``index`` of ``kind`` and store its checksum record (``pipeline.integrity``)."""
        rows = self.shard_range(index) if kind != "texts" else self.text_shard_range(index)
        record = integrity.make_record(kind, index, rows, self.shard_objects(kind, index), self.read_object)
        self.write_object(integrity.record_key(kind, index), integrity.encode_record(record))
        return record

    def checksum_record(self, kind: str, index: int) -> dict | None:
        """The checksum record of shard ``index`` of ``kind`` (``None``: none recorded)."""
        return integrity.decode_record(self.read_object(integrity.record_key(kind, index)))

    # -- reading (only what is committed) ---------------------------------------------------
    def _rows_of(self, name: str) -> int:
        return self.num_videos if name.startswith("videos/") else self.num_captions

    def strings(self, name: str, sel: slice = slice(None)) -> list[str]:
        """The rows ``sel`` of the fixed-width string array ``name`` (e.g. ``videos/split``), decoded; rows
        past the attributes' count (an unfinished append's) are not read."""
        arr = self.array(name)
        n = min(arr.shape[0], self._rows_of(name))
        if not n:
            return []
        lo, hi, step = sel.indices(n)
        return decode_strings(arr[lo:hi:step]) if hi > lo else []

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

    def caption_video(self) -> np.ndarray:
        """(C,) int64: each caption's video row."""
        if not self.num_captions:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.array("texts/video_index")[:self.num_captions])

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
        """Video shards committed (written whole)."""
        return set(np.flatnonzero(commit.done_flags(self, "videos")).tolist())

    def done_text_shards(self) -> set[int]:
        """Text shards committed (written whole)."""
        return set(np.flatnonzero(commit.done_flags(self, "texts")).tolist())

    def is_complete(self) -> bool:
        return (len(self.done_shards()) == self.num_shards
                and len(self.done_text_shards()) == self.num_text_shards)

    def status(self) -> np.ndarray:
        """(V,) int8 status per video as committed: a video of a shard not committed is pending whatever
        its stored status says (``pipeline.store.commit``)."""
        V = self.num_videos
        if not V:
            return np.zeros(0, dtype=np.int8)
        raw, done = commit.committed(self, "videos", lambda: np.asarray(self.array("videos/status")[:V]))
        out = np.asarray(raw, dtype=np.int8).copy()
        out[~commit.rows_mask(done, self.shard_size, V)] = STATUS_PENDING
        return out

    def failures(self, detail: bool = False) -> dict[str, Any]:
        """``{video_id: reason}`` for committed videos with status failed; ``detail=True``: ``{video_id:
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
        strings in stores of schema version 1). The store's own messages are shortened to the width; a
        manifest-given value wider than it is a ``StoreError`` (``append`` widens first)."""
        arr = self.array(name)
        if arr.ndim == 2:
            return encode_strings(values, arr.shape[1], cut=name in CUT_STRINGS, name=name)
        return np.asarray(list(values), dtype=str).reshape(-1)

    def write_shard(self, i: int, *, status: np.ndarray, error: Sequence[str],
                    tokens: np.ndarray, frame_emb: np.ndarray, frame_mask: np.ndarray,
                    frame_index: np.ndarray, frame_time: np.ndarray,
                    error_detail: Sequence[str] | None = None, decoder: Sequence[str] | None = None,
                    thumbnails: Sequence[Sequence[bytes]] | None = None) -> None:
        """Commit video shard ``i`` (``pipeline.store.commit``). ``error``: the short failure reason of
        each video ("" when ok), ``error_detail``: the raw message, ``decoder``: which decoder served each
        video, ``thumbnails``: each video's JPEGs (committed just before the shard, when the store has thumbnail
        arrays, so that a shard committed by extraction always has its thumbnails)."""
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
        if thumbnails is not None and self.has_thumbnails:  # first: a committed video shard has its thumbnails
            self.write_thumbnails(i, thumbnails)
        commit.commit_shard(self, "videos", i, (lo, hi), data)
        if kept:
            self._drop_kept("videos", i)

    def write_text_shard(self, j: int, *, tokens: np.ndarray, mask: np.ndarray,
                         emb: np.ndarray) -> None:
        """Commit text shard ``j`` (``pipeline.store.commit``)."""
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
        commit.commit_shard(self, "texts", j, (lo, hi), data)
        if kept:
            self._drop_kept("texts", j)

    def reset_shards(self, shards: Sequence[int]) -> None:
        """Mark video shards not done, so the next extraction decodes and writes them again whole."""
        commit.reset(self, "videos", shards)

    def reset_text_shards(self, shards: Sequence[int]) -> None:
        """Mark text shards not done, so the next extraction encodes and writes them again whole."""
        commit.reset(self, "texts", shards)

    def consolidate(self) -> None:
        """Write consolidated metadata (needed by HTTP readers)."""
        import warnings

        import zarr

        self._check_writable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self._g.store)


__all__ = ["CacheStore", "STATUS_PENDING", "STATUS_OK", "STATUS_FAILED"]
