"""Calibration probes: the linear probe itself (a feature that carries an attribute beats chance, the same
feature with shuffled labels does not), on the world's own frames, and probe-encoder on a tiny world."""
from __future__ import annotations

import json

import numpy as np
import pytest

from synthetic.probes import FEATURES, linear_probe, probe_label
from helpers import run_cli


@pytest.mark.slow
def test_linear_probe_separable_and_chance():
    rng = np.random.default_rng(0)
    y = rng.choice(["a", "b", "c"], size=300)
    centres = {"a": [4, 0], "b": [0, 4], "c": [-4, -4]}
    x = np.array([centres[c] for c in y]) + rng.normal(0, 0.5, size=(300, 2))
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) == 100.0
    noise = rng.normal(size=(300, 8))
    acc = linear_probe(noise[:200], y[:200], noise[200:], y[200:])
    assert acc < 60.0                      # nothing to learn: near 1/3
    # the separable feature with its training labels shuffled: nothing to learn either
    shuffled = [linear_probe(x[:200], rng.permutation(y[:200]), x[200:], y[200:]) for _ in range(5)]
    assert np.mean(shuffled) < 100 / 3 + 12
    # labels never seen in training count as errors
    assert linear_probe(x[:200], y[:200], x[200:], ["z"] * 100) == 0.0


def test_probe_on_the_worlds_frames_beats_chance_and_shuffled_labels_do_not(micro):
    """The mean patch token of the (random-weight) micro encoder carries the background colour of the world's
    frames: the probe finds it far above chance; trained on shuffled labels it stays near chance."""
    import torch

    from synthetic.render import render_frame
    from synthetic.world import ATTRIBUTES, random_attrs

    rng = np.random.default_rng(0)
    scenes = [random_attrs(rng) for _ in range(180)]
    frames = np.stack([render_frame(a, 0.25) for a in scenes])
    tokens, _ = micro.encode_frames(torch.from_numpy(frames))
    x = tokens[:, 1:].mean(1).float().numpy()
    y = [a["bg_color"] for a in scenes]
    chance = 100 / len(ATTRIBUTES["bg_color"])
    assert linear_probe(x[:120], y[:120], x[120:], y[120:], steps=100) > chance + 50
    shuffled = [linear_probe(x[:120], rng.permutation(y[:120]), x[120:], y[120:], steps=100) for _ in range(5)]
    assert np.mean(shuffled) < chance + 15


def test_probe_labels():
    assert probe_label("synth-vit-b32-tiny:/w/encoders/synth-vit-b32-tiny-2f275145a28e.pt") == "pretrained"
    assert probe_label("synth-vit-b32-tiny") == "random"
    assert probe_label("test-vit-micro:/w/x.pt") == "test-vit-micro:/w/x.pt"
    assert probe_label("test-vit-micro", taken=["random"]) == "test-vit-micro"   # a second random one: its spec


def test_probe_encoder_cli(tiny_world, tmp_path):
    from manifests import Manifest

    out = tmp_path / "probes.json"
    output = run_cli(["probe-encoder", "--work-dir", tiny_world["work"], "--manifest", tiny_world["manifest"],
                      "--encoder", "test-vit-micro", "--steps", "30", "--out", out])
    res = json.loads(out.read_text())["random"]
    m = Manifest.read(tiny_world["manifest"])
    test_rows = m.split("test").videos.to_pylist()
    assert res["frames"] == [4, 20]
    assert res["train_frames"] == 2 * m.split("train").videos.num_rows and res["test_frames"] == 2 * len(test_rows)
    assert set(res["probes"]) == {"bg_color", "main_color", "main_shape", "detail_color", "detail_shape", "corner",
                                  "motion", "timing"}
    for attr, row in res["probes"].items():
        assert set(row) == set(FEATURES) | {"chance"}
        assert row["chance"] == pytest.approx(100 / len({r[attr] for r in test_rows}))   # the test split's values
    # the mean patch token of even a random encoder carries the background colour
    assert res["probes"]["bg_color"]["patch_mean"] >= res["probes"]["bg_color"]["chance"] + 40
    t2v = res["zero_shot"]["t2v"]
    assert set(res["zero_shot"]) == {"t2v", "v2t"} and t2v["R@1"] <= t2v["R@5"] <= t2v["R@10"]
    # the printed table shows the JSON's figures
    line = next(s for s in output.splitlines() if s.startswith("bg_color"))
    assert line.split()[1:] == [f"{res['probes']['bg_color']['chance']:.0f}"] + [
        f"{res['probes']['bg_color'][f]:.1f}" for f in FEATURES]
    assert "zero-shot random" in output and f"T2V R@1/5/10 {t2v['R@1']:.1f}/" in output
