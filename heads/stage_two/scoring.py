"""Scoring (caption, video) pairs of a split with a stage-two head: the one path that validation,
re-ranking and the benchmarks take (no trainer involved).

``score_pairs`` groups the pairs by video (validation and re-ranking list them caption by caption,
each caption with its K candidates, so a video recurs across many batches), reads each batch's
distinct rows once from the memory-mapped split, runs the head's text-independent work once per
distinct video of a batch, and computes a contrastive head's
caption embeddings once per call (not once per batch a caption appears in). The head runs on the
``device`` it is given (``pair_score_blocks``, the model part, keeps the scores there);
``score_pairs`` brings them back as numpy. ``pair_scorer`` wraps it as the ``(caption_rows,
video_rows) -> scores`` callable that ``heads.evaluation.rerank`` takes.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from core.split import Split
from heads.stage_two.models import StageTwoHead
from heads.stage_two.pairs import load_pairs, require_tokens, text_rows
from heads.stage_two.tokenizer import text_view
from heads.training.common import evaluating
from heads.training.data import blocks, prefetched

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@torch.no_grad()
def caption_itc_embed(head: StageTwoHead, split: Split, caption_rows: np.ndarray, batch: int = 256,
                      device: str = "cpu") -> torch.Tensor:
    """(C, itc_dim) contrastive text embeddings (``itc_text_embed``) of ``caption_rows`` of ``split``,
    computed and kept on ``device`` (where the head is moved)."""
    head.to(device)
    caption_rows = np.asarray(caption_rows, dtype=np.int64)
    out = torch.empty(caption_rows.size, head.itc_dim, device=device)
    for sl in blocks(caption_rows.size, batch):
        ttok, tmask = text_rows(split, caption_rows[sl])
        out[sl] = head.itc_text_embed(torch.from_numpy(ttok).to(device), torch.from_numpy(tmask).to(device)).float()
    return out


@torch.no_grad()
def pair_score_blocks(head: StageTwoHead, split: Split, caption_index: np.ndarray, video_index: np.ndarray,
                      batch: int = 128, device: str = "cpu", prefetch: int = 1, progress: bool = False,
                      parts: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
    """The head scores of pairs ``(caption_index[i], video_index[i])`` of ``split`` as
    ``(pair rows, scores on device)`` of ``batch`` pairs each: (P',) ``pair_score``, or with
    ``parts=True`` (P', 2) of ITM log-odds and contrastive logit. The head runs on ``device`` (moved
    there) in the mode the caller set (``score_pairs`` puts it in eval mode)."""
    require_tokens(split)
    split = text_view(split, getattr(head, "text_input", "tokens"))
    caption_index = np.asarray(caption_index, dtype=np.int64)
    video_index = np.asarray(video_index, dtype=np.int64)
    if video_index.shape != caption_index.shape:
        raise ValueError(f"{caption_index.shape} caption rows vs {video_index.shape} video rows")
    head.to(device)
    chunks = list(blocks(video_index.size, batch))
    text_rows_all = text_embed = None
    if getattr(head, "itc_dim", 0) and video_index.size:
        text_rows_all = np.unique(caption_index)
        text_embed = caption_itc_embed(head, split, text_rows_all, device=device)
    load = lambda sl: (sl, load_pairs(split, caption_index[sl], video_index[sl], device=device))  # noqa: E731
    batches = prefetched(chunks, load, prefetch)
    try:
        for sl, b in tqdm(batches, total=len(chunks), disable=not progress, desc="score pairs", leave=False):
            b = b.to(device)
            extra = {}
            if text_embed is not None:
                # load_pairs orders the batch's captions as np.unique does
                rows = np.searchsorted(text_rows_all, np.unique(caption_index[sl]))
                extra["text_embed"] = text_embed[torch.from_numpy(rows).to(device)]
            if parts:
                extra["parts"] = True
            yield sl, head.pair_score(*b.pair_inputs(), **extra)
    finally:
        batches.close()


def score_pairs(head: StageTwoHead, split: Split, caption_index: np.ndarray, video_index: np.ndarray,
                batch: int = 128, device: str = "cpu", prefetch: int = 1, progress: bool = False,
                parts: bool = False) -> np.ndarray:
    """(P,) float32 head scores (``pair_score``) of pairs ``(caption_index[i], video_index[i])`` of
    ``split``, in the pairs' order, computed on ``device`` in eval mode (``pair_score_blocks``, fed the
    pairs grouped by video); ``parts=True``: (P, 2) of
    ITM log-odds and contrastive logit. A head reading caption ids (``text_input="ids"``) reads the
    split's ``text_ids`` in place of its text tokens."""
    caption_index = np.asarray(caption_index, dtype=np.int64).reshape(-1)
    video_index = np.asarray(video_index, dtype=np.int64).reshape(-1)
    if video_index.shape != caption_index.shape:
        raise ValueError(f"{caption_index.shape} caption rows vs {video_index.shape} video rows")
    size = video_index.size
    # by video, then caption: a batch holds few distinct videos, each sent to the device once
    order = np.lexsort((caption_index, video_index))
    out = np.empty((size, 2) if parts else size, dtype=np.float32)
    with evaluating(head):
        for sl, scores in pair_score_blocks(head, split, caption_index[order], video_index[order], batch=batch,
                                            device=device, prefetch=prefetch, progress=progress, parts=parts):
            out[order[sl]] = scores.float().cpu().numpy()
    return out


def pair_scorer(head: StageTwoHead, split: Split, batch_size: int = 64, device: str = "cpu",
                progress: bool = True) -> PairScorer:
    """A ``(caption_rows, video_rows) -> scores`` callable running ``head`` on ``split``'s cached
    tokens (``score_pairs``), refusing a non-finite score with the pair that produced it."""
    require_tokens(split, "re-ranking with a stage-two head")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def score(caps: np.ndarray, vids: np.ndarray) -> np.ndarray:
        out = score_pairs(head, split, caps, vids, batch=batch_size, device=device, progress=progress)
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise ValueError(f"the stage-two head returned a non-finite score for caption row "
                             f"{int(caps[bad])}, video row {int(vids[bad])}")
        return out

    return score
