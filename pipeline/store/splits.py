"""One split of a store as readers take it: its committed rows, its coverage, the digests staging is keyed by."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.errors import StoreError
from core.split import StagedSplit
from pipeline import integrity
from pipeline.staging import IN_PLACE_ARRAYS, STAGE_ARRAYS, stage_split
from pipeline.store.layout import STATUS_FAILED, STATUS_OK


class SplitMixin:
    """``CacheStore``'s reads of one split (only committed rows, ``CacheStore.status``)."""

    def split_rows(self, split: str, status: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of ``split`` as a staged split holds them: ``(video rows, caption rows, caption_video)``.

        Video rows: the split's committed videos whose extraction succeeded, in store order; caption rows:
        their captions in store order; ``caption_video``: each caption's index into the video rows.
        Raises ``StoreError`` when the store has no video of ``split``. ``status``: a committed status
        (``CacheStore.status``) already read.
        """
        splits = np.array(self.strings("videos/split"), dtype=object)
        in_split = splits == split
        if not in_split.any():
            raise StoreError(f"{self.url}: no videos of split {split!r} (splits: {self.splits()})")
        rows = np.flatnonzero(in_split & ((self.status() if status is None else status) == STATUS_OK))
        vidx = self.caption_video()
        crows = np.flatnonzero(np.isin(vidx, rows)) if rows.size else np.zeros(0, np.int64)
        return rows, crows, np.searchsorted(rows, vidx[crows]).astype(np.int64)

    def split_coverage(self, split: str) -> dict[str, Any]:
        """How much of ``split`` a staged copy holds: videos and captions of the split in the store
        (all of the manifest's) and those usable (videos extracted ok, their captions), and every
        missing video with why (its failure reason, or ``pending`` when not committed yet)."""
        status = self.status()  # one committed view for the rows and the reasons
        rows, crows, _ = self.split_rows(split, status)
        in_split = np.flatnonzero(np.array(self.strings("videos/split"), dtype=object) == split)
        vidx = self.caption_video()
        ids = self.video_ids
        reasons = self.strings("videos/error")
        missing = {ids[r]: (reasons[r] or "failed") if status[r] == STATUS_FAILED else "pending"
                   for r in np.setdiff1d(in_split, rows)}
        return {"split": split, "videos_total": int(in_split.size), "videos_scored": int(rows.size),
                "captions_total": int(np.isin(vidx, in_split).sum()), "captions_scored": int(crows.size),
                "complete": not missing, "missing_videos": missing}

    def split_status(self, split: str) -> np.ndarray:
        """Committed status (pending / ok / failed) of every video of ``split``, in store order."""
        return self.status()[np.array(self.strings("videos/split"), dtype=object) == split]

    def shard_digests(self, kind: str, shards: Sequence[int]) -> str:
        """sha256 over the checksum records of ``shards`` of ``kind`` (what staging is keyed by: any
        rewrite of one of them changes it); a shard without a record contributes its committed status."""
        import hashlib

        h = hashlib.sha256()
        for i in sorted({int(s) for s in shards}):
            h.update(f"{kind}/{i}:".encode())
            h.update(self.read_object(integrity.record_key(kind, i)) or b"-")
        return h.hexdigest()

    def stage(self, split: str, stage_dir: str | os.PathLike,
              arrays: Sequence[str] = STAGE_ARRAYS, copy: bool = False) -> StagedSplit:
        """One split as local memory maps (``pipeline.staging.stage_split``): the token arrays of a local
        store whose arrays are uncompressed read in place (``pipeline.store.inplace``), everything else
        (and with ``copy`` everything) copied into ``.npy`` files under ``stage_dir``."""
        return stage_split(self, split, stage_dir, arrays, () if copy else self.in_place_arrays())

    def in_place_arrays(self) -> list[str]:
        """The split arrays (``tokens``, ``text_tokens``) this store lets a reader map where they lie: all
        of a local store's uncompressed ones (``pipeline.store.inplace.in_place_reason``); none of a
        remote store's."""
        from pipeline.store.backend import local_path
        from pipeline.store.inplace import in_place_reason

        root = local_path(self.url)
        if root is None:
            return []
        return [name for name, array in IN_PLACE_ARRAYS.items() if in_place_reason(root, array) is None]


