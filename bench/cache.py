"""A ViT-B/32-shaped feature cache of random data, written as ``.npy`` memmaps (for benchmarks).

``write_cache`` writes the arrays a staged split holds chunk by chunk, so a cache larger than RAM
can be made, and returns it as a ``core.split.StagedSplit`` of memory maps, which the heads'
trainers and re-ranker accept. ``in_ram`` copies it into memory; ``evict`` asks the kernel to drop
its files from the page cache (``posix_fadvise(DONTNEED)``, no privileges needed), so the next
read comes from disk.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from core.split import StagedSplit

ARRAYS = ("frame_emb", "frame_mask", "text_emb", "tokens", "text_tokens", "text_mask")


IDENTITY = {"name": "bench-vit-b32-shaped"}


def write_cache(root: Path, videos: int, queries: int, frames: int, tokens: int, width: int, text_len: int,
                text_width: int, embed: int, seed: int = 0) -> StagedSplit:
    """Random ViT-B/32-shaped arrays written chunk by chunk as ``.npy`` files under ``root``; returns
    ``open_cache(root)``. Caption ``i`` belongs to video ``i mod videos``."""
    rng = np.random.default_rng(seed)
    root = Path(root)

    def write(name: str, shape: tuple, dtype, fill) -> None:
        mm = np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        for start in range(0, shape[0], 64):
            stop = min(shape[0], start + 64)
            mm[start:stop] = fill((stop - start,) + shape[1:])
        mm.flush()
        del mm

    normal = lambda shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    write("tokens", (videos, frames, tokens, width), np.float16, normal)
    write("frame_emb", (videos, frames, embed), np.float32, normal)
    write("frame_mask", (videos, frames), np.bool_, lambda s: np.ones(s, bool))
    lengths = rng.integers(8, text_len + 1, size=queries)
    write("text_tokens", (queries, text_len, text_width), np.float16, normal)
    np.save(root / "text_mask.npy", np.arange(text_len)[None, :] < lengths[:, None])
    write("text_emb", (queries, embed), np.float32, normal)
    np.save(root / "caption_video.npy", np.arange(queries) % videos)
    return open_cache(root)


def open_cache(root: Path, split: str = "test") -> StagedSplit:
    """The cache written by ``write_cache`` under ``root`` as split ``split``, every array a read-only memmap."""
    root = Path(root)
    arrays = {name: np.load(root / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    cv = np.load(root / "caption_video.npy")
    return StagedSplit(split=split, video_ids=[f"v{i}" for i in range(arrays["tokens"].shape[0])],
                       caption_ids=[f"c{i}" for i in range(cv.size)], caption_video=cv, **arrays,
                       store_fingerprint="bench", encoder_identity=dict(IDENTITY))


def first_queries(split: StagedSplit, n: int) -> StagedSplit:
    """The same split restricted to its first ``n`` captions (memmap views, nothing copied)."""
    return replace(split, caption_ids=split.caption_ids[:n], caption_video=split.caption_video[:n],
                   text_emb=split.text_emb[:n], text_tokens=split.text_tokens[:n], text_mask=split.text_mask[:n])




def in_ram(split: StagedSplit) -> StagedSplit:
    """The same split with every array read into memory."""
    return replace(split, **{name: np.array(getattr(split, name)) for name in ARRAYS})


def evict(split: StagedSplit) -> None:
    """Drop the split's memmapped files from the page cache (best effort; Linux)."""
    for f in fields(split):
        arr = getattr(split, f.name)
        path = getattr(arr, "filename", None)
        if path is None or not hasattr(os, "posix_fadvise"):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
