"""Stores shared between machines: what a store holds (``store_info``) and copying a remote store to
local disk (``pull``), resumable and verified (docs/SHARING.md).

The objects of a store are listed where the file system can list (a path, ``file://``, ``s3://``);
over ``http(s)://``, which cannot list, they are enumerated from the store's own metadata (every
array's chunk keys, the checksum records of written shards, ``failures.json``), absent chunks
(never written: all fill value) skipped.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import StoreError
from core.fileio import atomic_write
from pipeline import integrity
from pipeline.remote import filesystem, is_remote, join, scheme
from pipeline.store import (APPEND_PREFIX, LOCK_FILE, STATUS_FAILED, STATUS_OK, STATUS_PENDING, CacheStore,
                            local_path)

FAILURES_JSON = "failures.json"
_GROUP_KEYS = ("zarr.json", "videos/zarr.json", "texts/zarr.json", "shards/zarr.json")


# ----------------------------------------------------------------------------------------------- objects
def list_objects(url: str | os.PathLike, store: CacheStore | None = None) -> dict[str, int | None]:
    """Every object of the store at ``url``: key -> size in bytes (``None`` where unknown before
    reading it: over http(s), the objects no checksum record describes, which may not exist)."""
    s = os.fspath(url)
    if scheme(s) in ("http", "https"):
        store = store or CacheStore.open(s)
        known = _sizes_from_records(store)  # the written shards' objects, from their checksum records
        return {k: known.get(k) for k in enumerate_keys(store)}
    fs, root = filesystem(s)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError as exc:
        raise StoreError(f"{s}: nothing there ({exc})") from exc
    root = root.rstrip("/")
    out = {}
    for path, info in found.items():
        key = path[len(root):].lstrip("/") if path.startswith(root) else path
        if key and key != LOCK_FILE and ".partial" not in key and not key.endswith(".part"):
            out[key] = int(info.get("size") or 0)
    if "zarr.json" not in out:
        raise StoreError(f"{s}: not a feature cache store (no zarr.json)")
    return out


def enumerate_keys(store: CacheStore) -> list[str]:
    """The keys a store can hold, from its metadata alone (for stores that cannot be listed)."""
    keys = list(_GROUP_KEYS) + [FAILURES_JSON]
    for name in array_names(store):
        arr = store.array(name)
        keys.append(f"{name}/zarr.json")
        chunk = (arr.shards or arr.chunks)[0] if arr.ndim else 1
        n = -(-arr.shape[0] // max(1, chunk)) if arr.ndim and arr.shape[0] else 0
        keys += [store.chunk_key(name, i) for i in range(n)]
    for kind, count in (("videos", store.num_shards), ("texts", store.num_text_shards),
                        ("thumbnails", store.num_shards if store.has_thumbnails else 0)):
        keys += [integrity.record_key(kind, i) for i in range(count)]
        if kind != "thumbnails":
            keys += [f"{APPEND_PREFIX}/{kind}-{i}.npz" for i in sorted(store.reopened_shards(kind))]
    return keys


def array_names(store: CacheStore) -> list[str]:
    """Every array of the store (from its group metadata)."""
    names = []
    for group in ("videos", "texts", "shards"):
        try:
            g = store.array(group)  # a group: the cache keeps any child node
        except KeyError:
            continue
        names += [f"{group}/{k}" for k, _ in g.arrays()]
    return sorted(names)


# ----------------------------------------------------------------------------------------------- info
def store_info(url: str | os.PathLike, store: CacheStore | None = None) -> dict:
    """Everything a user asks before using a store: dataset, encoder identity, sampling, counts per
    split, failed videos (count, where the list is), shards done, checksums recorded, size on disk per
    array and the compression ratio (bytes of the arrays' data over the bytes stored)."""
    s = os.fspath(url)
    store = store or CacheStore.open(s)
    a = store.attrs
    status = store.status()
    splits_v = np.array(store.strings("videos/split"), dtype=object)
    splits_c = np.array(store.strings("texts/split"), dtype=object)
    per_split = {}
    for sp in store.splits():
        sel = splits_v == sp
        per_split[sp] = {"videos": int(sel.sum()), "ok": int((status[sel] == STATUS_OK).sum()),
                         "failed": int((status[sel] == STATUS_FAILED).sum()),
                         "pending": int((status[sel] == STATUS_PENDING).sum()),
                         "captions": int((splits_c == sp).sum())}
    try:
        sizes = list_objects(s, store)
    except (StoreError, OSError, NotImplementedError):
        sizes = {}
    known = {k: v for k, v in sizes.items() if v is not None}  # http(s): those its checksum records give
    arrays = {}
    total_raw = total_stored = 0
    for name in array_names(store):
        arr = store.array(name)
        raw = int(np.prod(arr.shape)) * arr.dtype.itemsize
        stored = sum(v for k, v in known.items() if k.startswith(name + "/") and not k.endswith("zarr.json"))
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": raw, "stored_bytes": stored,
                        "ratio": round(raw / stored, 3) if stored else None}
        total_raw += raw
        total_stored += stored
    failed = int((status == STATUS_FAILED).sum())
    checks = {kind: sum(1 for k in known if k.startswith(f"{integrity.PREFIX}/{kind}/"))
              for kind in integrity.KINDS}
    return {
        "store": s, "format": a.get("format"), "schema_version": a.get("schema_version"),
        "fingerprint": store.fingerprint, "dataset": a.get("dataset"), "manifest_sha256": a.get("manifest_sha256"),
        "manifest_history": a.get("manifest_history", []), "encoder": store.encoder_identity,
        "sampling": a.get("sampling"), "max_text_tokens": a.get("max_text_tokens"), "dims": a.get("dims"),
        "compressor": a.get("compressor"),
        "videos": store.num_videos, "captions": store.num_captions, "splits": per_split,
        "failed": failed, "failure_list": join(s, FAILURES_JSON) if is_remote(s) else
        str((local_path(s) or Path(s)) / FAILURES_JSON),
        "shards": {"videos": [len(store.done_shards()), store.num_shards],
                   "texts": [len(store.done_text_shards()), store.num_text_shards],
                   "thumbnails": [len(store.thumbnail_shards()), store.num_shards] if store.has_thumbnails else None},
        "checksums_recorded": checks,
        "arrays": arrays, "bytes": total_raw, "stored_bytes": total_stored,
        "compression_ratio": round(total_raw / total_stored, 3) if total_stored else None,
        "sizes_exact": len(known) == len(sizes) and bool(sizes),
    }


def _sizes_from_records(store: CacheStore) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind, count in (("videos", store.num_shards), ("texts", store.num_text_shards)):
        for i in range(count):
            rec = store.checksum_record(kind, i)
            for obj in (rec or {}).get("objects", {}).values():
                if obj.get("sha256") is not None:  # recorded as never stored: size unknown, left out
                    out[obj["key"]] = int(obj.get("bytes") or 0)
    return out


def format_info(info: dict) -> str:
    """``store_info`` for humans."""
    enc = info["encoder"]
    weights = enc.get("weights")
    lines = [f"store       {info['store']}",
             f"dataset     {info['dataset']}  (manifest {str(info['manifest_sha256'])[:12]}; "
             f"{len(info['manifest_history']) or 1} manifest version(s))",
             f"encoder     {enc.get('name')}  weights {weights}  image {enc.get('image_size')}  "
             f"tokens {info['dims']}",
             f"sampling    {info['sampling']}  text tokens {info['max_text_tokens']}  compressor {info['compressor']}",
             f"fingerprint {info['fingerprint'][:16]}",
             f"videos      {info['videos']}  captions {info['captions']}"]
    for sp, c in info["splits"].items():
        lines.append(f"  {sp:6s}    videos {c['videos']} (ok {c['ok']}, failed {c['failed']}, pending {c['pending']}), "
                     f"captions {c['captions']}")
    lines.append(f"failed      {info['failed']} videos; list: {info['failure_list']}")
    sh = info["shards"]
    th = f", thumbnails {sh['thumbnails'][0]}/{sh['thumbnails'][1]}" if sh["thumbnails"] else ""
    lines.append(f"shards done videos {sh['videos'][0]}/{sh['videos'][1]}, texts {sh['texts'][0]}/{sh['texts'][1]}{th}")
    cs = info["checksums_recorded"]
    lines.append(f"checksums   videos {cs['videos']}, texts {cs['texts']}, thumbnails {cs['thumbnails']} shards recorded")
    approx = "" if info["sizes_exact"] else " (from checksum records: written shards only)"
    lines.append(f"size        {info['stored_bytes'] / 1e6:.2f} MB on disk, {info['bytes'] / 1e6:.2f} MB of data, "
                 f"compression ratio {info['compression_ratio']}{approx}")
    width = max((len(n) for n in info["arrays"]), default=10)
    for name, a in info["arrays"].items():
        lines.append(f"  {name:{width}s}  {str(tuple(a['shape'])):22s} {a['dtype']:8s} "
                     f"{a['stored_bytes'] / 1e6:10.3f} MB  ratio {a['ratio']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- pull
@dataclass
class PullReport:
    """What one ``pull`` did."""

    source: str
    dest: str
    objects: int = 0           # objects of the source store
    copied: list[str] = field(default_factory=list)   # keys copied in this run
    skipped: int = 0           # already there (an earlier, interrupted run copied them)
    bytes_copied: int = 0
    seconds: float = 0.0
    verify: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.verify.get("ok"))

    def summary(self) -> str:
        rate = self.bytes_copied / 1e6 / self.seconds if self.seconds > 0 else 0.0
        return (f"pulled {self.source} -> {self.dest}: {len(self.copied)} objects copied "
                f"({self.bytes_copied / 1e6:.1f} MB, {rate:.1f} MB/s), {self.skipped} already there, "
                f"of {self.objects}; {self.seconds:.1f}s")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["copied"] = len(self.copied)
        return d


def pull(url: str | os.PathLike, dest: str | os.PathLike, progress: bool = True,
         on_copied: Callable[[str], None] | None = None) -> tuple[PullReport, integrity.VerifyReport]:
    """Copy the store at ``url`` to the local directory ``dest``, object by object (each written to a
    temporary name, then renamed: an interrupted run leaves whole objects only). A re-run copies only
    what is not there yet (same key, same size), so no shard is copied twice; the copy is verified
    against the store's checksums at the end. ``on_copied(key)`` is called after each copy (tests)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    s = os.fspath(url)
    out = Path(dest)
    if local_path(s) is not None and Path(local_path(s)).resolve() == out.resolve():
        raise StoreError(f"{dest}: is the store itself")
    source = CacheStore.open(s)
    objects = list_objects(s, source)
    fs, root = filesystem(s)
    report = PullReport(source=s, dest=str(out), objects=len(objects))
    # the group metadata last: a copy that has it has everything before it
    order = sorted(objects, key=lambda k: (k in _GROUP_KEYS, k))
    todo = []
    for key in order:
        target = out / key
        size = objects[key]
        if target.is_file() and (size is None or target.stat().st_size == size):
            report.skipped += 1
            continue
        todo.append(key)
    total = sum(objects[k] or 0 for k in todo)
    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc="pull", disable=not progress)
    try:
        for key in todo:
            src = f"{root.rstrip('/')}/{key}"
            try:
                data = fs.cat_file(src)
            except FileNotFoundError:
                if objects[key] is None:  # enumerated, never written (fill value only)
                    continue
                raise StoreError(f"{s}: {key} disappeared while pulling (is a writer still at work?)") from None
            target = out / key
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: tmp.write_bytes(data))
            report.copied.append(key)
            report.bytes_copied += len(data)
            bar.update(len(data))
            if on_copied is not None:
                on_copied(key)
    finally:
        bar.close()
    check = integrity.verify(CacheStore.open(out), progress=progress)
    report.verify = {"ok": check.ok, "problems": [p.line() for p in check.problems],
                     "unrecorded": {k: len(v) for k, v in check.unrecorded.items()}}
    report.seconds = time.perf_counter() - t0
    return report, check
