"""Uniform frame sampling (pure functions).

Strategy ``uniform-midpoint``: the clip's frames ``[first, stop)`` are cut into ``num_frames``
equal segments and the frame at each segment's midpoint is taken:
``index_k = first + floor((k + 0.5) * n / num_frames)`` with ``n = stop - first``.
Timestamps are ``index / fps`` (seconds from the start of the file).

Short clips (``n < num_frames``): every frame of the clip is taken once, in order, and the
remaining slots are padding with ``mask = False``, ``index = -1`` and ``time = -1.0`` (frames are
never repeated; the store's ``frame_mask`` marks the padding and heads must ignore it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STRATEGY = "uniform-midpoint"
PAD_INDEX = -1
PAD_TIME = -1.0


@dataclass(frozen=True)
class FrameSample:
    """Sampled frames of one clip: ``indices`` (T,) int32, ``times`` (T,) float32 seconds,
    ``mask`` (T,) bool (False = padding)."""

    indices: np.ndarray
    times: np.ndarray
    mask: np.ndarray

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())

    @property
    def valid_indices(self) -> np.ndarray:
        return self.indices[self.mask]


def clip_frame_range(num_video_frames: int, fps: float, start: float | None = None,
                     end: float | None = None) -> tuple[int, int]:
    """Frame range ``[first, stop)`` of the clip ``[start, end)`` seconds (None = file bounds).

    A frame ``i`` (shown at ``i / fps``) belongs to the clip when ``start <= i / fps < end``.
    The range is clamped to the file and may be empty.
    """
    if num_video_frames < 0:
        raise ValueError(f"num_video_frames must be >= 0, got {num_video_frames}")
    first, stop = 0, num_video_frames
    if start is not None or end is not None:
        if not (fps and fps > 0 and math.isfinite(fps)):
            raise ValueError(f"clip bounds need a positive fps, got {fps}")
        eps = 1e-6  # tolerate float error in start * fps
        if start is not None and start > 0:
            first = math.ceil(start * fps - eps)
        if end is not None:
            stop = math.ceil(end * fps - eps)
    first = min(max(first, 0), num_video_frames)
    stop = min(max(stop, first), num_video_frames)
    return first, stop


def uniform_indices(first: int, stop: int, num_frames: int) -> np.ndarray:
    """Midpoints of ``num_frames`` equal segments of ``[first, stop)`` (needs ``stop - first >=
    num_frames``)."""
    n = stop - first
    if num_frames <= 0:
        raise ValueError(f"num_frames must be > 0, got {num_frames}")
    if n < num_frames:
        raise ValueError(f"range of {n} frames is shorter than {num_frames}")
    k = np.arange(num_frames, dtype=np.int64)
    return (first + ((2 * k + 1) * n) // (2 * num_frames)).astype(np.int32)


def sample_frames(num_video_frames: int, fps: float, num_frames: int, start: float | None = None,
                  end: float | None = None) -> FrameSample:
    """Sample ``num_frames`` frames uniformly from a clip (see the module docstring)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be > 0, got {num_frames}")
    first, stop = clip_frame_range(num_video_frames, fps, start, end)
    n = stop - first
    if n >= num_frames:
        idx = uniform_indices(first, stop, num_frames)
        mask = np.ones(num_frames, dtype=bool)
    else:
        idx = np.full(num_frames, PAD_INDEX, dtype=np.int32)
        idx[:n] = np.arange(first, stop, dtype=np.int32)
        mask = np.zeros(num_frames, dtype=bool)
        mask[:n] = True
    times = np.full(num_frames, PAD_TIME, dtype=np.float32)
    if fps and fps > 0:
        times[mask] = (idx[mask] / float(fps)).astype(np.float32)
    else:
        times[mask] = 0.0
    return FrameSample(indices=idx, times=times, mask=mask)
