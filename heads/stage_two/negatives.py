"""Negatives for ITM training, mined from stage one's similarities, and the per-epoch plan of pairs.

Each training step takes ``B`` positive (caption, video) pairs (one caption per video and epoch,
``EpochSampler``) and builds ``3B`` pairs for the 2-way match classifier: the ``B`` positives
(label 1), for every caption one negative video, and for every video one negative caption
(label 0). A negative is either *hard*, drawn from the softmax of the stage-one similarities over
the whole train split (``HardNegativeSampler``: temperature, restricted to the ``pool`` most
similar candidates, positives excluded), or *random*, the partner of another pair of the same
batch. ``hard_fraction`` gives the share of hard negatives at each step: ``random``, ``hard``, or
``anneal`` (random only for a first share of the steps, then a linear rise to all hard).

Hard negatives come from one of two stage-one similarities (``neg_source``): *text*, caption to
video (the candidates stage one confuses with the caption), or *video*, video to video
(``VideoNeighbourSimilarity``: a caption's negative is one of its own video's nearest videos, a
video's negative a caption of one of its nearest videos). Video-to-video neighbours are mostly
near-duplicates, clips that share almost everything with the positive; on the synthetic benchmark
83% of train videos' nearest video is a member of their near-duplicate group, while only 7% of the
caption-to-video hard negatives are (BENCHMARKS.md). ``MixedNegatives`` draws each hard negative
from either source at even odds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from heads.stage_two.config import HARD_NEGATIVE_MODES
from heads.training.data import EpochSampler, blocks


class HardNegativeSampler:
    """Samples negatives from the softmax of stage-one similarities, positives excluded.

    ``sim`` (C, V) holds caption x video similarities of one split (any array, read in row and
    column blocks), ``caption_video`` (C,) each caption's video row. For caption ``c`` a negative
    video ``v != caption_video[c]`` is drawn with probability ``softmax(sim[c] / temperature)``
    renormalised over the ``pool`` most similar non-positive videos (``pool=None``: all of them);
    for video ``v`` a negative caption of another video likewise from ``sim[:, v]``, among the
    ``caption_pool`` most similar captions (default: ``pool``). Only the ``(rows, pool)`` candidate
    tables are kept in memory.
    """

    def __init__(self, sim: Any, caption_video: np.ndarray, temperature: float = 0.05,
                 pool: int | None = 128, block: int = 1024, caption_pool: int | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        cv = np.asarray(caption_video, dtype=np.int64)
        num_c, num_v = int(sim.shape[0]), int(sim.shape[1])
        if cv.shape != (num_c,):
            raise ValueError(f"caption_video has shape {cv.shape}, similarity has {num_c} captions")
        if num_v < 2:
            raise ValueError(f"need at least 2 videos to sample negatives, got {num_v}")
        self.temperature = float(temperature)
        self.caption_video = cv
        k_v = num_v - 1 if pool is None else max(1, min(int(pool), num_v - 1))
        self.text_cand = np.empty((num_c, k_v), dtype=np.int64)
        self.text_logit = np.empty((num_c, k_v), dtype=np.float64)
        for sl in blocks(num_c, block):
            s = np.array(sim[sl], dtype=np.float64)
            s[np.arange(s.shape[0]), cv[sl]] = -np.inf
            self.text_cand[sl], self.text_logit[sl] = top_candidates(s, k_v)
        pool_c = pool if caption_pool is None else caption_pool
        k_c = num_c - 1 if pool_c is None else max(1, min(int(pool_c), num_c - 1))
        self.video_cand = np.empty((num_v, k_c), dtype=np.int64)
        self.video_logit = np.empty((num_v, k_c), dtype=np.float64)
        for sl in blocks(num_v, block):
            s = np.array(sim[:, sl], dtype=np.float64).T  # (b, C)
            own = cv[None, :] == np.arange(sl.start, sl.stop)[:, None]
            s[own] = -np.inf
            self.video_cand[sl], self.video_logit[sl] = top_candidates(s, k_c)

    def _draw(self, cand: np.ndarray, logit: np.ndarray, rows: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        z = logit[rows] / self.temperature
        finite = np.isfinite(z)
        if not finite.any(axis=1).all():
            bad = rows[~finite.any(axis=1)][:5].tolist()
            raise ValueError(f"rows {bad} have no negative candidate (every other row is a positive)")
        mx = np.max(np.where(finite, z, -np.inf), axis=1, keepdims=True)
        p = np.where(finite, np.exp(np.where(finite, z, 0.0) - mx), 0.0)
        cum = np.cumsum(p, axis=1)
        u = rng.random(rows.size) * cum[:, -1]
        pick = (cum <= u[:, None]).sum(axis=1)
        # round-off could step past the last candidate with probability > 0: clamp to it
        last_valid = finite.shape[1] - 1 - np.argmax(finite[:, ::-1], axis=1)
        return cand[rows, np.minimum(pick, last_valid)]

    def negative_videos(self, captions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One negative video row per caption row."""
        return self._draw(self.text_cand, self.text_logit, captions, rng)

    def negative_texts(self, videos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One negative caption row (of another video) per video row."""
        return self._draw(self.video_cand, self.video_logit, videos, rng)


class VideoNeighbourSimilarity:
    """The ``(C, V)`` similarity of each caption's video to every video, as an array-like read in
    row or column blocks (``sim[rows]``, ``sim[:, cols]``) and computed on access from unit video
    embeddings, so the ``C x V`` matrix is never held whole. ``video_emb`` (V, D) any video
    embeddings (normalised here); ``caption_video`` (C,) each caption's video row."""

    def __init__(self, video_emb: Any, caption_video: np.ndarray) -> None:
        e = np.asarray(video_emb, dtype=np.float32)
        self.emb = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        self.caption_video = np.asarray(caption_video, dtype=np.int64)
        self.shape = (int(self.caption_video.size), int(e.shape[0]))

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        return self.emb[self.caption_video[rows]] @ self.emb[cols].T


def video_sampler(video_emb: Any, caption_video: np.ndarray, temperature: float, pool: int) -> HardNegativeSampler:
    """A ``HardNegativeSampler`` over video-to-video similarity: a caption's negative among its
    video's ``pool`` nearest videos, a video's negative among the captions of about as many nearest
    videos (``pool`` times the most captions any video has)."""
    cv = np.asarray(caption_video, dtype=np.int64)
    per_video = int(np.bincount(cv).max()) if cv.size else 1
    return HardNegativeSampler(VideoNeighbourSimilarity(video_emb, cv), cv, temperature, pool,
                               caption_pool=pool * per_video)


class MixedNegatives:
    """Each hard negative drawn from ``first`` or ``second`` (two ``HardNegativeSampler``) at even
    odds. ``text_cand`` (a caption's nearest videos, for clustered contrastive batches) is
    ``second``'s."""

    def __init__(self, first: HardNegativeSampler, second: HardNegativeSampler) -> None:
        self.first, self.second = first, second

    @property
    def text_cand(self) -> np.ndarray:
        return self.second.text_cand

    def negative_videos(self, captions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a, b = self.first.negative_videos(captions, rng), self.second.negative_videos(captions, rng)
        return np.where(rng.random(a.size) < 0.5, a, b)

    def negative_texts(self, videos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a, b = self.first.negative_texts(videos, rng), self.second.negative_texts(videos, rng)
        return np.where(rng.random(a.size) < 0.5, a, b)


def top_candidates(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest entries per row (descending)."""
    if k < s.shape[1]:
        idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(s.shape[1]), s.shape).copy()
    val = np.take_along_axis(s, idx, axis=1)
    order = np.argsort(-val, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1)


def hard_fraction(mode: str, step: int, total: int, anneal: float, start: float = 0.0) -> float:
    """Share of hard negatives at ``step`` of ``total`` for ``mode`` (random / hard / anneal).

    ``anneal``: 0 for the first ``start`` fraction of the steps (random negatives only), then a
    linear rise to 1 over the next ``anneal`` fraction.
    """
    if mode == "random":
        return 0.0
    if mode == "hard":
        return 1.0
    if mode != "anneal":
        raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_MODES}, got {mode!r}")
    begin, span = start * total, anneal * total
    if step < begin:
        return 0.0
    return 1.0 if span <= 0 else float(min(1.0, (step - begin) / span))


@dataclass
class PlanItem:
    video: np.ndarray  # (B,) positive videos
    caption: np.ndarray  # (B,) their captions
    neg_video: np.ndarray  # (B,) negative video for each caption
    neg_caption: np.ndarray  # (B,) negative caption for each video
    hard_share: float  # intended share of hard negatives at this step

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(caption rows, video rows, labels)`` of the step's ``3B`` pairs: positives, (caption,
        negative video), (negative caption, video)."""
        b = self.video.size
        caption = np.concatenate([self.caption, self.caption, self.neg_caption])
        video = np.concatenate([self.video, self.neg_video, self.video])
        labels = np.concatenate([np.ones(b, np.int64), np.zeros(2 * b, np.int64)])
        return caption, video, labels


def epoch_plan(sampler: EpochSampler, negatives: HardNegativeSampler | MixedNegatives | None, epoch: int, seed: int,
                mode: str, first_step: int, total: int, anneal: float, anneal_start: float = 0.0) -> list[PlanItem]:
    """Deterministic batches of epoch ``epoch``: positives and their negatives (seeded by epoch)."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x5752])
    plan = []
    for i, (c, v) in enumerate(sampler.epoch(epoch)):
        b = v.size
        share = hard_fraction(mode, first_step + i, total, anneal, anneal_start)
        partner = (np.arange(b) + rng.integers(1, b, size=b)) % b  # random in-batch partner
        partner2 = (np.arange(b) + rng.integers(1, b, size=b)) % b
        neg_v, neg_c = v[partner], c[partner2]
        if negatives is not None and share > 0:
            hard_t = rng.random(b) < share
            hard_v = rng.random(b) < share
            hv = negatives.negative_videos(c, rng)
            hc = negatives.negative_texts(v, rng)
            neg_v = np.where(hard_t, hv, neg_v)
            neg_c = np.where(hard_v, hc, neg_c)
        plan.append(PlanItem(v, c, neg_v, neg_c, share))
    return plan
