"""A store in and out of HDF5: the round trip and stores built from per-frame features another tool wrote.

The layouts are in docs/SHARING.md ("HDF5"); what an import checks, in docs/STORE.md ("Importing HDF5 safely").

``export_hdf5(store, out.h5)``: every array of the store as an HDF5 dataset of the same path and dtype
(chunked along the rows like the store's shards, gzip-compressed with byte shuffling), the store's
root attributes as JSON strings on the root (``attrs["store:<key>"]``), plus ``crosstvr_hdf5_format =
"crosstvr-feature-cache-hdf5"`` and ``crosstvr_hdf5_layout_version = 1``. ``import_hdf5(in.h5, store)``
builds the store again: the same layout, the same rows, every written shard written whole (and
checksummed) as extraction writes it, so the round trip gives back every array and attribute.

``import_features(in.h5, store, manifest)``: the minimal layout another extractor can write::

    /videos/<video_id>    (frames, tokens, dim) or (frames, dim)   float (any precision)
    /texts/<caption_id>   (tokens, dim) or (dim,)                  optional
    root attrs (optional): "encoder" (JSON: what made the features), "fps" (frames per second)

Videos of the manifest missing from the file are recorded as failed (``missing: not in <file>``).
With per-frame tokens, a frame's embedding is its first token (taken as the CLS token); with one
vector per frame, that vector is both the frame's only token and its embedding. Likewise for texts.
Captions without a ``/texts`` entry leave their text shards unwritten.

Both imports take the file as untrusted: every dataset they read is checked (declared shape, dtype,
chunking, that it is stored in this file) against what the import needs and against ``ImportLimits``
before any data is read; only the rows the store keeps are read, a shard at a time; only known root
attributes of checked type and size are taken (the others are named in a ``ForeignAttributeWarning``
and left out); a local store is built at ``<store>.importing-<host>-<pid>-<hex>`` beside the
destination and renamed into place when whole, and removed when the import fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ExternalFormatError, StoreError, UsageError
from pipeline.store import STATUS_FAILED, STATUS_OK, CacheStore, StoreLayout, decode_strings, local_path

H5_FORMAT = "crosstvr-feature-cache-hdf5"
H5_LAYOUT_VERSION = 1
ATTR_PREFIX = "store:"     # the store's root attributes, each as JSON
FORMAT_ATTR, VERSION_ATTR = "crosstvr_hdf5_format", "crosstvr_hdf5_layout_version"
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
IMPORTING = ".importing-"  # <store>.importing-<host>-<pid>-<hex>: a store being imported, renamed when whole
FLOAT16_MAX = float(np.finfo(np.float16).max)  # the store keeps tokens as float16

# The root attributes of a store export that an import takes, and the type each must have: ``int`` (a
# count, >= 0), ``str``, ``dict`` (any JSON object), ``None``, a tuple (one of), a list ([item type]),
# a dict of key -> type (exactly those keys). Every other ``store:`` key is left out.
STORE_ATTRS: dict[str, Any] = {
    "format": str, "schema_version": int, "dataset": str, "manifest_sha256": str, "encoder": dict,
    "sampling": {"num_frames": int, "strategy": str}, "max_text_tokens": int,
    "shard_size": int, "num_shards": int, "text_shard_size": int, "num_text_shards": int,
    "num_videos": int, "num_captions": int,
    "dims": {"num_tokens": int, "token_dim": int, "embed_dim": int, "text_dim": int},
    "compressor": (str, None), "created_by": str,
    "manifest_history": [{"manifest_sha256": str, "num_videos": int, "num_captions": int}],
    "thumbnails": {"count": int, "max_side": int, "max_bytes": int, "format": str},
}
REQUIRED_ATTRS = ("dataset", "manifest_sha256", "encoder", "sampling", "dims", "max_text_tokens", "shard_size",
                  "text_shard_size", "num_videos", "num_captions")
# Copied from the file into the store; every other known key must equal what the store rebuilds from
# the layout (else the file is refused): the new store's own attributes are never overwritten.
COPIED_ATTRS = ("created_by", "manifest_history")
FEATURE_ATTRS = ("encoder", "fps")  # what import_features takes from another tool's root attributes


@dataclass(frozen=True)
class ImportLimits:
    """The most an HDF5 import accepts; each dataset's declared shape is checked against them before
    anything is read. The defaults take real feature files with room to spare: 64 frames x 257 tokens x
    1408 dims in float16 for 100k videos is 4.6 TB in all and 3 GB per shard of 64 videos."""

    rows: int = 10_000_000          # videos, captions (and entries of a features file's /videos, /texts)
    frames: int = 1024              # frames per video in the store
    source_frames: int = 1_000_000  # frames one video of another tool's file declares (read: only those kept)
    tokens: int = 4096              # tokens per frame, tokens per caption
    width: int = 65536              # a vector's dims, a string row's bytes, a thumbnail's bytes
    total_bytes: int = 1 << 44      # the data the new store holds (16 TiB)
    memory_bytes: int = 1 << 33     # held at once: one shard, or the ids, splits and flags read whole (8 GiB)
    attr_bytes: int = 1 << 16       # one root attribute's value (64 KiB)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ImportLimits":
        """Limits from ``key=value`` options (``core.options.parse_key_values``), the rest at their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown import limit {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        bad = [k for k, v in options.items() if type(v) is not int or v < 1]
        if bad:
            raise UsageError(f"import limit {', '.join(bad)}: a whole number >= 1 expected")
        return cls(**options)

    def check(self, path: Any, what: str, value: int, limit: str) -> None:
        """``ExternalFormatError`` naming the file, ``what`` and the limit when ``value`` exceeds limit ``limit``."""
        bound = getattr(self, limit)
        if value > bound:
            raise ExternalFormatError(f"{path}: {what} is {value}, over the import limit {limit}={bound}")


class ForeignAttributeWarning(UserWarning):
    """Root attributes of an imported HDF5 file that the store does not take (named, never copied)."""


def export_hdf5(store: CacheStore, out: str | os.PathLike, progress: bool = True) -> Path:
    """Write every array and the root attributes of ``store`` into the HDF5 file ``out`` (see the module
    docstring), shard by shard (never a whole token array in memory)."""
    import h5py
    from tqdm.auto import tqdm

    from pipeline.sharing import array_names

    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    names = array_names(store)
    S = store.shard_size
    with h5py.File(tmp, "w") as f:
        f.attrs[FORMAT_ATTR] = H5_FORMAT
        f.attrs[VERSION_ATTR] = H5_LAYOUT_VERSION
        for key, value in store.attrs.items():
            f.attrs[ATTR_PREFIX + key] = json.dumps(value, sort_keys=True)
        bar = tqdm(names, unit="array", desc="export", disable=not progress, leave=False)
        for name in bar:
            arr = store.array(name)
            rows = (arr.shards or arr.chunks)[0] if arr.ndim else 1
            chunks = (max(1, min(rows, arr.shape[0])),) + tuple(arr.shape[1:]) if arr.shape[0] else None
            ds = f.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                  fillvalue=arr.fill_value, **(COMPRESSION if chunks else {}))
            step = max(1, rows if name != "videos/tokens" else S)
            for lo in range(0, arr.shape[0], step):
                ds[lo:lo + step] = np.asarray(arr[lo:lo + step])
        bar.close()
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------- reading untrusted files
def _attr(f: Any, key: str, path: Any, limits: ImportLimits) -> Any:
    """The root attribute ``key``: one value, its size checked before it is read (a variable-length
    string, whose size HDF5 does not declare, is checked once read)."""
    aid = f.attrs.get_id(key)
    if aid.shape not in ((), (1,)):
        raise ExternalFormatError(f"{path}: root attribute {key!r} has shape {aid.shape}; one value expected")
    limits.check(path, f"the size of root attribute {key!r}", aid.dtype.itemsize, "attr_bytes")
    value = f.attrs[key]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        limits.check(path, f"the size of root attribute {key!r}", len(value.encode("utf-8")), "attr_bytes")
    return value


def _json_attr(f: Any, key: str, path: Any, limits: ImportLimits) -> Any:
    value = _attr(f, key, path, limits)
    if not isinstance(value, str):
        raise ExternalFormatError(f"{path}: root attribute {key!r} is not a JSON string")
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise ExternalFormatError(f"{path}: root attribute {key!r} is not JSON ({str(exc)[:80]})") from None


def _fits(value: Any, kind: Any) -> bool:
    """Whether the JSON ``value`` has the type ``kind`` (as in ``STORE_ATTRS``)."""
    if kind is int:
        return type(value) is int and value >= 0
    if kind in (str, dict):
        return type(value) is kind
    if kind is None:
        return value is None
    if isinstance(kind, tuple):
        return any(_fits(value, k) for k in kind)
    if isinstance(kind, list):
        return type(value) is list and all(_fits(v, kind[0]) for v in value)
    return (type(value) is dict and value.keys() == kind.keys()
            and all(_fits(value[k], t) for k, t in kind.items()))


def _leave_out(path: Any, names: list[str]) -> None:
    """Say which root attributes the store does not take (names only: their values are never read)."""
    if names:
        shown = ", ".join(repr(n[:40]) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(f"{path}: root attributes not taken into the store: {shown}", ForeignAttributeWarning,
                      stacklevel=2)


def _has(group: Any, name: str) -> bool:
    return group.get(name, getlink=True) is not None


def _member(group: Any, name: str, path: Any, dataset: bool = True) -> Any:
    """``group[name]``, a dataset (or group) stored in this file: links to elsewhere, virtual datasets
    and datasets whose data lies in other files are refused, so an import reads nothing but the file."""
    import h5py

    where = f"{group.name.rstrip('/')}/{name}"
    node = group
    for part in name.split("/"):
        link = node.get(part, getlink=True)
        if link is None:
            raise ExternalFormatError(f"{path}: no {where}")
        if not isinstance(link, h5py.HardLink):
            raise ExternalFormatError(f"{path}: {where} is a {type(link).__name__}; only data stored in the "
                                      f"file itself is imported")
        node = node[part]
    if not isinstance(node, h5py.Dataset if dataset else h5py.Group):
        raise ExternalFormatError(f"{path}: {where} is not {'a dataset' if dataset else 'a group'}")
    if dataset and (node.is_virtual or node.external):
        raise ExternalFormatError(f"{path}: {where} keeps its data in other files; only data stored in the "
                                  f"file itself is imported")
    return node


def _nbytes(shape: tuple, dtype: Any) -> int:
    return int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize


def _chunked(ds: Any, path: Any, limits: ImportLimits) -> None:
    """A chunk is decompressed whole to read any of its rows: it must fit in memory."""
    if ds.chunks is not None:
        limits.check(path, f"one chunk of {ds.name} (bytes)", _nbytes(ds.chunks, ds.dtype), "memory_bytes")


# ------------------------------------------------------------------------------- building out of sight
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in socket.gethostname())[:64] or "host"


def _remove_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Delete what killed imports into ``dest`` left beside it (``<dest>.importing-<host>-<pid>-<hex>``
    of this machine whose process is gone); returns them."""
    dest = Path(dest)
    prefix = f"{dest.name}{IMPORTING}{_host()}-"
    gone = []
    if dest.parent.is_dir():
        for p in dest.parent.iterdir():
            pid = p.name[len(prefix):].split("-")[0] if p.name.startswith(prefix) else ""
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


@contextlib.contextmanager
def _building(store_url: str | os.PathLike) -> Iterator[str]:
    """Where to build the new store ``store_url``. Local: a temporary directory beside it, renamed to it
    when the block ends and removed when the block raises, so that nothing is ever at ``store_url`` but
    a whole store; an existing ``store_url`` (other than an empty directory) is refused. Remote (no
    rename there): ``store_url`` itself, written in place."""
    dest = local_path(store_url)
    if dest is None:
        yield os.fspath(store_url)
        return
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise StoreError(f"{store_url}: already exists; import into a new store path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest)
    tmp = dest.with_name(f"{dest.name}{IMPORTING}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield os.fspath(tmp)
        try:
            os.rename(tmp, dest)  # onto nothing or an empty directory; fails if a store appeared meanwhile
        except OSError as exc:
            raise StoreError(f"{store_url}: already exists (made while this import ran); the import is "
                             f"discarded") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------- the round trip
def _store_attrs(f: Any, path: Any, limits: ImportLimits) -> dict:
    """The store attributes of an export, each of a known key and checked type (the rest left out, named)."""
    if FORMAT_ATTR not in f.attrs or _attr(f, FORMAT_ATTR, path, limits) != H5_FORMAT:
        raise ExternalFormatError(f"{path}: not a store exported by `cache export` (no "
                                  f"{FORMAT_ATTR}={H5_FORMAT!r} attribute); per-frame features of "
                                  f"another tool are imported with --manifest (docs/SHARING.md)")
    version = _attr(f, VERSION_ATTR, path, limits) if VERSION_ATTR in f.attrs else 0
    if not isinstance(version, (int, np.integer)) or int(version) != H5_LAYOUT_VERSION:
        raise ExternalFormatError(f"{path}: HDF5 layout version {str(version)[:20]}, this code reads "
                                  f"{H5_LAYOUT_VERSION}")
    attrs, left_out = {}, []
    for name in list(f.attrs.keys()):
        key = name[len(ATTR_PREFIX):]
        if name in (FORMAT_ATTR, VERSION_ATTR):
            continue
        if not name.startswith(ATTR_PREFIX) or key not in STORE_ATTRS:
            left_out.append(name)
            continue
        value = _json_attr(f, name, path, limits)
        if not _fits(value, STORE_ATTRS[key]):
            raise ExternalFormatError(f"{path}: root attribute {name!r} does not have the type a store gives it")
        attrs[key] = value
    _leave_out(path, left_out)
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ExternalFormatError(f"{path}: no store attribute {', '.join(ATTR_PREFIX + k for k in missing)}")
    return attrs


def _check_layout(attrs: dict, path: Any, limits: ImportLimits) -> None:
    """The sizes the store attributes declare, against the limits."""
    dims, thumbs = attrs["dims"], attrs.get("thumbnails")
    sizes = [("num_videos", attrs["num_videos"], "rows"), ("num_captions", attrs["num_captions"], "rows"),
             ("shard_size", attrs["shard_size"], "rows"), ("text_shard_size", attrs["text_shard_size"], "rows"),
             ("sampling.num_frames", attrs["sampling"]["num_frames"], "frames"),
             ("dims.num_tokens", dims["num_tokens"], "tokens"), ("max_text_tokens", attrs["max_text_tokens"], "tokens"),
             *[(f"dims.{k}", dims[k], "width") for k in ("token_dim", "embed_dim", "text_dim")]]
    if thumbs:
        sizes += [("thumbnails.count", thumbs["count"], "frames"),
                  ("thumbnails.max_bytes", thumbs["max_bytes"], "width")]
    for what, value, limit in sizes:
        if value < 1 and what not in ("num_videos", "num_captions"):
            raise ExternalFormatError(f"{path}: store attribute {what} is {value}; at least 1 expected")
        limits.check(path, f"store attribute {what}", value, limit)


def _export_datasets(f: Any, attrs: dict, path: Any, limits: ImportLimits) -> dict[str, Any]:
    """Every dataset the import reads, by name, each checked against the shape and dtype the store
    attributes give it (``None``: a string width, up to ``limits.width``) and the whole against the limits."""
    V, C, S, St = attrs["num_videos"], attrs["num_captions"], attrs["shard_size"], attrs["text_shard_size"]
    T, L = attrs["sampling"]["num_frames"], attrs["max_text_tokens"]
    d = attrs["dims"]
    N, D, E, Dt = d["num_tokens"], d["token_dim"], d["embed_dim"], d["text_dim"]
    nS, nT = -(-V // S), -(-C // St)
    want: dict[str, tuple[tuple, str, bool]] = {  # name: (shape, dtype, required)
        "videos/ids": ((V, None), "u1", True), "videos/split": ((V, None), "u1", True),
        "videos/status": ((V,), "i1", True), "videos/error": ((V, None), "u1", True),
        "videos/error_detail": ((V, None), "u1", False), "videos/decoder": ((V, None), "u1", False),
        "videos/source": ((V, None), "u1", False),
        "videos/tokens": ((V, T, N, D), "f2", True), "videos/frame_emb": ((V, T, E), "f4", True),
        "videos/frame_mask": ((V, T), "?", True), "videos/frame_index": ((V, T), "i4", True),
        "videos/frame_time": ((V, T), "f4", True),
        "texts/ids": ((C, None), "u1", True), "texts/split": ((C, None), "u1", True),
        "texts/source": ((C, None), "u1", False), "texts/video_index": ((C,), "i8", True),
        "texts/tokens": ((C, L, Dt), "f2", True), "texts/mask": ((C, L), "?", True), "texts/emb": ((C, E), "f4", True),
        "shards/done": ((nS,), "?", True), "shards/text_done": ((nT,), "?", True)}
    if attrs.get("thumbnails"):
        K, B = attrs["thumbnails"]["count"], attrs["thumbnails"]["max_bytes"]
        want.update({"videos/thumbnails": ((V, K, B), "u1", True), "videos/thumbnail_bytes": ((V, K), "i4", True),
                     "shards/thumbnails_done": ((nS,), "?", True)})
    found: dict[str, Any] = {}
    for name, (shape, dtype, required) in want.items():
        if not required and not _has(f, name):
            continue
        ds = _member(f, name, path)
        fits = ds.ndim == len(shape) and all(w is None or w == h for w, h in zip(shape, ds.shape))
        if not fits or ds.dtype != np.dtype(dtype):
            need = "(" + ", ".join("width" if w is None else str(w) for w in shape) + ")"
            raise ExternalFormatError(f"{path}: /{name} is {ds.shape} {ds.dtype}; the store attributes give it "
                                      f"{need} {np.dtype(dtype)}")
        if None in shape:
            limits.check(path, f"the string width of /{name}", ds.shape[-1], "width")
        _chunked(ds, path, limits)
        found[name] = ds
    limits.check(path, "the data of the new store (bytes)",
                 sum(_nbytes(ds.shape, ds.dtype) for ds in found.values()), "total_bytes")
    whole = [n for n in found if n.startswith("shards/") or n.endswith(("/ids", "/split", "/source", "/video_index"))]
    shards = [sum(_nbytes(ds.shape[1:], ds.dtype) for n, ds in found.items() if n.startswith(k)) * rows
              for k, rows in (("videos/", S), ("texts/", St))]
    limits.check(path, "the memory an import holds at once (bytes)",
                 max(sum(_nbytes(found[n].shape, found[n].dtype) for n in whole), *shards), "memory_bytes")
    return found


def is_store_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file written by ``export_hdf5``."""
    import h5py

    with h5py.File(path, "r") as f:
        try:
            return FORMAT_ATTR in f.attrs and _attr(f, FORMAT_ATTR, path, ImportLimits()) == H5_FORMAT
        except ExternalFormatError:
            return False


def layout_from_attrs(attrs: dict) -> StoreLayout:
    """The ``StoreLayout`` a store's root attributes describe."""
    dims = attrs["dims"]
    return StoreLayout(dataset=attrs["dataset"], manifest_sha256=attrs["manifest_sha256"], encoder=attrs["encoder"],
                       num_frames=int(attrs["sampling"]["num_frames"]), num_tokens=int(dims["num_tokens"]),
                       token_dim=int(dims["token_dim"]), embed_dim=int(dims["embed_dim"]),
                       text_dim=int(dims["text_dim"]), max_text_tokens=int(attrs["max_text_tokens"]),
                       shard_size=int(attrs["shard_size"]), text_shard_size=int(attrs["text_shard_size"]),
                       strategy=attrs["sampling"]["strategy"], compressor=attrs.get("compressor"))


def _short(value: Any) -> str:
    s = json.dumps(value, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def import_hdf5(path: str | os.PathLike, store_url: str | os.PathLike, progress: bool = True,
                limits: ImportLimits | None = None) -> CacheStore:
    """Build the store ``store_url`` (new) from an HDF5 file of ``export_hdf5``, checked first
    (``ImportLimits``; module docstring)."""
    import h5py
    from tqdm.auto import tqdm

    from pipeline.extract import write_failure_list

    limits = limits or ImportLimits()
    with h5py.File(path, "r") as f:
        attrs = _store_attrs(f, path, limits)
        _check_layout(attrs, path, limits)
        sets = _export_datasets(f, attrs, path, limits)
        layout = layout_from_attrs(attrs)

        def strings(name: str) -> list[str]:
            return decode_strings(sets[name][...]) if sets[name].shape[0] else []

        def raw(name: str, lo: int, hi: int) -> np.ndarray:
            return np.asarray(sets[name][lo:hi])

        thumbs = attrs.get("thumbnails")
        source_v = [bytes(r) for r in sets["videos/source"][...]] if "videos/source" in sets else None
        source_c = [bytes(r) for r in sets["texts/source"][...]] if "texts/source" in sets else None
        video_index = np.asarray(sets["texts/video_index"][...])
        if video_index.size and not (0 <= video_index.min() and video_index.max() < attrs["num_videos"]):
            raise ExternalFormatError(f"{path}: /texts/video_index names videos outside 0..{attrs['num_videos'] - 1}")
        with _building(store_url) as at:
            store = CacheStore.create(at, layout, strings("videos/ids"), strings("videos/split"),
                                      strings("texts/ids"), video_index.tolist(), strings("texts/split"),
                                      thumbnails=thumbs, video_source=source_v, caption_source=source_c)
            differ = [k for k, v in attrs.items() if k not in COPIED_ATTRS and store.attrs.get(k) != v]
            if differ:
                raise ExternalFormatError(f"{path}: " + "; ".join(
                    f"store attribute {k} is {_short(attrs[k])}, the store it describes has "
                    f"{_short(store.attrs.get(k))}" for k in differ[:3]))
            done = np.asarray(sets["shards/done"][...])
            text_done = np.asarray(sets["shards/text_done"][...])
            thumb_done = np.asarray(sets["shards/thumbnails_done"][...]) if thumbs else np.zeros(len(done), bool)
            bar = tqdm(total=int(done.sum() + text_done.sum()), unit="shard", desc="import", disable=not progress)
            for i in np.flatnonzero(done).tolist():
                lo, hi = store.shard_range(i)
                jpegs = None
                if thumb_done[i]:
                    data, sizes = raw("videos/thumbnails", lo, hi), raw("videos/thumbnail_bytes", lo, hi)
                    jpegs = [[data[r, k, :n].tobytes() for k, n in enumerate(sizes[r]) if n > 0]
                             for r in range(hi - lo)]
                store.write_shard(i, status=raw("videos/status", lo, hi),
                                  error=decode_strings(raw("videos/error", lo, hi)),
                                  error_detail=decode_strings(raw("videos/error_detail", lo, hi))
                                  if "videos/error_detail" in sets else None,
                                  decoder=decode_strings(raw("videos/decoder", lo, hi))
                                  if "videos/decoder" in sets else None,
                                  tokens=raw("videos/tokens", lo, hi), frame_emb=raw("videos/frame_emb", lo, hi),
                                  frame_mask=raw("videos/frame_mask", lo, hi),
                                  frame_index=raw("videos/frame_index", lo, hi),
                                  frame_time=raw("videos/frame_time", lo, hi), thumbnails=jpegs)
                bar.update(1)
            for j in np.flatnonzero(text_done).tolist():
                lo, hi = store.text_shard_range(j)
                store.write_text_shard(j, tokens=raw("texts/tokens", lo, hi), mask=raw("texts/mask", lo, hi),
                                       emb=raw("texts/emb", lo, hi))
                bar.update(1)
            bar.close()
            copied = {k: attrs[k] for k in COPIED_ATTRS if k in attrs and store.attrs.get(k) != attrs[k]}
            if copied:  # what the layout does not rebuild (manifest history, created_by of the original)
                store.update_attrs(copied)
            store.consolidate()
            write_failure_list(store)  # failures.json, as extraction leaves it
    return CacheStore.open(store_url, mode="r+")


# ------------------------------------------------------------------------------- other tools' features
@dataclass
class FeatureImport:
    """What ``import_features`` did."""

    store: str
    videos: int = 0
    missing: list[str] = field(default_factory=list)      # manifest videos not in the file
    unknown: list[str] = field(default_factory=list)      # file entries not in the manifest
    captions: int = 0
    captions_missing: int = 0
    truncated: int = 0                                    # videos with more frames than the store keeps

    def summary(self) -> str:
        lines = [f"imported {self.videos} videos and {self.captions} captions into {self.store}; "
                 f"{len(self.missing)} manifest videos not in the file (recorded as failed), "
                 f"{len(self.unknown)} file entries not in the manifest (ignored), "
                 f"{self.captions_missing} captions without features"]
        if self.truncated:
            lines.append(f"{self.truncated} videos had more frames than --frames: uniformly subsampled")
        return "\n".join(lines)


def _uniform(n: int, k: int) -> np.ndarray:
    return np.linspace(0, n - 1, k).round().astype(int) if n > k else np.arange(n)


def _feature_sets(group: Any, names: list[str], ndims: tuple[int, ...], path: Any, limits: ImportLimits,
                  rows_limit: str) -> dict[str, tuple]:
    """The shape of each dataset ``names`` of ``group`` (those present), each checked: stored in this
    file, a float dtype, ``ndims`` dimensions, rows (frames, tokens) between 1 and limit ``rows_limit``."""
    shapes = {}
    for name in names:
        if not _has(group, name):
            continue
        ds = _member(group, name, path)
        if ds.ndim not in ndims or ds.dtype.kind != "f" or not ds.shape[0]:
            raise ExternalFormatError(f"{path}: {ds.name} is {ds.shape} {ds.dtype}; expected float "
                                      f"{' or '.join(f'{n}-d' for n in ndims)} with at least one row")
        if ds.ndim > 1:  # a single vector's length is checked as the dim
            limits.check(path, f"the first dimension of {ds.name}", ds.shape[0], rows_limit)
        _chunked(ds, path, limits)
        shapes[name] = ds.shape
    return shapes


def _frames(ds: Any, T: int) -> tuple[np.ndarray, np.ndarray]:
    """The frames of ``ds`` the store keeps (uniformly subsampled to ``T``) as float32, reading only
    those, and their frame numbers."""
    n = ds.shape[0]
    if n <= T:
        return np.asarray(ds[:n], dtype=np.float32), np.arange(n)
    pick = _uniform(n, T)
    keep, back = np.unique(pick, return_inverse=True)  # HDF5 reads increasing, distinct rows
    return np.asarray(ds[keep], dtype=np.float32)[back], pick


def _storable(x: np.ndarray, where: str, path: Any) -> np.ndarray:
    """``x`` when float16 (the store's tokens) holds every value; else the file is refused."""
    if x.size and not (np.isfinite(x).all() and float(np.abs(x).max()) <= FLOAT16_MAX):
        raise ExternalFormatError(f"{path}: {where} has values that are not finite or beyond float16's "
                                  f"+-{FLOAT16_MAX:g}, which the store cannot keep")
    return x


def import_features(path: str | os.PathLike, store_url: str | os.PathLike, manifest: Any,
                    num_frames: int | None = None, shard_size: int = 64, text_shard_size: int = 1024,
                    compressor: str | None = None, progress: bool = True,
                    limits: ImportLimits | None = None) -> FeatureImport:
    """Build a new store from per-frame features in the minimal layout (module docstring) for the
    videos and captions of ``manifest`` (its rows, splits and hash), checked first (``ImportLimits``)."""
    import h5py
    from tqdm.auto import tqdm

    from pipeline.extract import manifest_rows, write_failure_list

    limits = limits or ImportLimits()
    path = Path(path)
    rows = manifest_rows(manifest)
    report = FeatureImport(store=os.fspath(store_url))
    with h5py.File(path, "r") as f:
        vids = _member(f, "videos", path, dataset=False) if _has(f, "videos") else None
        if vids is None or not len(vids):
            raise ExternalFormatError(f"{path}: no /videos group with one dataset per video (docs/SHARING.md)")
        limits.check(path, "the number of /videos entries", len(vids), "rows")
        shapes = _feature_sets(vids, rows.video_ids, (2, 3), path, limits, "source_frames")
        if not shapes:
            raise ExternalFormatError(f"{path}: none of the manifest's {len(rows.video_ids)} videos is in /videos")
        first_vid = next(iter(shapes))
        first = shapes[first_vid]
        for vid, shape in shapes.items():
            if len(shape) != len(first) or shape[1:] != first[1:]:
                raise ExternalFormatError(f"{path}: /videos/{vid} has shape {shape}; /videos/{first_vid} has "
                                          f"{first} (every video needs the same tokens and dim)")
        N, D = (first[1], first[2]) if len(first) == 3 else (1, first[1])
        T = int(num_frames or max(s[0] for s in shapes.values()))
        limits.check(path, "tokens per frame", N, "tokens")
        limits.check(path, "the feature dim", D, "width")
        limits.check(path, "frames per video (--frames)", T, "frames")
        texts = _member(f, "texts", path, dataset=False) if _has(f, "texts") else None
        tshapes: dict[str, tuple] = {}
        if texts is not None:
            limits.check(path, "the number of /texts entries", len(texts), "rows")
            tshapes = _feature_sets(texts, rows.caption_ids, (1, 2), path, limits, "tokens")
        t0 = next(iter(tshapes.values()), None)
        L, Dt = (1, D) if t0 is None else (t0[0], t0[1]) if len(t0) == 2 else (1, t0[0])
        for cid, shape in tshapes.items():
            if shape[-1] != Dt:
                raise ExternalFormatError(f"{path}: /texts/{cid} has shape {shape}; every text needs dim {Dt}")
        limits.check(path, "the text feature dim", Dt, "width")
        video_row = T * (N * D * 2 + D * 4 + 13)  # tokens, frame_emb, mask, index, time
        text_row = L * Dt * 2 + L + Dt * 4
        limits.check(path, "the data of the new store (bytes)",
                     len(rows.video_ids) * video_row + len(rows.caption_ids) * text_row, "total_bytes")
        limits.check(path, "the memory an import holds at once (bytes)",
                     max(min(shard_size, len(rows.video_ids)) * video_row + T * N * D * 8,
                         min(text_shard_size, len(rows.caption_ids)) * text_row), "memory_bytes")
        fps = _attr(f, "fps", path, limits) if "fps" in f.attrs else None
        if fps is not None and not (isinstance(fps, (int, float, np.integer, np.floating))
                                    and np.isfinite(fps) and fps > 0):
            raise ExternalFormatError(f"{path}: root attribute 'fps' is {str(fps)[:40]}; a number > 0 expected")
        encoder = _json_attr(f, "encoder", path, limits) if "encoder" in f.attrs else {"name": f"external:{path.name}"}
        if type(encoder) is not dict:
            raise ExternalFormatError(f"{path}: root attribute 'encoder' is not a JSON object")
        _leave_out(path, [k for k in f.attrs.keys() if k not in FEATURE_ATTRS])
        fps = float(fps) if fps is not None else None
        encoder = {**encoder, "source": "hdf5 per-frame features", "num_tokens": N, "token_dim": D, "embed_dim": D,
                   "text_dim": Dt}
        layout = StoreLayout(dataset=manifest.dataset, manifest_sha256=manifest.sha256(), encoder=encoder,
                             num_frames=T, num_tokens=N, token_dim=D, embed_dim=D, text_dim=Dt, max_text_tokens=L,
                             shard_size=shard_size, text_shard_size=text_shard_size, strategy="external",
                             compressor=compressor)
        report.unknown = sorted(set(vids) - set(rows.video_ids))
        with _building(store_url) as at:
            store = CacheStore.create(at, layout, rows.video_ids, rows.video_splits, rows.caption_ids,
                                      rows.caption_video, rows.caption_splits, video_source=rows.video_source,
                                      caption_source=rows.caption_source)
            bar = tqdm(total=store.num_shards, unit="shard", desc="import features", disable=not progress)
            for i in range(store.num_shards):
                lo, hi = store.shard_range(i)
                n = hi - lo
                tokens = np.zeros((n, T, N, D), np.float16)
                emb = np.zeros((n, T, D), np.float32)
                mask = np.zeros((n, T), bool)
                index = np.full((n, T), -1, np.int32)
                times = np.full((n, T), -1.0, np.float32)
                status = np.full(n, STATUS_OK, np.int8)
                error = [""] * n
                for r, vid in enumerate(rows.video_ids[lo:hi]):
                    if vid not in shapes:
                        status[r], error[r] = STATUS_FAILED, f"missing: not in {path.name}"
                        report.missing.append(vid)
                        continue
                    x, pick = _frames(vids[vid], T)
                    _storable(x, f"/videos/{vid}", path)
                    report.truncated += int(shapes[vid][0] > T)
                    k = len(pick)
                    if x.ndim == 2:
                        x = x[:, None, :]
                    tokens[r, :k], emb[r, :k], mask[r, :k], index[r, :k] = x, x[:, 0], True, pick
                    times[r, :k] = pick / fps if fps else pick
                    report.videos += 1
                store.write_shard(i, status=status, error=error, tokens=tokens, frame_emb=emb, frame_mask=mask,
                                  frame_index=index, frame_time=times)
                bar.update(1)
            bar.close()
            if texts is not None:
                for j in range(store.num_text_shards):
                    lo, hi = store.text_shard_range(j)
                    cids = rows.caption_ids[lo:hi]
                    if not all(c in tshapes for c in cids):
                        report.captions_missing += sum(c not in tshapes for c in cids)
                        continue
                    tt = np.zeros((hi - lo, L, Dt), np.float16)
                    tm = np.zeros((hi - lo, L), bool)
                    te = np.zeros((hi - lo, Dt), np.float32)
                    for r, c in enumerate(cids):
                        ds = texts[c]  # a caption's first L tokens are read, or its one vector
                        y = _storable(np.asarray(ds[:L] if ds.ndim == 2 else ds[...], dtype=np.float32),
                                      f"/texts/{c}", path)
                        y = y[None] if y.ndim == 1 else y
                        tt[r, :len(y)], tm[r, :len(y)], te[r] = y, True, y[0]
                    store.write_text_shard(j, tokens=tt, mask=tm, emb=te)
                    report.captions += hi - lo
            else:
                report.captions_missing = len(rows.caption_ids)
            store.consolidate()
            write_failure_list(store)
    return report


def h5_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by path (tests, small files)."""
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out
