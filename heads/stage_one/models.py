"""Stage-one heads: cached frame / text embeddings -> a joint space scored by cosine similarity.

Both heads share the text side (L2-normalise the frozen text embedding, a linear projection
initialised to the identity, L2-normalise again) and a learnable logit scale (CLIP's
parametrisation: ``scale = exp(logit_scale)``, initialised to ``1/0.07``, clamped at 100).

* ``MeanP`` (CLIP4Clip's meanP): video = L2-normalised masked mean of the L2-normalised frame
  embeddings. The video side is deliberately parameter-free, as in CLIP4Clip; with the identity
  text projection it *is* zero-shot CLIP.
* ``SeqTransf`` (CLIP4Clip's seqTransf, made to start at meanP): frames (linearly mapped to the
  transformer width, 256 by default, for CPU speed) + learned position embeddings go through a
  small pre-norm transformer (padded frames masked out as keys); its
  output passes a zero-initialised linear layer and is added to the input frames, so at
  initialisation the head equals meanP exactly and training moves away from it.

Inputs are normalised first because frozen encoders differ in embedding scale; a padded (masked)
frame never influences the output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heads.base import Head

CLIP_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T, E) over valid frames ``mask`` (B, T); all-masked rows give zeros."""
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)


def clean_frames(frame_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised frames with padded ones set to zero (so garbage or NaN there cannot leak)."""
    x = torch.where(mask.unsqueeze(-1), frame_emb.float(), torch.zeros((), device=frame_emb.device))
    return F.normalize(x, dim=-1)


@dataclass
class StageOneConfig:
    """Options every stage-one head has."""

    logit_scale: float = CLIP_LOGIT_SCALE  # initial log of the logit scale (CLIP: log 1/0.07)
    text_proj: bool = True  # a trainable text projection (identity-initialised)


@dataclass
class SeqTransfConfig(StageOneConfig):
    """Options of ``SeqTransf``."""

    num_layers: int = 2
    num_heads: int = 4
    width: int | None = 256  # transformer width (None: the embedding width)
    ff_mult: float = 2.0
    dropout: float = 0.1
    max_frames: int = 64

    def resolve_width(self, embed_dim: int) -> int:
        """The transformer width (``None``: the embedding width), checked against ``num_heads``."""
        self.width = width = int(embed_dim if self.width is None else self.width)
        if width % int(self.num_heads):
            raise ValueError(f"transformer width {width} is not divisible by num_heads {self.num_heads}")
        return width


def transformer_encoder(width: int, num_heads: int, num_layers: int, ff_mult: float,
                        dropout: float) -> nn.TransformerEncoder:
    """A pre-norm transformer encoder (GELU, batch first) with a final LayerNorm."""
    layer = nn.TransformerEncoderLayer(d_model=width, nhead=num_heads, dim_feedforward=int(round(ff_mult * width)),
                                       dropout=dropout, activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, num_layers=num_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)


class StageOneHead(Head):
    """Common text side, logit scale and scoring of stage-one heads."""

    name = "base"
    Config = StageOneConfig
    # the identity-initialised text projection decays towards the identity, not towards zero
    # (``decay_text_proj``); position / type embeddings (``*_emb``) and VLAD centers never decay
    no_weight_decay = ("text_proj*", "*_emb", "centers")

    def __init__(self, embed_dim: int, **options: Any) -> None:
        super().__init__()
        self.cfg = self.Config(**options)
        self.embed_dim = int(embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(self.cfg.logit_scale)))
        self.text_proj: nn.Linear | None = None
        if self.cfg.text_proj:
            self.text_proj = nn.Linear(embed_dim, embed_dim)
            with torch.no_grad():
                self.text_proj.weight.copy_(torch.eye(embed_dim))
                self.text_proj.bias.zero_()

    # -- interface -------------------------------------------------------------------------
    def encode_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        """(C, E) frozen text embeddings -> (C, E) unit vectors."""
        x = F.normalize(text_emb.float(), dim=-1)
        if self.text_proj is not None:
            x = self.text_proj(x)
        return F.normalize(x, dim=-1)

    def encode_video(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(V, T, E) frame embeddings + (V, T) bool mask -> (V, E) unit vectors."""
        raise NotImplementedError

    def scale(self) -> torch.Tensor:
        """The (clamped) multiplicative logit scale."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def logits(self, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits (C, V) from unit text / video embeddings."""
        return self.scale() * text @ video.t()

    def forward(self, text_emb: torch.Tensor, frame_emb: torch.Tensor, frame_mask: torch.Tensor,
                **text: torch.Tensor) -> torch.Tensor:
        """Scaled logits (C, V) between a batch of texts and a batch of videos (``text``: the word
        tokens and mask, for heads that use them)."""
        return self.logits(self.encode_text(text_emb, **text), self.encode_video(frame_emb, frame_mask))

    @torch.no_grad()
    def decay_text_proj(self, lr: float, weight_decay: float) -> None:
        """Weight decay of the text projection towards the identity (its initialisation), applied by
        the trainer after every optimiser step."""
        if self.text_proj is None or weight_decay <= 0:
            return
        w = self.text_proj.weight
        w.sub_(lr * weight_decay * (w - torch.eye(w.shape[0], device=w.device, dtype=w.dtype)))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "embed_dim": self.embed_dim, **asdict(self.cfg)}


class MeanP(StageOneHead):
    """Masked mean pooling of normalised frame embeddings (no video-side parameters)."""

    name = "meanP"

    def encode_video(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        mask = frame_mask.bool()
        return F.normalize(masked_mean(clean_frames(frame_emb, mask), mask), dim=-1)


class SeqTransf(StageOneHead):
    """Temporal transformer over frame embeddings, residual from meanP (see module docstring)."""

    name = "seqTransf"
    Config = SeqTransfConfig

    def __init__(self, embed_dim: int, **options: Any) -> None:
        super().__init__(embed_dim, **options)
        c = self.cfg
        width = c.resolve_width(embed_dim)
        # A narrower transformer than the embedding keeps CPU training fast; the residual
        # branch maps back to embed_dim.
        self.inp: nn.Module = nn.Identity() if width == embed_dim else nn.Linear(embed_dim, width)
        self.pos_emb = nn.Parameter(torch.randn(int(c.max_frames), width) * 0.02)
        self.transformer = transformer_encoder(width, int(c.num_heads), int(c.num_layers), float(c.ff_mult),
                                               float(c.dropout))
        self.out = nn.Linear(width, embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def encode_video(self, frame_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        mask = frame_mask.bool()
        num_frames = frame_emb.shape[1]
        if num_frames > self.pos_emb.shape[0]:
            raise ValueError(f"{num_frames} frames > max_frames {self.pos_emb.shape[0]} of this head")
        frames = clean_frames(frame_emb, mask)
        # Rows with no valid frame would make attention all -inf (NaN); let them attend freely,
        # their pooled output is zero anyway.
        padding = ~mask & mask.any(dim=1, keepdim=True)
        x = self.inp(frames) + self.pos_emb[:num_frames]
        delta = self.out(self.transformer(x, src_key_padding_mask=padding))
        frames = F.normalize(frames + delta, dim=-1)
        return F.normalize(masked_mean(frames, mask), dim=-1)

