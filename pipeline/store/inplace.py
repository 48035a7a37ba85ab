"""Rows of a local store's uncompressed arrays read where they lie: memory maps of its chunk and shard files.

A store's token arrays are uncompressed by default (docs/STORE.md): ``videos/tokens`` is sharded (one
file per shard of videos, each video an inner chunk of raw little-endian bytes at the offset the
shard's index gives, the index itself checked by its crc32c), ``texts/tokens`` is chunked (one file
per text shard, the captions' rows one after another). For a store on local disk or NFS a split can
then be read without a copy: ``MappedRows`` maps each file once (read-only) and gives the split's rows
as views at their offsets, so ``rows[index]`` reads just those rows, like a staged memory map.

``in_place_reason`` says why an array cannot be read so (a compressor, another byte order, chunks cut
along more than the first axis), and staging copies it instead. Only rows of committed shards are
asked for (``CacheStore.split_rows``); every shard index is checked when its file is mapped, and a
``MappedRows`` maps the files as they are when it is made, so a split opened after a repair or an
append sees the new bytes (files are replaced whole by the commit protocol, never rewritten in place).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StoreError

_EMPTY = np.iinfo(np.uint64).max  # a shard index entry of a chunk that was never written
_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def _raw(codecs: list[dict]) -> bool:
    """Whether ``codecs`` store a chunk as its raw little-endian bytes (no compressor, no transpose)."""
    return len(codecs) == 1 and codecs[0].get("name") == "bytes" and \
        codecs[0].get("configuration", {}).get("endian", "little") == "little"


def _layout(meta: dict) -> tuple[int, int | None, str | None]:
    """``(rows per file, rows per inner chunk or None, reason or None)`` of an array's ``zarr.json``."""
    shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    if meta.get("chunk_key_encoding", {}).get("name") != "default" or \
            meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/":
        return 0, None, "its chunk keys are not zarr v3's default c/i/j/... layout"
    if list(chunk[1:]) != list(shape[1:]):
        return 0, None, "its chunks are cut along more than the rows"
    codecs = meta["codecs"]
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        conf = codecs[0]["configuration"]
        inner = conf["chunk_shape"]
        if list(inner[1:]) != list(shape[1:]) or chunk[0] % inner[0]:
            return 0, None, "its inner chunks are cut along more than the rows"
        if not _raw(conf["codecs"]):
            return 0, None, f"its inner chunks are encoded ({', '.join(c['name'] for c in conf['codecs'])})"
        if conf.get("index_location", "end") != "end" or conf.get("index_codecs") != _INDEX_CODECS:
            return 0, None, "its shard index is not little-endian bytes with a crc32c at the shard's end"
        return int(chunk[0]), int(inner[0]), None
    if not _raw(codecs):
        return 0, None, f"it is encoded ({', '.join(c['name'] for c in codecs)})"
    return int(chunk[0]), None, None


def in_place_reason(root: str | Path, name: str) -> str | None:
    """Why array ``name`` of the local store at ``root`` cannot be read in place (None: it can)."""
    path = Path(root) / name / "zarr.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path} is unreadable ({exc})"
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        return f"{path} is not a zarr v3 array"
    return _layout(meta)[2]


class MappedRows:
    """Rows ``rows`` (store row numbers) of array ``name`` of the local store at ``root``, as a read-only
    ``(len(rows), *row_shape)`` array-like: ``shape``, ``dtype``, ``len``, and ``[int]`` (a view) or
    ``[slice | index array]`` (a copy of those rows, in that order), then any numpy index within them
    (``[rows, i, j]``)."""

    def __init__(self, root: str | Path, name: str, rows: np.ndarray) -> None:
        self.root, self.name = Path(root), name
        meta = json.loads((self.root / name / "zarr.json").read_text())
        per_file, per_inner, reason = _layout(meta)
        if reason:
            raise StoreError(f"{self.root}: {name} cannot be read in place: {reason}")
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.row_shape = tuple(int(s) for s in meta["shape"][1:])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.per_file, self.per_inner = per_file, per_inner
        # a chunk zarr never wrote (all of it the fill value: zarr skips such chunks) reads as the fill value,
        # as zarr reads it
        self._fill = np.full(self.row_shape, meta.get("fill_value") or 0, dtype=self.dtype)
        self._fill.flags.writeable = False
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= int(meta["shape"][0])):
            raise StoreError(f"{self.root}: rows outside {name}'s {meta['shape'][0]}")
        self.shape = (int(self.rows.size),) + self.row_shape
        self._maps: dict[int, np.ndarray] = {}
        files = self.rows // per_file
        self._file = files
        self._offset = np.empty(self.rows.size, dtype=np.int64)
        for f in np.unique(files):
            sel = files == f
            self._offset[sel] = self._row_offsets(int(f), self.rows[sel] - int(f) * per_file)

    # -- files ----------------------------------------------------------------------------
    def _path(self, f: int) -> Path:
        return self.root / self.name / "c" / str(f) / "/".join("0" for _ in self.row_shape)

    def _map(self, f: int) -> np.ndarray:
        m = self._maps.get(f)
        if m is None:
            path = self._path(f)
            try:
                m = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{path}: cannot map {self.name}'s file {f} ({exc})") from None
            self._maps[f] = m
        return m

    def _row_offsets(self, f: int, local: np.ndarray) -> np.ndarray:
        """Byte offsets in file ``f`` of its rows ``local`` (0-based within the file); -1 for a row
        zarr reads as the fill value (its chunk, or the whole file, never written: zarr skips a chunk
        that is all fill value)."""
        if not self._path(f).is_file():
            return np.full(local.shape, -1, dtype=np.int64)
        m = self._map(f)
        if self.per_inner is None:  # a plain chunk: the rows one after another
            if m.size < self.per_file * self.row_bytes:
                raise StoreError(f"{self._path(f)}: {m.size} bytes, a chunk of {self.name} has "
                                 f"{self.per_file * self.row_bytes}")
            return local * self.row_bytes
        inner = self.per_file // self.per_inner
        index_bytes = inner * 16 + 4
        if m.size < index_bytes:
            raise StoreError(f"{self._path(f)}: {m.size} bytes cannot hold its shard index")
        from numcodecs.checksum32 import CRC32C

        try:
            raw = CRC32C().decode(bytes(m[m.size - index_bytes:]))
        except Exception as exc:
            raise StoreError(f"{self._path(f)}: the shard index fails its crc32c ({exc})") from None
        index = np.frombuffer(raw, dtype="<u8").reshape(inner, 2)
        entry = index[local // self.per_inner]
        chunk_bytes = self.per_inner * self.row_bytes
        empty = (entry[:, 0] == _EMPTY) & (entry[:, 1] == _EMPTY)
        bad = ~empty & ((entry[:, 1] != chunk_bytes) | (entry[:, 0] + entry[:, 1] > m.size - index_bytes))
        if bad.any():
            row = int(local[np.flatnonzero(bad)[0]]) + f * self.per_file
            raise StoreError(f"{self._path(f)}: the shard index has no whole chunk for {self.name} row {row}")
        offsets = np.where(empty, 0, entry[:, 0]).astype(np.int64) + (local % self.per_inner) * self.row_bytes
        return np.where(empty, -1, offsets)

    # -- array protocol ------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, i: int) -> np.ndarray:
        if self._offset[i] < 0:
            return self._fill
        m = self._map(int(self._file[i]))
        return np.frombuffer(m, dtype=self.dtype, count=int(np.prod(self.row_shape)),
                             offset=int(self._offset[i])).reshape(self.row_shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):  # rows first, then the rest within them, as numpy indexes
            if not index or index[0] is Ellipsis:
                return np.asarray(self)[index]
            rows, rest = self[index[0]], index[1:]
            return rows[rest] if isinstance(index[0], (int, np.integer)) else rows[(slice(None),) + rest]
        if isinstance(index, (int, np.integer)):
            return self._row(int(index) % max(1, len(self)))
        picked = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if picked.ndim != 1:
            raise IndexError(f"{self.name}: index rows with an int, a slice or a 1-d index array")
        out = np.empty((picked.size,) + self.row_shape, dtype=self.dtype)
        for k, i in enumerate(picked):
            out[k] = self._row(int(i))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"MappedRows({self.root}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"
