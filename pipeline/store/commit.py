"""The store's one commit protocol: a shard's rows become visible whole, after everything they need is stored.

A shard (video shard ``i``, text shard ``j``, or the thumbnails of video shard ``i``) is written by
:func:`commit_shard` and by nothing else, in this order (docs/STORE.md, "The commit protocol"):

1. its done flag is cleared when set (a rewrite: ``--repair``, ``--retry-failed``);
2. its old objects are deleted (a torn earlier write may have left any of them);
3. its data arrays are written (every array but ``videos/status``);
4. ``videos/status`` (video shards);
5. its checksum record (``pipeline.integrity``), read back from what is stored;
6. its done flag: the commit point. One object per shard, written whole.

Readers (:func:`committed`) treat a shard's rows as pending unless its done flag is set, whatever its
status array says, and read the flags before and after the rows they return (a shard whose flag went
down meanwhile is pending too). A kill anywhere before step 6 leaves the shard pending with its old
rows invisible; a re-run writes it again from step 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline import integrity
from pipeline.store.layout import DONE_ARRAYS

STATUS_ARRAY = "videos/status"


def done_flags(store: Any, kind: str) -> np.ndarray:
    """(num shards of ``kind``,) bool: which shards are committed (the attributes' count, not the array's:
    an unfinished append may have grown the array)."""
    n = store.num_shards if kind != "texts" else store.num_text_shards
    name = DONE_ARRAYS[kind]
    if not n or not store.has_array(name):
        return np.zeros(n, dtype=bool)
    flags = np.asarray(store.array(name)[:n], dtype=bool)
    return np.pad(flags, (0, n - flags.size)) if flags.size < n else flags


def forget(store: Any, names: Any, index: int) -> None:
    """Delete the stored objects of row block ``index`` of every array in ``names`` (step 2)."""
    for name in names:
        for key in store.chunk_keys(name, index):
            store.delete_object(key)


def commit_shard(store: Any, kind: str, index: int, rows: tuple[int, int], data: Mapping[str, np.ndarray]) -> dict:
    """Write shard ``index`` of ``kind`` (rows ``[lo, hi)`` of every array in ``data``) by the protocol
    above; returns its checksum record."""
    store._check_writable()
    lo, hi = rows
    flag = store.array(DONE_ARRAYS[kind])
    if bool(np.asarray(flag[index])):
        flag[index] = False  # 1
    forget(store, data, index)  # 2
    for name, value in data.items():  # 3
        if name != STATUS_ARRAY:
            store.array(name)[lo:hi] = value
    if STATUS_ARRAY in data:  # 4
        store.array(STATUS_ARRAY)[lo:hi] = data[STATUS_ARRAY]
    record = integrity.make_record(kind, index, rows, store.shard_objects(kind, index), store.read_object)  # 5
    store.write_object(integrity.record_key(kind, index), integrity.encode_record(record))
    flag[index] = True  # 6
    return record


def reset(store: Any, kind: str, shards: Any) -> None:
    """Mark shards of ``kind`` not done: their rows are pending until they are committed again."""
    store._check_writable()
    flag = store.array(DONE_ARRAYS[kind])
    for i in shards:
        flag[int(i)] = False


def committed(store: Any, kind: str, read: Any) -> tuple[Any, np.ndarray]:
    """``(read(), done)`` where ``done`` holds only the shards committed both before and after ``read()``
    ran (a writer that took a shard back meanwhile leaves it pending)."""
    before = done_flags(store, kind)
    value = read()
    after = done_flags(store, kind)
    return value, before & after


def rows_mask(done: np.ndarray, shard_size: int, n: int) -> np.ndarray:
    """(n,) bool: the rows of the committed shards ``done``."""
    return np.repeat(done, shard_size)[:n] if n else np.zeros(0, dtype=bool)
