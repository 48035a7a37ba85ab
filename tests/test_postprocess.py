"""Hand-computed checks of heads.evaluation.postprocess: dual softmax (DSL) and QB-Norm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.metrics import t2v_metrics, t2v_ranks, v2t_ranks
from heads.evaluation.postprocess import (
    check_querybank_split,
    dual_softmax,
    dual_softmax_both,
    dual_softmax_metrics,
    log_softmax,
    qb_norm,
    qb_norm_metrics,
)

# caption 0 -> video 0, caption 1 -> video 1; video 1 is a hub that steals caption 0 on raw scores
HUB = np.array([[0.6, 0.7],
                [0.1, 0.9]])


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dsl_t2v_uses_softmax_over_captions_and_fixes_the_hub() -> None:
    out = dual_softmax(HUB, temperature=0.1)  # default direction t2v
    # prior of (c, v) = softmax over captions of column v / 0.1
    expect = np.array([[0.6 * _sig(6 - 1), 0.7 * _sig(7 - 9)],
                       [0.1 * _sig(1 - 6), 0.9 * _sig(9 - 7)]])
    np.testing.assert_allclose(out, expect, rtol=1e-12)
    assert t2v_ranks(HUB, np.arange(2)).tolist() == [1, 0]
    assert t2v_ranks(out, np.arange(2)).tolist() == [0, 0]
    assert t2v_metrics(out, np.arange(2))["R@1"] == 100.0


def test_dsl_v2t_uses_softmax_over_videos() -> None:
    out = dual_softmax(HUB, temperature=0.1, direction="v2t")
    expect = np.array([[0.6 * _sig(6 - 7), 0.7 * _sig(7 - 6)],
                       [0.1 * _sig(1 - 9), 0.9 * _sig(9 - 1)]])
    np.testing.assert_allclose(out, expect, rtol=1e-12)
    t2v, v2t = dual_softmax_both(HUB, 0.1)
    np.testing.assert_array_equal(v2t, out)
    np.testing.assert_array_equal(t2v, dual_softmax(HUB, 0.1, "t2v"))
    # each direction is ranked on its own matrix
    m = dual_softmax_metrics(HUB, np.arange(2), temperature=0.1)
    assert m["t2v"]["R@1"] == 100.0
    # column v0: 0.6*sig(-1) = 0.161 > 0.1*sig(-8); column v1: 0.9*sig(8) = 0.900 > 0.7*sig(1) = 0.512
    assert v2t_ranks(out, np.arange(2)).tolist() == [0, 0]
    assert m["v2t"]["R@1"] == 100.0


def test_dsl_is_stable_for_extreme_scores() -> None:
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(20, 7)) * 1e4
    for direction in ("t2v", "v2t"):
        out = dual_softmax(sim, temperature=1e-3, direction=direction)
        assert np.isfinite(out).all()
    ls = log_softmax(np.array([[1e308, -1e308, 0.0]]), axis=1)
    assert np.isfinite(ls).all() and ls[0, 0] == 0.0


def test_dsl_with_huge_temperature_keeps_ranks() -> None:
    rng = np.random.default_rng(1)
    sim = rng.uniform(0.1, 1.0, size=(9, 4))  # positive scores: a near-uniform prior keeps the order
    out = dual_softmax(sim, temperature=1e9)
    assert (np.argsort(-out, axis=1) == np.argsort(-sim, axis=1)).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_dsl_bad_temperature(bad: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(HUB, temperature=bad)


def test_dsl_refuses_non_finite_and_bad_direction() -> None:
    sim = HUB.copy()
    sim[0, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        dual_softmax(sim, 0.1)
    with pytest.raises(ValueError, match="direction"):
        dual_softmax(HUB, 0.1, direction="both")


# --------------------------------------------------------------------------- QB-Norm

# 3 test queries (query i -> video i); video 2 is a hub favoured by every bank query
QUERIES = np.array([[0.5, 0.1, 0.6],
                    [0.1, 0.5, 0.2],
                    [0.1, 0.2, 0.9]])
BANK = np.array([[0.2, 0.1, 0.8],
                 [0.1, 0.3, 0.7],
                 [0.3, 0.1, 0.5]])
BETA = 10.0


def _log_n() -> np.ndarray:
    return np.array([math.log(sum(math.exp(BETA * BANK[b, g]) for b in range(3))) for g in range(3)])


def test_qb_norm_demotes_the_hub_exactly_as_defined() -> None:
    out = qb_norm(QUERIES, BANK, k=1, beta=BETA)
    log_n = _log_n()
    # activation set (top-1 of every bank query) = {video 2}
    # query 0: top-1 is video 2 (in the set) -> inverted softmax, log form
    np.testing.assert_allclose(out[0], BETA * QUERIES[0] - log_n, rtol=1e-12)
    # query 1: top-1 is video 1 (not in the set) -> raw scores, untouched
    np.testing.assert_array_equal(out[1], QUERIES[1])
    # query 2: top-1 is video 2 -> normalised, and the hub is still its best (it is its own video)
    np.testing.assert_allclose(out[2], BETA * QUERIES[2] - log_n, rtol=1e-12)
    cv = np.arange(3)
    assert t2v_ranks(QUERIES, cv).tolist() == [1, 0, 0]
    assert t2v_ranks(out, cv).tolist() == [0, 0, 0]  # the hub lost query 0
    # the log form orders a row exactly like the paper's ratio exp(beta s) / n
    ratio = np.exp(BETA * QUERIES[0]) / np.exp(log_n)
    assert (np.argsort(-ratio) == np.argsort(-out[0])).all()


def test_qb_norm_k_widens_the_activation_set() -> None:
    out = qb_norm(QUERIES, BANK, k=2, beta=BETA)  # top-2 of the bank covers all three videos
    np.testing.assert_allclose(out, BETA * QUERIES - _log_n()[None, :], rtol=1e-12)


def test_qb_norm_is_stable_and_validates() -> None:
    big = qb_norm(QUERIES * 1e3, BANK * 1e3, beta=BETA)
    assert np.isfinite(big).all()
    with pytest.raises(ValueError, match="gallery"):
        qb_norm(QUERIES, BANK[:, :2])
    with pytest.raises(ValueError, match="empty"):
        qb_norm(QUERIES, BANK[:0])
    with pytest.raises(ValueError, match="k must"):
        qb_norm(QUERIES, BANK, k=0)
    with pytest.raises(ValueError, match="beta"):
        qb_norm(QUERIES, BANK, beta=-1)
    bad = BANK.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="querybank.*non-finite"):
        qb_norm(QUERIES, bad)


def test_qb_norm_metrics_both_directions() -> None:
    cv = np.arange(3)
    m = qb_norm_metrics(QUERIES, cv, BANK, None, k=1, beta=BETA)
    assert m["t2v"]["R@1"] == 100.0
    # V2T: the video bank scores bank videos against the evaluated captions; here a bank that
    # favours caption 0 normalises columns whose best caption is caption 0
    video_bank = np.array([[0.9, 0.0, 0.0]])
    m2 = qb_norm_metrics(QUERIES, cv, None, video_bank, k=1, beta=BETA)
    expected = qb_norm(QUERIES.T, video_bank, k=1, beta=BETA).T
    assert m2["v2t"]["R@1"] == pytest.approx(100.0 * np.mean(v2t_ranks(expected, cv) == 0))
    assert m2["t2v"] == t2v_metrics(QUERIES, cv)


def test_querybank_must_not_be_the_test_queries() -> None:
    check_querybank_split("val", "test")
    check_querybank_split("train", "test")
    with pytest.raises(ValueError, match="evaluated split"):
        check_querybank_split("test", "test")
    with pytest.raises(ValueError, match="test split"):
        check_querybank_split("test-2", "val")


def test_dsl_blocks_match_one_block(monkeypatch) -> None:
    import heads.evaluation.postprocess as pp

    rng = np.random.default_rng(2)
    sim = rng.normal(size=(300, 70)).astype(np.float32)
    whole = {d: dual_softmax(sim, 0.05, d) for d in ("t2v", "v2t")}
    monkeypatch.setattr(pp, "_DSL_BLOCK_ELEMENTS", 500)  # many small blocks
    for d in ("t2v", "v2t"):
        np.testing.assert_allclose(dual_softmax(sim, 0.05, d), whole[d], rtol=1e-12, atol=0)
    e = np.exp(sim.astype(np.float64) / 0.05)
    np.testing.assert_allclose(whole["t2v"], sim * e / e.sum(axis=0), rtol=1e-10)
    np.testing.assert_allclose(whole["v2t"], sim * e / e.sum(axis=1, keepdims=True), rtol=1e-10)


def test_qb_norm_blocks_match_one_block(monkeypatch) -> None:
    import heads.evaluation.postprocess as pp

    rng = np.random.default_rng(3)
    sim, bank = rng.normal(size=(40, 25)), rng.normal(size=(90, 25)).round(1)  # ties in the bank
    whole = qb_norm(sim, bank, k=3, beta=5.0)
    monkeypatch.setattr(pp, "_QB_BLOCK_ELEMENTS", 30)
    np.testing.assert_allclose(qb_norm(sim, bank, k=3, beta=5.0), whole, rtol=1e-12)
