"""Contrastive losses for stage-one training."""

from __future__ import annotations

import torch


def positive_mask(
    text_video: torch.Tensor,
    video_ids: torch.Tensor,
    text_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Bt, Bv) bool: caption ``i`` is a positive of video column ``j``.

    ``text_video`` (Bt,) holds each caption's video id, ``video_ids`` (Bv,) the id of each video
    column; equal ids are positives (several captions of one video, or a video present twice).
    If ``text_emb`` (Bt, E) is given and the batch is square (caption ``j`` belongs to column
    ``j``), captions with bit-identical embeddings (the same sentence describing two videos) make
    each other's videos positives too, so the loss does not ask for an impossible distinction.
    """
    mask = text_video[:, None] == video_ids[None, :]
    if text_emb is not None and text_emb.shape[0] == video_ids.shape[0]:
        same_text = (text_emb[:, None, :] == text_emb[None, :, :]).all(dim=-1)
        mask = mask | same_text
    return mask


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-log(sum_pos softmax)``; rows without a positive are skipped."""
    has_pos = positives.any(dim=1)
    if not bool(has_pos.any()):
        raise ValueError("no row of the batch has a positive")
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos)[has_pos].mean()


def symmetric_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of text->video and video->text cross-entropy.

    ``logits`` (Bt, Bv) already carry the logit scale; ``positives`` (Bt, Bv) is the bool mask
    of correct pairs. With exactly one positive per row and column this is CLIP's loss; with
    several, each direction maximises the total probability of its positives.
    """
    if logits.shape != positives.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and positives {tuple(positives.shape)} differ")
    positives = positives.bool()
    t2v = _multi_positive_ce(logits, positives)
    v2t = _multi_positive_ce(logits.t(), positives.t())
    return 0.5 * (t2v + v2t)
