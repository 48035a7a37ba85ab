"""Reading an HDF5 file as untrusted input: the import limits, checked attributes and datasets, and the
temporary store an import is built in (docs/STORE.md, "Importing HDF5 safely")."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ExternalFormatError, StoreError, UsageError
from pipeline.store import local_path

IMPORTING = ".importing-"  # <store>.importing-<host>-<pid>-<hex>: a store being imported, renamed when whole


@dataclass(frozen=True)
class ImportLimits:
    """The most an HDF5 import accepts; each dataset's declared shape is checked against them before
    anything is read. The defaults take real feature files with room to spare: 64 frames x 257 tokens x
    1408 dims in float16 for 100k videos is 4.6 TB in all and 3 GB per shard of 64 videos."""

    rows: int = 10_000_000          # videos, captions (and entries of a features file's /videos, /texts)
    frames: int = 1024              # frames per video in the store
    source_frames: int = 1_000_000  # frames one video of another tool's file declares (read: only those kept)
    tokens: int = 4096              # tokens per frame, tokens per caption
    width: int = 65536              # a vector's dims, a string row's bytes, a thumbnail's bytes
    total_bytes: int = 1 << 44      # the data the new store holds (16 TiB)
    memory_bytes: int = 1 << 33     # held at once: one shard, or the ids, splits and flags read whole (8 GiB)
    attr_bytes: int = 1 << 16       # one root attribute's value (64 KiB)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ImportLimits":
        """Limits from ``key=value`` options (``core.options.parse_key_values``), the rest at their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown import limit {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        bad = [k for k, v in options.items() if type(v) is not int or v < 1]
        if bad:
            raise UsageError(f"import limit {', '.join(bad)}: a whole number >= 1 expected")
        return cls(**options)

    def check(self, path: Any, what: str, value: int, limit: str) -> None:
        """``ExternalFormatError`` naming the file, ``what`` and the limit when ``value`` exceeds limit ``limit``."""
        bound = getattr(self, limit)
        if value > bound:
            raise ExternalFormatError(f"{path}: {what} is {value}, over the import limit {limit}={bound}")


class ForeignAttributeWarning(UserWarning):
    """Root attributes of an imported HDF5 file that the store does not take (named, never copied)."""


def attr(f: Any, key: str, path: Any, limits: ImportLimits) -> Any:
    """The root attribute ``key``: one value, its size checked before it is read (a variable-length
    string, whose size HDF5 does not declare, is checked once read)."""
    aid = f.attrs.get_id(key)
    if aid.shape not in ((), (1,)):
        raise ExternalFormatError(f"{path}: root attribute {key!r} has shape {aid.shape}; one value expected")
    limits.check(path, f"the size of root attribute {key!r}", aid.dtype.itemsize, "attr_bytes")
    value = f.attrs[key]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        limits.check(path, f"the size of root attribute {key!r}", len(value.encode("utf-8")), "attr_bytes")
    return value


def json_attr(f: Any, key: str, path: Any, limits: ImportLimits) -> Any:
    value = attr(f, key, path, limits)
    if not isinstance(value, str):
        raise ExternalFormatError(f"{path}: root attribute {key!r} is not a JSON string")
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise ExternalFormatError(f"{path}: root attribute {key!r} is not JSON ({str(exc)[:80]})") from None


def fits(value: Any, kind: Any) -> bool:
    """Whether the JSON ``value`` has the type ``kind`` (as in ``STORE_ATTRS``)."""
    if kind is int:
        return type(value) is int and value >= 0
    if kind in (str, dict):
        return type(value) is kind
    if kind is None:
        return value is None
    if isinstance(kind, tuple):
        return any(fits(value, k) for k in kind)
    if isinstance(kind, list):
        return type(value) is list and all(fits(v, kind[0]) for v in value)
    return (type(value) is dict and value.keys() == kind.keys()
            and all(fits(value[k], t) for k, t in kind.items()))


def leave_out(path: Any, names: list[str]) -> None:
    """Say which root attributes the store does not take (names only: their values are never read)."""
    if names:
        shown = ", ".join(repr(n[:40]) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(f"{path}: root attributes not taken into the store: {shown}", ForeignAttributeWarning,
                      stacklevel=2)


def has(group: Any, name: str) -> bool:
    return group.get(name, getlink=True) is not None


def member(group: Any, name: str, path: Any, dataset: bool = True) -> Any:
    """``group[name]``, a dataset (or group) stored in this file: links to elsewhere, virtual datasets
    and datasets whose data lies in other files are refused, so an import reads nothing but the file."""
    import h5py

    where = f"{group.name.rstrip('/')}/{name}"
    node = group
    for part in name.split("/"):
        link = node.get(part, getlink=True)
        if link is None:
            raise ExternalFormatError(f"{path}: no {where}")
        if not isinstance(link, h5py.HardLink):
            raise ExternalFormatError(f"{path}: {where} is a {type(link).__name__}; only data stored in the "
                                      f"file itself is imported")
        node = node[part]
    if not isinstance(node, h5py.Dataset if dataset else h5py.Group):
        raise ExternalFormatError(f"{path}: {where} is not {'a dataset' if dataset else 'a group'}")
    if dataset and (node.is_virtual or node.external):
        raise ExternalFormatError(f"{path}: {where} keeps its data in other files; only data stored in the "
                                  f"file itself is imported")
    return node


def nbytes(shape: tuple, dtype: Any) -> int:
    return int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize


def chunked(ds: Any, path: Any, limits: ImportLimits) -> None:
    """A chunk is decompressed whole to read any of its rows: it must fit in memory."""
    if ds.chunks is not None:
        limits.check(path, f"one chunk of {ds.name} (bytes)", nbytes(ds.chunks, ds.dtype), "memory_bytes")


# ------------------------------------------------------------------------------- building out of sight
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in socket.gethostname())[:64] or "host"


def remove_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Delete what killed imports into ``dest`` left beside it (``<dest>.importing-<host>-<pid>-<hex>``
    of this machine whose process is gone); returns them."""
    dest = Path(dest)
    prefix = f"{dest.name}{IMPORTING}{_host()}-"
    gone = []
    if dest.parent.is_dir():
        for p in dest.parent.iterdir():
            pid = p.name[len(prefix):].split("-")[0] if p.name.startswith(prefix) else ""
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


@contextlib.contextmanager
def building(store_url: str | os.PathLike) -> Iterator[str]:
    """Where to build the new store ``store_url``. Local: a temporary directory beside it, renamed to it
    when the block ends and removed when the block raises, so that nothing is ever at ``store_url`` but
    a whole store; an existing ``store_url`` (other than an empty directory) is refused. Remote (no
    rename there): ``store_url`` itself, written in place."""
    dest = local_path(store_url)
    if dest is None:
        yield os.fspath(store_url)
        return
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise StoreError(f"{store_url}: already exists; import into a new store path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    tmp = dest.with_name(f"{dest.name}{IMPORTING}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield os.fspath(tmp)
        try:
            os.rename(tmp, dest)  # onto nothing or an empty directory; fails if a store appeared meanwhile
        except OSError as exc:
            raise StoreError(f"{store_url}: already exists (made while this import ran); the import is "
                             f"discarded") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
