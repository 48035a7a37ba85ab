"""A manifest's videos and captions in store row order (split, then id; a grown store's old rows first)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import StoreError, StoreMismatchError
from pipeline.decode import DecodeTask
from pipeline.store.cache import CacheStore
from pipeline.store.layout import row_digest

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class Rows:
    """Manifest content in store row order."""

    video_ids: list[str]
    video_splits: list[str]
    tasks: list[DecodeTask]
    caption_ids: list[str]
    caption_video: list[int]
    caption_splits: list[str]
    caption_texts: list[str]
    video_source: list[bytes] = field(default_factory=list)    # each row's manifest digest (row_digest)
    caption_source: list[bytes] = field(default_factory=list)


def _none_if_nan(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if x != x else x


def manifest_rows(manifest: Any, prior: tuple[Sequence[str], Sequence[str]] | None = None) -> Rows:
    """Videos sorted by (split, video_id); captions by (video row, caption_id). ``prior``: the
    (video ids, caption ids) of an existing store in its row order, which come first (in that order,
    those the manifest still lists), the manifest's other rows after them, sorted likewise: a grown
    manifest appends to a store."""
    v = manifest.videos
    ids = v.column("video_id").to_pylist()
    splits = v.column("split").to_pylist()
    starts = v.column("start").to_pylist()
    ends = v.column("end").to_pylist()
    old_v = {vid: r for r, vid in enumerate(prior[0])} if prior else {}
    order = sorted(range(len(ids)), key=lambda i: (0, old_v[ids[i]]) if ids[i] in old_v else
                   (1, SPLIT_ORDER.get(splits[i], 9), splits[i], ids[i]))
    vids = [ids[i] for i in order]
    row_of = {vid: r for r, vid in enumerate(vids)}
    tasks = [DecodeTask(ids[i], str(manifest.video_path(ids[i])), _none_if_nan(starts[i]),
                        _none_if_nan(ends[i])) for i in order]
    c = manifest.captions
    cids = c.column("caption_id").to_pylist()
    cvid = c.column("video_id").to_pylist()
    texts = c.column("text").to_pylist()
    csplit = c.column("split").to_pylist()
    old_c = {cid: r for r, cid in enumerate(prior[1])} if prior else {}
    corder = sorted(range(len(cids)), key=lambda i: (0, old_c[cids[i]], "") if cids[i] in old_c else
                    (1, row_of[cvid[i]], cids[i]))
    vsource = [row_digest(ids[i], splits[i], _none_if_nan(starts[i]), _none_if_nan(ends[i])) for i in order]
    csource = [row_digest(cids[i], cvid[i], csplit[i], texts[i]) for i in corder]
    return Rows(vids, [splits[i] for i in order], tasks, [cids[i] for i in corder],
                 [row_of[cvid[i]] for i in corder], [csplit[i] for i in corder],
                 [texts[i] for i in corder], vsource, csource)


def existing_rows(store_paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]] | None:
    """The row order of the existing stores (a grown store keeps its old rows first, so its order is
    not the sorted one), else ``None``; stores of different rows are refused (grow them one at a time)."""
    prior = None
    for path in store_paths:
        try:
            old = CacheStore.open(path)
        except StoreError:
            continue  # nothing there yet (or unreadable: open_or_create names it)
        rows = (old.video_ids, old.caption_ids)
        if prior is not None and rows != prior:
            raise StoreMismatchError(f"{path}: the stores hold other rows than {store_paths[0]}; extract or grow "
                                     f"them one at a time (one --encoder/--store per run)")
        prior = rows
    return prior
