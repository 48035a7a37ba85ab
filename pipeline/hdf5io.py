"""A store in and out of HDF5 (docs/SHARING.md, "HDF5"), and stores built from per-frame features
another tool wrote.

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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ExternalFormatError
from pipeline.store import STATUS_FAILED, STATUS_OK, CacheStore, StoreLayout, decode_strings

H5_FORMAT = "crosstvr-feature-cache-hdf5"
H5_LAYOUT_VERSION = 1
ATTR_PREFIX = "store:"     # the store's root attributes, each as JSON
FORMAT_ATTR, VERSION_ATTR = "crosstvr_hdf5_format", "crosstvr_hdf5_layout_version"
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


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


def _attrs_of(f: Any) -> dict:
    if f.attrs.get(FORMAT_ATTR) != H5_FORMAT:
        raise ExternalFormatError(f"{f.filename}: not a store exported by `cache export` (no "
                                  f"{FORMAT_ATTR}={H5_FORMAT!r} attribute); per-frame features of "
                                  f"another tool are imported with --manifest (docs/SHARING.md)")
    version = int(f.attrs.get(VERSION_ATTR, 0))
    if version != H5_LAYOUT_VERSION:
        raise ExternalFormatError(f"{f.filename}: HDF5 layout version {version}, this code reads "
                                  f"{H5_LAYOUT_VERSION}")
    return {k[len(ATTR_PREFIX):]: json.loads(v) for k, v in f.attrs.items() if k.startswith(ATTR_PREFIX)}


def is_store_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file written by ``export_hdf5``."""
    import h5py

    with h5py.File(path, "r") as f:
        return f.attrs.get(FORMAT_ATTR) == H5_FORMAT


def layout_from_attrs(attrs: dict) -> StoreLayout:
    """The ``StoreLayout`` a store's root attributes describe."""
    dims = attrs["dims"]
    return StoreLayout(dataset=attrs["dataset"], manifest_sha256=attrs["manifest_sha256"], encoder=attrs["encoder"],
                       num_frames=int(attrs["sampling"]["num_frames"]), num_tokens=int(dims["num_tokens"]),
                       token_dim=int(dims["token_dim"]), embed_dim=int(dims["embed_dim"]),
                       text_dim=int(dims["text_dim"]), max_text_tokens=int(attrs["max_text_tokens"]),
                       shard_size=int(attrs["shard_size"]), text_shard_size=int(attrs["text_shard_size"]),
                       strategy=attrs["sampling"]["strategy"], compressor=attrs.get("compressor"))


def import_hdf5(path: str | os.PathLike, store_url: str | os.PathLike, progress: bool = True) -> CacheStore:
    """Build the store ``store_url`` (new) from an HDF5 file of ``export_hdf5``."""
    import h5py
    from tqdm.auto import tqdm

    with h5py.File(path, "r") as f:
        attrs = _attrs_of(f)
        layout = layout_from_attrs(attrs)

        def strings(name: str) -> list[str]:
            return decode_strings(f[name][...]) if f[name].shape[0] else []

        def raw(name: str, lo: int, hi: int) -> np.ndarray:
            return np.asarray(f[name][lo:hi])

        thumbs = attrs.get("thumbnails")
        source_v = [bytes(r) for r in f["videos/source"][...]] if "videos/source" in f else None
        source_c = [bytes(r) for r in f["texts/source"][...]] if "texts/source" in f else None
        store = CacheStore.create(store_url, layout, strings("videos/ids"), strings("videos/split"),
                                  strings("texts/ids"), np.asarray(f["texts/video_index"][...]).tolist(),
                                  strings("texts/split"), thumbnails=thumbs, video_source=source_v,
                                  caption_source=source_c)
        done = np.asarray(f["shards/done"][...]) if store.num_shards else np.zeros(0, bool)
        text_done = np.asarray(f["shards/text_done"][...]) if store.num_text_shards else np.zeros(0, bool)
        thumb_done = (np.asarray(f["shards/thumbnails_done"][...]) if thumbs and "shards/thumbnails_done" in f
                      else np.zeros(store.num_shards, bool))
        bar = tqdm(total=int(done.sum() + text_done.sum()), unit="shard", desc="import", disable=not progress)
        for i in np.flatnonzero(done).tolist():
            lo, hi = store.shard_range(i)
            jpegs = None
            if thumb_done[i]:
                data, sizes = raw("videos/thumbnails", lo, hi), raw("videos/thumbnail_bytes", lo, hi)
                jpegs = [[data[r, k, :n].tobytes() for k, n in enumerate(sizes[r]) if n > 0] for r in range(hi - lo)]
            store.write_shard(i, status=raw("videos/status", lo, hi),
                              error=decode_strings(raw("videos/error", lo, hi)),
                              error_detail=decode_strings(raw("videos/error_detail", lo, hi))
                              if "videos/error_detail" in f else None,
                              decoder=decode_strings(raw("videos/decoder", lo, hi)) if "videos/decoder" in f else None,
                              tokens=raw("videos/tokens", lo, hi), frame_emb=raw("videos/frame_emb", lo, hi),
                              frame_mask=raw("videos/frame_mask", lo, hi), frame_index=raw("videos/frame_index", lo, hi),
                              frame_time=raw("videos/frame_time", lo, hi), thumbnails=jpegs)
            bar.update(1)
        for j in np.flatnonzero(text_done).tolist():
            lo, hi = store.text_shard_range(j)
            store.write_text_shard(j, tokens=raw("texts/tokens", lo, hi), mask=raw("texts/mask", lo, hi),
                                   emb=raw("texts/emb", lo, hi))
            bar.update(1)
        bar.close()
        extra = {k: v for k, v in attrs.items() if k not in store.attrs or store.attrs[k] != v}
    if extra:  # what the layout does not rebuild (manifest history, created_by of the original)
        store.update_attrs(extra)
    store.consolidate()
    return store


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


def import_features(path: str | os.PathLike, store_url: str | os.PathLike, manifest: Any,
                    num_frames: int | None = None, shard_size: int = 64, text_shard_size: int = 1024,
                    compressor: str | None = None, progress: bool = True) -> FeatureImport:
    """Build a new store from per-frame features in the minimal layout (module docstring) for the
    videos and captions of ``manifest`` (its rows, splits and hash)."""
    import h5py
    from tqdm.auto import tqdm

    from pipeline.extract import manifest_rows

    path = Path(path)
    rows = manifest_rows(manifest)
    report = FeatureImport(store=os.fspath(store_url))
    with h5py.File(path, "r") as f:
        if "videos" not in f or not isinstance(f["videos"], h5py.Group) or not len(f["videos"]):
            raise ExternalFormatError(f"{path}: no /videos group with one dataset per video (docs/SHARING.md)")
        vids = f["videos"]
        first = vids[next(iter(vids))]
        if first.ndim not in (2, 3):
            raise ExternalFormatError(f"{path}: /videos/{next(iter(vids))} has shape {first.shape}; expected "
                                      f"(frames, tokens, dim) or (frames, dim)")
        N, D = (first.shape[1], first.shape[2]) if first.ndim == 3 else (1, first.shape[1])
        T = int(num_frames or max(vids[k].shape[0] for k in vids))
        texts = f["texts"] if "texts" in f else None
        if texts is not None and len(texts):
            t0 = texts[next(iter(texts))]
            L, Dt = (t0.shape[0], t0.shape[1]) if t0.ndim == 2 else (1, t0.shape[0])
        else:
            L, Dt = 1, D
        fps = float(f.attrs["fps"]) if "fps" in f.attrs else None
        encoder = json.loads(f.attrs["encoder"]) if "encoder" in f.attrs else {"name": f"external:{path.name}"}
        encoder = {**encoder, "source": "hdf5 per-frame features", "num_tokens": N, "token_dim": D, "embed_dim": D,
                   "text_dim": Dt}
        layout = StoreLayout(dataset=manifest.dataset, manifest_sha256=manifest.sha256(), encoder=encoder,
                             num_frames=T, num_tokens=N, token_dim=D, embed_dim=D, text_dim=Dt, max_text_tokens=L,
                             shard_size=shard_size, text_shard_size=text_shard_size, strategy="external",
                             compressor=compressor)
        store = CacheStore.create(store_url, layout, rows.video_ids, rows.video_splits, rows.caption_ids,
                                  rows.caption_video, rows.caption_splits, video_source=rows.video_source,
                                  caption_source=rows.caption_source)
        report.unknown = sorted(set(vids) - set(rows.video_ids))
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
                if vid not in vids:
                    status[r], error[r] = STATUS_FAILED, f"missing: not in {path.name}"
                    report.missing.append(vid)
                    continue
                x = np.asarray(vids[vid][...], dtype=np.float32)
                if x.shape[1:] != first.shape[1:] or not x.shape[0]:
                    raise ExternalFormatError(f"{path}: /videos/{vid} has shape {x.shape}; the file's first video "
                                              f"has {first.shape} (every video needs the same tokens and dim)")
                pick = _uniform(x.shape[0], T)
                report.truncated += int(x.shape[0] > T)
                x = x[pick]
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
                if not all(c in texts for c in cids):
                    report.captions_missing += sum(c not in texts for c in cids)
                    continue
                tt = np.zeros((hi - lo, L, Dt), np.float16)
                tm = np.zeros((hi - lo, L), bool)
                te = np.zeros((hi - lo, Dt), np.float32)
                for r, c in enumerate(cids):
                    y = np.asarray(texts[c][...], dtype=np.float32)
                    y = y[None] if y.ndim == 1 else y[:L]
                    tt[r, :len(y)], tm[r, :len(y)], te[r] = y, True, y[0]
                store.write_text_shard(j, tokens=tt, mask=tm, emb=te)
                report.captions += hi - lo
        else:
            report.captions_missing = len(rows.caption_ids)
    store.consolidate()
    return report


def h5_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by path (tests, small files)."""
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out

