"""CLIP2Video as a stage-one head over cached per-frame embeddings and text word tokens.

Two blocks on top of the frozen encoder's outputs (Fang et al. 2021):

* **Temporal Difference Block (TDB)**, video side. The L2-normalised frames ``f_1..f_T`` (padded
  frames zeroed) are mapped to the transformer width; the differences of adjacent frames
  ``f_{t+1} - f_t`` go through a one-layer transformer and ``2 * sigmoid(x) - 1`` and are
  interleaved between the frame tokens: ``f_1, d_12, f_2, d_23, ..., f_T``. Position embeddings
  (one per interleaved slot) and type embeddings (frame / difference) are added, and a temporal
  transformer runs over the sequence. Its outputs at the frame slots pass a zero-initialised
  linear layer and are added to the input frames (a residual, as in ``SeqTransf``), so at
  initialisation the global video embedding is exactly meanP and training moves away from it.
  The global video embedding is the masked mean of those enhanced frames.
* **Temporal Alignment Block (TAB)**, both sides. ``num_centers`` (K, default 5) centers are
  shared by the two modalities. Word tokens (text tower output after its final LayerNorm,
  linearly projected from the text token width ``text_dim`` to the TAB width) and the enhanced
  frame tokens (linearly projected to the same width) are softly assigned to the centers
  NetVLAD-style (softmax over centers of a shared linear score); the assignment-weighted
  residuals to each center are summed, each center's vector is L2-normalised (intra
  normalisation), and the flattened (K * width) vector is L2-normalised again.

Similarity (``weight`` = w, 0.5 by default)::

    sim(t, v) = w * cos(global_t, global_v) + (1 - w) * cos(aligned_t, aligned_v)

Both terms are dot products of unit vectors, so the head's ``encode_text`` / ``encode_video``
return ``concat[sqrt(w) * global, sqrt(1 - w) * aligned]`` (itself a unit vector): the plain
matrix product of the two encodings *is* the similarity above. Evaluation, the trainer's
logits and re-ranking therefore use this head exactly like meanP / seqTransf; only the output
width differs (``output_dim = embed_dim + K * tab_dim``).

Padding never leaks: padded frames are zeroed and masked as attention keys, a difference is
valid only between two valid frames, and padded frames / padded words get zero assignment to
every center. A caption with no valid word (or a video with no valid frame) has a zero aligned
part rather than NaN.

The text side needs the word tokens: ``encode_text(text_emb, text_tokens, text_mask)``; the
registry lists the head as supporting ``text_tokens``, so the batch loader, the trainer and
``heads.evaluation.similarity`` gather and pass them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heads.stage_one.models import SeqTransfConfig, StageOneHead, clean_frames, masked_mean, transformer_encoder


def _key_padding(valid: torch.Tensor) -> torch.Tensor:
    """Key padding mask from a validity mask; rows with nothing valid attend freely (no NaN)."""
    return ~valid & valid.any(dim=1, keepdim=True)


def vlad(tokens: torch.Tensor, mask: torch.Tensor, assign: nn.Linear, centers: torch.Tensor) -> torch.Tensor:
    """NetVLAD-style aggregation of ``tokens`` (B, N, D) with validity ``mask`` (B, N).

    Soft assignment ``a = softmax_k(assign(x))`` (zeroed for invalid tokens), residuals
    ``sum_n a_nk (x_n - c_k)``, intra-normalised per center, flattened and L2-normalised:
    returns (B, K * D).
    """
    a = torch.softmax(assign(tokens), dim=-1) * mask.unsqueeze(-1).to(tokens.dtype)  # (B, N, K)
    agg = torch.einsum("bnk,bnd->bkd", a, tokens) - a.sum(dim=1).unsqueeze(-1) * centers.unsqueeze(0)
    agg = F.normalize(agg, dim=-1)
    return F.normalize(agg.flatten(1), dim=-1)


@dataclass
class CLIP2VideoConfig(SeqTransfConfig):
    """Options of ``CLIP2Video``: seqTransf's transformer options (one temporal layer by default) and
    the TDB / TAB ones (None: the embedding width)."""

    num_layers: int = 1
    text_dim: int | None = None  # width of the caption word tokens
    num_centers: int = 5  # K shared TAB centers
    weight: float = 0.5  # share of the global similarity
    tab_dim: int | None = 128
    diff_layers: int = 1  # layers of the difference transformer


class CLIP2Video(StageOneHead):
    """Temporal Difference Block + Temporal Alignment Block (see module docstring)."""

    name = "clip2video"
    Config = CLIP2VideoConfig

    def __init__(self, embed_dim: int, **options: Any) -> None:
        super().__init__(embed_dim, **options)
        c = self.cfg
        width = c.resolve_width(embed_dim)
        c.tab_dim = tab_dim = int(embed_dim if c.tab_dim is None else c.tab_dim)
        c.text_dim = text_dim = int(embed_dim if c.text_dim is None else c.text_dim)
        num_heads, num_layers, diff_layers = int(c.num_heads), int(c.num_layers), int(c.diff_layers)
        ff_mult, dropout, max_frames = float(c.ff_mult), float(c.dropout), int(c.max_frames)
        if not 0.0 <= float(c.weight) <= 1.0:
            raise ValueError(f"weight (share of the global similarity) must be in [0, 1], got {c.weight}")
        if int(c.num_centers) < 1:
            raise ValueError(f"num_centers must be >= 1, got {c.num_centers}")
        self.text_dim = text_dim
        self.num_centers = int(c.num_centers)
        self.tab_dim = tab_dim
        self.weight = float(c.weight)
        # -- TDB
        self.inp: nn.Module = nn.Identity() if width == embed_dim else nn.Linear(embed_dim, width)
        self.diff_pos_emb = nn.Parameter(torch.randn(max(1, max_frames - 1), width) * 0.02)
        self.diff_transformer = transformer_encoder(width, num_heads, diff_layers, ff_mult, dropout)
        self.pos_emb = nn.Parameter(torch.randn(2 * max_frames - 1, width) * 0.02)
        self.type_emb = nn.Parameter(torch.randn(2, width) * 0.02)  # 0: frame, 1: difference
        self.transformer = transformer_encoder(width, num_heads, num_layers, ff_mult, dropout)
        self.out = nn.Linear(width, embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # -- TAB
        self.frame_to_tab = nn.Linear(embed_dim, tab_dim)
        self.word_to_tab = nn.Linear(text_dim, tab_dim)
        self.assign = nn.Linear(tab_dim, self.num_centers)
        self.centers = nn.Parameter(torch.randn(self.num_centers, tab_dim) / math.sqrt(tab_dim))

    @property
    def output_dim(self) -> int:
        """Width of ``encode_text`` / ``encode_video`` outputs: global + K aligned centers."""
        return self.embed_dim + self.num_centers * self.tab_dim

    # -- video ---------------------------------------------------------------------------
    def enhanced_frames(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(V, T, E) unit frames after the TDB (padded frames are zero vectors)."""
        mask = frame_mask.bool()
        num_frames = frame_emb.shape[1]
        if num_frames > self.cfg.max_frames:
            raise ValueError(f"{num_frames} frames > max_frames {self.cfg.max_frames} of this head")
        frames = clean_frames(frame_emb, mask)
        x = self.inp(frames)  # (V, T, W)
        if num_frames > 1:
            diff_valid = mask[:, 1:] & mask[:, :-1]
            d = self.inp(frames[:, 1:] - frames[:, :-1]) + self.diff_pos_emb[: num_frames - 1]
            d = self.diff_transformer(d, src_key_padding_mask=_key_padding(diff_valid))
            d = 2.0 * torch.sigmoid(d) - 1.0
            d = torch.where(diff_valid.unsqueeze(-1), d, torch.zeros((), device=d.device))
            # interleave f_1, d_12, f_2, ..., f_T
            seq = torch.stack([x[:, :-1], d], dim=2).flatten(1, 2)
            seq = torch.cat([seq, x[:, -1:]], dim=1)
            valid = torch.stack([mask[:, :-1], diff_valid], dim=2).flatten(1, 2)
            valid = torch.cat([valid, mask[:, -1:]], dim=1)
            kind = torch.zeros(2 * num_frames - 1, dtype=torch.long, device=x.device)
            kind[1::2] = 1
        else:
            seq, valid = x, mask
            kind = torch.zeros(1, dtype=torch.long, device=x.device)
        seq = seq + self.pos_emb[: seq.shape[1]] + self.type_emb[kind]
        h = self.transformer(seq, src_key_padding_mask=_key_padding(valid))
        delta = self.out(h[:, 0::2])  # frame slots
        enhanced = F.normalize(frames + delta, dim=-1)
        return torch.where(mask.unsqueeze(-1), enhanced, torch.zeros((), device=enhanced.device))

    def video_parts(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (V, E), aligned (V, K*D)) unit vectors of the video side."""
        mask = frame_mask.bool()
        frames = self.enhanced_frames(frame_emb, mask)
        global_v = F.normalize(masked_mean(frames, mask), dim=-1)
        tokens = F.normalize(self.frame_to_tab(frames), dim=-1)
        return global_v, vlad(tokens, mask, self.assign, self.centers)

    def encode_video(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(V, T, E) + (V, T) mask -> (V, output_dim) = [sqrt(w) global, sqrt(1-w) aligned]."""
        global_v, aligned_v = self.video_parts(frame_emb, frame_mask)
        return self._combine(global_v, aligned_v)

    # -- text ----------------------------------------------------------------------------
    def text_parts(self, text_emb: torch.Tensor, text_tokens: torch.Tensor | None,
                   text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (C, E), aligned (C, K*D)) unit vectors of the text side."""
        if text_tokens is None or text_mask is None:
            raise ValueError(
                "the clip2video head needs the text word tokens and their mask (text_tokens, text_mask); "
                "stage the split with the text tokens (arrays including 'text')"
            )
        if text_tokens.shape[-1] != self.text_dim:
            raise ValueError(f"text tokens have width {text_tokens.shape[-1]}, this head was built for "
                             f"text_dim={self.text_dim}")
        global_t = super().encode_text(text_emb)
        mask = text_mask.bool()
        words = torch.where(mask.unsqueeze(-1), text_tokens.float(), torch.zeros((), device=text_tokens.device))
        words = F.normalize(self.word_to_tab(F.normalize(words, dim=-1)), dim=-1)
        return global_t, vlad(words, mask, self.assign, self.centers)

    def encode_text(self, text_emb: torch.Tensor, text_tokens: torch.Tensor | None = None,
                    text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(C, E) text embeddings + (C, L, Dt) word tokens + (C, L) mask -> (C, output_dim)."""
        return self._combine(*self.text_parts(text_emb, text_tokens, text_mask))

    def _combine(self, global_part: torch.Tensor, aligned_part: torch.Tensor) -> torch.Tensor:
        return torch.cat([math.sqrt(self.weight) * global_part, math.sqrt(1.0 - self.weight) * aligned_part], dim=-1)

