"""Model selection of a stage-two head on the val split (never test).

A fixed sample of val captions (``ValSet``: up to ``max_queries``, seeded) and their stage-one top
``k`` videos, and with ``directions`` naming ``v2t`` a fixed sample of val videos and their top
``k`` captions; after every epoch the head re-ranks them (final score = cosine + head score, each
distinct pair scored once) and the epoch with the best mean re-ranked R@1 over the directions is kept
(ties: the balanced sign accuracy of the head score on the T2V candidates). ``rerank_r1`` also
reports the sign accuracy of the ITM log-odds alone.

Both directions, at the re-ranking's own K, are the default (``StageTwoTrainConfig.val_directions``,
``val_candidates``): one direction at a smaller K picked early epochs on noise in the benchmark's
small val split (docs/benchmarks/qformer.md, "Which epoch the head keeps").
"""

from __future__ import annotations

import numpy as np

from core.split import Split
from heads.evaluation.rerank import top_k, v2t_query_videos
from heads.stage_two.config import check_directions
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

    def __init__(self, val: Split, sim: np.ndarray, k: int, max_queries: int, seed: int,
                 directions: str = "t2v") -> None:
        self.split, self.sim = val, sim
        self.directions = check_directions(directions)
        num_c, num_v = sim.shape
        rng = np.random.default_rng([int(seed), 0x7A1])
        q = num_c if max_queries <= 0 else min(num_c, int(max_queries))
        self.queries = np.sort(rng.choice(num_c, size=q, replace=False))
        self.top = top_k(sim[self.queries], k)  # the re-ranker's candidates: ties to the lower row
        self.video_queries = self.video_top = None
        if "v2t" in self.directions:
            videos = v2t_query_videos(val.caption_video, num_v)
            if 0 < max_queries < videos.size:
                videos = np.sort(rng.choice(videos, size=int(max_queries), replace=False))
            self.video_queries = videos
            self.video_top = top_k(sim[:, videos].T, k)  # caption rows

    def evaluate(self, head: StageTwoHead, batch: int, device: str) -> dict[str, float]:
        num_v = self.sim.shape[1]
        caps = [np.repeat(self.queries, self.top.shape[1])]
        vids = [self.top.reshape(-1)]
        if self.video_top is not None:
            caps.append(self.video_top.reshape(-1))
            vids.append(np.repeat(self.video_queries, self.video_top.shape[1]))
        keys, inverse = np.unique(np.concatenate(caps) * num_v + np.concatenate(vids), return_inverse=True)
        both = score_pairs(head, self.split, keys // num_v, keys % num_v, batch=batch, device=device, parts=True)
        # the head score exactly as pair_score sums it (float32), so selection matches scoring
        pair_scores, pair_itm = both[:, 0] + both[:, 1], both[:, 0]
        n = self.top.size
        t2v = inverse[:n].reshape(self.top.shape)
        out = rerank_r1(self.sim, self.split.caption_video, self.top, pair_scores[t2v], self.queries,
                        itm_scores=pair_itm[t2v])
        if self.video_top is not None:
            v2t = inverse[n:].reshape(self.video_top.shape)
            cv = np.asarray(self.split.caption_video)
            cos = self.sim[self.video_top, self.video_queries[:, None]]
            best = self.video_top[np.arange(v2t.shape[0]), np.argmax(cos + pair_scores[v2t], axis=1)]
            out["v2t_stage_one_R@1"] = 100.0 * float((cv[self.video_top[:, 0]] == self.video_queries).mean())
            out["v2t_reranked_R@1"] = 100.0 * float((cv[best] == self.video_queries).mean())
        out["selection_R@1"] = float(np.mean([out["reranked_R@1" if d == "t2v" else "v2t_reranked_R@1"]
                                              for d in self.directions]))
        return out


def selection_score(metrics: dict[str, float]) -> float:
    """The score an epoch is selected on: the mean re-ranked val R@1 of the selection's directions
    (``selection_R@1``; T2V alone in runs saved before it existed), ties broken by the balanced sign
    accuracy of the head score on the T2V candidates."""
    return metrics.get("selection_R@1", metrics["reranked_R@1"]) + 1e-3 * metrics["score_acc_balanced"]
