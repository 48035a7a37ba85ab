"""Whole video shards committed to every store that lacks them (``pipeline.store.commit``), by a writer thread."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from core.errors import StoreError
from pipeline.extraction.encode import EncodedShard
from pipeline.store import CacheStore


def write_to_stores(stores: Sequence[CacheStore], shard: EncodedShard) -> None:
    """Write ``shard`` whole into each store that lacks it (``CacheStore.write_shard``: the commit protocol,
    marked done last); an append's kept rows are taken from the store."""
    for k in shard.task.need:
        stores[k].write_shard(shard.task.index, status=shard.status, error=shard.error, tokens=shard.buffers[k].tokens,
                              frame_emb=shard.buffers[k].emb, frame_mask=shard.mask, frame_index=shard.index,
                              frame_time=shard.times, error_detail=shard.detail, decoder=shard.decoder,
                              thumbnails=shard.thumbnails)


class ShardWriter:
    """Writes whole shards in a background thread, so store writes overlap decoding and encoding.

    ``submit(i, write)`` queues ``write()`` (which writes shard ``i`` into every store and marks it
    done); at most ``depth`` shards wait (the caller blocks for a slot: memory stays bounded).
    ``depth`` 0 writes in the caller. An error in the writer is raised in the caller by the next
    ``submit`` or by ``close``, naming the shard; shards already queued are still written (each is
    independent), and a shard whose write failed is not marked done, so a re-run writes it again.
    ``close`` waits until every queued shard is written."""

    def __init__(self, depth: int = 2) -> None:
        import queue
        import threading

        self.depth = int(depth)
        if self.depth < 0:
            raise ValueError(f"write_queue must be >= 0, got {depth}")
        self.errors: list[tuple[int, BaseException]] = []
        self.seconds = 0.0       # spent writing
        self.wait_seconds = 0.0  # the caller waited for a free slot
        self.written = 0
        self._queue: Any = queue.Queue(maxsize=max(1, self.depth))
        self._thread = None
        if self.depth:
            self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
            self._thread.start()

    def _write(self, i: int, write: Any) -> None:
        t0 = time.perf_counter()
        try:
            write()
            self.written += 1
        except Exception as exc:  # surfaced in the caller
            self.errors.append((i, exc))
        finally:
            self.seconds += time.perf_counter() - t0

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._write(*job)

    def check(self) -> None:
        """Raise the first error of the writer (a ``StoreError`` naming the shard and the cause)."""
        if self.errors:
            i, exc = self.errors[0]
            more = f" (and {len(self.errors) - 1} more shards)" if len(self.errors) > 1 else ""
            raise StoreError(f"writing video shard {i} failed{more}: {type(exc).__name__}: {exc}; it is not marked "
                             f"done, so running the extraction again writes it") from exc

    def submit(self, i: int, write: Any) -> None:
        """Write shard ``i`` (``write()``) in the writer thread, or here when ``depth`` is 0."""
        import queue

        self.check()
        if self._thread is None:
            self._write(i, write)
            self.check()
            return
        t0 = time.perf_counter()
        while True:
            try:
                self._queue.put((i, write), timeout=0.5)
                break
            except queue.Full:
                self.check()
                if not self._thread.is_alive():
                    raise StoreError("the store writer thread stopped") from None
        self.wait_seconds += time.perf_counter() - t0

    def close(self, check: bool = True) -> None:
        """Write what is queued, stop the thread; ``check``: raise the writer's first error."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if check:
            self.check()
