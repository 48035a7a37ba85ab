"""Stage-two heads: score one (text, video) pair from cached frozen tokens with cross attention.

The base class and both heads stay in one module (a little over 400 lines, most of it this
description): they share one scoring API and its input projections; the layers are in ``layers``.

Both heads read per-frame CLS+patch tokens ``(V, T, N, D)`` with a frame mask ``(V, T)`` and text
tokens ``(C, L, Dt)`` with a token mask ``(C, L)``. Their scoring API, in (caption, video) order:

* ``encode_video(tokens, frame_mask)``: the text-independent work, once per distinct video;
* ``match(text_tokens, text_mask, video, pair_text, pair_video)``: 2-way match logits ``(P, 2)``
  (index 1 = match, as in BLIP-2's ITM head) of pairs (caption row ``pair_text[i]``, video row
  ``pair_video[i]``);
* ``pair_score(text_tokens, text_mask, tokens, frame_mask, pair_text, pair_video)``: the score
  re-ranking adds to the cosine, the ITM log-odds ``logit[match] - logit[no match]`` (unbounded,
  0 = undecided), plus the pair's ITC logit for a head with a contrastive projection.

Frozen inputs are first standardised per dimension (``TokenStandardizer``, statistics of the train
split, kept as buffers in the head's state dict): a cross-attention head on raw frozen tokens stayed
at the class-prior loss (docs/METHOD.md, "What the synthetic benchmark taught").

``CrossTVR`` (decoupled video-text cross attention, Dai et al. 2023)
--------------------------------------------------------------------
* ``QFormerLayer`` follows one BLIP-2 Q-Former (BERT) layer: self-attention over
  ``[queries; text]`` (text padding masked), cross-attention from the queries to visual tokens
  (with ``text_cross=True``, the default, the text tokens cross-attend too, which is what broke
  the class-prior plateau on the synthetic benchmark, docs/METHOD.md), then feed-forward, with
  separate FFNs for query and text positions as in BLIP-2. Post-LN (BERT style, residual then LayerNorm) by default
  so real Q-Former weights map one to one; ``prenorm=True`` switches to pre-LN.
* Spatial pass: the block stack runs once per frame over that frame's CLS+patches; the last
  layer's query outputs are averaged over the valid frames -> spatial-enhanced queries.
  ``spatial_frames`` (e.g. 4 of 12) runs it on evenly spaced valid frames only, for CPU speed.
* Token selector (TS2-Net): an MLP scores every token of a frame, softmax over the frame's
  tokens, the ``num_selected`` (M) best are kept. Straight-through top-k: the forward pass uses the
  exact selected tokens (hard one-hot weights); the backward pass uses the softmax's gradient
  (``hard + soft - soft.detach()``), so the MLP learns. ``keep_cls=True`` always keeps the CLS token
  (TS2-Net does) and picks ``M - 1`` patches.
* Temporal pass: the SAME block stack (``shared=True``; ``False`` builds a second, independent
  stack) with the spatial-enhanced queries as queries and the selected tokens of all frames,
  flattened, as keys/values; a learned frame-position embedding is added to the selected tokens
  so that order (motion, timing) is visible. Text input = the projected text tokens again.
* ``mode``: ``"spatial"`` (spatial pass only), ``"temporal"`` (temporal pass with the learnable
  queries), ``"both"`` (spatial then temporal, the paper's model).
* One linear layer on the query outputs -> 2 logits, averaged over queries (BLIP-2's ITM).
* BLIP-2's unimodal passes for its contrastive objective (ITC, ``heads.stage_two.itc``): ``video_queries``
  runs the same passes with no text (the queries attend to the visual tokens only),
  ``text_features`` runs the text alone through the spatial stack (self-attention and the text
  feed-forward). With ``itc_dim`` > 0 the head has BLIP-2's ``vision_proj`` / ``text_proj`` and
  temperature, and ``pair_score`` is the ITM log-odds plus the pair's ITC logit
  (``scale * max_q cos``), BLIP-2's retrieval rule. ``token_pos=True`` adds a learned embedding
  per token position to the visual tokens (off by default: BENCHMARKS.md found no gain).

How BLIP-2's Q-Former weights map onto these layers is in docs/METHOD.md.

``T2V2T`` (Kim et al.)
----------------------
Per frame ``i``: ``F[i] = XAttn(query = frame i tokens, key/value = text || frame i tokens)``
(the "bypass": a frame irrelevant to the text can attend to itself), FFN; then the text tokens
cross-attend to the fused tokens of all frames, self-attention over the text, FFN; the masked mean
of the text outputs -> 2 logits. Post-LN residual blocks, like ``CrossTVR``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.split import Split
from heads.base import Head
from heads.stage_two.layers import (CrossAttention, FeedForward, QFormer, TokenStandardizer, masked_mean,
                                    pick_frames, safe_valid, standardised_linear, straight_through_topk)


@dataclass
class CrossTVRConfig:
    """Options of ``CrossTVR`` (see the module docstring)."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    num_queries: int = 8
    num_selected: int = 4  # M tokens kept per frame by the selector
    mode: str = "both"  # spatial | temporal | both
    shared: bool = True  # the temporal pass reuses the spatial pass's layers
    text_cross: bool = True  # text tokens cross-attend to the video too
    spatial_frames: int | None = 4  # frames of the spatial pass (None: all)
    keep_cls: bool = True  # the selector always keeps CLS
    cross_every: int = 1  # cross attention in layers i % cross_every == 0
    ff_mult: float = 4.0
    dropout: float = 0.0
    prenorm: bool = False
    visual_proj: bool = True  # project the frozen tokens to the width (False: keys/values read them)
    max_frames: int = 64
    token_pos: bool = False  # a learned embedding per token position
    spatial_frame_pos: bool = False  # the frame-position embedding on the spatial pass's frames too
    frame_diff: int = 0  # > 0: the temporal pass also reads each selected token minus the same token k frames before
    max_tokens: int = 257
    itc_dim: int = 0  # width of the contrastive projection (0: none)
    # options for a head with BLIP-2's Q-Former layout (docs/METHOD.md, "Initialising from BLIP-2")
    ln_eps: float = 1e-5  # LayerNorm epsilon (BERT / BLIP-2: 1e-12)
    embed_norm: bool = False  # a LayerNorm over the stack's inputs [queries; text]
    text_input: str = "tokens"  # tokens: the store's text tokens, projected; ids: caption token ids
    vocab_size: int = 0  # word embeddings of a text_input="ids" head
    max_positions: int = 512  # position embeddings of a text_input="ids" head
    standardize: bool = True  # standardise the frozen tokens per dimension first
    itc_text_pool: str = "mean"  # mean: masked mean of the text outputs; cls: the first token's


# options added after heads were first saved, with the value a head saved without them was built with:
# left out of a saved config at that value, so earlier configs and today's default heads look alike
LATER_OPTIONS = {"spatial_frame_pos": False, "frame_diff": 0, "ln_eps": 1e-5, "embed_norm": False, "text_input": "tokens", "vocab_size": 0,
                 "max_positions": 512, "standardize": True, "itc_text_pool": "mean"}
TEXT_INPUTS = ("tokens", "ids")


@dataclass
class T2V2TConfig:
    """Options of ``T2V2T``."""

    width: int = 128
    layers: int = 1
    heads: int = 4
    spatial_frames: int | None = 4
    ff_mult: float = 4.0
    dropout: float = 0.0
    max_frames: int = 64


class StageTwoHead(Head):
    """Common parts: standardiser, input projections, the 2-way classifier, ``pair_score``."""

    name = "base"
    no_weight_decay = ("*queries", "*frame_pos", "*token_pos")
    itc_dim = 0

    def __init__(self, token_dim: int, text_dim: int, **options: Any) -> None:
        super().__init__()
        self.cfg = self.Config(**options)
        visual_proj = bool(getattr(self.cfg, "visual_proj", True))
        width = int(self.cfg.width)
        self.text_input = str(getattr(self.cfg, "text_input", "tokens"))
        if self.text_input not in TEXT_INPUTS:
            raise ValueError(f"text_input must be one of {TEXT_INPUTS}, got {self.text_input!r}")
        self.standardize = bool(getattr(self.cfg, "standardize", True))
        self.token_dim, self.text_dim, self.width = int(token_dim), int(text_dim), width
        self.standardizer = TokenStandardizer(token_dim, text_dim)
        self.visual_proj: nn.Module = nn.Linear(token_dim, width) if visual_proj else nn.Identity()
        if self.text_input == "ids":
            # BLIP-2's Q-Former reads caption token ids through its own BERT embeddings
            vocab, positions = int(self.cfg.vocab_size), int(self.cfg.max_positions)
            if vocab < 1:
                raise ValueError("text_input='ids' needs vocab_size >= 1 (the tokenizer's vocabulary)")
            self.word_embeddings = nn.Embedding(vocab, width)
            self.position_embeddings = nn.Embedding(positions, width)
        else:
            self.text_proj = nn.Linear(text_dim, width)
        self.fc = nn.Linear(width, 2)

    def fit_standardizer(self, split: Split, seed: int = 0) -> None:
        """Fit the input standardisation on ``split`` (a head built with ``standardize=False``, such
        as one initialised from BLIP-2, reads the tokens as they are and fits nothing)."""
        if self.standardize:
            self.standardizer.fit(split, seed=seed)

    def visual(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised, projected visual tokens (B, T, N, W) (padding frames -> 0 before the
        projection) and the bool mask."""
        fm = frame_mask.bool()
        if not self.standardize:
            vis = self.visual_proj(tokens.float())
            fill = self.visual_proj.bias if isinstance(self.visual_proj, nn.Linear) else torch.zeros((), device=vis.device)
            return torch.where(fm[:, :, None, None], vis, fill), fm
        if isinstance(self.visual_proj, nn.Linear):
            std = self.standardizer
            vis = standardised_linear(tokens, self.visual_proj, std.visual_mean, std.visual_std)
            return torch.where(fm[:, :, None, None], vis, self.visual_proj.bias), fm
        vis = self.standardizer.visual(tokens)
        vis = torch.where(fm[:, :, None, None], vis, torch.zeros((), device=vis.device))
        return self.visual_proj(vis), fm

    def _text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised, projected text tokens (B, L, W) (padding -> 0 before the projection) and
        the usable-token mask; for a ``text_input="ids"`` head, ``text_tokens`` are token ids (B, L)
        and the result is their word + position embeddings."""
        tm = text_mask.bool()
        if self.text_input == "ids":
            ids = text_tokens.long()
            if ids.dim() != 2:
                raise ValueError(f"this head reads caption token ids (C, L), got text of shape {tuple(ids.shape)}")
            if ids.shape[1] > self.position_embeddings.num_embeddings:
                raise ValueError(f"{ids.shape[1]} text positions > max_positions "
                                 f"{self.position_embeddings.num_embeddings} of this head")
            pos = torch.arange(ids.shape[1], device=ids.device)
            return self.word_embeddings(ids) + self.position_embeddings(pos), safe_valid(tm)
        std = self.standardizer
        if not self.standardize:
            txt = self.text_proj(text_tokens.float())
            return torch.where(tm[:, :, None], txt, self.text_proj.bias), safe_valid(tm)
        txt = standardised_linear(text_tokens, self.text_proj, std.text_mean, std.text_std)
        return torch.where(tm[:, :, None], txt, self.text_proj.bias), safe_valid(tm)

    def encode_video(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text-independent part of the head for ``V`` videos: a dict of (V, ...) tensors."""
        raise NotImplementedError

    def match(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, video: dict[str, torch.Tensor],
              pair_text: torch.Tensor, pair_video: torch.Tensor) -> torch.Tensor:
        """Match logits (P, 2) of caption rows ``pair_text`` of ``text_tokens`` with video rows
        ``pair_video`` of ``video`` (``encode_video``'s output)."""
        raise NotImplementedError

    def pair_score(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, tokens: torch.Tensor,
                   frame_mask: torch.Tensor, pair_text: torch.Tensor, pair_video: torch.Tensor,
                   text_embed: torch.Tensor | None = None, parts: bool = False) -> torch.Tensor:
        """(P,) score of the pairs (caption row ``pair_text[i]``, video row ``pair_video[i]``).

        ``text_tokens`` / ``text_mask`` and ``tokens`` / ``frame_mask`` hold each distinct caption
        and video once: a video's text-independent work (``encode_video``) is done once however many
        captions it is paired with. The score is the ITM log-odds plus, for a head with a
        contrastive projection (``itc_dim`` > 0), the ITC logit of the pair (BLIP-2's retrieval
        rule); ``text_embed`` (C, itc_dim), rows aligned with ``text_tokens``, supplies the
        captions' ``itc_text_embed`` computed beforehand. ``parts=True`` returns (P, 2): the ITM
        log-odds and the ITC logit (0 without a contrastive projection), whose sum is the score.
        """
        video = self.encode_video(tokens, frame_mask)
        logits = self.match(text_tokens, text_mask, video, pair_text, pair_video)
        score = logits[:, 1] - logits[:, 0]
        itc = torch.zeros_like(score)
        if self.itc_dim:
            itc = self.pair_itc(text_tokens, text_mask, video, pair_text, pair_video, text_embed)
        if parts:
            return torch.stack([score, itc], dim=1)
        return score + itc if self.itc_dim else score

    def pair_itc(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, video: dict[str, torch.Tensor],
                 pair_text: torch.Tensor, pair_video: torch.Tensor,
                 text_embed: torch.Tensor | None = None) -> torch.Tensor:
        """(P,) contrastive logit of each pair (heads with a contrastive projection)."""
        raise ValueError(f"head {self.name!r} has no contrastive projection")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "token_dim": self.token_dim, "text_dim": self.text_dim, **asdict(self.cfg)}


class CrossTVR(StageTwoHead):
    """Decoupled spatial / temporal text-video cross attention (see module docstring)."""

    name = "crosstvr"
    Config = CrossTVRConfig

    def __init__(self, token_dim: int, text_dim: int, **options: Any) -> None:
        c = CrossTVRConfig(**options)
        if c.mode not in ("spatial", "temporal", "both"):
            raise ValueError(f"mode must be 'spatial', 'temporal' or 'both', got {c.mode!r}")
        super().__init__(token_dim, text_dim, **options)
        c = self.cfg
        width, layers, heads, num_queries = int(c.width), int(c.layers), int(c.heads), int(c.num_queries)
        mode, shared, token_pos, max_tokens = c.mode, bool(c.shared), bool(c.token_pos), int(c.max_tokens)
        visual_proj, max_frames = bool(c.visual_proj), int(c.max_frames)
        self.itc_dim = int(c.itc_dim)
        if self.itc_dim:
            # BLIP-2's vision_proj / text_proj and temperature (contrastive objective, heads.stage_two.itc)
            self.itc_vision = nn.Linear(width, self.itc_dim)
            self.itc_text = nn.Linear(width, self.itc_dim)
            self.itc_logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.mode, self.shared = mode, shared
        self.num_selected, self.keep_cls = int(c.num_selected), bool(c.keep_cls)
        self.spatial_frames = None if c.spatial_frames is None else int(c.spatial_frames)
        kv_dim = width if visual_proj else token_dim
        if c.itc_text_pool not in ("mean", "cls"):
            raise ValueError(f"itc_text_pool must be 'mean' or 'cls', got {c.itc_text_pool!r}")
        stack = dict(layers=layers, width=width, heads=heads, kv_dim=kv_dim, cross_every=int(c.cross_every),
                     text_cross=bool(c.text_cross), ff_mult=float(c.ff_mult), dropout=float(c.dropout),
                     prenorm=bool(c.prenorm), eps=float(c.ln_eps), embed_norm=bool(c.embed_norm))
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.token_pos = nn.Parameter(torch.randn(max_tokens, kv_dim) * 0.02) if token_pos else None
        self.block = QFormer(**stack)
        self.temporal_block: QFormer | None = None
        self.spatial_frame_pos = bool(c.spatial_frame_pos) and mode != "temporal"
        if mode != "spatial":
            self.temporal_block = self.block if shared else QFormer(**stack)
            self.selector = nn.Sequential(nn.LayerNorm(kv_dim, eps=float(c.ln_eps)), nn.Linear(kv_dim, width // 2), nn.GELU(),
                                          nn.Linear(width // 2, 1))
        if mode != "spatial" or self.spatial_frame_pos:
            self.frame_pos = nn.Parameter(torch.randn(max_frames, kv_dim) * 0.02)
        self.frame_diff = int(c.frame_diff) if mode != "spatial" else 0
        if self.frame_diff < 0:
            raise ValueError(f"frame_diff must be >= 0, got {self.frame_diff}")
        # marks a temporal key as a frame difference (the same token k frames before subtracted)
        self.diff_embed = nn.Parameter(torch.randn(kv_dim) * 0.02) if self.frame_diff else None

    def select_tokens(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, N, W) tokens -> (selected (B, T, M, W), index (B, T, M)); straight-through top-k."""
        weights, index = self._selection(visual)
        return weights @ visual, index

    def _selection(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.selector(visual).squeeze(-1)  # (B, T, N)
        return straight_through_topk(scores, self.num_selected, keep_first=self.keep_cls)

    def encode_video(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text-independent: the spatial pass's frames and the temporal pass's selected tokens."""
        vis, fm = self.visual(tokens, frame_mask)
        b, t, n, w = vis.shape
        if self.token_pos is not None:
            if n > self.token_pos.shape[0]:
                raise ValueError(f"{n} tokens per frame > max_tokens {self.token_pos.shape[0]} of this head")
            vis = vis + self.token_pos[:n]
        out: dict[str, torch.Tensor] = {}
        if hasattr(self, "frame_pos") and t > self.frame_pos.shape[0]:
            raise ValueError(f"{t} frames > max_frames {self.frame_pos.shape[0]} of this head")
        if self.mode in ("spatial", "both"):
            idx, valid = pick_frames(fm, self.spatial_frames)  # (B, F)
            out["frames"] = vis.gather(1, idx[:, :, None, None].expand(-1, -1, n, w))  # (B, F, N, W)
            if self.spatial_frame_pos:  # which frame a token comes from, so order survives the frame mean
                out["frames"] = out["frames"] + self.frame_pos[idx][:, :, None, :]
            out["frame_valid"] = valid
        if self.mode in ("temporal", "both"):
            weights, _ = self._selection(vis)  # (B, T, M, N)
            selected = weights @ vis + self.frame_pos[:t, None, :]  # (B, T, M, W)
            m = selected.shape[2]
            valid = fm.unsqueeze(-1).expand(-1, -1, m)
            if self.frame_diff:
                selected, valid = self._with_differences(vis, weights, fm, selected, valid)
            out["keys"] = selected.reshape(b, -1, selected.shape[-1])
            out["key_valid"] = valid.reshape(b, -1)
        return out

    def _with_differences(self, vis: torch.Tensor, weights: torch.Tensor, fm: torch.Tensor, selected: torch.Tensor,
                          valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected tokens (B, T, M, W) followed, per frame, by the same tokens minus their value
        ``frame_diff`` frames before (what changed there: a moving object's edges, a detail that
        appears), each with its frame position, its token position and the difference embedding;
        a frame with no valid frame ``frame_diff`` before it has no difference keys."""
        k, t = self.frame_diff, vis.shape[1]
        earlier = torch.cat([vis[:, :1].expand(-1, min(k, t), -1, -1), vis[:, :max(0, t - k)]], dim=1)
        diff = vis - earlier  # (B, T, N, W): token positions cancel, so they are added back
        if self.token_pos is not None:
            diff = diff + self.token_pos[:vis.shape[2]]
        diff = weights @ diff + self.frame_pos[:t, None, :] + self.diff_embed
        has_earlier = torch.zeros_like(fm)
        has_earlier[:, k:] = fm[:, :max(0, t - k)]
        diff_valid = (fm & has_earlier).unsqueeze(-1).expand_as(valid)
        return torch.cat([selected, diff], dim=2), torch.cat([valid, diff_valid], dim=2)

    def _passes(self, video: dict[str, torch.Tensor], pair_video: torch.Tensor, txt: torch.Tensor,
                tv: torch.Tensor) -> torch.Tensor:
        """Query outputs (P, Q, W) of the spatial and / or temporal pass for pairs (video row
        ``pair_video[i]``, projected text ``txt[i]``); text of length 0 gives the text-free queries."""
        p = pair_video.shape[0]
        queries = self.queries.unsqueeze(0).expand(p, -1, -1)
        if "frames" in video:
            frames = video["frames"]
            vb, f, n, w = frames.shape
            rows = (pair_video[:, None] * f + torch.arange(f, device=frames.device)[None, :]).reshape(-1)
            q_out, _ = self.block(queries, txt, tv, frames.reshape(vb * f, n, w), None, rows,
                                  expand=f, need_text=False)  # every token of a frame is valid
            queries = masked_mean(q_out.view(p, f, -1, q_out.shape[-1]), video["frame_valid"][pair_video], dim=1)
        if "keys" in video:
            assert self.temporal_block is not None
            queries, _ = self.temporal_block(queries, txt, tv, video["keys"], video["key_valid"], pair_video,
                                             need_text=False)
        return queries

    def match(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, video: dict[str, torch.Tensor],
              pair_text: torch.Tensor, pair_video: torch.Tensor) -> torch.Tensor:
        txt, tv = self._text(text_tokens[pair_text], text_mask[pair_text])
        return self.fc(self._passes(video, pair_video, txt, tv)).mean(dim=1)

    def video_queries(self, video: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text-free query outputs (V, Q, W) of every video of ``encode_video``'s output: the
        queries attend to the visual tokens alone, as in BLIP-2's contrastive (ITC) objective."""
        ref = video["frames"] if "frames" in video else video["keys"]
        v = ref.shape[0]
        empty = ref.new_zeros(v, 0, self.width)
        return self._passes(video, torch.arange(v, device=ref.device), empty,
                            torch.zeros(v, 0, dtype=torch.bool, device=ref.device))

    def text_features(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text tokens passed alone through the (spatial) block stack, pooled (C, W): their masked
        mean, or the first ([CLS]) token's output with ``itc_text_pool="cls"`` (BLIP-2's ITC)."""
        txt, tv = self._text(text_tokens, text_mask)
        out = self.block.forward_text(txt, tv)
        if self.cfg.itc_text_pool == "cls":
            return out[:, 0]
        return masked_mean(out, tv, dim=1)

    def _itc_check(self) -> None:
        if not self.itc_dim:
            raise ValueError("this head was built without a contrastive projection (itc_dim=0)")

    def _itc_scale(self) -> torch.Tensor:
        return self.itc_logit_scale.clamp(max=float(np.log(100.0))).exp()

    def itc_logits(self, queries: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Contrastive logits (C, V) from text-free query outputs (V, Q, W) and text features (C, W):
        ``scale * max_q cos(itc_vision(query), itc_text(text))`` (BLIP-2's ITC similarity)."""
        self._itc_check()
        q = F.normalize(self.itc_vision(queries), dim=-1)
        t = F.normalize(self.itc_text(text), dim=-1)
        return self._itc_scale() * torch.einsum("vqd,cd->cvq", q, t).amax(dim=-1)

    def itc_text_embed(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm contrastive text embeddings (C, itc_dim): they depend on the caption alone, so a
        caller scoring many pairs computes them once per caption (``pair_score(..., text_embed=)``)."""
        self._itc_check()
        return F.normalize(self.itc_text(self.text_features(text_tokens, text_mask)), dim=-1)

    def pair_itc(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, video: dict[str, torch.Tensor],
                 pair_text: torch.Tensor, pair_video: torch.Tensor,
                 text_embed: torch.Tensor | None = None) -> torch.Tensor:
        """(P,) ITC logit of each pair: one text-free pass per distinct video of ``video`` and one
        text pass per caption (or the captions' ``itc_text_embed`` given as ``text_embed``)."""
        q = F.normalize(self.itc_vision(self.video_queries(video)), dim=-1)[pair_video]  # (P, Q, D)
        if text_embed is None:
            text_embed = self.itc_text_embed(text_tokens, text_mask)
        elif tuple(text_embed.shape) != (text_tokens.shape[0], self.itc_dim):
            raise ValueError(f"text_embed has shape {tuple(text_embed.shape)}, expected "
                             f"({text_tokens.shape[0]}, {self.itc_dim})")
        t = text_embed[pair_text]
        return self._itc_scale() * torch.einsum("pqd,pd->pq", q, t).amax(dim=-1)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        # options absent from the config when off, so configs saved before they existed build the same head
        if not self.cfg.token_pos:
            del cfg["token_pos"], cfg["max_tokens"]
        if not self.itc_dim:
            del cfg["itc_dim"]
        for key, default in LATER_OPTIONS.items():
            if cfg.get(key) == default and type(cfg.get(key)) is type(default):
                del cfg[key]
        return cfg


class _BypassLayer(nn.Module):
    """Frame tokens attend to text || the same frame's tokens, then FFN (post-LN)."""

    def __init__(self, width: int, heads: int, ff_mult: float, dropout: float) -> None:
        super().__init__()
        self.attn = CrossAttention(width, heads, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = FeedForward(width, ff_mult, dropout)

    def forward(self, frame: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        kv = torch.cat([text, frame], dim=1)
        valid = torch.cat([text_valid, torch.ones_like(frame[..., 0], dtype=torch.bool)], dim=1)
        frame = self.norm1(frame + self.attn(frame, kv, valid))
        return self.norm2(frame + self.ffn(frame))


class _V2TLayer(nn.Module):
    """Text tokens cross-attend to fused frame tokens, self-attend, FFN (post-LN)."""

    def __init__(self, width: int, heads: int, ff_mult: float, dropout: float) -> None:
        super().__init__()
        self.cross = CrossAttention(width, heads, dropout=dropout)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = FeedForward(width, ff_mult, dropout)

    def forward(self, text: torch.Tensor, text_valid: torch.Tensor, video: torch.Tensor,
                video_valid: torch.Tensor) -> torch.Tensor:
        text = self.norm1(text + self.cross(text, video, safe_valid(video_valid)))
        text = self.norm2(text + self.self_attn(text, text, text, key_padding_mask=~text_valid,
                                                need_weights=False)[0])
        return self.norm3(text + self.ffn(text))


class T2V2T(StageTwoHead):
    """Text-to-video bypass cross attention, then video-to-text attention (see module docstring)."""

    name = "t2v2t"
    Config = T2V2TConfig

    def __init__(self, token_dim: int, text_dim: int, **options: Any) -> None:
        super().__init__(token_dim, text_dim, **options)
        c = self.cfg
        width, layers, heads, ff_mult, dropout = int(c.width), int(c.layers), int(c.heads), float(c.ff_mult), \
            float(c.dropout)
        max_frames = int(c.max_frames)
        self.spatial_frames = None if c.spatial_frames is None else int(c.spatial_frames)
        self.t2v = nn.ModuleList(_BypassLayer(width, heads, ff_mult, dropout) for _ in range(layers))
        self.v2t = nn.ModuleList(_V2TLayer(width, heads, ff_mult, dropout) for _ in range(layers))
        self.frame_pos = nn.Parameter(torch.randn(max_frames, width) * 0.02)

    def encode_video(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text-independent: the picked frames' projected tokens with their frame-position embedding."""
        vis, fm = self.visual(tokens, frame_mask)
        b, t, n, w = vis.shape
        idx, valid = pick_frames(fm, self.spatial_frames)
        frames = vis.gather(1, idx[:, :, None, None].expand(-1, -1, n, w))
        return {"frames": frames + self.frame_pos[idx][:, :, None, :], "frame_valid": valid}

    def fuse_frames(self, frames: torch.Tensor, txt: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
        """Bypass cross attention per frame: (P, F, N, W) frames of each pair -> fused tokens."""
        p, f, n, w = frames.shape
        rep = lambda x: x.unsqueeze(1).expand(-1, f, *x.shape[1:]).reshape(p * f, *x.shape[1:])  # noqa: E731
        fused, text_r, tv_r = frames.reshape(p * f, n, w), rep(txt), rep(tv)
        for layer in self.t2v:
            fused = layer(fused, text_r, tv_r)
        return fused.view(p, f, n, w)

    def match(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, video: dict[str, torch.Tensor],
              pair_text: torch.Tensor, pair_video: torch.Tensor) -> torch.Tensor:
        txt, tv = self._text(text_tokens[pair_text], text_mask[pair_text])
        fused = self.fuse_frames(video["frames"][pair_video], txt, tv)
        p, f, n, w = fused.shape
        valid = video["frame_valid"][pair_video]
        video_valid = valid.unsqueeze(-1).expand(-1, -1, n).reshape(p, f * n)
        text = txt
        for layer in self.v2t:
            text = layer(text, tv, fused.reshape(p, f * n, w), video_valid)
        return self.fc(masked_mean(text, tv, dim=1))
