"""The split: what every consumer of a cache store reads (trainers, evaluation, re-ranking, bench).

:class:`Split` is the protocol heads are written against; :class:`StagedSplit` is its one concrete
form. ``pipeline.store.CacheStore.stage`` returns a ``StagedSplit`` whose arrays are read-only
``np.memmap`` files; tests and benchmarks build one from plain arrays. Rows: videos in store order
(only videos whose extraction succeeded), captions of those videos in store order;
``caption_video[c]`` is the row of caption ``c``'s video in this split.

Shapes (``V`` videos, ``T`` frames, ``N`` visual tokens of width ``D``, ``E`` embedding width,
``C`` captions, ``L`` text tokens of width ``Dt``): ``frame_emb`` (V, T, E) float32,
``frame_mask`` (V, T) bool, ``text_emb`` (C, E) float32, and, when staged, ``tokens``
(V, T, N, D) float16, ``text_tokens`` (C, L, Dt) float16, ``text_mask`` (C, L) bool,
``frame_time`` (V, T) float32 seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from core.errors import IncompleteSplitError, StoreMismatchError

TOKEN_ARRAYS = ("tokens", "frame_mask", "text_tokens", "text_mask")


@runtime_checkable
class Split(Protocol):
    """The attributes of a staged split that heads, evaluation and re-ranking read."""

    split: str
    store_fingerprint: str
    encoder_identity: dict
    video_ids: Sequence[str]
    caption_ids: Sequence[str]
    caption_video: np.ndarray
    frame_emb: np.ndarray
    frame_mask: np.ndarray
    text_emb: np.ndarray
    tokens: np.ndarray | None
    text_tokens: np.ndarray | None
    text_mask: np.ndarray | None


@dataclass(kw_only=True)
class StagedSplit:
    """One split of a store as arrays (``np.memmap`` when staged from a store; see module docstring)."""

    split: str
    video_ids: list[str]
    caption_ids: list[str]
    caption_video: np.ndarray
    frame_emb: np.ndarray
    frame_mask: np.ndarray
    text_emb: np.ndarray
    tokens: np.ndarray | None = None
    text_tokens: np.ndarray | None = None
    text_mask: np.ndarray | None = None
    frame_time: np.ndarray | None = None
    store_fingerprint: str = ""
    encoder_identity: dict = field(default_factory=dict)
    store_attrs: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # pipeline.store.CacheStore.split_coverage; {} = complete
    # captions as token ids of a head's own tokenizer (heads.stage_two.tokenizer.with_caption_ids)
    text_ids: np.ndarray | None = None
    text_ids_mask: np.ndarray | None = None
    # how each large array is read: "in place" (memory maps of the store's own files) or "staged" (a copy)
    access: dict = field(default_factory=dict)


def require_arrays(split: Split, names: Sequence[str], purpose: str) -> None:
    """Refuse a split lacking any of the staged arrays ``names`` with one line saying how to stage them."""
    missing = [n for n in names if getattr(split, n, None) is None]
    if missing:
        raise ValueError(
            f"split {getattr(split, 'split', '?')!r} has no {', '.join(missing)} staged, which {purpose} "
            f"needs: stage it with CacheStore.stage(..., arrays=('frame_emb', 'tokens', 'text'))")


def check_same_store(a: Split, b: Split) -> None:
    """Refuse two splits of different stores (``StoreMismatchError``)."""
    if a.store_fingerprint != b.store_fingerprint:
        raise StoreMismatchError(
            f"splits {a.split!r} and {b.split!r} come from different stores "
            f"({a.store_fingerprint[:12]} vs {b.store_fingerprint[:12]})")


def coverage_line(split: Split) -> str:
    """"test: 5 of 6 videos and 10 of 12 captions scored (1 video missing)" for a split staged from
    a store; a split without a coverage record (built from arrays) counts as whole."""
    cov = getattr(split, "coverage", None) or {}
    v, c = len(split.video_ids), len(split.caption_ids)
    vt, ct = cov.get("videos_total", v), cov.get("captions_total", c)
    missing = len(cov.get("missing_videos", {}))
    tail = f" ({missing} video{'s' if missing != 1 else ''} missing from the store)" if missing else ""
    return f"{split.split}: {v} of {vt} videos and {c} of {ct} captions scored{tail}"


def check_complete(split: Split, allow_incomplete: bool = False) -> dict:
    """The split's coverage as a report entry (``{"complete": ..., "videos": "5/6", ...,
    "missing_video_ids": {id: why}}``); ``IncompleteSplitError`` when videos of the split are missing
    from the store (failed or not extracted) unless ``allow_incomplete``: metrics on part of a
    benchmark split are not comparable with published ones."""
    cov = getattr(split, "coverage", None) or {}
    missing = dict(cov.get("missing_videos", {}))
    entry = {"split": split.split, "complete": not missing,
             "videos": f"{len(split.video_ids)}/{cov.get('videos_total', len(split.video_ids))}",
             "captions": f"{len(split.caption_ids)}/{cov.get('captions_total', len(split.caption_ids))}",
             "missing_video_ids": missing}
    if missing and not allow_incomplete:
        shown = ", ".join(f"{k} ({v})" for k, v in list(missing.items())[:3])
        raise IncompleteSplitError(
            f"{coverage_line(split)}: {shown}{', ...' if len(missing) > 3 else ''}. Metrics on an incomplete "
            f"split are not comparable with published ones; extract the missing videos (--retry-failed) or "
            f"pass --allow-incomplete to report them labelled incomplete")
    return entry
