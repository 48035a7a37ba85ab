"""Synthetic-encoder pretraining: loss, positives, keyed reuse, loading through the checkpoint path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import pretrain as P


def test_positives_rules():
    red = (("red", "circle", "gray"), ("blue", "ring", "top left"))
    red_nodetail = (("red", "circle", "gray"), None)
    green = (("green", "circle", "gray"), ("blue", "ring", "top left"))
    frames = [red, red_nodetail, green]
    captions = [(red[0], None), (red[0], red[1]), (green[0], green[1])]
    m = P.positives(frames, captions)
    # a caption without the detail fits every frame with the same main object and background
    assert m[:, 0].tolist() == [True, True, False]
    # a caption naming the detail fits only frames where that detail is visible
    assert m[:, 1].tolist() == [True, False, False]
    assert m[:, 2].tolist() == [False, False, True]


def test_multi_positive_infonce_reduces_to_infonce_and_spreads_targets():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(10.0)
    eye = torch.eye(6, dtype=torch.bool)
    logits = scale * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(6))
                 + torch.nn.functional.cross_entropy(logits.t(), torch.arange(6)))
    assert torch.allclose(P.multi_positive_infonce(img, txt, scale, eye), ref, atol=1e-6)
    # two identical captions that are both positives for both frames: no floor from duplicates
    same = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    pos = torch.ones(2, 2, dtype=torch.bool)
    loss = P.multi_positive_infonce(same, same, torch.tensor(10.0), pos)
    assert abs(float(loss) - np.log(2)) < 1e-5   # uniform targets over 2 equal logits: log 2 exactly


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from manifests import synthetic

    out = tmp_path_factory.mktemp("world")
    synthetic.build(out, seed=3, train_groups=1, train_random=5, val_groups=1, val_random=1,
                    test_groups=1, test_random=1, progress=False)
    from manifests import Manifest

    return Manifest.read(out / "manifest")


def test_pretrain_reuse_and_checkpoint_loads(tiny_world, tmp_path):
    from pipeline.encoders import load_encoder

    opts = dict(config="test-vit-micro", steps=3, batch_size=8, warmup=1, frame_indices=(2, 14),
                workers=1, progress=False)
    ckpt = P.pretrain_encoder(tiny_world, tmp_path, **opts)
    info = json.loads(ckpt.with_suffix(".json").read_text())
    assert info["steps"] == 3 and info["train_videos"] == tiny_world.split("train").videos.num_rows
    assert np.isfinite(info["final_loss"])
    mtime = ckpt.stat().st_mtime_ns
    again = P.pretrain_encoder(tiny_world, tmp_path, **opts)          # same key: reused, not retrained
    assert again == ckpt and ckpt.stat().st_mtime_ns == mtime
    other = P.pretrain_encoder(tiny_world, tmp_path, **{**opts, "seed": 1})
    assert other != ckpt                                               # key includes the seed
    # a real user's local-checkpoint path loads it, and the weights are the trained ones
    enc = load_encoder(f"test-vit-micro:{ckpt}")
    assert enc.identity()["weights"]["kind"] == "checkpoint"
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    got = enc.model.state_dict()
    assert all(torch.equal(sd[k], got[k]) for k in sd)
    rand = load_encoder("test-vit-micro")
    assert not torch.equal(rand.model.state_dict()["visual.conv1.weight"], sd["visual.conv1.weight"])


def test_pretrain_needs_train_videos(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="train videos"):
        P.pretrain_encoder(tiny_world.split("test"), tmp_path, config="test-vit-micro", steps=1)


def _labels(n_videos: int, frames: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for v in range(n_videos):
        bg, main = ("gray", "navy")[int(rng.integers(2))], ("red", "blue", "green")[int(rng.integers(3))]
        out += [{"video_id": f"v{v}", "bg_color": bg, "main_color": main} for _ in range(frames)]
    return out


def test_batch_sampler_random_epochs_and_gist_clusters():
    labels = _labels(40)
    # cluster_size 0: shuffled epochs, every frame once per epoch (the original pretraining batches)
    s = P.BatchSampler(labels, 24, 0, np.random.default_rng(5))
    ref = np.random.default_rng(5).permutation(len(labels))
    seen = np.concatenate([s.next() for _ in range(5)])
    assert sorted(seen.tolist()) == sorted(ref[:120].tolist())
    # cluster_size 4: 6 clusters of 4 frames sharing background and main colour, distinct videos first
    s = P.BatchSampler(labels, 24, 4, np.random.default_rng(1))
    for _ in range(20):
        idx = s.next()
        assert idx.size == 24 and (np.diff(idx) >= 0).all()
        keys = [P.gist_key(labels[i]) for i in idx]
        counts: dict = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        assert all(c % 4 == 0 for c in counts.values())  # whole clusters only
    cluster = s._cluster(s.clusters[0])
    assert len({labels[i]["video_id"] for i in cluster}) == 4  # one frame per video while videos last
    with pytest.raises(ValueError, match="cluster_size"):
        P.BatchSampler(labels, 8, 9, np.random.default_rng(0))
