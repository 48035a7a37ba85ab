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
``verify`` recomputes every record and names each corrupt or missing shard. Stores written before
checksums existed have no records: ``verify`` says so instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("videos", "texts", "thumbnails")
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
    """The record of one shard: ``objects`` maps array name -> object key; ``read(key)`` gives its bytes."""
    return {"kind": kind, "index": int(index), "rows": [int(rows[0]), int(rows[1])], "algorithm": ALGORITHM,
            "objects": {name: {"key": key, **digest(read(key))} for name, key in sorted(objects.items())}}


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

    @property
    def ok(self) -> bool:
        """Every shard written and every record matching (unrecorded shards are not ok: unknown)."""
        return not self.problems and not any(self.unrecorded.values())

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
        if self.ok:
            lines.append("  every shard is intact")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify(store: Any, progress: bool = True) -> VerifyReport:
    """Recompute every checksum record of ``store`` (a ``pipeline.store.CacheStore``): each shard not
    written, each record whose objects differ or are gone is a ``Problem``."""
    from tqdm.auto import tqdm

    report = VerifyReport(store=store.url)
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
        if record.get("unreadable") or "objects" not in record:
            report.problems.append(Problem(kind, index, "corrupt", detail="its checksum record is unreadable"))
            continue
        report.checked[kind] += 1
        corrupt, missing = [], []
        for name, obj in record["objects"].items():
            data = store.read_object(obj["key"])
            report.bytes_read += len(data) if data is not None else 0
            have = digest(data)
            if have["sha256"] == obj.get("sha256"):
                continue
            (missing if data is None else corrupt).append(name)
        if corrupt:
            report.problems.append(Problem(kind, index, "corrupt", corrupt, "stored bytes differ from the checksum"))
        if missing:
            report.problems.append(Problem(kind, index, "missing", missing, "stored object is gone"))
    bar.close()
    return report


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
