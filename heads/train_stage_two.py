"""Stage-two trainer: video-text matching (ITM) with hard negatives mined from stage one.

For CrossTVR the run starts (by default) with ``itc_steps`` of BLIP-2-style contrastive
pre-training (``heads.itc``), and every ITM step adds the contrastive loss of its positives
(``itc_weight``); the head then scores a pair by ITM log-odds + ITC logit. Measured on the
synthetic benchmark (BENCHMARKS.md, third round): ITM from scratch learnt none of the
one-attribute differences, while the contrastive phase taught the queries where a caption's
details are in the patch tokens; without it (``itc_steps=0, itc_weight=0``) the trainer is the
paper's ITM recipe alone.

Each training step takes ``B`` positive (video, caption) pairs (one caption per video and epoch,
``heads.data.EpochSampler``) and builds ``3B`` pairs for the 2-way match classifier:

* the ``B`` positives (label 1);
* for every caption one negative video (label 0);
* for every video one negative caption (label 0).

A negative is either *hard*, drawn from the softmax of the stage-one similarities over the
whole train split (temperature ``neg_temperature``, restricted to the ``neg_pool`` most similar
candidates, the positives excluded: the caption's own video, or every caption of the video), or
*random*, the partner of another pair of the same batch. ``hard_negatives="anneal"`` (default)
uses random negatives only for the first ``anneal_start`` fraction of the steps (0.4), then
raises the share of hard ones linearly to 1 over the next ``anneal`` fraction (0.3): a head that
has not learnt basic text-video binding yet collapses to "no match" on hard negatives (measured on
the synthetic benchmark: annealing from step 0 at lr 5e-4 ended at the class prior, while 0.4 of
random steps first reached 84% train ITM accuracy); ``"hard"`` and ``"random"`` use one kind
throughout. The default lr 5e-4: at 2e-3 the head stayed at the class-prior loss even on random
negatives (BENCHMARKS.md, stage-two diagnostics).

The head's ``TokenStandardizer`` is fitted on the train split before the first step. AdamW with
a cosine schedule after a linear warm-up. Batches are read from the split's memory-mapped arrays
(only their rows, ``heads.data.gather_rows``) by a background thread. Every epoch ends with a
model-selection pass on the val split (never test): the head re-ranks the stage-one top
``val_k`` videos of up to ``val_queries`` val captions (final score = cosine + head log-odds)
and the epoch with the best re-ranked T2V R@1 (ties: balanced ITM accuracy on those pairs) is
kept. After every epoch ``train_state.pt`` holds the model, optimizer, scheduler and RNG state,
so an interrupted run (or one stopped by ``max_steps``) continues where it stopped and ends with
exactly the weights of an uninterrupted run on CPU.

Files in ``out_dir``: ``stage_two.pt`` (the selected head with its config, the store
fingerprint, the encoder identity, the stage-one identity, the training arguments and history),
``train_state.pt`` (resume state) and ``history.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from heads.data import EpochSampler, blocks, gather_rows
from heads.itc import ITC_STATE_NAME, batch_itc_loss, pretrain_itc, supports_itc
from heads.stage_two import StageTwoHead, build_stage_two
from heads.train import (ForbiddenSplitError, StoreMismatchError, check_not_test, cosine_with_warmup,
                         identity_diff)

__all__ = [
    "RunMismatchError",
    "CHECKPOINT_NAME", "STATE_NAME", "HISTORY_NAME", "HARD_NEGATIVE_MODES", "StageTwoCheckpoint",
    "HardNegativeSampler", "ItmBatch", "ITC_DEFAULTS", "DEFAULT_ITC_DIM", "resolve_itc", "train_stage_two", "load_stage_two", "stage_one_identity",
    "score_pairs", "caption_itc_embed", "load_pairs", "hard_fraction", "rerank_r1", "ForbiddenSplitError",
]

CHECKPOINT_NAME = "stage_two.pt"
STATE_NAME = "train_state.pt"
HISTORY_NAME = "history.json"
HARD_NEGATIVE_MODES = ("random", "hard", "anneal")
# train arguments that may change between an interrupted run and its resumption
_RESUME_FREE = frozenset({"device", "max_steps", "progress", "resume", "num_threads", "prefetch"})
# arguments added after runs were first saved: a saved state without them ran with these values
_ARG_DEFAULTS = {"rank_weight": 0.0, "itc_steps": 0, "itc_batch": 64, "itc_cluster": 1, "itc_lr": 5e-4,
                 "itc_weight": 0.0}


# --------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------
def _stage_one_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "stage_one.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no stage-one checkpoint at {p}")
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_one_identity(stage_one_ckpt_path: str | Path) -> dict:
    """``{"path_name", "sha256", "config", "store_fingerprint"}`` of a stage-one checkpoint file.

    ``path_name`` is ``<run dir>/<file>`` (no absolute path), ``sha256`` the hash of the file.
    """
    p = _stage_one_file(stage_one_ckpt_path)
    raw = torch.load(p, map_location="cpu", weights_only=True)
    return {"path_name": f"{p.parent.name}/{p.name}", "sha256": _sha256(p),
            "config": json.loads(json.dumps(raw.get("config", {}), default=str)),
            "store_fingerprint": str(raw.get("store_fingerprint", ""))}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------------------------
# hard negatives
# --------------------------------------------------------------------------------------------
class RunMismatchError(ValueError):
    """An output directory holds a run of other training arguments (or another stage one / store)."""


class HardNegativeSampler:
    """Samples negatives from the softmax of stage-one similarities, positives excluded.

    ``sim`` (C, V) holds caption x video similarities of one split (any array, read in row and
    column blocks), ``caption_video`` (C,) each caption's video row. For caption ``c`` a negative
    video ``v != caption_video[c]`` is drawn with probability ``softmax(sim[c] / temperature)``
    renormalised over the ``pool`` most similar non-positive videos (``pool=None``: all of them);
    for video ``v`` a negative caption of another video likewise from ``sim[:, v]``. Only the
    ``(rows, pool)`` candidate tables are kept in memory.
    """

    def __init__(self, sim: np.ndarray, caption_video: np.ndarray, temperature: float = 0.05,
                 pool: int | None = 128, block: int = 1024) -> None:
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
            self.text_cand[sl], self.text_logit[sl] = _top(s, k_v)
        k_c = num_c - 1 if pool is None else max(1, min(int(pool), num_c - 1))
        self.video_cand = np.empty((num_v, k_c), dtype=np.int64)
        self.video_logit = np.empty((num_v, k_c), dtype=np.float64)
        for sl in blocks(num_v, block):
            s = np.array(sim[:, sl], dtype=np.float64).T  # (b, C)
            own = cv[None, :] == np.arange(sl.start, sl.stop)[:, None]
            s[own] = -np.inf
            self.video_cand[sl], self.video_logit[sl] = _top(s, k_c)

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


def _top(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
@dataclass
class ItmBatch:
    """Pairs to score: ``tokens[pair_video[i]]`` with ``text_tokens[pair_text[i]]``, label ``labels[i]``.

    Only the distinct video / caption rows are held; text tokens are cut to the longest caption
    of the batch (the rest is padding).
    """

    tokens: torch.Tensor  # (Vb, T, N, D) as stored (float16 usually)
    frame_mask: torch.Tensor  # (Vb, T) bool
    text_tokens: torch.Tensor  # (Cb, L', Dt)
    text_mask: torch.Tensor  # (Cb, L') bool
    pair_video: torch.Tensor  # (P,) int64 into tokens
    pair_text: torch.Tensor  # (P,) int64 into text_tokens
    labels: torch.Tensor  # (P,) int64, 1 = match

    def to(self, device: str | torch.device) -> "ItmBatch":
        """Move every tensor to ``device``."""
        return ItmBatch(*(t.to(device, non_blocking=True) for t in (
            self.tokens, self.frame_mask, self.text_tokens, self.text_mask, self.pair_video,
            self.pair_text, self.labels)))

    def inputs(self, sl: slice = slice(None)) -> tuple[torch.Tensor, ...]:
        """Head inputs ``(tokens, frame_mask, text_tokens, text_mask)`` of pairs ``sl``."""
        v, t = self.pair_video[sl], self.pair_text[sl]
        return self.tokens[v], self.frame_mask[v], self.text_tokens[t], self.text_mask[t]

    def pair_inputs(self) -> tuple[torch.Tensor, ...]:
        """``StageTwoHead.pair_logits`` inputs: distinct rows once, plus the pair index."""
        return self.tokens, self.frame_mask, self.text_tokens, self.text_mask, self.pair_video, self.pair_text


def _require_tokens(split: Any) -> None:
    for name in ("tokens", "frame_mask", "text_tokens", "text_mask"):
        if getattr(split, name, None) is None:
            raise ValueError(f"split {getattr(split, 'split', '?')!r} has no staged {name!r}: stage it "
                             f"with arrays=('frame_emb', 'tokens', 'text') for stage-two heads")


def _text_rows(split: Any, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text tokens and bool mask of caption rows ``caps``, cut to the longest caption among them."""
    tmask = gather_rows(split.text_mask, caps).astype(bool, copy=False)
    length = max(1, int(np.flatnonzero(tmask.any(axis=0)).max(initial=-1)) + 1)
    ttok = np.ascontiguousarray(gather_rows(split.text_tokens, caps)[:, :length])
    return ttok, np.ascontiguousarray(tmask[:, :length])


def load_pairs(split: Any, video_index: np.ndarray, caption_index: np.ndarray,
               labels: np.ndarray | None = None) -> ItmBatch:
    """Read the rows needed for pairs ``(video_index[i], caption_index[i])`` from ``split``."""
    video_index = np.asarray(video_index, dtype=np.int64)
    caption_index = np.asarray(caption_index, dtype=np.int64)
    vids, v_inv = np.unique(video_index, return_inverse=True)
    caps, c_inv = np.unique(caption_index, return_inverse=True)
    tokens = gather_rows(split.tokens, vids)
    fmask = gather_rows(split.frame_mask, vids).astype(bool, copy=False)
    ttok, tmask = _text_rows(split, caps)
    if labels is None:
        labels = np.zeros(video_index.size, dtype=np.int64)
    return ItmBatch(
        tokens=torch.from_numpy(tokens), frame_mask=torch.from_numpy(fmask),
        text_tokens=torch.from_numpy(ttok), text_mask=torch.from_numpy(tmask),
        pair_video=torch.from_numpy(v_inv.reshape(-1).astype(np.int64)),
        pair_text=torch.from_numpy(c_inv.reshape(-1).astype(np.int64)),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)))


_END = object()


def prefetched(items: Sequence[Any], load: Callable[[Any], Any], depth: int = 2) -> Iterator[Any]:
    """Yield ``load(item)`` for each item; ``depth > 0`` loads ahead in a background thread."""
    if depth <= 0:
        for item in items:
            yield load(item)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                value = load(item)
                while not stop.is_set():
                    try:
                        q.put(value, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put(_END)
        except BaseException as exc:  # surfaced in the consumer
            q.put(exc)

    thread = threading.Thread(target=worker, name="itm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = q.get()
            if value is _END:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


@dataclass
class _PlanItem:
    video: np.ndarray  # (B,) positive videos
    caption: np.ndarray  # (B,) their captions
    neg_video: np.ndarray  # (B,) negative video for each caption
    neg_caption: np.ndarray  # (B,) negative caption for each video
    hard_share: float  # intended share of hard negatives at this step

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = self.video.size
        video = np.concatenate([self.video, self.neg_video, self.video])
        caption = np.concatenate([self.caption, self.caption, self.neg_caption])
        labels = np.concatenate([np.ones(b, np.int64), np.zeros(2 * b, np.int64)])
        return video, caption, labels


def _epoch_plan(sampler: EpochSampler, negatives: HardNegativeSampler | None, epoch: int, seed: int,
                mode: str, first_step: int, total: int, anneal: float, anneal_start: float = 0.0) -> list[_PlanItem]:
    """Deterministic batches of epoch ``epoch``: positives and their negatives (seeded by epoch)."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x5752])
    plan = []
    for i, (v, c) in enumerate(sampler.epoch(epoch)):
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
        plan.append(_PlanItem(v, c, neg_v, neg_c, share))
    return plan


def rank_loss(scores: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
    """Pairwise ranking loss on a batch laid out as ``_PlanItem.pairs``: ``[positives (b);
    (negative video, caption) (b); (video, negative caption) (b)]``.

    With ``r = cosine + scores`` (the re-ranking score), the mean of ``softplus(r_neg - r_pos)``
    over both negatives of each positive. Unlike ITM cross-entropy it cannot be lowered by moving
    every score towards the class prior, only by ordering the positive above its negatives; and
    since the cosine is part of ``r``, pairs that stage one already orders by a wide margin give
    little gradient, so the head learns where stage one is wrong or unsure.
    """
    r = cosine.float() + scores
    b = r.shape[0] // 3
    pos, neg_v, neg_c = r[:b], r[b:2 * b], r[2 * b:3 * b]
    return 0.5 * (F.softplus(neg_v - pos).mean() + F.softplus(neg_c - pos).mean())


class StageOneCosine:
    """Stage-one cosine of any (caption row, video row) pair of a split, from unit embeddings
    computed once (V + C rows of the head's output width, not a C x V matrix)."""

    @torch.no_grad()
    def __init__(self, head: Any, split: Any, device: str = "cpu", batch: int = 1024) -> None:
        from heads.data import uses_text_tokens
        from heads.evaluate import encode_texts, encode_videos

        if uses_text_tokens(head):
            raise ValueError(f"rank_weight needs a stage-one head whose text embedding does not depend on "
                             f"the video; {getattr(head, 'name', type(head).__name__)} has text-token "
                             f"alignment: use rank_weight=0")
        was_training = head.training
        head.eval()
        try:
            self.video = encode_videos(head, split, batch, device).float().cpu()
            texts = [encode_texts(head, split, sl, device).float().cpu()
                     for sl in blocks(int(split.text_emb.shape[0]), batch)]
            self.text = torch.cat(texts) if texts else torch.zeros(0, self.video.shape[1])
        finally:
            head.train(was_training)

    def __call__(self, captions: np.ndarray, videos: np.ndarray) -> torch.Tensor:
        c = torch.as_tensor(np.asarray(captions, dtype=np.int64))
        v = torch.as_tensor(np.asarray(videos, dtype=np.int64))
        return (self.text[c] * self.video[v]).sum(-1)


# --------------------------------------------------------------------------------------------
# scoring and model selection
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def caption_itc_embed(head: StageTwoHead, split: Any, caption_rows: np.ndarray, batch: int = 256,
                      device: str = "cpu") -> torch.Tensor:
    """(C, itc_dim) contrastive text embeddings (``itc_text_embed``) of ``caption_rows`` of ``split``."""
    caption_rows = np.asarray(caption_rows, dtype=np.int64)
    out = torch.empty(caption_rows.size, head.itc_dim)
    for sl in blocks(caption_rows.size, batch):
        ttok, tmask = _text_rows(split, caption_rows[sl])
        out[sl] = head.itc_text_embed(torch.from_numpy(ttok).to(device), torch.from_numpy(tmask).to(device)
                                      ).float().cpu()
    return out


@torch.no_grad()
def score_pairs(head: StageTwoHead, split: Any, video_index: np.ndarray, caption_index: np.ndarray,
                batch: int = 128, device: str = "cpu", prefetch: int = 1, progress: bool = False,
                parts: bool = False) -> np.ndarray:
    """(P,) float32 head scores (``pair_score``) of pairs ``(video_index[i], caption_index[i])`` of
    ``split``; ``parts=True``: (P, 2) of ITM log-odds and contrastive logit. A head with a
    contrastive projection gets each caption's text embedding computed once
    (``caption_itc_embed``) rather than once per batch it appears in."""
    _require_tokens(split)
    video_index = np.asarray(video_index, dtype=np.int64)
    caption_index = np.asarray(caption_index, dtype=np.int64)
    if video_index.shape != caption_index.shape:
        raise ValueError(f"{video_index.shape} video rows vs {caption_index.shape} caption rows")
    was_training = head.training
    head.eval()
    out = np.empty((video_index.size, 2) if parts else video_index.size, dtype=np.float32)
    chunks = list(blocks(video_index.size, batch))
    try:
        text_rows = text_embed = None
        if supports_itc(head) and video_index.size:
            text_rows = np.unique(caption_index)
            text_embed = caption_itc_embed(head, split, text_rows, device=device)
        load = lambda sl: (sl, load_pairs(split, video_index[sl], caption_index[sl]))  # noqa: E731
        for sl, b in tqdm(prefetched(chunks, load, prefetch), total=len(chunks), disable=not progress,
                          desc="score pairs", leave=False):
            b = b.to(device)
            extra = {}
            if text_embed is not None:
                # load_pairs orders the batch's captions as np.unique does
                rows = np.searchsorted(text_rows, np.unique(caption_index[sl]))
                extra["text_embed"] = text_embed[torch.from_numpy(rows)].to(device)
            if parts:
                extra["parts"] = True
            out[sl] = head.pair_score(*b.pair_inputs(), **extra).float().cpu().numpy()
    finally:
        head.train(was_training)
    return out


def _sign_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Accuracy of ``scores > 0`` on the positive and negative pairs, and their mean."""
    pred = scores > 0
    pos = float(pred[labels].mean()) if labels.any() else float("nan")
    neg = float((~pred[~labels]).mean()) if (~labels).any() else float("nan")
    return pos, neg, float(np.nanmean([pos, neg]))


def rerank_r1(sim: np.ndarray, caption_video: np.ndarray, top: np.ndarray, head_scores: np.ndarray,
              queries: np.ndarray, itm_scores: np.ndarray | None = None) -> dict[str, float]:
    """T2V R@1 of stage one and re-ranked (cosine + head score) on ``queries`` with candidates ``top``.

    ``top`` (Q, K) candidate videos per query (stage-one order), ``head_scores`` (Q, K). A query
    whose video is not among its candidates keeps stage one's answer (wrong either way). Also the
    sign accuracy on the candidates' true / false pairs of the head score (``score_acc_*``) and of
    its ITM log-odds ``itm_scores`` (``itm_acc_*``; the head score itself when not given).
    """
    cv = np.asarray(caption_video)[queries]
    cos = np.take_along_axis(sim[queries], top, axis=1)
    final = cos + head_scores
    hit1 = top[:, 0] == cv
    best = top[np.arange(top.shape[0]), np.argmax(final, axis=1)] == cv
    in_top = (top == cv[:, None]).any(axis=1)
    labels = top == cv[:, None]
    s_pos, s_neg, s_bal = _sign_accuracy(head_scores, labels)
    i_pos, i_neg, i_bal = _sign_accuracy(head_scores if itm_scores is None else itm_scores, labels)
    return {"stage_one_R@1": 100.0 * float(hit1.mean()), "reranked_R@1": 100.0 * float(best.mean()),
            f"stage_one_R@{top.shape[1]}": 100.0 * float(in_top.mean()),
            "itm_acc_pos": i_pos, "itm_acc_neg": i_neg, "itm_acc_balanced": i_bal,
            "score_acc_pos": s_pos, "score_acc_neg": s_neg, "score_acc_balanced": s_bal}


class _ValSet:
    """Fixed val queries, their stage-one top-K candidates, and the metric of a head on them."""

    def __init__(self, val: Any, sim: np.ndarray, k: int, max_queries: int, seed: int) -> None:
        self.split, self.sim = val, sim
        num_c, num_v = sim.shape
        rng = np.random.default_rng([int(seed), 0x7A1])
        q = num_c if max_queries <= 0 else min(num_c, int(max_queries))
        self.queries = np.sort(rng.choice(num_c, size=q, replace=False))
        k = min(int(k), num_v)
        part = np.argpartition(-sim[self.queries], k - 1, axis=1)[:, :k] if k < num_v else \
            np.broadcast_to(np.arange(num_v), (q, num_v)).copy()
        vals = np.take_along_axis(sim[self.queries], part, axis=1)
        self.top = np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), axis=1)

    def evaluate(self, head: StageTwoHead, batch: int, device: str) -> dict[str, float]:
        vid = self.top.reshape(-1)
        cap = np.repeat(self.queries, self.top.shape[1])
        both = score_pairs(head, self.split, vid, cap, batch=batch, device=device, parts=True)
        itm = both[:, 0].reshape(self.top.shape)
        # the head score exactly as pair_score sums it (float32), so selection matches scoring
        scores = (both[:, 0] + both[:, 1]).reshape(self.top.shape)
        return rerank_r1(self.sim, self.split.caption_video, self.top, scores, self.queries, itm_scores=itm)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
@dataclass
class StageTwoCheckpoint:
    """A loaded stage-two checkpoint: the head (eval mode) and its metadata."""

    head: StageTwoHead
    config: dict
    store_fingerprint: str
    encoder_identity: dict
    stage_one_identity: dict
    train_args: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_stage_two(path: str | Path, expect_encoder_identity: dict | None = None,
                   map_location: str = "cpu") -> StageTwoCheckpoint:
    """Load ``stage_two.pt`` (a file or the run directory holding it).

    Raises ``StoreMismatchError`` naming the differences when ``expect_encoder_identity`` (the
    identity of the store the head is about to be used on) differs from the encoder identity of
    the store it was trained on: the head's input projections only make sense for that encoder.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no stage-two checkpoint at {p}")
    ckpt = torch.load(p, map_location=map_location, weights_only=True)
    missing = {"config", "state_dict", "store_fingerprint", "encoder_identity", "stage_one_identity"} - set(ckpt)
    if missing or ckpt.get("kind") != "stage_two":
        raise ValueError(f"{p} is not a stage-two checkpoint (missing {sorted(missing) or ['kind']})")
    if expect_encoder_identity is not None:
        diff = identity_diff(expect_encoder_identity, ckpt["encoder_identity"])
        if diff:
            raise StoreMismatchError(
                f"stage-two head {p} was trained on tokens of a different encoder than this store: "
                + "; ".join(diff))
    config = dict(ckpt["config"])
    head = build_stage_two(**config)
    head.load_state_dict(ckpt["state_dict"])
    head.eval()
    return StageTwoCheckpoint(head=head, config=config, store_fingerprint=ckpt["store_fingerprint"],
                              encoder_identity=ckpt["encoder_identity"],
                              stage_one_identity=ckpt["stage_one_identity"],
                              train_args=ckpt.get("train_args", {}), history=ckpt.get("history", {}))


ITC_DEFAULTS = {"itc_steps": 1200, "itc_weight": 1.0}
DEFAULT_ITC_DIM = 128   # width of the contrastive projection of a head trained with ITC
ITC_HEADS = ("crosstvr",)


def resolve_itc(head: str, itc_steps: int | None, itc_weight: float | None) -> tuple[int, float]:
    """The contrastive settings a run uses: ``None`` -> ``ITC_DEFAULTS`` for heads with learnable
    queries (``ITC_HEADS``), 0 for the others."""
    has = head in ITC_HEADS
    steps = (ITC_DEFAULTS["itc_steps"] if has else 0) if itc_steps is None else int(itc_steps)
    weight = (ITC_DEFAULTS["itc_weight"] if has else 0.0) if itc_weight is None else float(itc_weight)
    if steps < 0 or weight < 0:
        raise ValueError(f"itc_steps and itc_weight must be >= 0, got {steps} and {weight}")
    return steps, weight


def _param_groups(head: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices; biases, norms, queries and position embeddings exempt."""
    decay, no_decay, seen = [], [], set()
    for name, p in head.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.ndim >= 2 and not name.endswith(("queries", "frame_pos", "token_pos"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
def train_stage_two(
    train: Any,
    val: Any | None,
    stage_one: str | Path,
    out_dir: str | Path,
    head: str = "crosstvr",
    head_cfg: dict | None = None,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    hard_negatives: str = "anneal",
    seed: int = 0,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
    anneal: float = 0.3,
    anneal_start: float = 0.4,
    neg_temperature: float = 0.05,
    neg_pool: int | None = 128,
    val_k: int = 10,
    val_queries: int = 256,
    eval_batch: int = 128,
    num_threads: int | None = None,
    prefetch: int = 2,
    rank_weight: float = 0.0,
    itc_steps: int | None = None,
    itc_batch: int = 64,
    itc_cluster: int = 1,
    itc_lr: float = 5e-4,
    itc_weight: float | None = None,
) -> Path:
    """Train a stage-two head on ``train``; select the epoch on ``val``; return ``stage_two.pt``.

    ``stage_one`` is the stage-one checkpoint whose train-split similarities drive hard-negative
    mining (and whose val top-``val_k`` lists the head re-ranks for model selection).
    ``warmup`` < 1 is a fraction of all steps, otherwise a number of steps; ``anneal`` the
    fraction of the steps over which ``hard_negatives="anneal"`` moves from random to hard
    negatives, after a first ``anneal_start`` fraction of random negatives only
    negatives. ``max_steps`` stops after that many steps in total (the run stays resumable: call
    again with the same arguments). With ``resume`` a matching ``train_state.pt`` in ``out_dir``
    is continued (a finished run returns at once); other arguments than those in that state
    raise ``ValueError``. ``resume=False`` starts afresh. ``rank_weight`` > 0 adds a pairwise
    ranking term on the same pairs (``rank_loss``): the positive's re-ranking score
    ``cosine + head score`` must beat each of its two negatives'. ``itc_steps`` > 0 first runs
    that many steps of contrastive pre-training (``heads.itc.pretrain_itc``: batches of
    ``itc_batch`` videos, clusters of ``itc_cluster`` stage-one neighbours, peak lr ``itc_lr``);
    ``max_steps`` counts those steps too. ``itc_weight`` > 0 adds the contrastive loss of each ITM
    batch's positives (weighted) to the ITM loss, as BLIP-2 trains ITC and ITM together. Either
    one builds the head with a contrastive projection (``itc_dim``, default 128), whose ITC logit
    is then part of the head's score. ``None`` (default) means ``ITC_DEFAULTS`` for a head that
    supports it (crosstvr: 1,200 steps, weight 1; measured on the synthetic benchmark) and 0 for
    the others (t2v2t has no learnable queries). Neither split may be a test split
    (``ForbiddenSplitError``); both must come from one store (``StoreMismatchError``).
    """
    from heads.evaluate import similarity
    from heads.train import load_stage_one

    check_not_test(train, "train")
    _require_tokens(train)
    if val is not None:
        check_not_test(val, "val")
        _require_tokens(val)
        if val.store_fingerprint != train.store_fingerprint:
            raise StoreMismatchError(
                f"train and val splits come from different stores "
                f"({train.store_fingerprint[:12]} vs {val.store_fingerprint[:12]})")
    if hard_negatives not in HARD_NEGATIVE_MODES:
        raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_MODES}, got {hard_negatives!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (random negatives come from the batch), got {batch_size}")
    itc_steps, itc_weight = resolve_itc(head, itc_steps, itc_weight)
    s1_identity = stage_one_identity(stage_one)
    s1 = load_stage_one(stage_one, expect_encoder_identity=train.encoder_identity)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token_dim, text_dim = int(train.tokens.shape[-1]), int(train.text_tokens.shape[-1])
    train_args = _jsonable({
        "head": head, "head_cfg": dict(head_cfg or {}), "epochs": int(epochs), "batch_size": int(batch_size),
        "lr": float(lr), "weight_decay": float(weight_decay), "warmup": float(warmup),
        "hard_negatives": hard_negatives, "anneal": float(anneal), "anneal_start": float(anneal_start), "neg_temperature": float(neg_temperature),
        "neg_pool": neg_pool, "val_k": int(val_k), "val_queries": int(val_queries), "seed": int(seed),
        "train_split": str(train.split), "val_split": None if val is None else str(val.split),
        "store_fingerprint": str(train.store_fingerprint), "stage_one_sha256": s1_identity["sha256"],
        "rank_weight": float(rank_weight), "device": str(device), "max_steps": max_steps,
        "num_threads": num_threads, "prefetch": int(prefetch), "itc_steps": int(itc_steps),
        "itc_batch": int(itc_batch), "itc_cluster": int(itc_cluster), "itc_lr": float(itc_lr),
        "itc_weight": float(itc_weight),
    })
    head_cfg = dict(head_cfg or {})
    if (itc_steps > 0 or itc_weight > 0) and head in ITC_HEADS:
        head_cfg.setdefault("itc_dim", DEFAULT_ITC_DIM)
    elif itc_steps > 0 or itc_weight > 0:
        raise ValueError(f"contrastive training (itc_steps / itc_weight) needs a Q-Former-style head "
                         f"({', '.join(ITC_HEADS)}), not {head!r}: use itc_steps=0, itc_weight=0")
    state_path, ckpt_path = out / STATE_NAME, out / CHECKPOINT_NAME
    if not resume:
        (out / ITC_STATE_NAME).unlink(missing_ok=True)
    state = None
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        old = {k: v for k, v in {**_ARG_DEFAULTS, **state["train_args"]}.items() if k not in _RESUME_FREE}
        new = {k: v for k, v in train_args.items() if k not in _RESUME_FREE}
        diff = identity_diff(old, new)
        if diff:
            raise RunMismatchError(f"{state_path} belongs to a run with other arguments ({'; '.join(diff)}); "
                             f"use another out_dir or resume=False")
        if state["finished"] and ckpt_path.is_file():
            return ckpt_path

    sampler = EpochSampler(train.caption_video, len(train.video_ids), batch_size, seed=seed)
    steps_per_epoch = len(sampler)
    total = max(1, epochs * steps_per_epoch)
    warmup_steps = int(round(warmup * total)) if warmup < 1 else int(warmup)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(num_threads or os.cpu_count() or 1))
    try:
        negatives = None
        if hard_negatives != "random":
            train_sim = similarity(s1.head, train, device=device)
            negatives = HardNegativeSampler(train_sim, train.caption_video, neg_temperature, neg_pool)
            del train_sim
        cosine = StageOneCosine(s1.head, train, device) if rank_weight > 0 else None
        valset = None
        if val is not None:
            valset = _ValSet(val, similarity(s1.head, val, device=device), val_k, val_queries, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_stage_two(head, token_dim, text_dim, **(head_cfg or {}))
            if state is None:
                model.standardizer.fit(train, seed=seed)
            model.to(device)
            optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: cosine_with_warmup(s, total, warmup_steps))
            step, history = 0, []
            best = {"score": -math.inf, "epoch": None, "state": None}
            if state is not None:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["torch_rng"])
                step, history = int(state["step"]), list(json.loads(state["history"]))
                best = {"score": float(state["best_score"]), "epoch": state["best_epoch"],
                        "state": state["best_state"]}
            stopped = False
            itc_history: list[dict] = []
            if state is None and itc_steps > 0:
                itc_args = {k: train_args[k] for k in ("itc_steps", "itc_batch", "itc_cluster", "itc_lr", "seed",
                                                        "weight_decay", "store_fingerprint", "stage_one_sha256",
                                                        "head", "head_cfg")}
                done, itc_history = pretrain_itc(
                    model, train, out / ITC_STATE_NAME, int(itc_steps), batch_size=itc_batch, lr=itc_lr,
                    weight_decay=weight_decay, seed=seed,
                    neighbours=None if negatives is None else negatives.text_cand, cluster=itc_cluster,
                    device=device, max_steps=max_steps, progress=progress, args=itc_args)
                stopped = not done
            itm_max_steps = None if max_steps is None else max(0, max_steps - int(itc_steps))
            bar = tqdm(total=total, initial=step, desc=f"stage two [{head}]", disable=not progress or stopped,
                       dynamic_ncols=True)
            while step < total and not stopped:
                epoch, offset = divmod(step, steps_per_epoch)
                plan = _epoch_plan(sampler, negatives, epoch, seed, hard_negatives,
                                   epoch * steps_per_epoch, total, anneal, anneal_start)
                acc_loss, acc_hits, acc_n, t0 = 0.0, 0, 0, time.perf_counter()
                if state is not None and offset and state.get("partial"):
                    acc_loss, acc_hits, acc_n = (float(x) for x in state["partial"])
                model.train()
                load = lambda item: (item, load_pairs(train, *item.pairs()))  # noqa: E731
                batches = prefetched(plan[offset:], load, prefetch)
                for item, batch in batches:
                    if itm_max_steps is not None and step >= itm_max_steps:
                        stopped = True
                        break
                    batch = batch.to(device)
                    video = model.encode_video(batch.tokens, batch.frame_mask)
                    logits = model.match(video, batch.pair_video, batch.text_tokens[batch.pair_text],
                                         batch.text_mask[batch.pair_text])
                    loss = F.cross_entropy(logits, batch.labels)
                    if itc_weight > 0:  # the positives' contrastive loss (their videos are distinct)
                        b = item.video.size
                        itc, _ = batch_itc_loss(model, batch, batch.pair_video[:b], batch.pair_text[:b], video)
                        loss = loss + itc_weight * itc
                    if cosine is not None:
                        pv, pc, _ = item.pairs()
                        loss = loss + rank_weight * rank_loss(
                            logits[:, 1] - logits[:, 0], cosine(pc, pv).to(logits.device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    hits = int((logits.argmax(dim=1) == batch.labels).sum())
                    acc_loss += float(loss.item()) * batch.labels.numel()
                    acc_hits += hits
                    acc_n += batch.labels.numel()
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}",
                                    acc=f"{hits / batch.labels.numel():.2f}", hard=f"{item.hard_share:.2f}")
                batches.close()
                if stopped:
                    _save_state(state_path, model, optimizer, scheduler, step, history, best, train_args,
                                finished=False, partial=(acc_loss, acc_hits, acc_n))
                    break
                record: dict[str, Any] = {
                    "epoch": epoch, "step": step, "loss": acc_loss / max(1, acc_n),
                    "itm_acc": acc_hits / max(1, acc_n), "hard_share": plan[-1].hard_share if plan else 0.0,
                    "lr": float(scheduler.get_last_lr()[0]), "seconds": round(time.perf_counter() - t0, 3),
                }
                if valset is not None:
                    metrics = valset.evaluate(model, eval_batch, device)
                    record["val"] = metrics
                    # ties in R@1 go to the better sign accuracy of the head score on the candidates
                    score = metrics["reranked_R@1"] + 1e-3 * metrics["score_acc_balanced"]
                else:
                    score = float(epoch)  # no val split: keep the last epoch
                if score > best["score"]:
                    best = {"score": score, "epoch": epoch,
                            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                history.append(_jsonable(record))
                if progress and valset is not None:
                    v = record["val"]
                    bar.write(f"epoch {epoch}: loss {record['loss']:.3f} acc {record['itm_acc']:.3f} | val R@1 "
                              f"stage one {v['stage_one_R@1']:.1f} -> re-ranked {v['reranked_R@1']:.1f} "
                              f"(itm acc {v['itm_acc_balanced']:.3f})")
                state = None
                _save_state(state_path, model, optimizer, scheduler, step, history, best, train_args,
                            finished=step >= total, partial=None)
            bar.close()
    finally:
        torch.set_num_threads(previous_threads)

    finished = step >= total
    best_state = best["state"] if best["state"] is not None else model.state_dict()
    if not itc_history and itc_steps > 0 and (out / ITC_STATE_NAME).is_file():
        itc_history = list(torch.load(out / ITC_STATE_NAME, map_location="cpu", weights_only=True)["history"])
    summary = {
        "best_epoch": best["epoch"], "finished": finished, "steps": step, "total_steps": total,
        "itc_steps": int(itc_steps), "itc": itc_history,
        "selected_on": None if val is None else f"{val.split} re-ranked T2V R@1 of stage-one top-{val_k}",
        "best_score": None if val is None or best["epoch"] is None else best["score"], "epochs": history,
    }
    ckpt = {
        "kind": "stage_two",
        "config": _jsonable(model.config()),
        "state_dict": {k: v.detach().cpu() for k, v in best_state.items()},
        "store_fingerprint": str(train.store_fingerprint),
        "encoder_identity": _jsonable(train.encoder_identity),
        "stage_one_identity": s1_identity,
        "train_args": train_args,
        "history": _jsonable(summary),
    }
    _atomic_save(ckpt, ckpt_path)
    (out / HISTORY_NAME).write_text(json.dumps(summary, indent=2, default=str))
    return ckpt_path


def _save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                history: list, best: dict, train_args: dict, finished: bool,
                partial: tuple[float, int, int] | None) -> None:
    _atomic_save({
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "step": int(step), "history": json.dumps(history),
        "best_score": float(best["score"]), "best_epoch": best["epoch"], "best_state": best["state"],
        "train_args": train_args, "finished": bool(finished),
        "partial": None if partial is None else [float(x) for x in partial],
    }, path)
