"""A store built from per-frame features another tool wrote in HDF5 (``import_features``; docs/SHARING.md, "HDF5")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ExternalFormatError
from pipeline.hdf5_checks import ImportLimits, attr, building, chunked, has, json_attr, leave_out, member
from pipeline.store import STATUS_FAILED, STATUS_OK, CacheStore, StoreLayout

FLOAT16_MAX = float(np.finfo(np.float16).max)  # the store keeps tokens as float16
FEATURE_ATTRS = ("encoder", "fps")  # what import_features takes from another tool's root attributes


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
        if not has(group, name):
            continue
        ds = member(group, name, path)
        if ds.ndim not in ndims or ds.dtype.kind != "f" or not ds.shape[0]:
            raise ExternalFormatError(f"{path}: {ds.name} is {ds.shape} {ds.dtype}; expected float "
                                      f"{' or '.join(f'{n}-d' for n in ndims)} with at least one row")
        if ds.ndim > 1:  # a single vector's length is checked as the dim
            limits.check(path, f"the first dimension of {ds.name}", ds.shape[0], rows_limit)
        chunked(ds, path, limits)
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

    from pipeline.store.rows import manifest_rows
    from pipeline.store.failures import write_failure_list

    limits = limits or ImportLimits()
    path = Path(path)
    rows = manifest_rows(manifest)
    report = FeatureImport(store=os.fspath(store_url))
    with h5py.File(path, "r") as f:
        vids = member(f, "videos", path, dataset=False) if has(f, "videos") else None
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
        texts = member(f, "texts", path, dataset=False) if has(f, "texts") else None
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
        fps = attr(f, "fps", path, limits) if "fps" in f.attrs else None
        if fps is not None and not (isinstance(fps, (int, float, np.integer, np.floating))
                                    and np.isfinite(fps) and fps > 0):
            raise ExternalFormatError(f"{path}: root attribute 'fps' is {str(fps)[:40]}; a number > 0 expected")
        encoder = json_attr(f, "encoder", path, limits) if "encoder" in f.attrs else {"name": f"external:{path.name}"}
        if type(encoder) is not dict:
            raise ExternalFormatError(f"{path}: root attribute 'encoder' is not a JSON object")
        leave_out(path, [k for k in f.attrs.keys() if k not in FEATURE_ATTRS])
        fps = float(fps) if fps is not None else None
        encoder = {**encoder, "source": "hdf5 per-frame features", "num_tokens": N, "token_dim": D, "embed_dim": D,
                   "text_dim": Dt}
        layout = StoreLayout(dataset=manifest.dataset, manifest_sha256=manifest.sha256(), encoder=encoder,
                             num_frames=T, num_tokens=N, token_dim=D, embed_dim=D, text_dim=Dt, max_text_tokens=L,
                             shard_size=shard_size, text_shard_size=text_shard_size, strategy="external",
                             compressor=compressor)
        report.unknown = sorted(set(vids) - set(rows.video_ids))
        with building(store_url) as at:
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
