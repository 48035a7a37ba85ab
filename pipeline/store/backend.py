"""Where a store's objects are read and written: every write passes the crash gate; opening, locking, attributes."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core import faults
from core.errors import StoreError
from pipeline.remote import is_read_only, storage_options as storage_options_for
from pipeline.store.layout import LOCK_FILE


def _is_url(s: str) -> bool:
    return "://" in s


def local_path(url_or_path: str | os.PathLike) -> Path | None:
    """The local directory of a store given as a path or ``file://`` URL; ``None`` for a remote URL."""
    s = os.fspath(url_or_path)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return None if _is_url(s) else Path(s)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _gated_local_store_class() -> type:
    from zarr.storage import LocalStore

    class GatedLocalStore(LocalStore):
        """A local zarr store whose every object write passes ``core.faults.gate`` and is durable:
        written to a unique temporary name, fsynced, renamed over the key, the directory fsynced (a reader
        or a crash sees the old object or the new one, never part of one)."""

        def _put_durable(self, key: str, data: bytes, exclusive: bool = False) -> None:
            import uuid

            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")

            def torn() -> None:
                tmp.write_bytes(data[:len(data) // 2])

            faults.gate(key, torn)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if exclusive:
                    os.link(tmp, path)
                    os.unlink(tmp)
                else:
                    os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)

        async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
            import asyncio

            if not self._is_open:
                await self._open()
            self._check_writable()
            await asyncio.to_thread(self._put_durable, key, bytes(value.as_buffer_like()), exclusive)

        def set_sync(self, key: str, value: Any) -> None:
            self._ensure_open_sync()
            self._check_writable()
            self._put_durable(key, bytes(value.as_buffer_like()))

        async def delete(self, key: str) -> None:
            faults.gate(f"delete {key}")
            await super().delete(key)

        def delete_sync(self, key: str) -> None:
            faults.gate(f"delete {key}")
            super().delete_sync(key)

        async def delete_dir(self, prefix: str) -> None:
            faults.gate(f"delete {prefix}/")
            await super().delete_dir(prefix)

    return GatedLocalStore


def _gated_wrapper_class() -> type:
    from zarr.storage import WrapperStore

    class GatedStore(WrapperStore):
        """A remote zarr store (s3://) whose every object write passes ``core.faults.gate`` (an object PUT is
        atomic there: a reader sees the old object or the new one)."""

        async def set(self, key: str, value: Any) -> None:
            faults.gate(key)
            await self._store.set(key, value)

        async def set_if_not_exists(self, key: str, value: Any) -> None:
            faults.gate(key)
            await self._store.set_if_not_exists(key, value)

        async def _set_many(self, values: Any) -> None:
            for key, value in values:
                await self.set(key, value)

        async def delete(self, key: str) -> None:
            faults.gate(f"delete {key}")
            await self._store.delete(key)

        async def delete_dir(self, prefix: str) -> None:
            faults.gate(f"delete {prefix}/")
            await self._store.delete_dir(prefix)

    return GatedStore


def zarr_store(url_or_path: str | os.PathLike, writable: bool, storage_options: dict | None = None) -> Any:
    """The zarr store object of ``url_or_path``, writes gated (``core.faults.gate``)."""
    local = local_path(url_or_path)
    if local is not None:
        return _gated_local_store_class()(local, read_only=not writable)
    from zarr.storage import FsspecStore

    s = os.fspath(url_or_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inner = FsspecStore.from_url(s, storage_options=storage_options_for(s, storage_options),
                                         read_only=not writable)
    except ImportError as exc:
        raise StoreError(f"{s}: {exc} (pip install -r requirements.txt)") from exc
    return _gated_wrapper_class()(inner) if writable else inner


def open_group(url_or_path: str | os.PathLike, mode: str, storage_options: dict | None = None,
               use_consolidated: bool | None = None) -> Any:
    """The zarr group of an existing store (``mode`` ``r`` or ``r+``)."""
    import zarr

    local = local_path(url_or_path)
    if local is not None and not (local / "zarr.json").is_file():
        raise StoreError(f"{url_or_path}: not a feature cache store (no zarr.json)")
    if mode != "r" and is_read_only(url_or_path):
        raise StoreError(f"{url_or_path}: http(s) stores are read-only; write to a path, file:// or s3://")
    try:
        store = zarr_store(url_or_path, writable=mode != "r", storage_options=storage_options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata is not in the v3 spec yet
            return zarr.open_group(store=store, mode=mode, zarr_format=3, use_consolidated=use_consolidated)
    except StoreError:
        raise
    except (FileNotFoundError, KeyError) as exc:
        raise StoreError(f"{url_or_path}: not a feature cache store ({exc})") from exc
    except ImportError as exc:
        raise StoreError(f"{url_or_path}: {exc} (pip install -r requirements.txt)") from exc
    except OSError as exc:
        raise StoreError(f"{url_or_path}: cannot open ({type(exc).__name__}: {exc})") from exc


def new_group(url_or_path: str | os.PathLike, storage_options: dict | None = None) -> Any:
    """The zarr group of a store being created (a remote one must not exist yet)."""
    import zarr

    store = zarr_store(url_or_path, writable=True, storage_options=storage_options)
    mode = "a" if local_path(url_or_path) is not None else "w-"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zarr.open_group(store=store, mode=mode, zarr_format=3)


CREATION_ENTRIES = ("zarr.json", "videos", "texts", "shards", LOCK_FILE)  # what a store's creation writes first


def clear_interrupted_creation(url_or_path: str | os.PathLike) -> None:
    """Under the store's lock: remove what a killed creation left at a local path (no root attributes
    yet; only the entries a creation writes, and temporary files), so that the store can be created again.
    A directory holding anything else is left alone (``create`` then refuses it)."""
    import json
    import shutil

    local = local_path(url_or_path)
    if local is None or not local.is_dir():
        return
    root = local / "zarr.json"
    if root.is_file():
        try:
            if json.loads(root.read_text()).get("attributes", {}).get("format"):
                return  # a finished store
        except (OSError, ValueError):
            pass
    entries = [p for p in local.iterdir() if p.name != LOCK_FILE]
    if not entries or any(p.name not in CREATION_ENTRIES and not p.name.endswith(".partial") for p in entries):
        return
    for p in entries:
        faults.gate(f"delete {p.name}")
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def set_attrs(group: Any, values: dict) -> None:
    """Add ``values`` to a group's root attributes in one write of its metadata. (``attrs.update``
    writes once per key, so another process could read a half-written set: ``format`` without
    ``schema_version`` while a store is being created, a new manifest hash with the old sizes while
    it grows.)"""
    group.update_attributes(dict(values))


def read_object(group: Any, key: str) -> bytes | None:
    """The stored bytes of ``key`` (``None``: no such object)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(group.store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def write_object(group: Any, key: str, data: bytes) -> None:
    """Store ``data`` at ``key`` whole (through the gate: a reader sees the old object or the new one)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    sync(group.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete_object(group: Any, key: str) -> None:
    """Remove the object ``key`` (nothing when there is none)."""
    from zarr.core.sync import sync

    sync(group.store.delete(key))


_held: dict[str, list] = {}  # store directory -> [its thread lock, depth held by this process]


@contextlib.contextmanager
def store_lock(url_or_path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock of a local store (``<store>/.lock``, ``fcntl.flock``) around the steps several
    writers of one store must not interleave (creating it, growing it, adding arrays); re-entrant within
    a thread (growing finishes an unfinished append under the same lock). Remote stores have no lock:
    there one writer grows a store (``--part 0/N`` or an unpartitioned run) and the others wait for it
    (docs/STORE.md, "Several writers")."""
    import threading

    local = local_path(url_or_path)
    if local is None:
        yield
        return
    import fcntl

    local.mkdir(parents=True, exist_ok=True)
    key = str(local.resolve())
    entry = _held.setdefault(key, [threading.RLock(), 0])
    with entry[0]:
        if entry[1]:  # this thread holds it already
            entry[1] += 1
            try:
                yield
            finally:
                entry[1] -= 1
            return
        with open(local / LOCK_FILE, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            entry[1] = 1
            try:
                yield
            finally:
                entry[1] = 0
                fcntl.flock(f, fcntl.LOCK_UN)
