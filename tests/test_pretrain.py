"""Synthetic-encoder pretraining: loss, positives, settings and keys, the pipeline's decoder and preprocessing
(with the first version's numbers), keyed reuse, loading through the checkpoint path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthetic import pretrain as P


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
    from synthetic import manifest

    out = tmp_path_factory.mktemp("world")
    manifest.build(out, seed=3, train_groups=1, train_random=5, val_groups=1, val_random=1,
                    test_groups=1, test_random=1, progress=False)
    from manifests import Manifest

    return Manifest.read(out / "manifest")


@pytest.mark.slow
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


def test_settings_take_the_same_option_keys_and_keep_the_checkpoint_key():
    s = P.PretrainSettings.from_options({"steps": "12", "lr": 1, "frame_indices": [2, 14], "cluster_size": 4})
    assert (s.steps, s.lr, s.frame_indices, s.cluster_size) == (12, 1.0, (2, 14), 4)
    assert isinstance(s.lr, float) and isinstance(s.steps, int)
    assert P.PretrainSettings.from_options({"warmup": 3}, base=s).steps == 12   # given ones replace the base's
    with pytest.raises(TypeError, match="unknown pretraining option.*stepz"):   # UnknownOptionError
        P.PretrainSettings.from_options({"stepz": 1})
    # the options hashed into the key: cluster_size only when set (keys of random-batch runs stay valid)
    assert "cluster_size" not in P.PretrainSettings().key_options()
    assert P.PretrainSettings(cluster_size=4).key_options()["cluster_size"] == 4
    # the keys the first version (settings as a dict, configs registered by the pretraining itself)
    # computed for the default settings, and for cluster_size 4 with seed 1: existing work dirs'
    # checkpoints (<work>/encoders/<config>-<key>.pt) are found again
    cfg = P.model_config("synth-vit-b32-tiny")
    default = P.PretrainSettings().key_options()
    assert P.checkpoint_key("synth-vit-b32-tiny", cfg, 0, default, "0" * 64) == "2f275145a28e"
    assert P.checkpoint_key("synth-vit-b32-tiny", cfg, 1, P.PretrainSettings(cluster_size=4).key_options(),
                            "0" * 64) == "37aa2d3a1fa9"


def test_default_frames_are_the_pipelines_uniform_sample():
    from pipeline.sampling import sample_frames
    from synthetic.frames import sample_size
    from synthetic.world import FPS, NUM_FRAMES

    six = sample_frames(NUM_FRAMES, FPS, len(P.DEFAULT_FRAMES))
    assert tuple(six.indices.tolist()) == P.DEFAULT_FRAMES and sample_size(P.DEFAULT_FRAMES) == 6
    assert sample_size((4, 20)) == NUM_FRAMES   # not a uniform sample: picked from every frame
    assert sample_size((2, 14)) == NUM_FRAMES


def test_frames_through_the_pipelines_decoder_are_decords(tiny_world):
    """The decoded frames are the pixels the first version got from decord directly (so its frame
    caches, and the weights trained on them, do not change)."""
    import decord

    from synthetic.frames import decode_video_frames

    path = tiny_world.video_path(tiny_world.video_ids[0])
    vr = decord.VideoReader(str(path), num_threads=1)
    for idx in (P.DEFAULT_FRAMES, (4, 20), (2, 14), (23, 0, 5)):
        got = decode_video_frames(path, idx)
        assert got.dtype == np.uint8 and np.array_equal(got, vr.get_batch(list(idx)).asnumpy()), idx
    with pytest.raises(ValueError, match="frames \\[24\\]"):
        decode_video_frames(path, (3, 24))


def test_frame_batch_keeps_the_first_versions_numbers():
    """The model's input is bit for bit what pretraining always fed it: the registry's preprocessing at
    the encoder's size (channels-last, as before), the bilinear square resize of [0, 1] pixels otherwise."""
    from pipeline.encoders import load_encoder

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 224, 224, 3), dtype=np.uint8)

    def first_version(enc):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != enc.image_size:
            x = torch.nn.functional.interpolate(x, size=(enc.image_size,) * 2, mode="bilinear", antialias=True,
                                                align_corners=False)
        return (x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)

    for config in ("synth-vit-b32-tiny", "test-vit-micro"):   # 224 px (no resize) and 64 px
        enc = load_encoder(config)
        got, want = P.frame_batch(enc, frames), first_version(enc)
        assert torch.equal(got, want) and got.stride() == want.stride(), config
    enc = load_encoder("synth-vit-b32-tiny")
    assert torch.equal(P.frame_batch(enc, frames), enc.preprocess(torch.from_numpy(frames)))
