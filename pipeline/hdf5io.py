"""A store in and out of HDF5: the round trip and stores built from per-frame features another tool wrote.

The layouts are in docs/SHARING.md ("HDF5"); what an import checks, in docs/STORE.md ("Importing HDF5 safely").

``export_hdf5(store, out.h5)``: every array of the store as an HDF5 dataset of the same path and dtype
(chunked along the rows like the store's shards, gzip-compressed with byte shuffling), the store's
root attributes as JSON strings on the root (``attrs["store:<key>"]``), plus ``crosstvr_hdf5_format =
"crosstvr-feature-cache-hdf5"`` and ``crosstvr_hdf5_layout_version = 1``. ``import_hdf5(in.h5, store)``
builds the store again: the same layout, the same rows, every written shard written whole (and
checksummed) as extraction writes it, so the round trip gives back every array and attribute.

``pipeline.hdf5_features.import_features(in.h5, store, manifest)``: the minimal layout another extractor
can write::

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

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ExternalFormatError
from pipeline.hdf5_checks import ImportLimits, attr, building, chunked, fits, has, json_attr, leave_out, member, nbytes
from pipeline.store import CacheStore, StoreLayout, decode_strings

H5_FORMAT = "crosstvr-feature-cache-hdf5"
H5_LAYOUT_VERSION = 1
ATTR_PREFIX = "store:"     # the store's root attributes, each as JSON
FORMAT_ATTR, VERSION_ATTR = "crosstvr_hdf5_format", "crosstvr_hdf5_layout_version"
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}

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
# ------------------------------------------------------------------------------- the round trip
def _store_attrs(f: Any, path: Any, limits: ImportLimits) -> dict:
    """The store attributes of an export, each of a known key and checked type (the rest left out, named)."""
    if FORMAT_ATTR not in f.attrs or attr(f, FORMAT_ATTR, path, limits) != H5_FORMAT:
        raise ExternalFormatError(f"{path}: not a store exported by `cache export` (no "
                                  f"{FORMAT_ATTR}={H5_FORMAT!r} attribute); per-frame features of "
                                  f"another tool are imported with --manifest (docs/SHARING.md)")
    version = attr(f, VERSION_ATTR, path, limits) if VERSION_ATTR in f.attrs else 0
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
        value = json_attr(f, name, path, limits)
        if not fits(value, STORE_ATTRS[key]):
            raise ExternalFormatError(f"{path}: root attribute {name!r} does not have the type a store gives it")
        attrs[key] = value
    leave_out(path, left_out)
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
        if not required and not has(f, name):
            continue
        ds = member(f, name, path)
        shaped = ds.ndim == len(shape) and all(w is None or w == h for w, h in zip(shape, ds.shape))
        if not shaped or ds.dtype != np.dtype(dtype):
            need = "(" + ", ".join("width" if w is None else str(w) for w in shape) + ")"
            raise ExternalFormatError(f"{path}: /{name} is {ds.shape} {ds.dtype}; the store attributes give it "
                                      f"{need} {np.dtype(dtype)}")
        if None in shape:
            limits.check(path, f"the string width of /{name}", ds.shape[-1], "width")
        chunked(ds, path, limits)
        found[name] = ds
    limits.check(path, "the data of the new store (bytes)",
                 sum(nbytes(ds.shape, ds.dtype) for ds in found.values()), "total_bytes")
    whole = [n for n in found if n.startswith("shards/") or n.endswith(("/ids", "/split", "/source", "/video_index"))]
    shards = [sum(nbytes(ds.shape[1:], ds.dtype) for n, ds in found.items() if n.startswith(k)) * rows
              for k, rows in (("videos/", S), ("texts/", St))]
    limits.check(path, "the memory an import holds at once (bytes)",
                 max(sum(nbytes(found[n].shape, found[n].dtype) for n in whole), *shards), "memory_bytes")
    return found


def is_store_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file written by ``export_hdf5``."""
    import h5py

    with h5py.File(path, "r") as f:
        try:
            return FORMAT_ATTR in f.attrs and attr(f, FORMAT_ATTR, path, ImportLimits()) == H5_FORMAT
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

    from pipeline.store.failures import write_failure_list

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
        with building(store_url) as at:
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


def h5_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by path (tests, small files)."""
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out
