"""Hand-computed checks of core.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.metrics import (
    format_table,
    metrics_to_json,
    rank_of_positives,
    rank_of_single_positive,
    ranks_to_metrics,
    retrieval_metrics,
    rsum,
    t2v_metrics,
    t2v_ranks,
    v2t_metrics,
    v2t_ranks,
)

# 5 captions, 3 videos; captions 0,1 -> video 0, caption 2 -> video 1, captions 3,4 -> video 2.
MULTI_SIM = np.array(
    [
        [0.9, 0.1, 0.2],
        [0.3, 0.8, 0.1],
        [0.2, 0.4, 0.5],
        [0.1, 0.2, 0.7],
        [0.6, 0.3, 0.6],  # tie between its own video (col 2) and video 0
    ]
)
MULTI_CV = np.array([0, 0, 1, 2, 2])


def test_perfect_matrix() -> None:
    sim = np.eye(4)
    cv = np.arange(4)
    for m in (t2v_metrics(sim, cv), v2t_metrics(sim, cv)):
        assert m == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.0, "n": 4}


def test_reversed_matrix() -> None:
    # Each positive scores lowest in its row and column: rank 3 of 4 everywhere.
    sim = -np.eye(4)
    cv = np.arange(4)
    for m in (t2v_metrics(sim, cv), v2t_metrics(sim, cv)):
        assert m["R@1"] == 0.0 and m["R@5"] == 100.0 and m["MdR"] == 4.0 and m["MnR"] == 4.0


def test_staircase_matrix_recall_at_k() -> None:
    # caption c: videos v < c score 1, its own video 0.5, videos v > c score 0 -> rank c.
    n = 12
    v, c = np.meshgrid(np.arange(n), np.arange(n))
    sim = np.where(v < c, 1.0, np.where(v == c, 0.5, 0.0))
    assert t2v_ranks(sim, np.arange(n)).tolist() == list(range(n))
    m = t2v_metrics(sim, np.arange(n))
    assert m["R@1"] == pytest.approx(100 / 12)
    assert m["R@5"] == pytest.approx(500 / 12)
    assert m["R@10"] == pytest.approx(1000 / 12)
    assert m["MdR"] == 6.5 and m["MnR"] == 6.5


def test_all_ties_are_pessimistic() -> None:
    sim = np.zeros((3, 3))
    cv = np.arange(3)
    assert t2v_ranks(sim, cv).tolist() == [2, 2, 2]
    assert v2t_ranks(sim, cv).tolist() == [2, 2, 2]
    m = t2v_metrics(sim, cv)
    assert m["R@1"] == 0.0 and m["MdR"] == 3.0


def test_partial_ties_single_positive() -> None:
    sim = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    assert rank_of_single_positive(sim, np.array([0, 2])).tolist() == [1, 2]
    pos = np.array([[True, False, False], [False, False, True]])
    assert rank_of_positives(sim, pos).tolist() == [1, 2]


def test_multi_caption_t2v() -> None:
    assert t2v_ranks(MULTI_SIM, MULTI_CV).tolist() == [0, 1, 1, 0, 1]
    m = t2v_metrics(MULTI_SIM, MULTI_CV)
    assert m["R@1"] == pytest.approx(40.0)
    assert m["R@5"] == 100.0 and m["MdR"] == 2.0 and m["MnR"] == pytest.approx(1.6) and m["n"] == 5


def test_multi_caption_v2t_best_caption() -> None:
    # v0: captions 0,1 -> best 0.9, no negative >= 0.9 -> 0
    # v1: caption 2 scores 0.4, caption 1 (negative) scores 0.8 -> 1
    # v2: captions 3,4 -> best 0.7, no negative >= 0.7 -> 0
    assert v2t_ranks(MULTI_SIM, MULTI_CV).tolist() == [0, 1, 0]
    m = v2t_metrics(MULTI_SIM, MULTI_CV)
    assert m["R@1"] == pytest.approx(200 / 3)
    assert m["MdR"] == 1.0 and m["MnR"] == pytest.approx(4 / 3) and m["n"] == 3


def test_v2t_other_positives_do_not_count_but_negative_ties_do() -> None:
    # one video, captions 0,1 are its own (tie at 0.5), caption 2 is a negative tied at 0.5
    sim = np.array([[0.5, 0.0], [0.5, 0.0], [0.5, 0.9]])
    cv = np.array([0, 0, 1])
    assert v2t_ranks(sim, cv).tolist() == [1, 0]


def test_video_without_caption_is_only_a_candidate() -> None:
    sim = np.array([[0.9, 0.1, 0.95], [0.1, 0.9, 0.0]])
    cv = np.array([0, 1])
    assert t2v_ranks(sim, cv).tolist() == [1, 0]
    m = v2t_metrics(sim, cv)
    assert m["n"] == 2 and m["R@1"] == 100.0


def test_blocking_matches_unblocked() -> None:
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(2500, 300)).round(1)  # many ties
    cv = rng.integers(0, 300, size=2500)
    pos = cv[:, None] == np.arange(300)[None, :]
    ref = ((sim >= sim[np.arange(2500), cv][:, None]).sum(1) - 1)
    assert (t2v_ranks(sim, cv) == ref).all()
    assert (rank_of_positives(sim, pos) == ref).all()
    # v2t via the generic function on the transpose
    has = np.bincount(cv, minlength=300) > 0
    assert (v2t_ranks(sim, cv) == rank_of_positives(sim.T[has], pos.T[has])).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad: float) -> None:
    sim = np.eye(3)
    sim[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        t2v_metrics(sim, np.arange(3))
    with pytest.raises(ValueError, match="non-finite"):
        v2t_metrics(sim, np.arange(3))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="caption_video"):
        t2v_metrics(np.eye(3), np.arange(2))
    with pytest.raises(ValueError, match="outside"):
        t2v_metrics(np.eye(3), np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="no positive"):
        rank_of_positives(np.eye(2), np.zeros((2, 2), bool))


def test_format_table_and_json() -> None:
    rows = {
        "zero-shot": retrieval_metrics(MULTI_SIM, MULTI_CV),
        "meanP": retrieval_metrics(np.eye(3)[[0, 0, 1, 2, 2]], MULTI_CV),
    }
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["name", "R@1", "R@5", "R@10"]
    assert len(lines) == 2 + 4
    assert len({len(line) for line in lines}) == 1  # aligned
    assert any(line.startswith("meanP t2v") and "100.0" in line for line in lines)
    data = json.loads(metrics_to_json({**rows, "empty": ranks_to_metrics(np.array([], int))}))
    assert data["zero-shot"]["v2t"]["n"] == 3
    assert data["empty"]["R@1"] is None
    assert rsum(rows["meanP"]) == 600.0
