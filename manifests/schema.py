"""The manifest format shared by every dataset.

A manifest is a directory holding ``videos.parquet``, ``captions.parquet`` and ``meta.json``
(see docs/ARCHITECTURE.md, "Manifest"). :class:`Manifest` keeps both tables as
``pyarrow.Table`` objects, validates them and computes a content hash that does not depend on
row order.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
VIDEOS_FILE = "videos.parquet"
CAPTIONS_FILE = "captions.parquet"
META_FILE = "meta.json"

VIDEO_COLUMNS: dict[str, pa.DataType] = {
    "video_id": pa.string(),
    "path": pa.string(),
    "split": pa.string(),
    "start": pa.float64(),
    "end": pa.float64(),
}
CAPTION_COLUMNS: dict[str, pa.DataType] = {
    "caption_id": pa.string(),
    "video_id": pa.string(),
    "text": pa.string(),
    "split": pa.string(),
}
# Columns that may hold nulls (everything else is required per row).
_NULLABLE = {"start", "end"}

# Longest video / caption id, in UTF-8 bytes: a store keeps every id at the longest one's width
# (zero-padded), and ids name files. Real ids are under 100 bytes (LSMDC's are the longest).
MAX_ID_BYTES = 256
# Longest caption text, in UTF-8 bytes: room for paragraph captions (ActivityNet's and DiDeMo's
# joined sentences are a few KiB at most).
MAX_CAPTION_BYTES = 16 * 1024
# Characters refused in ids (Unicode category Cc: C0 controls, DEL, C1 controls): a NUL is lost
# from a zero-padded id, and a newline or escape has no place in a file name or a one-line error.
_ID_CONTROL = r"[\x00-\x1f\x7f-\x9f]"

# Extensions tried, in order, when looking for a video file.
VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".flv",
)


class ManifestError(ValueError):
    """A manifest (or the annotation files it is built from) is missing or invalid."""


def _fail(where: str, msg: str) -> ManifestError:
    return ManifestError(f"{where}: {msg}")


def _row_label(i: int, key: str | None, value: Any) -> str:
    if isinstance(value, str) and len(value) > 60:  # an id over the limit stays a short line
        value = value[:40] + "..."
    return f"row {i}" + (f" ({key}={value!r})" if key is not None else "")


def _check_text(table: pa.Table, column: str, limit: int, controls: bool, key: str, where: str) -> None:
    """Refuse the first row whose ``column`` is over ``limit`` UTF-8 bytes or (``controls``) holds a
    control character; nulls are left to the null check."""
    col = table.column(column)
    checks = [(pc.greater(pc.binary_length(col), limit),
               lambda n: f"{column} is {n} bytes (UTF-8), over the limit of {limit} bytes")]
    if controls:
        checks.append((pc.match_substring_regex(col, _ID_CONTROL),
                       lambda _: f"{column} holds a control character (NUL, newline, tab, ...)"))
    for bad, message in checks:
        i = pc.index(bad.fill_null(False), True).as_py()
        if i >= 0:
            value = col[i].as_py()
            raise _fail(where, f"{_row_label(i, key, table.column(key)[i].as_py())}: "
                               f"{message(len(value.encode('utf-8')))}")


def _normalize(table: pa.Table, columns: Mapping[str, pa.DataType], where: str) -> pa.Table:
    """Check required columns, cast them to their types and put them first."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise _fail(where, f"missing required column(s) {missing}; found {table.column_names}")
    dupes = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if dupes:
        raise _fail(where, f"duplicate column name(s) {dupes}")
    arrays, names = [], []
    for name, dtype in columns.items():
        col = table.column(name)
        if not col.type.equals(dtype):
            try:
                col = col.cast(dtype)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise _fail(where, f"column {name!r} of type {col.type} cannot be read as "
                                   f"{dtype}: {exc}") from None
        arrays.append(col)
        names.append(name)
    for name in table.column_names:
        if name not in columns:
            arrays.append(table.column(name))
            names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _check_rows(videos: pa.Table, captions: pa.Table, vwhere: str, cwhere: str) -> None:
    """Row-level checks; every error names the file and the offending row and id."""
    vcols = {c: videos.column(c).to_pylist() for c in VIDEO_COLUMNS}
    ccols = {c: captions.column(c).to_pylist() for c in CAPTION_COLUMNS}

    for table_cols, spec, key, where in ((vcols, VIDEO_COLUMNS, "video_id", vwhere),
                                         (ccols, CAPTION_COLUMNS, "caption_id", cwhere)):
        for name in spec:
            if name in _NULLABLE:
                continue
            for i, value in enumerate(table_cols[name]):
                if value is None:
                    ident = table_cols[key][i]
                    raise _fail(where, f"{_row_label(i, key if ident is not None else None, ident)}"
                                       f": null {name!r}")

    _check_text(videos, "video_id", MAX_ID_BYTES, True, "video_id", vwhere)
    _check_text(captions, "caption_id", MAX_ID_BYTES, True, "caption_id", cwhere)
    _check_text(captions, "text", MAX_CAPTION_BYTES, False, "caption_id", cwhere)

    video_split: dict[str, str] = {}
    for i, (vid, split, start, end) in enumerate(zip(vcols["video_id"], vcols["split"],
                                                     vcols["start"], vcols["end"])):
        label = _row_label(i, "video_id", vid)
        if vid == "":
            raise _fail(vwhere, f"row {i}: empty video_id")
        if vid in video_split:
            raise _fail(vwhere, f"{label}: duplicate video_id")
        if split not in SPLITS:
            raise _fail(vwhere, f"{label}: bad split {split!r} (expected one of {list(SPLITS)})")
        if start is not None and not start >= 0:
            raise _fail(vwhere, f"{label}: start {start} must be >= 0")
        if end is not None and not end > (start or 0.0):
            raise _fail(vwhere, f"{label}: end {end} must be greater than start {start or 0.0}")
        video_split[vid] = split
    for i, path in enumerate(vcols["path"]):
        if path == "":
            raise _fail(vwhere, f"{_row_label(i, 'video_id', vcols['video_id'][i])}: empty path")

    seen: set[str] = set()
    for i, (cid, vid, text, split) in enumerate(zip(ccols["caption_id"], ccols["video_id"],
                                                    ccols["text"], ccols["split"])):
        label = _row_label(i, "caption_id", cid)
        if cid == "":
            raise _fail(cwhere, f"row {i}: empty caption_id")
        if cid in seen:
            raise _fail(cwhere, f"{label}: duplicate caption_id")
        seen.add(cid)
        if split not in SPLITS:
            raise _fail(cwhere, f"{label}: bad split {split!r} (expected one of {list(SPLITS)})")
        if vid not in video_split:
            raise _fail(cwhere, f"{label}: unknown video_id {vid!r} (not in {vwhere})")
        if video_split[vid] != split:
            raise _fail(cwhere, f"{label}: split {split!r} differs from its video {vid!r} "
                                f"(split {video_split[vid]!r})")
        if not text.strip():
            raise _fail(cwhere, f"{label}: empty text")


def _column_digest(h: "hashlib._Hash", name: str, col: pa.ChunkedArray) -> None:
    values = json.dumps(col.to_pylist(), ensure_ascii=False, separators=(",", ":"),
                        default=str, allow_nan=True)
    h.update(json.dumps([name, str(col.type)]).encode())
    h.update(b"\x00")
    h.update(values.encode("utf-8"))
    h.update(b"\x01")


def _canonical(table: pa.Table, required: Mapping[str, pa.DataType], key: str) -> pa.Table:
    order = pc.sort_indices(table, sort_keys=[(key, "ascending")])
    table = table.take(order)
    extras = sorted(c for c in table.column_names if c not in required)
    return table.select(list(required) + extras)


def _table_from_records(records: Sequence[Mapping[str, Any]],
                        columns: Mapping[str, pa.DataType], where: str) -> pa.Table:
    names: list[str] = list(columns)
    for rec in records:
        for k in rec:
            if k not in names:
                names.append(k)
    arrays = []
    for name in names:
        values = [rec.get(name) for rec in records]
        try:
            if name in columns:
                values = [str(v) if isinstance(v, Path) else v for v in values]
                arrays.append(pa.array(values, type=columns[name]))
            else:
                arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise _fail(where, f"column {name!r}: {exc}") from None
    return pa.Table.from_arrays(arrays, names=names)


@dataclass
class Manifest:
    """Videos and captions of one dataset; see docs/ARCHITECTURE.md, "Manifest"."""

    videos: pa.Table
    captions: pa.Table
    root: Path
    dataset: str
    source: dict = field(default_factory=dict)
    _paths: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.videos = _normalize(self.videos, VIDEO_COLUMNS, VIDEOS_FILE)
        self.captions = _normalize(self.captions, CAPTION_COLUMNS, CAPTIONS_FILE)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_records(cls, dataset: str, videos: Sequence[Mapping[str, Any]],
                     captions: Sequence[Mapping[str, Any]], root: str | Path,
                     source: dict | None = None) -> "Manifest":
        """Build and validate a manifest from lists of row dicts (missing start/end = null)."""
        vt = _table_from_records(videos, VIDEO_COLUMNS, "videos records")
        ct = _table_from_records(captions, CAPTION_COLUMNS, "captions records")
        m = cls(vt, ct, Path(root), dataset, dict(source or {}))
        m.validate("videos records", "captions records")
        return m

    def validate(self, videos_name: str = VIDEOS_FILE,
                 captions_name: str = CAPTIONS_FILE) -> None:
        """Raise :class:`ManifestError` on the first problem found (names file and row)."""
        self.videos = _normalize(self.videos, VIDEO_COLUMNS, videos_name)
        self.captions = _normalize(self.captions, CAPTION_COLUMNS, captions_name)
        self._paths = None
        _check_rows(self.videos, self.captions, videos_name, captions_name)

    # -- queries --------------------------------------------------------------------------
    @property
    def video_ids(self) -> list[str]:
        return self.videos.column("video_id").to_pylist()

    @property
    def caption_ids(self) -> list[str]:
        return self.captions.column("caption_id").to_pylist()

    def __len__(self) -> int:
        return self.videos.num_rows

    def video_path(self, video_id: str) -> Path:
        """Path of a video file; relative paths resolve against the manifest directory."""
        if self._paths is None:
            self._paths = dict(zip(self.videos.column("video_id").to_pylist(),
                                   self.videos.column("path").to_pylist()))
        try:
            p = Path(self._paths[video_id])
        except KeyError:
            raise KeyError(f"unknown video_id {video_id!r} in manifest "
                           f"{self.dataset!r}") from None
        return p if p.is_absolute() else self.root / p

    def split(self, name: str) -> "Manifest":
        """Videos and captions of one split (same root and dataset)."""
        if name not in SPLITS:
            raise ManifestError(f"bad split {name!r} (expected one of {list(SPLITS)})")
        videos = self.videos.filter(pc.equal(self.videos.column("split"), name))
        captions = self.captions.filter(pc.equal(self.captions.column("split"), name))
        return Manifest(videos, captions, self.root, self.dataset, dict(self.source))

    def split_counts(self) -> dict[str, dict[str, int]]:
        """``{split: {"videos": n, "captions": n}}`` for the splits present."""
        out: dict[str, dict[str, int]] = {}
        for key, table in (("videos", self.videos), ("captions", self.captions)):
            for s in table.column("split").to_pylist():
                out.setdefault(s, {"videos": 0, "captions": 0})[key] += 1
        return out

    def as_paragraphs(self, sep: str = " ") -> "Manifest":
        """One caption per video: all its captions joined (paragraph-to-video retrieval)."""
        texts: dict[str, list[str]] = {}
        for vid, text in zip(self.captions.column("video_id").to_pylist(),
                             self.captions.column("text").to_pylist()):
            texts.setdefault(vid, []).append(text)
        vids = [v for v in self.video_ids if v in texts]
        splits = dict(zip(self.video_ids, self.videos.column("split").to_pylist()))
        caps = pa.table({"caption_id": vids, "video_id": vids,
                         "text": [paragraph(texts[v], sep) for v in vids],
                         "split": [splits[v] for v in vids]})
        return Manifest(self.videos, caps, self.root, self.dataset, dict(self.source))

    def sha256(self) -> str:
        """Hash of the canonical content: rows sorted by id, required then extra columns
        (sorted by name); independent of row order, root and ``source``."""
        h = hashlib.sha256()
        h.update(f"manifest-schema-{SCHEMA_VERSION}".encode())
        for label, table, spec, key in (("videos", self.videos, VIDEO_COLUMNS, "video_id"),
                                        ("captions", self.captions, CAPTION_COLUMNS,
                                         "caption_id")):
            canon = _canonical(table, spec, key)
            h.update(f"\x02{label}:{canon.num_rows}".encode())
            for name in canon.column_names:
                _column_digest(h, name, canon.column(name))
        return h.hexdigest()

    # -- disk -------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"dataset": self.dataset, "schema": SCHEMA_VERSION, "source": self.source,
                "sha256": self.sha256()}

    def write(self, directory: str | Path) -> Path:
        """Write the three files into ``directory`` (created). When ``directory`` differs from
        ``root``, relative video paths are made absolute (resolved against ``root``) so that
        they still name the same files. All three are written in full before any replaces the
        previous manifest's (an error leaves that manifest as it was), meta.json, which holds the
        content hash, last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.validate()
        videos = self.videos
        if directory.resolve() != self.root.resolve():
            new = []
            for p in videos.column("path").to_pylist():
                if not Path(p).is_absolute():
                    p = str((self.root / p).resolve())
                new.append(p)
            videos = videos.set_column(videos.column_names.index("path"), "path",
                                       pa.array(new, pa.string()))
        out = Manifest(videos, self.captions, directory, self.dataset, dict(self.source))
        meta = json.dumps(out.meta(), indent=2, sort_keys=True, default=str) + "\n"
        _replace_files({directory / VIDEOS_FILE: lambda tmp: pq.write_table(out.videos, tmp),
                        directory / CAPTIONS_FILE: lambda tmp: pq.write_table(out.captions, tmp),
                        directory / META_FILE: lambda tmp: tmp.write_text(meta)})
        return directory

    @classmethod
    def read(cls, directory: str | Path, verify: bool = True) -> "Manifest":
        """Read and validate a manifest directory; with ``verify`` the content must match
        the hash recorded in meta.json."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ManifestError(f"{directory}: manifest directory does not exist")
        paths = {n: directory / n for n in (VIDEOS_FILE, CAPTIONS_FILE, META_FILE)}
        for p in paths.values():
            if not p.is_file():
                raise ManifestError(f"{p}: missing manifest file")
        try:
            meta = json.loads(paths[META_FILE].read_text())
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{paths[META_FILE]}: invalid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise ManifestError(f"{paths[META_FILE]}: expected a JSON object")
        for key in ("dataset", "schema"):
            if key not in meta:
                raise ManifestError(f"{paths[META_FILE]}: missing key {key!r}")
        if meta["schema"] != SCHEMA_VERSION:
            raise ManifestError(f"{paths[META_FILE]}: schema {meta['schema']!r} is not "
                                f"supported (expected {SCHEMA_VERSION})")
        tables = {}
        for name in (VIDEOS_FILE, CAPTIONS_FILE):
            try:
                tables[name] = pq.read_table(paths[name])
            except (OSError, pa.ArrowException) as exc:
                raise ManifestError(f"{paths[name]}: cannot read Parquet: {exc}") from None
        m = cls.__new__(cls)
        m.videos, m.captions = tables[VIDEOS_FILE], tables[CAPTIONS_FILE]
        m.root, m.dataset = directory, str(meta["dataset"])
        m.source, m._paths = dict(meta.get("source") or {}), None
        m.validate(str(paths[VIDEOS_FILE]), str(paths[CAPTIONS_FILE]))
        if verify and meta.get("sha256") is not None and meta["sha256"] != m.sha256():
            raise ManifestError(f"{paths[META_FILE]}: sha256 {meta['sha256']} does not match "
                                f"the content of the tables ({m.sha256()}); the manifest was "
                                f"modified after it was written")
        return m


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_files(writers: Mapping[Path, Callable[[Path], Any]]) -> None:
    """``write(tmp)`` of every ``path: write`` to a new temporary file beside ``path`` (fsynced), then
    each renamed over its path, in order, and the directories fsynced: nothing is replaced until every
    file is written whole. On an error the temporary files are removed and the error re-raised.
    (``core.fileio.atomic_write`` does this for one file; manifests import nothing of ours.)"""
    tmps: dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            while path not in tmps:
                tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.part{path.suffix}")
                try:  # created here, so that the name is ours alone
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                    tmps[path] = tmp
                except FileExistsError:
                    continue
            write(tmp)
            _fsync(tmp)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for directory in {p.parent for p in tmps}:
        try:
            _fsync(directory)
        except OSError:  # a platform or file system that cannot sync a directory
            pass


def paragraph(texts: Iterable[str], sep: str = " ") -> str:
    """Join the captions of one video into one text (stripped, blanks dropped)."""
    return sep.join(t.strip() for t in texts if t and t.strip())


# -- helpers for the dataset builders ------------------------------------------------------
class VideoLocator:
    """Finds video files under ``video_dir`` trying common extensions. Each directory is
    listed once, so looking up many videos costs one scan per directory."""

    def __init__(self, video_dir: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS):
        self.video_dir = Path(video_dir).expanduser().resolve()
        self.extensions = tuple(extensions)
        self._listing: dict[Path, set[str]] = {}

    def _names(self, directory: Path) -> set[str]:
        if directory not in self._listing:
            try:
                self._listing[directory] = {e.name for e in os.scandir(directory)}
            except OSError:
                self._listing[directory] = set()
        return self._listing[directory]

    def find(self, stem: str, exact: bool = False) -> Path | None:
        """The file for ``stem`` (may contain ``/``): ``stem`` itself when ``exact``, else
        ``stem + ext`` for each known extension; ``None`` when absent."""
        target = self.video_dir / stem
        names = self._names(target.parent)
        candidates = [target.name] if exact else [target.name + e for e in self.extensions]
        for name in candidates:
            if name in names:
                return target.parent / name
        return None

    def locate(self, stems: Sequence[str], default_ext: str = ".mp4") -> tuple[Path, bool]:
        """First existing file among ``stems`` (extensions tried); otherwise the expected
        path ``video_dir/stems[0] + default_ext``. Returns ``(path, found)``."""
        for stem in stems:
            hit = self.find(stem)
            if hit is not None:
                return hit, True
        return self.video_dir / (stems[0] + default_ext), False


def finish(manifest: Manifest, out_dir: str | Path | None, missing: Sequence[str],
           require_videos: bool) -> Manifest:
    """Common end of a builder: record missing videos, enforce ``require_videos`` and write
    the manifest when ``out_dir`` is given."""
    manifest.source["missing_videos"] = len(missing)
    if missing and require_videos:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ManifestError(f"{len(missing)} of {len(manifest)} video files not found under "
                            f"{manifest.source.get('video_dir')}: {shown}")
    if out_dir is not None:
        return Manifest.read(manifest.write(out_dir))
    return manifest


def annotation_file(explicit: str | Path | None, annotations_dir: str | Path | None,
                    default_names: Sequence[str], what: str, required: bool = True) -> Path | None:
    """Resolve one annotation file: the explicit path, else the first of ``default_names``
    found in ``annotations_dir``. Raises :class:`ManifestError` naming what was tried."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ManifestError(f"{path}: {what} file not found")
        return path
    if annotations_dir is not None:
        base = Path(annotations_dir).expanduser()
        for name in default_names:
            if (base / name).is_file():
                return base / name
        if required:
            raise ManifestError(f"{base}: no {what} file (tried {', '.join(default_names)})")
        return None
    if required:
        raise ManifestError(f"no {what} file: give annotations_dir or the file path")
    return None


def load_json(path: Path) -> Any:
    """Parse a JSON annotation file, naming it in any error."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as exc:
        raise ManifestError(f"{path}: invalid JSON: {exc}") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None


def read_lines(path: Path) -> list[tuple[int, str]]:
    """``(line_number, text)`` of the non-blank lines of a text file (stripped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


class RecordCollector:
    """Accumulates video and caption rows for a builder, locating video files as it goes."""

    def __init__(self, dataset: str, video_dir: str | Path | None, default_ext: str = ".mp4",
                 extensions: Sequence[str] = VIDEO_EXTENSIONS):
        if video_dir is None:
            raise ManifestError(f"{dataset}: video_dir is required (the directory of the video "
                                f"files; missing files are allowed unless require_videos=True)")
        self.dataset = dataset
        self.locator = VideoLocator(video_dir, extensions)
        self.default_ext = default_ext
        self.videos: list[dict[str, Any]] = []
        self.captions: list[dict[str, Any]] = []
        self.missing: list[str] = []
        self.skipped_blank = 0
        self._split: dict[str, str] = {}
        self._origin: dict[str, str] = {}
        self._count: dict[str, int] = {}

    def has_video(self, video_id: str) -> bool:
        return video_id in self._split

    def split_of(self, video_id: str) -> str | None:
        return self._split.get(video_id)

    def add_video(self, video_id: str, split: str, origin: str,
                  stems: Sequence[str] | None = None, path: Path | None = None,
                  found: bool | None = None, start: float | None = None,
                  end: float | None = None, **extra: Any) -> None:
        """Add one video. The file is looked up from ``stems`` (default: the id) unless
        ``path``/``found`` are given. ``origin`` names the annotation file for errors."""
        if video_id in self._split:
            raise ManifestError(f"{origin}: video {video_id!r} already listed in "
                                f"{self._origin[video_id]} (split {self._split[video_id]!r})")
        if path is None:
            path, found = self.locator.locate(list(stems or [video_id]), self.default_ext)
        if not found:
            self.missing.append(video_id)
        self._split[video_id] = split
        self._origin[video_id] = origin
        self.videos.append({"video_id": video_id, "path": str(path), "split": split,
                            "start": start, "end": end, **extra})

    def add_caption(self, video_id: str, text: Any, origin: str,
                    caption_id: str | None = None) -> None:
        """Add one caption of a known video (stripped; blank texts are skipped and counted)."""
        if video_id not in self._split:
            raise ManifestError(f"{origin}: caption for unknown video {video_id!r}")
        if not isinstance(text, str):
            raise ManifestError(f"{origin}: caption of video {video_id!r} is not a string: "
                                f"{text!r}")
        text = text.strip()
        if not text:
            self.skipped_blank += 1
            return
        n = self._count.get(video_id, 0)
        self._count[video_id] = n + 1
        self.captions.append({"caption_id": caption_id or f"{video_id}#{n}",
                              "video_id": video_id, "text": text,
                              "split": self._split[video_id]})

    def caption_count(self, video_id: str) -> int:
        return self._count.get(video_id, 0)

    def finish(self, source: dict, out_dir: str | Path | None,
               require_videos: bool) -> Manifest:
        """Validate, record provenance, enforce ``require_videos``, write if ``out_dir``."""
        source = {"video_dir": str(self.locator.video_dir), **source,
                  "skipped_blank_captions": self.skipped_blank}
        root = Path(out_dir) if out_dir is not None else self.locator.video_dir
        m = Manifest.from_records(self.dataset, self.videos, self.captions, root, source)
        return finish(m, out_dir, self.missing, require_videos)
