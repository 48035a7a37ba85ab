"""Thumbnails: a few small JPEGs of each video's sampled frames, kept in the store, so that a report can
show the videos from a shared store without the raw files.

Extraction makes them from the frames it has decoded anyway (``thumbnails_of``: ``count`` of the
sampled frames, evenly spread over the valid ones, the longer side shrunk to ``max_side`` pixels, JPEG
re-encoded at a lower quality until it fits ``max_bytes``). A store made before thumbnails existed gets
them with ``pipeline.extraction.thumbnail_backfill.add_thumbnails`` (``python cli.py cache thumbnails``): it
decodes the store's videos again, sampling the same frames as the store records, but encodes nothing;
shard by shard, each written whole and marked done, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["THUMBNAIL_COUNT", "THUMBNAIL_SIDE", "THUMBNAIL_BYTES", "thumbnail_frames", "encode_jpeg",
           "thumbnails_of"]

THUMBNAIL_COUNT = 3      # JPEGs per video
THUMBNAIL_SIDE = 128     # longer side in pixels (never enlarged)
THUMBNAIL_BYTES = 16384  # the store's fixed width per JPEG; a 128 px frame takes a few KB
QUALITIES = (85, 70, 55, 40, 25)


def thumbnail_frames(mask: np.ndarray, count: int = THUMBNAIL_COUNT) -> np.ndarray:
    """Indices (into the sampled frames) of ``count`` valid frames spread evenly from first to last
    (fewer when fewer are valid)."""
    valid = np.flatnonzero(np.asarray(mask, dtype=bool))
    if not valid.size or count < 1:
        return np.zeros(0, dtype=np.int64)
    pick = np.unique(np.round(np.linspace(0, valid.size - 1, min(count, valid.size))).astype(np.int64))
    return valid[pick]


def encode_jpeg(frame: np.ndarray, max_side: int = THUMBNAIL_SIDE, max_bytes: int = THUMBNAIL_BYTES) -> bytes:
    """One RGB frame (H, W, 3) uint8 as a JPEG whose longer side is at most ``max_side`` and whose size is
    at most ``max_bytes`` (lower quality first, then a smaller image)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).convert("RGB")
    side = int(max_side)
    while True:
        small = img.copy()
        small.thumbnail((side, side), Image.BICUBIC)
        for q in QUALITIES:
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=q, optimize=True)
            if buf.tell() <= max_bytes:
                return buf.getvalue()
        if side <= 8:
            raise ValueError(f"a frame does not fit a {max_bytes}-byte JPEG even at 8 px")
        side //= 2


def thumbnails_of(frames: np.ndarray, mask: np.ndarray, count: int = THUMBNAIL_COUNT,
                  max_side: int = THUMBNAIL_SIDE, max_bytes: int = THUMBNAIL_BYTES) -> list[bytes]:
    """The JPEGs of one decoded video (``frames`` (T, H, W, 3), ``mask`` (T,) valid frames)."""
    return [encode_jpeg(frames[t], max_side, max_bytes) for t in thumbnail_frames(mask, count)]
