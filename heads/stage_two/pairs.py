"""Batches of (caption, video) pairs read from a split's cached tokens.

Only the distinct rows a batch needs are read from the (memory-mapped) arrays, each once, in
ascending order (``gather_rows``); text tokens are cut to the longest caption of the batch. A batch
bound for a CUDA device (``load_pairs(device=...)``) is built in pinned memory, so that
``ItmBatch.to`` copies it without blocking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.split import TOKEN_ARRAYS, Split, require_arrays
from heads.training.data import gather_rows, host_rows, host_tensor, pins


@dataclass
class ItmBatch:
    """Pairs to score: ``text_tokens[pair_text[i]]`` with ``tokens[pair_video[i]]``, label ``labels[i]``.

    Only the distinct caption / video rows are held (in ascending row order).
    """

    text_tokens: torch.Tensor  # (Cb, L', Dt)
    text_mask: torch.Tensor  # (Cb, L') bool
    tokens: torch.Tensor  # (Vb, T, N, D) as stored (float16 usually)
    frame_mask: torch.Tensor  # (Vb, T) bool
    pair_text: torch.Tensor  # (P,) int64 into text_tokens
    pair_video: torch.Tensor  # (P,) int64 into tokens
    labels: torch.Tensor  # (P,) int64, 1 = match

    def to(self, device: str | torch.device) -> "ItmBatch":
        """Move every tensor to ``device``."""
        return ItmBatch(*(t.to(device, non_blocking=True) for t in (
            self.text_tokens, self.text_mask, self.tokens, self.frame_mask, self.pair_text, self.pair_video,
            self.labels)))

    def pair_inputs(self) -> tuple[torch.Tensor, ...]:
        """The positional inputs of ``StageTwoHead.pair_score`` for these pairs."""
        return self.text_tokens, self.text_mask, self.tokens, self.frame_mask, self.pair_text, self.pair_video


def require_tokens(split: Split, purpose: str = "a stage-two head") -> None:
    """Refuse a split without the visual and text tokens a stage-two head reads."""
    require_arrays(split, TOKEN_ARRAYS, purpose)


def text_rows(split: Split, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text tokens and bool mask of caption rows ``caps``, cut to the longest caption among them."""
    tmask = gather_rows(split.text_mask, caps).astype(bool, copy=False)
    length = max(1, int(np.flatnonzero(tmask.any(axis=0)).max(initial=-1)) + 1)
    ttok = np.ascontiguousarray(gather_rows(split.text_tokens, caps)[:, :length])
    return ttok, np.ascontiguousarray(tmask[:, :length])


def load_pairs(split: Split, caption_index: np.ndarray, video_index: np.ndarray,
               labels: np.ndarray | None = None, device: str | torch.device | None = None) -> ItmBatch:
    """Read the rows needed for pairs ``(caption_index[i], video_index[i])`` from ``split``; for a
    CUDA ``device`` (where the batch goes) into pinned memory (the video tokens straight from the
    arrays)."""
    pin = pins(device)
    caption_index = np.asarray(caption_index, dtype=np.int64)
    video_index = np.asarray(video_index, dtype=np.int64)
    caps, c_inv = np.unique(caption_index, return_inverse=True)
    vids, v_inv = np.unique(video_index, return_inverse=True)
    ttok, tmask = text_rows(split, caps)
    if labels is None:
        labels = np.zeros(video_index.size, dtype=np.int64)
    return ItmBatch(
        text_tokens=host_tensor(ttok, pin), text_mask=host_tensor(tmask, pin),
        tokens=host_rows(split.tokens, vids, pin=pin), frame_mask=host_rows(split.frame_mask, vids, bool, pin),
        pair_text=host_tensor(c_inv.reshape(-1).astype(np.int64), pin),
        pair_video=host_tensor(v_inv.reshape(-1).astype(np.int64), pin),
        labels=host_tensor(np.asarray(labels, dtype=np.int64), pin))
