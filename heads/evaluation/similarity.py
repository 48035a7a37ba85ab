"""Similarity matrices of stage-one heads on a split, and their retrieval metrics.

The one text / video embedding path of stage one: evaluation, hard-negative mining, the ranking
term's cosine and QB-Norm's querybanks all encode through ``encode_texts`` / ``encode_videos``.
Each of them, and ``similarity_blocks``, runs the head on the ``device`` it is given: the head is
moved there (a no-op when it is there already) and the split's rows are read onto it, so the
caller's one device decision holds for model and data alike. Results stay on that device;
``similarity`` alone brings them back, as a numpy matrix.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from core.metrics import retrieval_metrics
from core.split import Split, StagedSplit
from heads.evaluation.postprocess import check_querybank_split
from heads.stage_one.models import MeanP, StageOneHead
from heads.training.common import evaluating
from heads.training.data import blocks, require_text_tokens, uses_text_tokens


@torch.no_grad()
def encode_videos(head: StageOneHead, split: Split, batch: int = 1024, device: str = "cpu") -> torch.Tensor:
    """(V, E) unit video embeddings on ``device`` (where the head runs), read from the split in
    blocks of ``batch`` videos."""
    head.to(device)
    out = []
    for sl in blocks(len(split.video_ids), batch):
        emb = torch.from_numpy(np.array(split.frame_emb[sl], dtype=np.float32)).to(device)
        mask = torch.from_numpy(np.array(split.frame_mask[sl], dtype=bool)).to(device)
        out.append(head.encode_video(emb, mask))
    if not out:
        return torch.zeros(0, int(getattr(head, "output_dim", head.embed_dim)), device=device)
    return torch.cat(out)


def encode_texts(head: StageOneHead, split: Split, sl: slice | None = None, device: str = "cpu") -> torch.Tensor:
    """(C', E) unit text embeddings on ``device`` (where the head runs) of the captions ``sl``
    (default: all) of ``split``; heads with ``uses_text_tokens`` (clip2video) also get the
    captions' word tokens and mask."""
    head.to(device)
    sl = slice(None) if sl is None else sl
    text = torch.from_numpy(np.array(split.text_emb[sl], dtype=np.float32)).to(device)
    kwargs = {}
    if uses_text_tokens(head):
        kwargs = {
            "text_tokens": torch.from_numpy(np.array(split.text_tokens[sl], dtype=np.float32)).to(device),
            "text_mask": torch.from_numpy(np.array(split.text_mask[sl], dtype=bool)).to(device),
        }
    return head.encode_text(text, **kwargs)


@torch.no_grad()
def similarity_blocks(head: StageOneHead, split: Split, batch: int = 1024,
                      device: str = "cpu") -> Iterator[tuple[slice, torch.Tensor]]:
    """The (C, V) cosine similarities (no logit scale) of every caption and video, as
    ``(caption rows, (C', V) block on device)`` of ``batch`` captions each; the head as the caller
    set it (``similarity`` puts it in eval mode). Heads with ``uses_text_tokens`` (clip2video) also
    get the captions' word tokens and mask."""
    if uses_text_tokens(head):
        require_text_tokens(split, getattr(head, "name", type(head).__name__))
    videos = encode_videos(head, split, batch, device)
    for sl in blocks(int(split.text_emb.shape[0]), batch):
        yield sl, encode_texts(head, split, sl, device) @ videos.t()


def similarity(head: StageOneHead, split: Split, batch: int = 1024, device: str = "cpu") -> np.ndarray:
    """(C, V) float32 cosine similarities (no logit scale) between every caption and video,
    computed on ``device`` in eval mode (``similarity_blocks``)."""
    sim = np.empty((int(split.text_emb.shape[0]), len(split.video_ids)), dtype=np.float32)
    with evaluating(head):
        for sl, block in similarity_blocks(head, split, batch, device):
            sim[sl] = block.float().cpu().numpy()
    return sim


def evaluate(head: StageOneHead, split: Split, batch: int = 1024, device: str = "cpu") -> dict[str, dict[str, float]]:
    """``{"t2v": {...}, "v2t": {...}}`` retrieval metrics of ``head`` on ``split``."""
    sim = similarity(head, split, batch=batch, device=device)
    return retrieval_metrics(sim, np.asarray(split.caption_video))


def untrained_baseline(embed_dim: int) -> MeanP:
    """meanP with the identity text projection: zero-shot CLIP on the cached embeddings."""
    return MeanP(embed_dim).eval()


def querybanks(head: StageOneHead, split: Split, bank: Split, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """QB-Norm querybanks of a stage-one head: ``(text_bank (B_t, V), video_bank (B_v, C))``.

    ``text_bank``: ``bank``'s captions against ``split``'s videos (for T2V); ``video_bank``:
    ``bank``'s videos against ``split``'s captions (for V2T). ``bank`` must be another, non-test
    split (train or val) of the same store (``heads.evaluation.postprocess.check_querybank_split``).
    Computed on ``device``.
    """
    check_querybank_split(bank.split, split.split)
    if getattr(bank, "store_fingerprint", None) != getattr(split, "store_fingerprint", None):
        raise ValueError(f"QB-Norm querybank split {bank.split!r} comes from another store than {split.split!r}")
    def cross(videos: Split, captions: Split) -> StagedSplit:  # one split's videos, the other's captions
        return StagedSplit(split=captions.split, video_ids=list(videos.video_ids),
                           caption_ids=list(captions.caption_ids), caption_video=captions.caption_video,
                           frame_emb=videos.frame_emb, frame_mask=videos.frame_mask, text_emb=captions.text_emb,
                           text_tokens=captions.text_tokens, text_mask=captions.text_mask)

    texts, videos = cross(split, bank), cross(bank, split)
    return similarity(head, texts, device=device), similarity(head, videos, device=device).T
