"""Batches from a split (``core.split.Split``) without loading whole arrays into memory.

A split's arrays are usually ``np.memmap``. Only the rows of one batch are read, with sorted fancy
indexing (sequential reads), and a background thread prepares the next batches (``prefetched``,
the one prefetcher of both trainers and of pair scoring). A batch bound for a CUDA device (``device=``)
is read straight into page-locked memory, so that its ``to(device)`` copies run without blocking.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from core.split import Split, require_arrays
from heads.registry import supports


def gather_rows(array: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``array[index]`` as an in-memory copy, reading the distinct rows in ascending order; into
    ``out`` (cast to its dtype) when given."""
    index = np.asarray(index, dtype=np.int64)
    uniq, inverse = np.unique(index, return_inverse=True)
    rows = np.asarray(array[uniq])
    if out is None:
        return rows[inverse.reshape(-1)]
    if rows.dtype == out.dtype:
        np.take(rows, inverse.reshape(-1), axis=0, out=out)
    else:
        out[...] = rows[inverse.reshape(-1)]
    return out


def pins(device: str | torch.device | None) -> bool:
    """Whether a batch bound for ``device`` is built in page-locked (pinned) memory: for CUDA, where a
    CUDA runtime is there to pin it."""
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def host_buffer(shape: tuple[int, ...], dtype: Any, pin: bool) -> torch.Tensor:
    """An uninitialised CPU tensor of numpy ``dtype``; with ``pin`` page-locked, so that a CUDA copy
    from it runs without blocking."""
    torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return torch.empty(tuple(int(n) for n in shape), dtype=torch_dtype, pin_memory=pin)


def host_tensor(array: np.ndarray, pin: bool = False) -> torch.Tensor:
    """``array`` as a CPU tensor: sharing its memory, or with ``pin`` copied into a pinned buffer."""
    if not pin:
        return torch.from_numpy(array)
    out = host_buffer(array.shape, array.dtype, True)
    out.numpy()[...] = array
    return out


def host_rows(array: np.ndarray, index: np.ndarray, dtype: Any = None, pin: bool = False) -> torch.Tensor:
    """``gather_rows(array, index)`` (as ``dtype``, default the array's) as a CPU tensor; with ``pin``
    the rows are read straight into a pinned buffer."""
    dtype = np.dtype(dtype or array.dtype)
    if not pin:
        return torch.from_numpy(gather_rows(array, index).astype(dtype, copy=False))
    out = host_buffer((np.asarray(index).size,) + tuple(array.shape[1:]), dtype, True)
    gather_rows(array, index, out=out.numpy())
    return out


@dataclass
class Batch:
    """One training batch: caption ``i`` belongs to video ``i`` (square positives).

    ``text_tokens`` / ``text_mask`` are only loaded for heads that use word tokens
    (``uses_text_tokens``); otherwise they are ``None``.
    """

    video_index: torch.Tensor  # (B,) int64 rows in the split's videos
    caption_index: torch.Tensor  # (B,) int64 rows in the split's captions
    frame_emb: torch.Tensor  # (B, T, E) float32
    frame_mask: torch.Tensor  # (B, T) bool
    text_emb: torch.Tensor  # (B, E) float32
    text_tokens: torch.Tensor | None = None  # (B, L, Dt) float32
    text_mask: torch.Tensor | None = None  # (B, L) bool

    def to(self, device: str | torch.device) -> "Batch":
        """Move every tensor to ``device``."""
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in (
            self.video_index, self.caption_index, self.frame_emb, self.frame_mask, self.text_emb,
            self.text_tokens, self.text_mask)))

    def text_kwargs(self) -> dict[str, torch.Tensor]:
        """``{"text_tokens": ..., "text_mask": ...}`` when loaded, else ``{}`` (for head calls)."""
        if self.text_tokens is None:
            return {}
        return {"text_tokens": self.text_tokens, "text_mask": self.text_mask}


def uses_text_tokens(head: Any) -> bool:
    """Whether a stage-one head (name, class or instance) reads the caption word tokens."""
    return supports(head, "text_tokens")


def require_text_tokens(split: Split, head_name: str) -> None:
    """Refuse a split without staged text tokens for a head that reads them, with a clear error."""
    require_arrays(split, ("text_tokens", "text_mask"), f"head {head_name!r} (it uses the caption word tokens)")


class EpochSampler:
    """Per epoch: one random caption per captioned video, videos shuffled, cut into batches.

    Deterministic: epoch ``e`` with seed ``s`` always yields the same batches. Batches of a
    single pair (no negatives) are dropped; ``drop_last`` drops any short final batch.
    """

    def __init__(self, caption_video: np.ndarray, num_videos: int, batch_size: int, seed: int = 0,
                 drop_last: bool = False) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {batch_size}")
        cv = np.asarray(caption_video, dtype=np.int64)
        order = np.argsort(cv, kind="stable")
        counts = np.bincount(cv, minlength=num_videos)
        self.videos = np.flatnonzero(counts > 0)  # videos that can be a training pair
        if self.videos.size < 2:
            raise ValueError(f"need at least 2 captioned videos to train, got {self.videos.size}")
        starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
        self._captions_sorted = order
        self._start = starts[self.videos]
        self._count = counts[self.videos]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n, b = self.videos.size, self.batch_size
        full, rest = divmod(n, b)
        return full + (0 if self.drop_last or rest < 2 else 1)

    def epoch(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(caption_index, video_index), ...]`` for this epoch (caption ``i`` is of video ``i``)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        pick = self._start + (rng.random(self.videos.size) * self._count).astype(np.int64)
        captions = self._captions_sorted[pick]
        perm = rng.permutation(self.videos.size)
        videos, captions = self.videos[perm], captions[perm]
        batches = []
        for start in range(0, videos.size, self.batch_size):
            v = videos[start : start + self.batch_size]
            if v.size < 2 or (self.drop_last and v.size < self.batch_size):
                continue
            batches.append((captions[start : start + self.batch_size], v))
        return batches


def load_batch(split: Split, caption_index: np.ndarray, video_index: np.ndarray,
               text_tokens: bool = False, device: str | torch.device | None = None) -> Batch:
    """Read the rows of one batch from the (memory-mapped) arrays of ``split``.

    ``text_tokens=True`` also reads the captions' word tokens and mask. ``device``: where the batch
    goes (``Batch.to``); for CUDA it is read into pinned memory.
    """
    pin = pins(device)
    words = mask = None
    if text_tokens:
        words = host_rows(split.text_tokens, caption_index, np.float32, pin)
        mask = host_rows(split.text_mask, caption_index, bool, pin)
    return Batch(
        video_index=host_tensor(np.asarray(video_index, dtype=np.int64), pin),
        caption_index=host_tensor(np.asarray(caption_index, dtype=np.int64), pin),
        frame_emb=host_rows(split.frame_emb, video_index, np.float32, pin),
        frame_mask=host_rows(split.frame_mask, video_index, bool, pin),
        text_emb=host_rows(split.text_emb, caption_index, np.float32, pin),
        text_tokens=words,
        text_mask=mask,
    )


_END = object()


def prefetched(items: Sequence[Any], load: Callable[[Any], Any], depth: int = 2) -> Iterator[Any]:
    """Yield ``load(item)`` for each item; ``depth > 0`` loads up to ``depth`` ahead in a thread.

    An exception in ``load`` is raised in the consumer; closing the generator stops the thread.
    """
    if depth <= 0:
        for item in items:
            yield load(item)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                value = load(item)
                while not stop.is_set():
                    try:
                        q.put(value, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put(_END)
        except BaseException as exc:  # surfaced in the consumer
            q.put(exc)

    thread = threading.Thread(target=worker, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = q.get()
            if value is _END:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def iterate_batches(split: Split, plan: Sequence[tuple[np.ndarray, np.ndarray]], prefetch: int = 2,
                    text_tokens: bool = False, device: str | torch.device | None = None) -> Iterator[Batch]:
    """Yield ``load_batch`` for each planned ``(caption_index, video_index)`` batch, ``prefetch`` ahead
    (pinned for a CUDA ``device``)."""
    return prefetched(plan, lambda cv: load_batch(split, cv[0], cv[1], text_tokens, device), prefetch)


def blocks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
