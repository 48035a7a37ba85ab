"""Stage-two heads: score one (text, video) pair from cached frozen tokens with cross attention.

Both heads take per-frame CLS+patch tokens ``(B, T, N, D)`` with a frame mask ``(B, T)`` and text
tokens ``(B, L, Dt)`` with a token mask ``(B, L)`` for ``B`` aligned pairs and return 2-way match
logits ``(B, 2)`` (index 1 = match, as in BLIP-2's ITM head). ``score()`` is the log-odds
``logit[match] - logit[no match]`` (unbounded, 0 = undecided); re-ranking adds it to the cosine.

Frozen inputs are first standardised per dimension (``TokenStandardizer``, statistics of the train
split, kept as buffers in the head's state dict): DESIGN's experiments found a cross-attention head
stuck at loss ln 2 on raw frozen tokens.

``CrossTVR`` (decoupled video-text cross attention, Dai et al. 2023)
--------------------------------------------------------------------
* ``QFormerLayer`` follows one BLIP-2 Q-Former (BERT) layer: self-attention over
  ``[queries; text]`` (text padding masked), cross-attention from the queries to visual tokens
  (with ``text_cross=True``, the default, the text tokens cross-attend too: DESIGN's third
  experiment found that this broke the ln 2 plateau), then feed-forward, with separate FFNs for
  query and text positions as in BLIP-2. Post-LN (BERT style, residual then LayerNorm) by default
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
* BLIP-2's unimodal passes for its contrastive objective (ITC, ``heads.itc``): ``video_queries``
  runs the same passes with no text (the queries attend to the visual tokens only),
  ``text_features`` runs the text alone through the spatial stack (self-attention and the text
  feed-forward). With ``itc_dim`` > 0 the head has BLIP-2's ``vision_proj`` / ``text_proj`` and
  temperature, and ``pair_score`` is the ITM log-odds plus the pair's ITC logit
  (``scale * max_q cos``), BLIP-2's retrieval rule. ``token_pos=True`` adds a learned embedding
  per token position to the visual tokens (off by default: no gain measured).

Mapping BLIP-2 Q-Former weights (``Blip2QFormerModel``; not implemented here): layer ``i`` ->
``layers[i]``: ``attention.self.{query,key,value}`` -> ``self_attn.in_proj_{weight,bias}``
(stacked q;k;v), ``attention.output.dense`` -> ``self_attn.out_proj``,
``attention.output.LayerNorm`` -> ``norm_self``; ``crossattention.self.query`` -> ``cross_attn.q``,
``.key``/``.value`` -> ``cross_attn.k``/``.v`` (BLIP-2's take the 1408-d EVA tokens, so build with
``visual_proj=False`` for an EVA-g/14 store), ``crossattention.output.dense`` -> ``cross_attn.out``,
``crossattention.output.LayerNorm`` -> ``norm_cross``; ``intermediate_query.dense`` /
``output_query.dense`` / ``output_query.LayerNorm`` -> ``ffn_query.fc1`` / ``ffn_query.fc2`` /
``norm_ffn_query``; ``intermediate.dense`` / ``output.dense`` / ``output.LayerNorm`` ->
``ffn_text.*`` / ``norm_ffn_text``; ``query_tokens`` -> ``queries``; ``itm_head`` -> ``fc``.
BLIP-2 has cross attention only in every other layer (``cross_every=2``) and width 768 / 12 heads /
32 queries; its text side is its own BERT word embeddings, so ``text_proj`` (CLIP text tokens ->
width) stays trained from scratch.

``T2V2T`` (Kim et al.)
----------------------
Per frame ``i``: ``F[i] = XAttn(query = frame i tokens, key/value = text || frame i tokens)``
(the "bypass": a frame irrelevant to the text can attend to itself), FFN; then the text tokens
cross-attend to the fused tokens of all frames, self-attention over the text, FFN; the masked mean
of the text outputs -> 2 logits. Post-LN residual blocks, like ``CrossTVR``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "STAGE_TWO", "TokenStandardizer", "StageTwoHead", "CrossTVR", "T2V2T", "QFormerLayer",
    "build_stage_two", "straight_through_topk", "pick_frames", "count_parameters",
]


# --------------------------------------------------------------------------------------------
# input standardisation
# --------------------------------------------------------------------------------------------
class TokenStandardizer(nn.Module):
    """Per-dimension mean / std of frozen visual and text tokens (buffers, saved with the head)."""

    def __init__(self, token_dim: int, text_dim: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("visual_mean", torch.zeros(token_dim))
        self.register_buffer("visual_std", torch.ones(token_dim))
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("text_std", torch.ones(text_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, split: Any, max_videos: int = 256, max_captions: int = 2048, seed: int = 0,
            chunk: int = 32) -> "TokenStandardizer":
        """Estimate the statistics from a random sample of ``split``'s rows, streamed in chunks.

        Visual statistics use the valid frames of up to ``max_videos`` videos, text statistics the
        unmasked tokens of up to ``max_captions`` captions. Returns ``self``.
        """
        rng = np.random.default_rng(seed)
        num_v = int(split.tokens.shape[0])
        vids = np.sort(rng.choice(num_v, size=min(num_v, max_videos), replace=False))
        acc = _Moments(self.visual_mean.numel())
        for start in range(0, vids.size, chunk):
            idx = vids[start:start + chunk]
            tok = np.asarray(split.tokens[idx], dtype=np.float64)  # (b, T, N, D)
            fm = np.asarray(split.frame_mask[idx], dtype=bool)
            acc.add(tok[fm].reshape(-1, tok.shape[-1]))
        num_c = int(split.text_tokens.shape[0])
        caps = np.sort(rng.choice(num_c, size=min(num_c, max_captions), replace=False))
        tacc = _Moments(self.text_mean.numel())
        for start in range(0, caps.size, chunk * 8):
            idx = caps[start:start + chunk * 8]
            tok = np.asarray(split.text_tokens[idx], dtype=np.float64)
            tm = np.asarray(split.text_mask[idx], dtype=bool)
            tacc.add(tok[tm])
        for (mean_buf, std_buf), moments in (((self.visual_mean, self.visual_std), acc),
                                             ((self.text_mean, self.text_std), tacc)):
            mean, std = moments.result()
            mean_buf.copy_(torch.from_numpy(mean).float())
            std_buf.copy_(torch.from_numpy(std).float().clamp_min(self.eps))
        self.fitted.fill_(True)
        return self

    def visual(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised visual tokens (float32)."""
        return (x.float() - self.visual_mean) / self.visual_std

    def text(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised text tokens (float32)."""
        return (x.float() - self.text_mean) / self.text_std


class _Moments:
    """Running sum / sum of squares (float64) of row vectors."""

    def __init__(self, dim: int) -> None:
        self.n, self.s, self.ss = 0, np.zeros(dim), np.zeros(dim)

    def add(self, rows: np.ndarray) -> None:
        self.n += rows.shape[0]
        self.s += rows.sum(axis=0)
        self.ss += np.square(rows).sum(axis=0)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 0:
            return np.zeros_like(self.s), np.ones_like(self.s)
        mean = self.s / self.n
        var = np.maximum(self.ss / self.n - mean ** 2, 0.0)
        return mean, np.sqrt(var)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head attention with separate q / k / v / out linears (keys may have another width)."""

    def __init__(self, width: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        kv_dim = width if kv_dim is None else int(kv_dim)
        self.heads, self.dropout = int(heads), float(dropout)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv_dim, width)
        self.v = nn.Linear(kv_dim, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_valid: torch.Tensor | None = None,
                kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, Lq, W) attends to ``kv`` (B, Lk, Dk); ``kv_valid`` (B, Lk) bool marks usable keys.

        With ``kv_index`` (B,), ``kv`` / ``kv_valid`` hold distinct rows (R, Lk, ...) and row ``i`` of
        ``x`` attends to row ``kv_index[i]``: the key / value projections run once per distinct row
        (e.g. once per video when many captions are scored against it).
        """
        b, lq, w = x.shape
        h = self.heads
        k, v = self.k(kv), self.v(kv)
        q = self.q(x)
        if kv_index is not None:
            # group the query rows by the key/value row they read: the rows of one kv row are laid
            # end to end as one longer query sequence (attention treats query positions
            # independently), so keys and values are never copied per query row
            r = kv.shape[0]
            order = torch.argsort(kv_index, stable=True)
            counts = torch.bincount(kv_index, minlength=r)
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.empty_like(kv_index)
            pos[order] = torch.arange(b, device=x.device) - starts[kv_index[order]]
            m = int(counts.max()) if b else 0
            grouped = q.new_zeros(r, m, lq, w)
            grouped[kv_index, pos] = q
            q = grouped.view(r, m * lq, w)
        rows = q.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rows, t.shape[1], h, w // h).transpose(1, 2)

        mask = None if kv_valid is None else kv_valid[:, None, None, :]
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        o = o.transpose(1, 2).reshape(rows, -1, w)
        if kv_index is not None:
            o = o.view(rows, -1, lq, w)[kv_index, pos]
        return self.out(o)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear (BERT intermediate / output)."""

    def __init__(self, width: int, mult: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(round(width * mult))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


def _safe_valid(valid: torch.Tensor) -> torch.Tensor:
    """Rows with no valid key attend to everything (their inputs are zeros) instead of NaN."""
    return valid | ~valid.any(dim=-1, keepdim=True)


class QFormerLayer(nn.Module):
    """One Q-Former layer: self-attn over [queries; text], cross-attn to visual tokens, FFNs."""

    def __init__(self, width: int, heads: int, kv_dim: int, cross: bool = True, text_cross: bool = True,
                 ff_mult: float = 4.0, dropout: float = 0.0, prenorm: bool = False) -> None:
        super().__init__()
        self.prenorm, self.text_cross = bool(prenorm), bool(text_cross)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads, kv_dim, dropout) if cross else None
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.ffn_query = FeedForward(width, ff_mult, dropout)
        self.norm_ffn_query = nn.LayerNorm(width)
        self.ffn_text = FeedForward(width, ff_mult, dropout)
        self.norm_ffn_text = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def _res(self, x: torch.Tensor, norm: nn.LayerNorm, fn: Any) -> torch.Tensor:
        if self.prenorm:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor,
                visual: torch.Tensor, visual_valid: torch.Tensor | None,
                visual_index: torch.Tensor | None = None, expand: int = 1,
                need_text: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, Q, W), (B, L, W) -> updated (queries, text); ``visual_index`` as in ``CrossAttention``.

        ``expand`` > 1: every input row stands for ``expand`` consecutive rows of ``visual_index``
        (e.g. one pair's frames); the self-attention, which does not see the visual tokens, runs
        once per input row and its output is repeated before the cross attention. Outputs have
        ``B * expand`` rows. ``need_text=False`` (a last layer whose text outputs nobody reads)
        computes the query rows only: attention and feed-forward act row by row after the
        self-attention's keys and values, so the query outputs are the same.
        """
        nq = queries.shape[1]
        x = torch.cat([queries, text], dim=1)
        pad = torch.cat([text_valid.new_zeros(text_valid.shape[0], nq), ~text_valid], dim=1)
        if need_text:
            x = self._res(x, self.norm_self,
                          lambda h: self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
        elif self.prenorm:
            h = self.norm_self(x)
            x = x[:, :nq] + self.drop(self.self_attn(h[:, :nq], h, h, key_padding_mask=pad, need_weights=False)[0])
        else:
            x = self.norm_self(x[:, :nq] + self.drop(
                self.self_attn(x[:, :nq], x, x, key_padding_mask=pad, need_weights=False)[0]))
        if expand > 1:
            x = x.repeat_interleave(expand, dim=0)
        if self.cross_attn is not None:
            vv = None if visual_valid is None else _safe_valid(visual_valid)
            if self.text_cross or not need_text:
                x = self._res(x, self.norm_cross, lambda h: self.cross_attn(h, visual, vv, visual_index))
            else:
                q = self._res(x[:, :nq], self.norm_cross,
                              lambda h: self.cross_attn(h, visual, vv, visual_index))
                x = torch.cat([q, x[:, nq:]], dim=1)
        q = self._res(x[:, :nq], self.norm_ffn_query, self.ffn_query)
        t = self._res(x[:, nq:], self.norm_ffn_text, self.ffn_text) if need_text else None
        return q, t


class QFormer(nn.Module):
    """A stack of ``QFormerLayer`` (cross attention in layers ``i % cross_every == 0``)."""

    def __init__(self, layers: int, width: int, heads: int, kv_dim: int, cross_every: int = 1,
                 text_cross: bool = True, ff_mult: float = 4.0, dropout: float = 0.0,
                 prenorm: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            QFormerLayer(width, heads, kv_dim, cross=(i % cross_every == 0), text_cross=text_cross,
                         ff_mult=ff_mult, dropout=dropout, prenorm=prenorm)
            for i in range(layers))
        self.final_norm = nn.LayerNorm(width) if prenorm else nn.Identity()

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor,
                visual: torch.Tensor, visual_valid: torch.Tensor | None,
                visual_index: torch.Tensor | None = None, expand: int = 1,
                need_text: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the stack; ``expand`` and ``need_text`` as in ``QFormerLayer.forward`` (the first
        layer expands, the last one skips the text rows when ``need_text`` is False)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            queries, text = layer(queries, text, text_valid, visual, visual_valid, visual_index,
                                  expand=expand if i == 0 else 1, need_text=need_text or i < last)
            if i == 0 and expand > 1:
                text_valid = text_valid.repeat_interleave(expand, dim=0)
        return self.final_norm(queries), None if text is None else self.final_norm(text)

    def forward_text(self, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """Text alone through the stack (self-attention and the text feed-forward, no queries and no
        cross attention): BLIP-2's unimodal text encoding for its contrastive (ITC) objective."""
        pad = ~text_valid
        for layer in self.layers:
            text = layer._res(text, layer.norm_self,
                              lambda h: layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
            text = layer._res(text, layer.norm_ffn_text, layer.ffn_text)
        return self.final_norm(text)


def straight_through_topk(scores: torch.Tensor, k: int, keep_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable top-k selection weights over the last axis.

    ``scores`` (..., N) -> (weights (..., k, N), index (..., k)). Forward: one-hot rows of the k
    highest-scoring positions (position 0 always first when ``keep_first``); backward: the gradient
    of ``softmax(scores)`` (straight-through estimator).
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} tokens")
    soft = scores.softmax(dim=-1)
    if keep_first:
        rest = scores[..., 1:].topk(k - 1, dim=-1).indices + 1 if k > 1 else scores[..., :0].long()
        index = torch.cat([torch.zeros_like(scores[..., :1], dtype=torch.long), rest], dim=-1)
    else:
        index = scores.topk(k, dim=-1).indices
    hard = F.one_hot(index, n).to(scores.dtype)  # (..., k, N)
    weights = hard + soft.unsqueeze(-2) - soft.unsqueeze(-2).detach()
    return weights, index


def pick_frames(frame_mask: torch.Tensor, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced valid frames: ``(index (B, F), valid (B, F))`` with ``F = min(count, T)``.

    A video with ``n <= F`` valid frames gets all of them (the rest of its slots are invalid);
    otherwise frame ``floor((j + 0.5) n / F)`` of its valid frames, in time order.
    """
    b, t = frame_mask.shape
    f = t if count is None else min(int(count), t)
    mask = frame_mask.bool()
    ar = torch.arange(t, device=mask.device)
    order = torch.sort(torch.where(mask, ar, ar + t), dim=1).indices  # valid frames first, in order
    n = mask.sum(dim=1, keepdim=True)
    j = torch.arange(f, device=mask.device)[None, :]
    spaced = torch.div((2 * j + 1) * n, 2 * f, rounding_mode="floor")
    pos = torch.where(n <= f, j, spaced).clamp(max=t - 1)
    return order.gather(1, pos), j < n


def _standardised_linear(x: torch.Tensor, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``linear((x - mean) / std)`` with the standardisation folded into the weights
    (``W / std`` and ``b - (W / std) @ mean``): the per-element work on the wide frozen tokens
    is skipped; equal up to float rounding."""
    w = linear.weight / std
    return F.linear(x.float(), w, linear.bias - w @ mean)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    w = valid.to(x.dtype)
    while w.dim() < x.dim():
        w = w.unsqueeze(-1)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------
class StageTwoHead(nn.Module):
    """Common parts: standardiser, input projections, the 2-way classifier, ``score``."""

    name = "base"

    def __init__(self, token_dim: int, text_dim: int, width: int, visual_proj: bool = True) -> None:
        super().__init__()
        self.token_dim, self.text_dim, self.width = int(token_dim), int(text_dim), int(width)
        self.standardizer = TokenStandardizer(token_dim, text_dim)
        self.visual_proj: nn.Module = nn.Linear(token_dim, width) if visual_proj else nn.Identity()
        self.text_proj = nn.Linear(text_dim, width)
        self.fc = nn.Linear(width, 2)
        self._cfg: dict[str, Any] = {}

    def _visual(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised, projected visual tokens (B, T, N, W) (padding frames -> 0 before the
        projection) and the bool mask."""
        fm = frame_mask.bool()
        if isinstance(self.visual_proj, nn.Linear):
            std = self.standardizer
            vis = _standardised_linear(tokens, self.visual_proj, std.visual_mean, std.visual_std)
            return torch.where(fm[:, :, None, None], vis, self.visual_proj.bias), fm
        vis = self.standardizer.visual(tokens)
        vis = torch.where(fm[:, :, None, None], vis, torch.zeros((), device=vis.device))
        return self.visual_proj(vis), fm

    def _text(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised, projected text tokens (B, L, W) (padding -> 0 before the projection) and
        the usable-token mask."""
        tm = text_mask.bool()
        std = self.standardizer
        txt = _standardised_linear(text_tokens, self.text_proj, std.text_mean, std.text_std)
        return torch.where(tm[:, :, None], txt, self.text_proj.bias), _safe_valid(tm)

    def encode_video(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text-independent part of the head for ``V`` videos: a dict of (V, ...) tensors."""
        raise NotImplementedError

    def match(self, video: dict[str, torch.Tensor], pair_video: torch.Tensor, text_tokens: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
        """Match logits (P, 2) of caption ``i`` with video row ``pair_video[i]`` of ``video``."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, frame_mask: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """Match logits (B, 2) of ``B`` aligned (video, text) pairs."""
        video = self.encode_video(tokens, frame_mask)
        return self.match(video, torch.arange(tokens.shape[0], device=tokens.device), text_tokens, text_mask)

    def pair_logits(self, tokens: torch.Tensor, frame_mask: torch.Tensor, text_tokens: torch.Tensor,
                    text_mask: torch.Tensor, pair_video: torch.Tensor, pair_text: torch.Tensor) -> torch.Tensor:
        """Match logits (P, 2) of pairs (video row ``pair_video[i]``, caption row ``pair_text[i]``).

        ``tokens`` / ``frame_mask`` hold each distinct video once: its text-independent work
        (``encode_video``) is done once however many captions it is paired with. Equal to
        ``forward`` on the expanded pairs.
        """
        video = self.encode_video(tokens, frame_mask)
        return self.match(video, pair_video, text_tokens[pair_text], text_mask[pair_text])

    def score(self, tokens: torch.Tensor, frame_mask: torch.Tensor, text_tokens: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
        """(B,) match log-odds ``logit[1] - logit[0]`` of each pair."""
        logits = self(tokens, frame_mask, text_tokens, text_mask)
        return logits[:, 1] - logits[:, 0]

    def pair_score(self, *args: torch.Tensor, parts: bool = False) -> torch.Tensor:
        """(P,) match log-odds of the pairs of ``pair_logits(*args)``; ``parts=True``: (P, 2) of
        (ITM log-odds, contrastive logit), the latter 0 for a head without one."""
        logits = self.pair_logits(*args)
        itm = logits[:, 1] - logits[:, 0]
        return torch.stack([itm, torch.zeros_like(itm)], dim=1) if parts else itm

    def config(self) -> dict[str, Any]:
        """JSON-able keyword arguments for ``build_stage_two(**config)``."""
        return {"name": self.name, "token_dim": self.token_dim, "text_dim": self.text_dim, **self._cfg}


class CrossTVR(StageTwoHead):
    """Decoupled spatial / temporal text-video cross attention (see module docstring)."""

    name = "crosstvr"

    def __init__(self, token_dim: int, text_dim: int, width: int = 128, layers: int = 2, heads: int = 4,
                 num_queries: int = 8, num_selected: int = 4, mode: str = "both", shared: bool = True,
                 text_cross: bool = True, spatial_frames: int | None = 4, keep_cls: bool = True,
                 cross_every: int = 1, ff_mult: float = 4.0, dropout: float = 0.0, prenorm: bool = False,
                 visual_proj: bool = True, max_frames: int = 64, token_pos: bool = False,
                 max_tokens: int = 257, itc_dim: int = 0) -> None:
        if mode not in ("spatial", "temporal", "both"):
            raise ValueError(f"mode must be 'spatial', 'temporal' or 'both', got {mode!r}")
        super().__init__(token_dim, text_dim, width, visual_proj)
        self._cfg = dict(width=int(width), layers=int(layers), heads=int(heads), num_queries=int(num_queries),
                         num_selected=int(num_selected), mode=mode, shared=bool(shared),
                         text_cross=bool(text_cross),
                         spatial_frames=None if spatial_frames is None else int(spatial_frames),
                         keep_cls=bool(keep_cls), cross_every=int(cross_every), ff_mult=float(ff_mult),
                         dropout=float(dropout), prenorm=bool(prenorm), visual_proj=bool(visual_proj),
                         max_frames=int(max_frames))
        # options absent from the config when off, so configs saved before them build the same head
        if token_pos:
            self._cfg.update(token_pos=True, max_tokens=int(max_tokens))
        self.itc_dim = int(itc_dim)
        if self.itc_dim:
            self._cfg.update(itc_dim=self.itc_dim)
            # BLIP-2's vision_proj / text_proj and temperature (contrastive objective, heads.itc)
            self.itc_vision = nn.Linear(width, self.itc_dim)
            self.itc_text = nn.Linear(width, self.itc_dim)
            self.itc_logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.mode, self.shared = mode, bool(shared)
        self.num_selected, self.keep_cls = int(num_selected), bool(keep_cls)
        self.spatial_frames = self._cfg["spatial_frames"]
        kv_dim = width if visual_proj else token_dim
        stack = dict(layers=layers, width=width, heads=heads, kv_dim=kv_dim, cross_every=cross_every,
                     text_cross=text_cross, ff_mult=ff_mult, dropout=dropout, prenorm=prenorm)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.token_pos = nn.Parameter(torch.randn(int(max_tokens), kv_dim) * 0.02) if token_pos else None
        self.block = QFormer(**stack)
        self.temporal_block: QFormer | None = None
        if mode != "spatial":
            self.temporal_block = self.block if shared else QFormer(**stack)
            self.selector = nn.Sequential(nn.LayerNorm(kv_dim), nn.Linear(kv_dim, width // 2), nn.GELU(),
                                          nn.Linear(width // 2, 1))
            self.frame_pos = nn.Parameter(torch.randn(max_frames, kv_dim) * 0.02)

    def select_tokens(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, N, W) tokens -> (selected (B, T, M, W), index (B, T, M)); straight-through top-k."""
        scores = self.selector(visual).squeeze(-1)  # (B, T, N)
        weights, index = straight_through_topk(scores, self.num_selected, keep_first=self.keep_cls)
        return weights @ visual, index

    def encode_video(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text-independent: the spatial pass's frames and the temporal pass's selected tokens."""
        vis, fm = self._visual(tokens, frame_mask)
        b, t, n, w = vis.shape
        if self.token_pos is not None:
            if n > self.token_pos.shape[0]:
                raise ValueError(f"{n} tokens per frame > max_tokens {self.token_pos.shape[0]} of this head")
            vis = vis + self.token_pos[:n]
        out: dict[str, torch.Tensor] = {}
        if self.mode in ("spatial", "both"):
            idx, valid = pick_frames(fm, self.spatial_frames)  # (B, F)
            out["frames"] = vis.gather(1, idx[:, :, None, None].expand(-1, -1, n, w))  # (B, F, N, W)
            out["frame_valid"] = valid
        if self.mode in ("temporal", "both"):
            if t > self.frame_pos.shape[0]:
                raise ValueError(f"{t} frames > max_frames {self.frame_pos.shape[0]} of this head")
            selected, _ = self.select_tokens(vis)  # (B, T, M, W)
            selected = selected + self.frame_pos[:t, None, :]
            m = selected.shape[2]
            out["keys"] = selected.reshape(b, t * m, -1)
            out["key_valid"] = fm.unsqueeze(-1).expand(-1, -1, m).reshape(b, t * m)
        return out

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
            queries = _masked_mean(q_out.view(p, f, -1, q_out.shape[-1]), video["frame_valid"][pair_video], dim=1)
        if "keys" in video:
            assert self.temporal_block is not None
            queries, _ = self.temporal_block(queries, txt, tv, video["keys"], video["key_valid"], pair_video,
                                             need_text=False)
        return queries

    def match(self, video: dict[str, torch.Tensor], pair_video: torch.Tensor, text_tokens: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
        txt, tv = self._text(text_tokens, text_mask)
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
        """Masked mean (C, W) of the text tokens passed alone through the (spatial) block stack."""
        txt, tv = self._text(text_tokens, text_mask)
        return _masked_mean(self.block.forward_text(txt, tv), tv, dim=1)

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

    def pair_score(self, tokens: torch.Tensor, frame_mask: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor, pair_video: torch.Tensor, pair_text: torch.Tensor,
                   text_embed: torch.Tensor | None = None, parts: bool = False) -> torch.Tensor:
        """(P,) match score of the pairs: the ITM log-odds, plus, for a head with a contrastive
        projection (``itc_dim`` > 0), the ITC logit of the pair (BLIP-2's retrieval rule, ITM + ITC).
        The ITC part costs one text-free pass per distinct video and one text pass per caption;
        ``text_embed`` (C, itc_dim), rows aligned with ``text_tokens``, supplies the captions'
        ``itc_text_embed`` computed beforehand. ``parts=True`` returns (P, 2): the ITM log-odds and
        the ITC logit (0 without a contrastive projection), whose sum is the score."""
        video = self.encode_video(tokens, frame_mask)
        logits = self.match(video, pair_video, text_tokens[pair_text], text_mask[pair_text])
        score = logits[:, 1] - logits[:, 0]
        itc = torch.zeros_like(score)
        if self.itc_dim:
            q = F.normalize(self.itc_vision(self.video_queries(video)), dim=-1)[pair_video]  # (P, Q, D)
            if text_embed is None:
                text_embed = self.itc_text_embed(text_tokens, text_mask)
            elif tuple(text_embed.shape) != (text_tokens.shape[0], self.itc_dim):
                raise ValueError(f"text_embed has shape {tuple(text_embed.shape)}, expected "
                                 f"({text_tokens.shape[0]}, {self.itc_dim})")
            t = text_embed[pair_text]
            itc = self._itc_scale() * torch.einsum("pqd,pd->pq", q, t).amax(dim=-1)
        if parts:
            return torch.stack([score, itc], dim=1)
        return score + itc if self.itc_dim else score

    def score(self, tokens: torch.Tensor, frame_mask: torch.Tensor, text_tokens: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
        """(B,) match score of ``B`` aligned pairs (as ``pair_score``)."""
        ar = torch.arange(tokens.shape[0], device=tokens.device)
        return self.pair_score(tokens, frame_mask, text_tokens, text_mask, ar, ar)


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
        text = self.norm1(text + self.cross(text, video, _safe_valid(video_valid)))
        text = self.norm2(text + self.self_attn(text, text, text, key_padding_mask=~text_valid,
                                                need_weights=False)[0])
        return self.norm3(text + self.ffn(text))


class T2V2T(StageTwoHead):
    """Text-to-video bypass cross attention, then video-to-text attention (see module docstring)."""

    name = "t2v2t"

    def __init__(self, token_dim: int, text_dim: int, width: int = 128, layers: int = 1, heads: int = 4,
                 spatial_frames: int | None = 4, ff_mult: float = 4.0, dropout: float = 0.0,
                 max_frames: int = 64) -> None:
        super().__init__(token_dim, text_dim, width)
        self._cfg = dict(width=int(width), layers=int(layers), heads=int(heads),
                         spatial_frames=None if spatial_frames is None else int(spatial_frames),
                         ff_mult=float(ff_mult), dropout=float(dropout), max_frames=int(max_frames))
        self.spatial_frames = self._cfg["spatial_frames"]
        self.t2v = nn.ModuleList(_BypassLayer(width, heads, ff_mult, dropout) for _ in range(layers))
        self.v2t = nn.ModuleList(_V2TLayer(width, heads, ff_mult, dropout) for _ in range(layers))
        self.frame_pos = nn.Parameter(torch.randn(max_frames, width) * 0.02)

    def encode_video(self, tokens: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text-independent: the picked frames' projected tokens with their frame-position embedding."""
        vis, fm = self._visual(tokens, frame_mask)
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

    def match(self, video: dict[str, torch.Tensor], pair_video: torch.Tensor, text_tokens: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
        txt, tv = self._text(text_tokens, text_mask)
        fused = self.fuse_frames(video["frames"][pair_video], txt, tv)
        p, f, n, w = fused.shape
        valid = video["frame_valid"][pair_video]
        video_valid = valid.unsqueeze(-1).expand(-1, -1, n).reshape(p, f * n)
        text = txt
        for layer in self.v2t:
            text = layer(text, tv, fused.reshape(p, f * n, w), video_valid)
        return self.fc(_masked_mean(text, tv, dim=1))


STAGE_TWO: dict[str, type[StageTwoHead]] = {"crosstvr": CrossTVR, "t2v2t": T2V2T}


def build_stage_two(name: str, token_dim: int, text_dim: int, **cfg: Any) -> StageTwoHead:
    """Build the stage-two head ``name`` for ``token_dim``-d visual / ``text_dim``-d text tokens."""
    if name not in STAGE_TWO:
        from heads import UnknownHeadError

        raise UnknownHeadError(f"unknown stage-two head {name!r}; known heads: {', '.join(sorted(STAGE_TWO))}")
    return STAGE_TWO[name](token_dim, text_dim, **cfg)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
