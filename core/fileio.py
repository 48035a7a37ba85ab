"""Small file helpers shared by every stage: file hashes, writes that never leave a torn file, and
the one JSON normaliser."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.faults import gate

_sha_cache: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes (remembered per path, size and mtime within the process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a new temporary file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never a partial one, even after a power cut (the file is
    fsynced before the rename, its directory after). The temporary name is unique
    (``.x.<random>.part.npy`` for ``x.npy``: two writers of one path never share it) and keeps the
    suffix, so writers that choose a format by extension work. On any error the temporary file is
    removed and the error re-raised; ``path`` is untouched. The rename passes the crash-test gate
    (``core.faults.gate``). Returns ``path``."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.part{path.suffix}")
        try:  # created here (umask-respecting mode), so that the name is ours alone
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        fsync_path(tmp)
        gate(str(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data (or a directory's entries) to disk. A directory that cannot be opened or
    synced on this platform or file system is skipped; a file's failure is raised."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (is_dir and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Atomically write ``obj`` as JSON (values JSON cannot hold are written as strings), newline-ended."""
    return write_text(path, json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys) + "\n")


def jsonable(obj: Any, strict: bool = False) -> Any:
    """``obj`` as plain JSON data, the form in which configs, identities and metrics are stored and
    compared: mappings with string keys, lists for tuples and arrays, Python numbers for numpy
    scalars, ``str`` for anything else JSON cannot hold. ``strict=True`` also turns NaN and inf
    into ``None`` (strict JSON, for metrics)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v, strict) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return None if strict and (math.isnan(f) or math.isinf(f)) else f
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def json_diff(expected: Any, found: Any) -> list[str]:
    """Human-readable differences between two JSON-like dicts, key by key ([] when equal)."""
    a, b = jsonable(expected or {}), jsonable(found or {})
    return [f"{k}: expected {a.get(k)!r}, found {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
