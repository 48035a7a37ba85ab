"""Building blocks of the stage-two heads: input standardisation, cross attention, the Q-Former
layer and stack, straight-through top-k token selection, evenly spaced frame picking.

``QFormerLayer`` follows one BLIP-2 Q-Former (BERT) layer: self-attention over ``[queries; text]``
(text padding masked), cross-attention from the queries to visual tokens (with ``text_cross`` the
text tokens cross-attend too), then feed-forward, with separate FFNs for query and text positions.
Post-LN (residual then LayerNorm) by default; ``prenorm=True`` switches to pre-LN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.split import Split


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
    def fit(self, split: Split, max_videos: int = 256, max_captions: int = 2048, seed: int = 0,
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


def safe_valid(valid: torch.Tensor) -> torch.Tensor:
    """Rows with no valid key attend to everything (their inputs are zeros) instead of NaN."""
    return valid | ~valid.any(dim=-1, keepdim=True)


class QFormerLayer(nn.Module):
    """One Q-Former layer: self-attn over [queries; text], cross-attn to visual tokens, FFNs."""

    def __init__(self, width: int, heads: int, kv_dim: int, cross: bool = True, text_cross: bool = True,
                 ff_mult: float = 4.0, dropout: float = 0.0, prenorm: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.prenorm, self.text_cross = bool(prenorm), bool(text_cross)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(width, eps=eps)
        self.cross_attn = CrossAttention(width, heads, kv_dim, dropout) if cross else None
        self.norm_cross = nn.LayerNorm(width, eps=eps) if cross else None
        self.ffn_query = FeedForward(width, ff_mult, dropout)
        self.norm_ffn_query = nn.LayerNorm(width, eps=eps)
        self.ffn_text = FeedForward(width, ff_mult, dropout)
        self.norm_ffn_text = nn.LayerNorm(width, eps=eps)
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
            vv = None if visual_valid is None else safe_valid(visual_valid)
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
    """A stack of ``QFormerLayer`` (cross attention in layers ``i % cross_every == 0``).

    ``embed_norm=True`` applies one LayerNorm to the stack's inputs, queries and text alike (it
    acts per position, so this equals BLIP-2's LayerNorm over the concatenated ``[queries; text]``
    embeddings). ``checkpointing = True`` (an attribute, set by the trainer) recomputes each
    layer's activations in the backward pass instead of keeping them (training only).
    """

    def __init__(self, layers: int, width: int, heads: int, kv_dim: int, cross_every: int = 1,
                 text_cross: bool = True, ff_mult: float = 4.0, dropout: float = 0.0,
                 prenorm: bool = False, eps: float = 1e-5, embed_norm: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            QFormerLayer(width, heads, kv_dim, cross=(i % cross_every == 0), text_cross=text_cross,
                         ff_mult=ff_mult, dropout=dropout, prenorm=prenorm, eps=eps)
            for i in range(layers))
        self.final_norm = nn.LayerNorm(width, eps=eps) if prenorm else nn.Identity()
        self.embed_norm = nn.LayerNorm(width, eps=eps) if embed_norm else None
        self.embed_drop = nn.Dropout(dropout)
        self.checkpointing = False

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.embed_norm is None else self.embed_drop(self.embed_norm(x))

    def _run(self, layer: nn.Module, *args: Any, **kw: Any) -> Any:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, *args, use_reentrant=False, **kw)
        return layer(*args, **kw)

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor,
                visual: torch.Tensor, visual_valid: torch.Tensor | None,
                visual_index: torch.Tensor | None = None, expand: int = 1,
                need_text: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the stack; ``expand`` and ``need_text`` as in ``QFormerLayer.forward`` (the first
        layer expands, the last one skips the text rows when ``need_text`` is False)."""
        last = len(self.layers) - 1
        queries, text = self._embed(queries), self._embed(text)
        for i, layer in enumerate(self.layers):
            queries, text = self._run(layer, queries, text, text_valid, visual, visual_valid, visual_index,
                                      expand=expand if i == 0 else 1, need_text=need_text or i < last)
            if i == 0 and expand > 1:
                text_valid = text_valid.repeat_interleave(expand, dim=0)
        return self.final_norm(queries), None if text is None else self.final_norm(text)

    def forward_text(self, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """Text alone through the stack (self-attention and the text feed-forward, no queries and no
        cross attention): BLIP-2's unimodal text encoding for its contrastive (ITC) objective."""
        pad = ~text_valid
        text = self._embed(text)
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


def standardised_linear(x: torch.Tensor, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``linear((x - mean) / std)`` with the standardisation folded into the weights
    (``W / std`` and ``b - (W / std) @ mean``): the per-element work on the wide frozen tokens
    is skipped; equal up to float rounding.

    Under autocast the matmul rounds its inputs to 16 bits, and a channel with a large mean (ViT
    tokens have a few) would lose its variation to that rounding before the mean is taken off: there
    the tokens are centred in float32 first (``W / std`` still folded), so the 16-bit inputs are the
    deviations themselves. Without autocast the fully folded float32 path is unchanged."""
    w = linear.weight / std
    if torch.is_autocast_enabled(x.device.type):
        centred = x.to(torch.float32, copy=True).sub_(mean)
        return F.linear(centred, w, linear.bias)
    return F.linear(x.float(), w, linear.bias - w @ mean)


def masked_mean(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    w = valid.to(x.dtype)
    while w.dim() < x.dim():
        w = w.unsqueeze(-1)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1.0)
