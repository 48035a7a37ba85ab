"""bench/groups.py: within-group matching accuracy (ties count against the caption)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.groups import within_group_accuracy


def test_within_group_accuracy_per_attribute_and_ties() -> None:
    s = np.array([[0.9, 0.1, 0.2],    # own = 0, right
                  [0.5, 0.5, 0.1],    # own = 1, tie with 0: wrong
                  [0.1, 0.3, 0.2],    # own = 2, wrong
                  [0.0, 0.0, 0.4]])   # own = 2, right
    own = np.array([0, 1, 2, 2])
    attr = np.array(["motion", "motion", "timing", "timing"])
    cand = np.zeros_like(s, dtype=np.int64)
    res = within_group_accuracy({"x": s}, np.arange(4), cand, own, attr)["x"]
    assert res == pytest.approx({"motion": 50.0, "timing": 50.0, "all": 50.0})
    flipped = within_group_accuracy({"neg": -s}, np.arange(4), cand, own, attr)["neg"]
    assert flipped["all"] == 0.0  # no row has its own video strictly highest after the flip
