"""Model selection of a stage-two head on the val split (never test).

A fixed sample of val captions (``ValSet``: up to ``max_queries``, seeded) and their stage-one top
``k`` videos; after every epoch the head re-ranks them (final score = cosine + head score) and the
epoch with the best re-ranked T2V R@1 is kept (ties: the balanced sign accuracy of the head score
on those candidates). ``rerank_r1`` also reports the sign accuracy of the ITM log-odds alone.
"""

from __future__ import annotations

import numpy as np

from core.split import Split
from heads.stage_two.models import StageTwoHead
from heads.stage_two.scoring import score_pairs


def sign_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
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
    s_pos, s_neg, s_bal = sign_accuracy(head_scores, labels)
    i_pos, i_neg, i_bal = sign_accuracy(head_scores if itm_scores is None else itm_scores, labels)
    return {"stage_one_R@1": 100.0 * float(hit1.mean()), "reranked_R@1": 100.0 * float(best.mean()),
            f"stage_one_R@{top.shape[1]}": 100.0 * float(in_top.mean()),
            "itm_acc_pos": i_pos, "itm_acc_neg": i_neg, "itm_acc_balanced": i_bal,
            "score_acc_pos": s_pos, "score_acc_neg": s_neg, "score_acc_balanced": s_bal}


class ValSet:
    """Fixed val queries, their stage-one top-K candidates, and the metric of a head on them."""

    def __init__(self, val: Split, sim: np.ndarray, k: int, max_queries: int, seed: int) -> None:
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
        both = score_pairs(head, self.split, cap, vid, batch=batch, device=device, parts=True)
        itm = both[:, 0].reshape(self.top.shape)
        # the head score exactly as pair_score sums it (float32), so selection matches scoring
        scores = (both[:, 0] + both[:, 1]).reshape(self.top.shape)
        return rerank_r1(self.sim, self.split.caption_video, self.top, scores, self.queries, itm_scores=itm)


def selection_score(metrics: dict[str, float]) -> float:
    """The score an epoch is selected on: re-ranked val T2V R@1, ties broken by the balanced sign
    accuracy of the head score on the candidates."""
    return metrics["reranked_R@1"] + 1e-3 * metrics["score_acc_balanced"]
