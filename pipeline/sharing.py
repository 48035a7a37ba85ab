"""Stores shared between machines: what a store holds (``store_info``) and copying a remote store to
local disk (``pull``), resumable and verified (docs/SHARING.md).

The objects of a store are listed where the file system can list (a path, ``file://``, ``s3://``);
over ``http(s)://``, which cannot list, they are enumerated from the store's own metadata (every
array's chunk keys, the checksum records of written shards, ``failures.json``), absent chunks
(never written: all fill value) skipped.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import StoreError
from core.faults import gate
from core.fileio import atomic_write, sha256_file
from pipeline import integrity
from pipeline.integrity import array_names
from pipeline.remote import filesystem, is_remote, join, scheme
from pipeline.store import (APPEND_PREFIX, FAILURES_JSON, LOCK_FILE, STATUS_FAILED, STATUS_OK, STATUS_PENDING,
                            CacheStore, local_path)

PULL_MARK = ".pull"  # in DEST while a pull is under way (a directory holding it may be pulled into again)
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
        temporary = ".partial" in key or ".part" in key.rsplit("/", 1)[-1]  # a write under way (or killed)
        if key and key not in (LOCK_FILE, PULL_MARK) and not temporary:
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
    from core.urls import redact_url

    return {
        "store": redact_url(s), "format": a.get("format"), "schema_version": a.get("schema_version"),
        "fingerprint": store.fingerprint, "digest": integrity.store_digest(store),
        "dataset": a.get("dataset"), "manifest_sha256": a.get("manifest_sha256"),
        "manifest_history": a.get("manifest_history", []), "encoder": store.encoder_identity,
        "sampling": a.get("sampling"), "max_text_tokens": a.get("max_text_tokens"), "dims": a.get("dims"),
        "compressor": a.get("compressor"),
        "videos": store.num_videos, "captions": store.num_captions, "splits": per_split,
        "failed": failed, "failure_list": redact_url(join(s, FAILURES_JSON)) if is_remote(s) else
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
             f"digest      {info['digest']}" if info.get("digest") else
             "digest      none: shards written before checksums existed have no record (cache verify says which)",
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
    skipped: int = 0           # already there with the recorded bytes (an earlier run copied them)
    removed: list[str] = field(default_factory=list)  # objects of an earlier copy the source no longer has
    bytes_copied: int = 0
    seconds: float = 0.0
    digest: str | None = None  # the source's store digest when the pull started
    verify: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # why the copy cannot be trusted (exit 1)

    @property
    def ok(self) -> bool:
        return bool(self.verify.get("ok")) and not self.problems

    def summary(self) -> str:
        rate = self.bytes_copied / 1e6 / self.seconds if self.seconds > 0 else 0.0
        lines = [f"pulled {self.source} -> {self.dest}: {len(self.copied)} objects copied "
                 f"({self.bytes_copied / 1e6:.1f} MB, {rate:.1f} MB/s), {self.skipped} already there, "
                 f"{len(self.removed)} stale removed, of {self.objects}; {self.seconds:.1f}s"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["copied"] = len(self.copied)
        d["removed"] = len(self.removed)
        d["ok"] = self.ok
        return d


def checked_key(key: str, dest: Path, source: str) -> Path:
    """Where the object ``key`` of ``source`` goes under ``dest``; ``StoreError`` for a key that could
    leave it (absolute, ``..``, ``.`` or empty segments, a backslash, a NUL, or a path that resolves
    outside ``dest`` through a link)."""
    bad = (not key or key.startswith("/") or "\\" in key or "\0" in key
           or any(seg in ("", ".", "..") for seg in key.split("/")) or ":" in key.split("/")[0])
    target = dest / key
    if not bad:
        root = dest.resolve()
        try:
            target.resolve().relative_to(root)
        except ValueError:
            bad = True
    if bad:
        raise StoreError(f"{source}: refusing to pull object key {key!r}: it would be written outside {dest} "
                         f"(nothing was copied)")
    return target


def _phase(key: str) -> int:
    """The order a pull writes objects in: data, checksum records, done flags, other metadata, group
    metadata last (a partial copy never shows a committed shard whose objects are not there)."""
    if key in _GROUP_KEYS:
        return 4
    if key.startswith("shards/") and not key.endswith("zarr.json"):
        return 2
    if key.startswith(f"{integrity.PREFIX}/"):
        return 1
    if key.endswith("zarr.json") or key == FAILURES_JSON or key.startswith(f"{APPEND_PREFIX}/"):
        return 3
    return 0


def pull(url: str | os.PathLike, dest: str | os.PathLike, progress: bool = True,
         on_copied: Callable[[str], None] | None = None,
         expect: str | None = None) -> tuple[PullReport, integrity.VerifyReport]:
    """Copy the store at ``url`` to the local directory ``dest`` (docs/SHARING.md, "Pulling").

    Every key is checked before anything is written (``checked_key``). Objects a checksum record
    describes are compared by their recorded sha256, not their size: a re-run copies only what is not
    there yet with the recorded bytes; every other object is fetched and written when its bytes differ,
    and objects of an earlier copy the source no longer has are removed. Shards whose record changed
    lose their done flag in the copy first, and objects are written data first, group metadata last (each
    whole: temporary name, fsync, rename). The copy is verified at the end and its digest compared with
    the source's (and with ``expect`` when given). ``on_copied(key)`` is called after each copy (tests)."""
    from tqdm.auto import tqdm

    from core.urls import redact_url

    t0 = time.perf_counter()
    s = os.fspath(url)
    out = Path(dest)
    if local_path(s) is not None and Path(local_path(s)).resolve() == out.resolve():
        raise StoreError(f"{dest}: is the store itself")
    if out.exists() and not out.is_dir():
        raise StoreError(f"{dest}: exists and is not a directory")
    if out.is_dir() and not (out / "zarr.json").is_file() and not (out / PULL_MARK).is_file() and \
            any(".part" not in p.name for p in out.iterdir()):  # (a killed pull may leave a temporary file)
        raise StoreError(f"{dest}: not empty and not a store (pull into an empty directory or an earlier copy)")
    source = CacheStore.open(s)
    report = PullReport(source=redact_url(s), dest=str(out))
    report.digest = integrity.store_digest(source)
    if expect and report.digest != expect:
        raise StoreError(f"{redact_url(s)}: its store digest is {report.digest or 'unknown (no digest)'}, not the "
                         f"expected {expect}: not the store you were told of (nothing was copied)")
    objects = list_objects(s, source)
    targets = {key: checked_key(key, out, redact_url(s)) for key in objects}
    records = _source_records(source)
    recorded = _recorded(source, records)
    out.mkdir(parents=True, exist_ok=True)
    mark = out / PULL_MARK
    if not mark.is_file():
        atomic_write(mark, lambda tmp: tmp.write_text(redact_url(s) + "\n"))
    _retract(source, records, out)
    fs, root = filesystem(s)
    order = sorted(objects, key=lambda k: (_phase(k), k))
    todo = []
    for key in order:
        target = targets[key]
        want = recorded.get(key)
        if want is not None and target.is_file() and sha256_file(target) == want:
            report.skipped += 1
            continue
        todo.append(key)
    report.objects = len(objects)
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
                raise StoreError(f"{redact_url(s)}: {key} disappeared while pulling (is a writer still at "
                                 f"work?)") from None
            want = recorded.get(key)
            if want is not None and hashlib.sha256(data).hexdigest() != want:
                report.problems.append(f"{key}: the source's bytes differ from its checksum record (a writer at "
                                       f"work, or a corrupt source): not copied")
                continue
            target = targets[key]
            if target.is_file() and want is None and target.read_bytes() == data:
                report.skipped += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: tmp.write_bytes(data))
            report.copied.append(key)
            report.bytes_copied += len(data)
            bar.update(len(data))
            if on_copied is not None:
                on_copied(key)
    finally:
        bar.close()
    if scheme(s) not in ("http", "https"):  # a listing is complete only where the source can be listed
        report.removed = _remove_stale(out, set(objects))
    mark.unlink(missing_ok=True)
    check = integrity.verify(CacheStore.open(out), progress=progress, expect=expect or report.digest)
    if report.digest is None:
        report.problems.append("the source has committed shards without checksum records: the copy cannot be "
                               "verified")
    report.verify = {"ok": check.ok, "problems": [p.line() for p in check.problems] + check.notes,
                     "unrecorded": {k: len(v) for k, v in check.unrecorded.items()}, "digest": check.digest}
    report.seconds = time.perf_counter() - t0
    return report, check


def _source_records(source: CacheStore) -> dict[tuple[str, int], bytes | None]:
    """The checksum record of every shard of the source, read once: ``(kind, index)`` -> its bytes."""
    counts = (("videos", source.num_shards), ("texts", source.num_text_shards),
              ("thumbnails", source.num_shards if source.has_thumbnails else 0))
    return {(kind, i): source.read_object(integrity.record_key(kind, i))
            for kind, count in counts for i in range(count)}


def _recorded(source: CacheStore, records: dict[tuple[str, int], bytes | None]) -> dict[str, str]:
    """key -> recorded sha256 of every object a committed shard's checksum record names as stored."""
    out: dict[str, str] = {}
    for kind, done in (("videos", source.done_shards()), ("texts", source.done_text_shards()),
                       ("thumbnails", source.thumbnail_shards())):
        for i in sorted(done):
            rec = integrity.decode_record(records.get((kind, i))) or {}
            for obj in (rec.get("objects") or {}).values():
                if isinstance(obj, dict) and obj.get("sha256") and isinstance(obj.get("key"), str):
                    out[obj["key"]] = obj["sha256"]
    return out


def _retract(source: CacheStore, records: dict[tuple[str, int], bytes | None], out: Path) -> None:
    """In an earlier copy at ``out``, take back (delete the done flag and record of) every shard whose
    checksum record differs from the source's, before any of its new objects is written."""
    if not (out / "zarr.json").is_file():
        return
    for (kind, i), theirs in records.items():
        local = out / integrity.record_key(kind, i)
        mine = local.read_bytes() if local.is_file() else None
        if mine != theirs:
            for stale in (out / source.chunk_key(integrity.DONE_ARRAYS[kind], i), local):
                if stale.is_file():
                    gate(f"delete {stale}")
                    stale.unlink()


def _remove_stale(out: Path, keep: set[str]) -> list[str]:
    """Delete the objects under ``out`` (a copy) that are not among ``keep`` (the source's keys)."""
    removed = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        key = p.relative_to(out).as_posix()
        if key in keep or key in (LOCK_FILE, PULL_MARK) or key.endswith(".partial") or ".part" in p.name:
            continue
        gate(f"delete {p}")
        p.unlink()
        removed.append(key)
    return removed
