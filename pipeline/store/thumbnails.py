"""The thumbnails a store keeps per video: adding their arrays, committing them per shard, reading them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.store import backend, commit
from pipeline.store.layout import THUMBNAIL_ARRAYS, THUMBNAILS_DONE, thumbnail_info


class ThumbnailMixin:
    """``CacheStore``'s thumbnails: ``videos/thumbnails`` (JPEG bytes), ``videos/thumbnail_bytes`` and the
    per-shard flag ``shards/thumbnails_done``, committed like any shard (``pipeline.store.commit``)."""

    @property
    def has_thumbnails(self) -> bool:
        """Whether the store has the thumbnail arrays (filled or not: see ``thumbnail_shards``)."""
        return all(self.has_array(n) for n in (*THUMBNAIL_ARRAYS, THUMBNAILS_DONE))

    def add_thumbnail_arrays(self, count: int, max_side: int, max_bytes: int) -> None:
        """Create the (empty) thumbnail arrays when the store lacks them, ``count`` JPEGs of at most
        ``max_bytes`` bytes per video; a store that has them keeps its own sizes. The attributes are
        written last (a store whose arrays exist without them gets them from the next call)."""
        from zarr.codecs import ZstdCodec
        from zarr.errors import ContainsArrayError

        self._check_writable()
        if self.has_thumbnails and self.attrs.get("thumbnails"):
            return
        if count < 1 or max_bytes < 1:
            raise ValueError("thumbnail count and bytes must be >= 1")
        with backend.store_lock(self.url):
            self._reload_group()  # another writer may have added them since this store was opened
            if not self.attrs.get("thumbnails"):
                V, S = self.num_videos, max(1, self.shard_size)
                shapes = {"videos/thumbnails": ((V, count, max_bytes), (S, count, max_bytes), "uint8", 0,
                                                (ZstdCodec(level=3),)),
                          "videos/thumbnail_bytes": ((V, count), (S, count), "int32", 0, None),
                          THUMBNAILS_DONE: ((self.num_shards,), (1,), "bool", False, None)}
                for name, (shape, chunks, dtype, fill, comp) in shapes.items():
                    if self.has_array(name):
                        continue
                    try:
                        # kept in the cache: this open group reads its children from the consolidated metadata
                        # it was opened with, which the consolidation below updates only for later readers
                        self._cache[name] = self._g.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                                                 fill_value=fill, compressors=comp)
                    except ContainsArrayError:  # another writer made it at the same moment: use theirs
                        self._cache.pop(name, None)
                arrays = self.array("videos/thumbnails").shape
                info = thumbnail_info(arrays[1], max_side, arrays[2])
                backend.set_attrs(self._g, {"thumbnails": info})
                self.attrs["thumbnails"] = info
                self.consolidate()

    def thumbnail_shards(self) -> set[int]:
        """Video shards whose thumbnails are committed (none for a store without thumbnail arrays)."""
        if not self.has_thumbnails or not self.num_shards:
            return set()
        return set(np.flatnonzero(commit.done_flags(self, "thumbnails")).tolist())

    def reset_thumbnail_shards(self, shards: Sequence[int]) -> None:
        """Mark shards' thumbnails not done (``cache thumbnails`` or extraction writes them again)."""
        commit.reset(self, "thumbnails", shards)

    def write_thumbnails(self, i: int, thumbnails: Sequence[Sequence[bytes]]) -> None:
        """Commit the JPEGs of every video of shard ``i`` (``thumbnails[row]``: that video's, at most
        ``count``; empty for a failed video)."""
        self._check_writable()
        lo, hi = self.shard_range(i)
        if len(thumbnails) != hi - lo:
            raise ValueError(f"shard {i}: {len(thumbnails)} thumbnail lists for {hi - lo} videos")
        _, count, width = self.array("videos/thumbnails").shape
        data = np.zeros((hi - lo, count, width), dtype=np.uint8)
        sizes = np.zeros((hi - lo, count), dtype=np.int32)
        for r, jpegs in enumerate(thumbnails):
            if len(jpegs) > count:
                raise ValueError(f"video row {lo + r}: {len(jpegs)} thumbnails, the store holds {count}")
            for k, b in enumerate(jpegs):
                if len(b) > width:
                    raise ValueError(f"video row {lo + r}: thumbnail of {len(b)} bytes, the store holds {width}")
                data[r, k, :len(b)] = np.frombuffer(b, dtype=np.uint8)
                sizes[r, k] = len(b)
        merged = {"videos/thumbnails": data, "videos/thumbnail_bytes": sizes}
        kept = self._merge_kept("videos", i, merged)
        commit.commit_shard(self, "thumbnails", i, (lo, hi), merged)
        if kept and i in self.done_shards():
            self._drop_kept("videos", i)

    def thumbnails(self, rows: Sequence[int]) -> list[list[bytes]]:
        """The JPEGs of the video ``rows`` (an empty list for a video without any, or whose shard or its
        thumbnails are not committed)."""
        rows = [int(r) for r in rows]
        if not self.has_thumbnails or not rows:
            return [[] for _ in rows]
        order = np.unique(rows)

        def read() -> tuple[np.ndarray, np.ndarray]:
            sizes = np.asarray(self.array("videos/thumbnail_bytes").get_orthogonal_selection((order, slice(None))))
            data = np.asarray(self.array("videos/thumbnails").get_orthogonal_selection(
                (order, slice(None), slice(None))))
            return sizes, data

        (sizes, data), done = commit.committed(self, "thumbnails", read)
        done &= commit.done_flags(self, "videos")  # and the video shard itself committed
        ok = commit.rows_mask(done, self.shard_size, self.num_videos)
        at = {r: j for j, r in enumerate(order.tolist())}
        return [[data[at[r], k, :n].tobytes() for k, n in enumerate(sizes[at[r]]) if n > 0] if ok[r] else []
                for r in rows]
