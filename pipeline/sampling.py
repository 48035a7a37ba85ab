"""Uniform frame sampling (pure functions).

Strategy ``uniform-midpoint``: the clip's frames ``[first, stop)`` are cut into ``num_frames``
equal segments and the frame at each segment's midpoint is taken:
``index_k = first + floor((k + 0.5) * n / num_frames)`` with ``n = stop - first``.
Timestamps are ``index / fps`` (seconds from the start of the file).

Short clips (``n < num_frames``): every frame of the clip is taken once, in order, and the
remaining slots are padding with ``mask = False``, ``index = -1`` and ``time = -1.0`` (frames are
never repeated; the store's ``frame_mask`` marks the padding and heads must ignore it).

Variable frame rate: when a video's frame timestamps are not ``index / fps`` (off by more than half
a frame anywhere), the same rule is applied to time instead of frame numbers (``sample_by_time``):
the clip is the frames with ``start <= timestamp < end``, the targets are the midpoints of equal
time segments, each takes the last frame shown at or before it, and the times stored are the
frames' own timestamps. Constant-rate videos keep the frame-number rule exactly.

Strategy ``uniform-midpoint@<F>fps`` (``sample_fps=F``): as many frames as the clip lasts seconds
times ``F`` (at least 1), at most ``num_frames``, taken the same way (segment midpoints); the other
slots are padding. A long clip thus gets ``num_frames`` frames, a short one proportionally fewer.
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


def strategy_name(sample_fps: float | None = None) -> str:
    """The store's name of the sampling strategy (``uniform-midpoint`` or ``uniform-midpoint@<F>fps``)."""
    return STRATEGY if not sample_fps else f"{STRATEGY}@{float(sample_fps):g}fps"


def strategy_fps(name: str) -> float | None:
    """The frames per second of a strategy name of ``strategy_name`` (``None``: uniform over the clip);
    ``ValueError`` for a name it did not write."""
    if name == STRATEGY:
        return None
    prefix = f"{STRATEGY}@"
    if name.startswith(prefix) and name.endswith("fps"):
        try:
            return float(name[len(prefix):-len("fps")])
        except ValueError:
            pass
    raise ValueError(f"unknown sampling strategy {name!r} (known: {STRATEGY}, {STRATEGY}@<F>fps)")


def sample_frames(num_video_frames: int, fps: float, num_frames: int, start: float | None = None,
                  end: float | None = None, sample_fps: float | None = None) -> FrameSample:
    """Sample ``num_frames`` frames uniformly from a clip, or ``sample_fps`` frames per second of
    it up to ``num_frames`` (see the module docstring)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be > 0, got {num_frames}")
    first, stop = clip_frame_range(num_video_frames, fps, start, end)
    n = stop - first
    take = num_frames
    if sample_fps:
        if not (sample_fps > 0 and fps and fps > 0):
            raise ValueError(f"fps sampling needs a positive sample rate and video fps, got {sample_fps} and {fps}")
        take = max(1, min(num_frames, math.floor(n / fps * sample_fps + 1e-9)))
    if n >= take:
        idx = np.full(num_frames, PAD_INDEX, dtype=np.int32)
        idx[:take] = uniform_indices(first, stop, take)
        mask = np.arange(num_frames) < take
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


def is_constant_rate(timestamps: np.ndarray, fps: float) -> bool:
    """Whether frame ``i`` is shown at ``timestamps[0] + i / fps`` give or take half a frame."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if ts.size < 2:
        return True
    if not (fps and fps > 0 and math.isfinite(fps)):
        return False
    expected = ts[0] + np.arange(ts.size) / fps
    return bool(np.all(np.abs(ts - expected) <= 0.5 / fps))


def sample_by_time(timestamps: np.ndarray, num_frames: int, start: float | None = None, end: float | None = None,
                   sample_fps: float | None = None) -> FrameSample:
    """``sample_frames`` for a variable-frame-rate video, on its frames' timestamps (seconds, in
    presentation order; see the module docstring)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be > 0, got {num_frames}")
    ts = np.asarray(timestamps, dtype=np.float64)
    lo = -np.inf if start is None or start <= 0 else start - 1e-6
    hi = np.inf if end is None else end - 1e-6
    clip = np.flatnonzero((ts >= lo) & (ts < hi))
    idx = np.full(num_frames, PAD_INDEX, dtype=np.int32)
    times = np.full(num_frames, PAD_TIME, dtype=np.float32)
    mask = np.zeros(num_frames, dtype=bool)
    if clip.size == 0:
        return FrameSample(indices=idx, times=times, mask=mask)
    t0 = ts[clip[0]]
    step = float(np.median(np.diff(ts[clip]))) if clip.size > 1 else 0.0
    duration = ts[clip[-1]] - t0 + step
    take = num_frames
    if sample_fps:
        take = max(1, min(num_frames, math.floor(duration * sample_fps + 1e-9)))
    targets = t0 + (np.arange(take) + 0.5) * duration / take
    pick = clip[np.clip(np.searchsorted(ts[clip], targets, side="right") - 1, 0, clip.size - 1)]
    pick = np.unique(pick)[:num_frames]  # a long gap can serve two targets: each frame once
    idx[:pick.size], times[:pick.size], mask[:pick.size] = pick, ts[pick], True
    return FrameSample(indices=idx, times=times, mask=mask)
