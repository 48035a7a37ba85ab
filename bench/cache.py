"""A ViT-B/32-shaped feature cache of random data, written as ``.npy`` memmaps (for benchmarks).

``write_cache`` writes the arrays a staged split holds chunk by chunk, so a cache larger than RAM
can be made (``write_store`` writes the same shapes as a real Zarr store, shard by shard through its
commit protocol, for the benchmarks that read a store in place), and returns it as a ``core.split.StagedSplit`` of memory maps, which the heads'
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


def write_store(path: Path, videos: int, frames: int, tokens: int, width: int, text_len: int, text_width: int,
                embed: int, shard_size: int = 64, seed: int = 0) -> Path:
    """A Zarr store (``pipeline.store.CacheStore``, uncompressed, every video in the train split, one
    caption per video) of random values with these shapes, written shard by shard; returns its path."""
    from pipeline.store import CacheStore, StoreLayout

    rng = np.random.default_rng(seed)
    layout = StoreLayout(dataset="bench", manifest_sha256="b" * 64, encoder=dict(IDENTITY), num_frames=frames,
                         num_tokens=tokens, token_dim=width, embed_dim=embed, text_dim=text_width,
                         max_text_tokens=text_len, shard_size=shard_size, text_shard_size=1024)
    ids = [f"v{i:07d}" for i in range(videos)]
    store = CacheStore.create(path, layout, ids, ["train"] * videos, [f"c{i:07d}" for i in range(videos)],
                              list(range(videos)), ["train"] * videos)
    for i in range(store.num_shards):
        lo, hi = store.shard_range(i)
        n = hi - lo
        store.write_shard(i, status=np.ones(n, np.int8), error=[""] * n,
                          tokens=rng.standard_normal((n, frames, tokens, width), dtype=np.float32).astype(np.float16),
                          frame_emb=rng.standard_normal((n, frames, embed), dtype=np.float32),
                          frame_mask=np.ones((n, frames), bool),
                          frame_index=np.tile(np.arange(frames, dtype=np.int32), (n, 1)),
                          frame_time=np.tile(np.arange(frames, dtype=np.float32), (n, 1)))
    for j in range(store.num_text_shards):
        lo, hi = store.text_shard_range(j)
        n = hi - lo
        store.write_text_shard(j, tokens=rng.standard_normal((n, text_len, text_width), dtype=np.float32
                                                              ).astype(np.float16),
                               mask=np.ones((n, text_len), bool),
                               emb=rng.standard_normal((n, embed), dtype=np.float32))
    store.consolidate()
    return Path(path)
