"""Calibration probes: the linear probe itself, and probe-encoder on a tiny world."""
from __future__ import annotations

import json

import numpy as np

from pipeline.probes import FEATURES, linear_probe
from worlds import run_cli


def test_linear_probe_separable_and_chance():
    rng = np.random.default_rng(0)
    y = rng.choice(["a", "b", "c"], size=300)
    centres = {"a": [4, 0], "b": [0, 4], "c": [-4, -4]}
    x = np.array([centres[c] for c in y]) + rng.normal(0, 0.5, size=(300, 2))
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) == 100.0
    noise = rng.normal(size=(300, 8))
    acc = linear_probe(noise[:200], y[:200], noise[200:], y[200:])
    assert acc < 60.0                      # nothing to learn: near 1/3
    # labels never seen in training count as errors
    assert linear_probe(x[:200], y[:200], x[200:], ["z"] * 100) == 0.0


def test_probe_encoder_cli(tiny_world, tmp_path):
    out = tmp_path / "probes.json"
    output = run_cli(["probe-encoder", "--work-dir", tiny_world["work"], "--manifest", tiny_world["manifest"],
                      "--encoder", "test-vit-micro", "--steps", "30", "--out", out])
    res = json.loads(out.read_text())["random"]
    assert set(res["probes"]) >= {"main_color", "detail_color", "corner", "motion", "timing"}
    for row in res["probes"].values():
        assert set(FEATURES) <= set(row) and 0 < row["chance"] <= 100
        assert all(0.0 <= row[f] <= 100.0 for f in FEATURES)
    assert set(res["zero_shot"]) == {"t2v", "v2t"}
    assert "main_color" in output and "zero-shot random" in output
