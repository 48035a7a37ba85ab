"""Small file helpers shared by every stage: file hashes, writes that never leave a torn file, and
the one JSON normaliser."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

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
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never a partial one. The temporary name keeps the suffix
    (``x.part.npy`` for ``x.npy``), so writers that choose a format by extension work. Returns
    ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.part{path.suffix}")
    write(tmp)
    tmp.replace(path)
    return path


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
