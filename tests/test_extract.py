"""End-to-end extraction with the micro encoder: stores, failures, resume, refusals, staging."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

from manifests.schema import Manifest
from pipeline.decode import decode_video
from pipeline.encoders import EncoderSpec, FrozenEncoder, load_encoder
from pipeline.extract import extract, manifest_rows
from pipeline.store import CacheStore, StoreMismatchError

T = 4


@pytest.fixture(scope="module")
def micro() -> FrozenEncoder:
    return load_encoder("test-vit-micro")


@pytest.fixture
def manifest(tmp_path, make_video, fixture_video) -> Manifest:
    videos = [{"video_id": f"g{i}", "path": str(make_video(f"g{i}.mp4", num_frames=12 + 4 * i,
                                                           seed=i)),
               "split": "train" if i < 3 else "test"} for i in range(4)]
    videos.append({"video_id": "fixture", "path": str(fixture_video), "split": "test",
                   "start": 1.0, "end": 9.0})
    videos.append({"video_id": "missing", "path": "nope.mp4", "split": "train"})
    (tmp_path / "bad.mp4").write_bytes(os.urandom(3000))
    videos.append({"video_id": "corrupt", "path": "bad.mp4", "split": "test"})
    captions = [{"caption_id": f"{v['video_id']}-{j}", "video_id": v["video_id"],
                 "text": f"caption {j} of {v['video_id']}", "split": v["split"]}
                for v in videos for j in range(2)]
    return Manifest.from_records("toy", videos, captions, root=tmp_path)


def test_rows_sorted_by_split_then_id(manifest):
    rows = manifest_rows(manifest)
    assert rows.video_ids == ["g0", "g1", "g2", "missing", "corrupt", "fixture", "g3"]
    assert rows.caption_video[:2] == [0, 0] and rows.caption_ids[-1] == "g3-1"


def test_extract_end_to_end(tmp_path, manifest, micro, monkeypatch):
    store_path = tmp_path / "micro.zarr"
    rep = extract(manifest, [micro], [store_path], num_frames=T, shard_size=2, workers=2,
                  timeout=30, text_shard_size=5, batch_size=6, progress=False)
    assert (rep.ok, rep.failed, rep.skipped, rep.videos) == (5, 2, 0, 7)
    assert rep.captions_encoded == 14 and set(rep.failures) == {"missing", "corrupt"}
    assert "missing file" in rep.failures["missing"]
    assert "5 ok, 2 failed" in rep.summary()

    g = zarr.open_group(str(store_path), mode="r")
    assert g["videos/tokens"].shape == (7, T, 17, 64) and g["texts/tokens"].shape == (14, 32, 64)
    assert g["videos/status"][...].tolist() == [1, 1, 1, 2, 2, 1, 1]
    assert g["shards/done"][...].all() and g["shards/text_done"][...].all()
    fails = json.loads((store_path / "failures.json").read_text())
    assert set(fails) == {"missing", "corrupt"}

    # stored features equal the encoder run on the decoded frames directly
    store = CacheStore.open(store_path)
    row = store.video_ids.index("fixture")
    dec = decode_video("fixture", manifest.video_path("fixture"), T, micro.image_size, 1.0, 9.0)
    assert g["videos/frame_index"][row].tolist() == dec.indices.tolist()
    assert (g["videos/frame_time"][row] >= 1.0).all() and (g["videos/frame_time"][row] < 9.0).all()
    tok, emb = micro.encode_frames(torch.from_numpy(dec.valid_frames))
    np.testing.assert_allclose(g["videos/frame_emb"][row], emb.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(g["videos/tokens"][row].astype(np.float32),
                               tok.half().float().numpy(), atol=2e-3)
    ci = store.caption_ids.index("g1-0")
    _, _, temb = micro.encode_texts(["caption 0 of g1"], max_tokens=32)
    np.testing.assert_allclose(g["texts/emb"][ci], temb[0].numpy(), atol=1e-4, rtol=1e-4)
    assert g["texts/video_index"][ci] == store.video_ids.index("g1")

    # second run: nothing to do, no encoder calls
    def boom(*a, **k):
        raise AssertionError("encoder called on a finished store")

    monkeypatch.setattr(FrozenEncoder, "encode_images", boom)
    monkeypatch.setattr(FrozenEncoder, "encode_texts", boom)
    rep2 = extract(manifest, [micro], [store_path], num_frames=T, shard_size=2,
                   text_shard_size=5, progress=False)
    assert (rep2.ok, rep2.failed, rep2.skipped, rep2.captions_skipped) == (0, 0, 7, 14)
    monkeypatch.undo()

    # a different request on the same store is refused
    with pytest.raises(StoreMismatchError, match="sampling"):
        extract(manifest, [micro], [store_path], num_frames=T + 1, shard_size=2,
                text_shard_size=5, progress=False)
    with pytest.raises(StoreMismatchError, match="manifest_sha256"):
        extract(manifest.split("train"), [micro], [store_path], num_frames=T, shard_size=2,
                text_shard_size=5, progress=False)

    # staging: only ok videos of the split, their captions
    st = store.stage("test", tmp_path / "stage")
    assert st.video_ids == ["fixture", "g3"]
    assert st.caption_ids == ["fixture-0", "fixture-1", "g3-0", "g3-1"]
    assert st.caption_video.tolist() == [0, 0, 1, 1]
    assert st.frame_emb.shape == (2, T, 32) and st.tokens.shape == (2, T, 17, 64)
    np.testing.assert_allclose(st.frame_emb[0], g["videos/frame_emb"][row])


def test_two_encoders_resume_and_parts(tmp_path, manifest, micro):
    import open_clip

    torch.manual_seed(7)
    other = open_clip.create_model("test-vit-micro", pretrained=None)
    ckpt = tmp_path / "other.pt"
    torch.save(other.state_dict(), ckpt)
    spec = EncoderSpec("test-vit-micro", str(ckpt))
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    # first only half the shards of store a (as one of two processes would)
    rep = extract(manifest, [micro], [a], num_frames=T, shard_size=2, text_shard_size=5,
                  part=(0, 2), progress=False)
    assert rep.ok + rep.failed == 4  # shards 0 and 2 of 4
    assert CacheStore.open(a).done_shards() == {0, 2}
    # then both encoders: a gets the remaining shards, b everything; one decode per video
    rep = extract(manifest, [micro, spec], [a, b], num_frames=T, shard_size=2,
                  text_shard_size=5, progress=False)
    assert rep.ok + rep.failed == 7 and rep.frames_encoded > 0
    sa, sb = CacheStore.open(a), CacheStore.open(b)
    assert sa.is_complete() and sb.is_complete()
    assert sa.fingerprint != sb.fingerprint
    assert sb.encoder_identity["weights"]["kind"] == "checkpoint"
    ia, ib = sa.array("videos/frame_index")[...], sb.array("videos/frame_index")[...]
    assert (ia == ib).all()
    ea, eb = sa.array("videos/frame_emb")[...], sb.array("videos/frame_emb")[...]
    assert not np.allclose(ea[0], eb[0])
    with pytest.raises(StoreMismatchError, match="encoder"):
        extract(manifest, [spec], [a], num_frames=T, shard_size=2, text_shard_size=5,
                progress=False)
