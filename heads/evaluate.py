"""Similarity matrices of stage-one heads on a staged split, metrics and reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from heads.data import blocks, require_text_tokens, uses_text_tokens
from heads.metrics import format_table, metrics_to_json, retrieval_metrics
from heads.stage_one import MeanP, StageOneHead


@torch.no_grad()
def encode_videos(head: StageOneHead, split: Any, batch: int = 1024, device: str = "cpu") -> torch.Tensor:
    """(V, E) unit video embeddings, read from the split in blocks of ``batch`` videos."""
    out = []
    for sl in blocks(len(split.video_ids), batch):
        emb = torch.from_numpy(np.array(split.frame_emb[sl], dtype=np.float32)).to(device)
        mask = torch.from_numpy(np.array(split.frame_mask[sl], dtype=bool)).to(device)
        out.append(head.encode_video(emb, mask))
    if not out:
        return torch.zeros(0, int(getattr(head, "output_dim", head.embed_dim)), device=device)
    return torch.cat(out)


def encode_texts(head: StageOneHead, split: Any, sl: slice | None = None, device: str = "cpu") -> torch.Tensor:
    """(C', E) unit text embeddings of the captions ``sl`` (default: all) of ``split``; heads with
    ``uses_text_tokens`` (clip2video) also get the captions' word tokens and mask."""
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
def similarity(head: StageOneHead, split: Any, batch: int = 1024, device: str = "cpu") -> np.ndarray:
    """(C, V) float32 cosine similarities (no logit scale) between every caption and video.

    Heads with ``uses_text_tokens`` (clip2video) also get the captions' word tokens and mask.
    """
    if uses_text_tokens(head):
        require_text_tokens(split, getattr(head, "name", type(head).__name__))
    was_training = head.training
    head.eval()
    try:
        videos = encode_videos(head, split, batch, device)
        num_captions = int(split.text_emb.shape[0])
        sim = np.empty((num_captions, videos.shape[0]), dtype=np.float32)
        for sl in blocks(num_captions, batch):
            sim[sl] = (encode_texts(head, split, sl, device) @ videos.t()).float().cpu().numpy()
    finally:
        head.train(was_training)
    return sim


def evaluate(head: StageOneHead, split: Any, batch: int = 1024, device: str = "cpu") -> dict[str, dict[str, float]]:
    """``{"t2v": {...}, "v2t": {...}}`` retrieval metrics of ``head`` on ``split``."""
    sim = similarity(head, split, batch=batch, device=device)
    return retrieval_metrics(sim, np.asarray(split.caption_video))


def untrained_baseline(embed_dim: int) -> MeanP:
    """meanP with the identity text projection: zero-shot CLIP on the cached embeddings."""
    return MeanP(embed_dim).eval()


def write_report(results: Mapping[str, Any], out_dir: str | Path, name: str = "report") -> tuple[Path, str]:
    """Write ``out_dir/<name>.json`` and ``out_dir/<name>.txt``; return (json path, table text).

    ``results`` maps a model name to its metrics (``{"t2v": {...}, "v2t": {...}}`` or flat).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    json_path = out / f"{name}.json"
    json_path.write_text(metrics_to_json(results) + "\n")
    (out / f"{name}.txt").write_text(table + "\n")
    return json_path, table
