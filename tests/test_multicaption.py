"""Multi-caption evaluation: 3 videos with 1 / 2 / 4 captions, every number computed by hand.

Convention (core.metrics): every caption is a T2V query over all videos; every captioned video is
a V2T query, correct at the rank of its *best-scoring* caption, and only other videos' captions
(negatives) count against it. Ties count against the query (pessimistic).
"""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics import retrieval_metrics, t2v_metrics, t2v_ranks, v2t_metrics, v2t_ranks
from heads.evaluation.postprocess import dual_softmax, flatten_padded_captions

CV = np.array([0, 1, 1, 2, 2, 2, 2])  # video 0: 1 caption, video 1: 2, video 2: 4
SIM = np.array([
    # v0   v1   v2
    [0.5, 0.5, 0.2],  # c0 -> v0, tied with v1            T2V rank 1
    [0.3, 0.8, 0.1],  # c1 -> v1                          T2V rank 0
    [0.4, 0.4, 0.4],  # c2 -> v1, three-way tie           T2V rank 2
    [0.1, 0.2, 0.9],  # c3 -> v2                          T2V rank 0
    [0.6, 0.1, 0.3],  # c4 -> v2, v0 above                T2V rank 1
    [0.2, 0.7, 0.6],  # c5 -> v2, v1 above                T2V rank 1
    [0.9, 0.8, 0.7],  # c6 -> v2, both above              T2V rank 2
])
# V2T, column by column:
#   v0: own caption c0 = 0.5; negatives >= 0.5: c4 (0.6), c6 (0.9)             -> rank 2
#   v1: best own caption c1 = 0.8; negatives >= 0.8: c6 (0.8, tie)             -> rank 1
#   v2: best own caption c3 = 0.9; negatives c0 0.2, c1 0.1, c2 0.4 all below   -> rank 0


def test_t2v_every_caption_is_a_query() -> None:
    assert t2v_ranks(SIM, CV).tolist() == [1, 0, 2, 0, 1, 1, 2]
    m = t2v_metrics(SIM, CV)
    # ranks sorted 0 0 1 1 1 2 2 -> median 1, mean 1
    assert m == pytest.approx({"R@1": 200 / 7, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0, "n": 7})


def test_v2t_best_caption_with_ties() -> None:
    assert v2t_ranks(SIM, CV).tolist() == [2, 1, 0]
    m = v2t_metrics(SIM, CV)
    assert m == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0, "n": 3})


def test_v2t_deep_rank_for_the_single_caption_video() -> None:
    sim = SIM.copy()
    sim[:, 0] = [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.1]  # c0 (its only caption) ties with c6, below c1..c5
    # v0: all 6 negatives >= 0.1 -> rank 6; v1, v2 columns unchanged -> 1, 0
    assert v2t_ranks(sim, CV).tolist() == [6, 1, 0]
    m = v2t_metrics(sim, CV)
    assert m == pytest.approx({"R@1": 100 / 3, "R@5": 200 / 3, "R@10": 100.0, "MdR": 2.0,
                               "MnR": 10 / 3, "n": 3})
    # T2V on the same matrix: c0 [0.1 .5 .2] -> 2; c1 [.9 .8 .1] -> 1; c2 [.8 .4 .4] -> 2;
    # c3 [.7 .2 .9] -> 0; c4 [.6 .1 .3] -> 1; c5 [.5 .7 .6] -> 1; c6 [.1 .8 .7] -> 1
    assert t2v_ranks(sim, CV).tolist() == [2, 1, 2, 0, 1, 1, 1]
    m = t2v_metrics(sim, CV)
    assert m == pytest.approx({"R@1": 100 / 7, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0,
                               "MnR": 15 / 7, "n": 7})


def test_more_captions_never_push_the_best_one_down() -> None:
    # adding a second, worse caption to video 0 leaves its V2T rank unchanged
    sim = np.vstack([SIM, [[-1.0, 0.0, 0.0]]])
    cv = np.append(CV, 0)
    assert v2t_ranks(sim, cv).tolist()[0] == v2t_ranks(SIM, CV).tolist()[0]


def test_padded_dense_layout_gives_the_same_metrics() -> None:
    # the same captions stored as (V, max_captions=4, ...) with NaN in the padded slots
    dense = np.full((3, 4, 3), np.nan)
    mask = np.zeros((3, 4), bool)
    for c, v in enumerate(CV):
        s = int(mask[v].sum())
        dense[v, s] = SIM[c]
        mask[v, s] = True
    flat, cv = flatten_padded_captions(dense, mask)
    assert cv.tolist() == CV.tolist()
    np.testing.assert_array_equal(flat, SIM)
    assert retrieval_metrics(flat, cv) == retrieval_metrics(SIM, CV)
    # padding is never a query: 7 T2V queries, not 12
    assert t2v_metrics(flat, cv)["n"] == 7


def test_padded_layout_errors() -> None:
    dense = np.zeros((3, 4, 3))
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = True
    dense[0, 0, 1] = np.inf
    with pytest.raises(ValueError, match="video 0, slot 0"):
        flatten_padded_captions(dense, mask)
    with pytest.raises(ValueError, match="boolean"):
        flatten_padded_captions(dense, mask.astype(int))
    with pytest.raises(ValueError, match="shape"):
        flatten_padded_captions(dense, mask[:, :3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_padding_values_in_a_flat_matrix_are_refused(bad: float) -> None:
    # a padded caption row leaking into the flat list is refused, never ranked
    sim = np.vstack([SIM, np.full((1, 3), bad)])
    cv = np.append(CV, 2)
    for fn in (t2v_metrics, v2t_metrics):
        with pytest.raises(ValueError, match=r"non-finite.*\[7, 0\]"):
            fn(sim, cv)


def test_dsl_on_multi_caption_matches_the_formula() -> None:
    t = 0.05
    out = dual_softmax(SIM, temperature=t)
    e = np.exp(SIM / t)
    np.testing.assert_allclose(out, SIM * e / e.sum(axis=0, keepdims=True), rtol=1e-12)
    out = dual_softmax(SIM, temperature=t, direction="v2t")
    np.testing.assert_allclose(out, SIM * e / e.sum(axis=1, keepdims=True), rtol=1e-12)
