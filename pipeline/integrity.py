"""Checksums of a store's shards and their verification (docs/SHARING.md, "Checksums").

When a writer finishes a video shard, a text shard or a shard's thumbnails, it reads back the stored
object of every array that shard wrote (zarr chunk or zarr shard; an object never written because it
held only the fill value counts as absent) and records its sha256 and size in one small JSON object
inside the store::

    checksums/videos/<i>.json      video shard i      (videos/* rows [i*S, (i+1)*S))
    checksums/texts/<j>.json       text shard j       (texts/* rows [j*St, (j+1)*St))
    checksums/thumbnails/<i>.json  thumbnails of video shard i

    {"kind": "videos", "index": i, "rows": [lo, hi], "algorithm": "sha256",
     "objects": {"videos/tokens": {"key": "videos/tokens/c/i/0/0/0", "sha256": "...", "bytes": n}, ...}}

(``"sha256": null, "bytes": 0`` records an absent object.) One object per shard, written by the shard's
only writer before the shard is marked done: several writers of one store never touch the same record.
``verify`` recomputes every record, checks that it covers exactly the objects its shard has (the keys
the store's metadata gives), and names each corrupt or missing shard. Stores written before checksums
existed have no records: ``verify`` says so instead of guessing.

The **store digest** (``store_digest``) is one sha256 over every committed shard's checksum record, the
list of committed shards, every metadata object (the root attributes, each group's and each array's
``zarr.json``: codecs, fill values, dtypes, shapes), the failure list and the append objects. Two stores
with one digest, each passing ``verify``, hold the same bytes wherever a reader looks: ``cache info``
prints it, ``cache verify --expect`` and ``cache pull --expect`` check it (docs/SHARING.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("videos", "texts", "thumbnails")
DONE_ARRAYS = {"videos": "shards/done", "texts": "shards/text_done", "thumbnails": "shards/thumbnails_done"}
GROUPS = ("videos", "texts", "shards")
FAILURES_JSON = "failures.json"
APPEND_PREFIX = "append"
JOURNAL_KEY = f"{APPEND_PREFIX}/journal.npz"
NOUN = {"videos": "video", "texts": "text", "thumbnails": "thumbnail"}  # for messages
ALGORITHM = "sha256"
PREFIX = "checksums"


def record_key(kind: str, index: int) -> str:
    """Where the record of shard ``index`` of ``kind`` lives inside the store."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r} ({', '.join(KINDS)})")
    return f"{PREFIX}/{kind}/{int(index)}.json"


def digest(data: bytes | None) -> dict:
    """``{"sha256", "bytes"}`` of one stored object (``None``: absent)."""
    if data is None:
        return {"sha256": None, "bytes": 0}
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def make_record(kind: str, index: int, rows: tuple[int, int], objects: dict[str, str],
                read: Callable[[str], bytes | None]) -> dict:
    """The record of one shard: ``objects`` maps array name -> object key; ``read(key)`` gives its bytes.
    ``metadata``: each array's ``zarr.json`` but its shape (``metadata_digest``), so that a changed codec,
    fill value or dtype, which changes what the same bytes decode to, is a corrupt shard too."""
    arrays = sorted({name.split("[")[0] for name in objects})
    return {"kind": kind, "index": int(index), "rows": [int(rows[0]), int(rows[1])], "algorithm": ALGORITHM,
            "objects": {name: {"key": key, **digest(read(key))} for name, key in sorted(objects.items())},
            "metadata": {name: metadata_digest(read(f"{name}/zarr.json")) for name in arrays}}


def metadata_digest(data: bytes | None) -> str | None:
    """sha256 of an array's ``zarr.json`` without its shape (an append grows the shape, nothing else)."""
    if data is None:
        return None
    try:
        meta = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return hashlib.sha256(data).hexdigest()
    if isinstance(meta, dict):
        meta.pop("shape", None)
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode_record(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def decode_record(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        rec = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return {"unreadable": True}
    return rec if isinstance(rec, dict) else {"unreadable": True}


@dataclass
class Problem:
    """One bad shard: ``kind`` videos / texts / thumbnails, ``index``, ``state`` corrupt / missing, and why."""

    kind: str
    index: int
    state: str
    arrays: list[str] = field(default_factory=list)
    detail: str = ""

    def line(self) -> str:
        what = f" ({', '.join(self.arrays)})" if self.arrays else ""
        return f"{NOUN[self.kind]} shard {self.index}: {self.state}{what}{': ' + self.detail if self.detail else ''}"


@dataclass
class VerifyReport:
    """What ``verify`` found."""

    store: str
    checked: dict[str, int] = field(default_factory=dict)       # shards whose records were recomputed, per kind
    unrecorded: dict[str, list[int]] = field(default_factory=dict)  # done shards without a record, per kind
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0
    digest: str | None = None      # the store digest (None: not every committed shard has a record)
    expected: str | None = None    # the digest the caller expected (--expect)
    notes: list[str] = field(default_factory=list)  # store-wide problems (an unfinished append, a digest)

    @property
    def ok(self) -> bool:
        """Every shard written and every record matching (unrecorded shards are not ok: unknown), and the
        digest the one expected when one was."""
        return not self.problems and not any(self.unrecorded.values()) and not self.notes

    def bad_shards(self, kind: str) -> list[int]:
        return sorted({p.index for p in self.problems if p.kind == kind})

    def summary(self) -> str:
        checked = ", ".join(f"{n} {NOUN[k]} shards" for k, n in self.checked.items() if n) or "no shards"
        lines = [f"verify {self.store}: {checked} checked against their checksums, "
                 f"{self.bytes_read / 1e6:.1f} MB read; {len(self.problems)} bad"]
        lines += [f"  {p.line()}" for p in self.problems]
        for kind, idx in self.unrecorded.items():
            if idx:
                lines.append(f"  {len(idx)} {NOUN[kind]} shards have no checksum recorded (written before this store "
                             f"recorded checksums): cannot verify them (shards {_ranges(idx)})")
        lines += [f"  {n}" for n in self.notes]
        lines.append(f"  digest {self.digest}" if self.digest else
                     "  no digest: some committed shards have no checksum record (written before checksums)")
        if self.ok:
            lines.append("  every shard is intact" + (" and the digest is the one expected" if self.expected else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify(store: Any, progress: bool = True, expect: str | None = None) -> VerifyReport:
    """Recompute every checksum record of ``store`` (a ``pipeline.store.CacheStore``): each shard not
    written, each record that covers other objects than its shard has, each whose objects differ or are
    gone is a ``Problem``; ``expect``: the store digest it must have."""
    from core.urls import redact_url
    from tqdm.auto import tqdm

    report = VerifyReport(store=redact_url(store.url), expected=expect)
    plan: list[tuple[str, int, bool]] = []  # (kind, index, done)
    done_v, done_t = store.done_shards(), store.done_text_shards()
    plan += [("videos", i, i in done_v) for i in range(store.num_shards)]
    plan += [("texts", j, j in done_t) for j in range(store.num_text_shards)]
    if store.has_thumbnails:
        done_th = store.thumbnail_shards()
        plan += [("thumbnails", i, True) for i in sorted(done_th)]
    bar = tqdm(plan, unit="shard", desc="verify", disable=not progress, leave=False)
    for kind, index, done in bar:
        report.checked.setdefault(kind, 0)
        report.unrecorded.setdefault(kind, [])
        if not done:
            report.problems.append(Problem(kind, index, "missing", detail="not written (extraction unfinished)"))
            continue
        record = decode_record(store.read_object(record_key(kind, index)))
        if record is None:
            report.unrecorded[kind].append(index)
            continue
        if record.get("unreadable") or not isinstance(record.get("objects"), dict):
            report.problems.append(Problem(kind, index, "corrupt", detail="its checksum record is unreadable"))
            continue
        report.checked[kind] += 1
        wrong = record_mismatch(store, kind, index, record)
        if wrong:
            report.problems.append(Problem(kind, index, "corrupt", detail=wrong))
            continue
        corrupt, missing = [], []
        for name, obj in record["objects"].items():
            data = store.read_object(obj["key"])
            report.bytes_read += len(data) if data is not None else 0
            have = digest(data)
            if have["sha256"] == obj.get("sha256"):
                continue
            (missing if data is None else corrupt).append(name)
        changed = [name for name, sha in (record.get("metadata") or {}).items()
                   if metadata_digest(store.read_object(f"{name}/zarr.json")) != sha]
        if changed:
            report.problems.append(Problem(kind, index, "corrupt", changed,
                                           "the array's metadata (codecs, fill value, dtype) changed since it was "
                                           "written"))
        if corrupt:
            report.problems.append(Problem(kind, index, "corrupt", corrupt, "stored bytes differ from the checksum"))
        if missing:
            report.problems.append(Problem(kind, index, "missing", missing, "stored object is gone"))
    bar.close()
    if store.read_object(JOURNAL_KEY) is not None:
        report.notes.append("an append is unfinished (append/journal.npz): the next writer of the store finishes it")
    report.digest = store_digest(store)
    if expect and report.digest != expect:
        report.notes.append(f"the store digest is {report.digest or 'unknown (no digest)'}, not the expected {expect}")
    return report


def record_mismatch(store: Any, kind: str, index: int, record: dict) -> str:
    """Why ``record`` is not the record of shard ``index`` of ``kind`` ("" when it is): another shard's, or
    covering other objects than the shard has (the keys its metadata gives)."""
    rows = store.shard_range(index) if kind != "texts" else store.text_shard_range(index)
    if record.get("kind") != kind or record.get("index") != index or list(record.get("rows") or []) != list(rows):
        return (f"its checksum record is of another shard ({record.get('kind')} {record.get('index')}, rows "
                f"{record.get('rows')})")
    want = store.shard_objects(kind, index)
    have = {name: (obj or {}).get("key") if isinstance(obj, dict) else None
            for name, obj in record["objects"].items()}
    for name in set(want) - set(have):  # a string array widened since: its new objects of this shard
        if "[" in name and store.read_object(want[name]) is None:  # hold only the fill value (absent)
            have[name] = want[name]
    if have != want:
        lacks = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        moved = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        parts = ([f"lacks {', '.join(lacks)}"] if lacks else []) + ([f"names {', '.join(extra)} the shard has not"]
                                                                    if extra else []) + \
            ([f"names other keys for {', '.join(moved)}"] if moved else [])
        return "its checksum record does not cover the shard's objects (" + "; ".join(parts) + ")"
    return ""


def _canonical(data: bytes | None, part: str | None = None) -> bytes:
    """A JSON object's bytes in one canonical form (``part``: only that member), so that one metadata
    written twice has one digest; bytes that are not JSON as they are."""
    if data is None:
        return b"-"
    try:
        obj = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return data
    if part is not None:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest_entries(store: Any) -> dict[str, str] | None:
    """What the store digest is made of: name -> sha256 of each part (``None`` when a committed shard has
    no checksum record: a store written before checksums existed has no digest)."""
    entries: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        entries[name] = hashlib.sha256(data).hexdigest()

    put("zarr.json#attributes", _canonical(store.read_object("zarr.json"), "attributes"))
    for group in GROUPS:
        put(f"{group}/zarr.json#attributes", _canonical(store.read_object(f"{group}/zarr.json"), "attributes"))
    for name in array_names(store):
        put(f"{name}/zarr.json", _canonical(store.read_object(f"{name}/zarr.json")))
    for kind in KINDS:
        if kind == "thumbnails" and not store.has_thumbnails:
            continue
        done = sorted(store.done_shards() if kind == "videos" else store.done_text_shards() if kind == "texts"
                      else store.thumbnail_shards())
        put(f"{DONE_ARRAYS[kind]}#committed", json.dumps(done).encode())
        for i in done:
            data = store.read_object(record_key(kind, i))
            if data is None:
                return None
            put(record_key(kind, i), data)
    put(FAILURES_JSON, store.read_object(FAILURES_JSON) or b"-")
    append_keys = [JOURNAL_KEY] + [f"{APPEND_PREFIX}/{kind}-{i}.npz" for kind in ("videos", "texts")
                                   for i in sorted(store.reopened_shards(kind))]
    for key in append_keys:
        data = store.read_object(key)
        if data is not None:
            put(key, data)
    return entries


def store_digest(store: Any) -> str | None:
    """The store digest (module docstring); ``None`` for a store with committed shards but no records."""
    entries = digest_entries(store)
    if entries is None:
        return None
    return hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in sorted(entries.items())).encode()).hexdigest()


def array_names(store: Any) -> list[str]:
    """Every array of the store (from its group metadata)."""
    names = []
    for group in GROUPS:
        try:
            g = store.array(group)  # a group: the cache keeps any child node
        except KeyError:
            continue
        names += [f"{group}/{k}" for k, _ in g.arrays()]
    return sorted(names)


def _ranges(idx: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out, idx = [], sorted(idx)
    start = prev = None
    for i in idx + [None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(out)
