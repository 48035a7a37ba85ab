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
from pipeline.encoders import EncoderSpec, FrozenEncoder
from pipeline.extraction.job import extract
from pipeline.extraction.report import ExtractReport
from pipeline.store.rows import manifest_rows
from pipeline.store import CacheStore, StoreMismatchError

pytestmark = pytest.mark.integration

T = 4


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
    assert rep.failures["missing"].startswith("missing: no file at") and rep.failures["corrupt"].startswith(
        "not a video: ")
    assert rep.decoders == {"decord": 5}
    assert "videos 5 ok (5 by decord), 2 failed" in rep.summary()
    assert f"store {store_path}: 5 ok, 2 failed, 0 pending of 7 videos; failures listed in" in rep.summary()

    g = zarr.open_group(str(store_path), mode="r")
    assert g["videos/tokens"].shape == (7, T, 17, 64) and g["texts/tokens"].shape == (14, 32, 64)
    assert g["videos/status"][...].tolist() == [1, 1, 1, 2, 2, 1, 1]
    assert g["shards/done"][...].all() and g["shards/text_done"][...].all()
    fails = json.loads((store_path / "failures.json").read_text())
    assert set(fails) == {"missing", "corrupt"}
    assert fails["corrupt"]["reason"].startswith("not a video") and "decord:" in fails["corrupt"]["detail"]
    assert CacheStore.open(store_path).failures() == {k: v["reason"] for k, v in fails.items()}

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
    # a re-run's summary still states what the store holds: its failures did not go away
    assert rep2.store_failed == 2 and "5 ok, 2 failed, 0 pending of 7 videos" in rep2.summary()
    monkeypatch.undo()

    # a different request on the same store is refused
    with pytest.raises(StoreMismatchError, match="sampling"):
        extract(manifest, [micro], [store_path], num_frames=T + 1, shard_size=2,
                text_shard_size=5, progress=False)
    with pytest.raises(StoreMismatchError, match="lacks 3 of the store's videos.*make a new store"):
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


def test_failed_videos_are_retried_and_torn_shards_rewritten(tmp_path, manifest, micro, make_video):
    store_path = tmp_path / "retry.zarr"
    kw = dict(num_frames=T, shard_size=2, text_shard_size=5, progress=False)
    rep = extract(manifest, [micro], [store_path], **kw)
    assert rep.store_failed == 2
    # the missing file appears and the corrupt one is replaced: --retry-failed decodes their shards again
    make_video("nope.mp4", num_frames=12)
    make_video("bad.mp4", num_frames=12, seed=9)
    store = CacheStore.open(store_path)
    before = store.array("videos/frame_emb")[...]
    rep = extract(manifest, [micro], [store_path], retry_failed=True, **kw)
    assert rep.retried == 4 and (rep.ok, rep.failed) == (4, 0) and rep.store_failed == 0  # 2 shards of 2
    store = CacheStore.open(store_path)
    assert store.failures() == {} and (store.status() == 1).all()
    ok_before = [r for r in range(7) if r not in (3, 4)]
    np.testing.assert_array_equal(store.array("videos/frame_emb")[ok_before], before[ok_before])
    # a shard left torn by a crash (written, not marked done) is overwritten on resume, no checksum error
    shard_files = sorted(p for p in (store_path / "videos" / "tokens").rglob("*") if p.is_file() and "c" in p.parts)
    shard_files[0].write_bytes(shard_files[0].read_bytes()[:100])
    store = CacheStore.open(store_path, mode="r+")
    store.reset_shards([0])
    rep = extract(manifest, [micro], [store_path], **kw)
    assert rep.ok == 2 and CacheStore.open(store_path).is_complete()
    np.testing.assert_allclose(CacheStore.open(store_path).array("videos/tokens")[0:2].astype(np.float32),
                               before_tokens(store_path, micro, manifest), atol=2e-3)


def before_tokens(store_path, micro, manifest):
    """The tokens of the store's first two videos, computed afresh."""
    rows = manifest_rows(manifest)
    out = []
    for task in rows.tasks[:2]:
        dec = decode_video(task.video_id, task.path, T, micro.image_size, task.start, task.end)
        tok, _ = micro.encode_frames(torch.from_numpy(dec.valid_frames))
        out.append(tok.half().float().numpy())
    return np.stack(out)


def test_strings_are_portable(tmp_path, manifest, micro):
    """Ids, splits and reasons are fixed-width UTF-8 bytes: a reader that is not zarr-python (here
    tensorstore) reads every array of a store, bit-exactly."""
    import tensorstore
    store_path = tmp_path / "portable.zarr"
    extract(manifest, [micro], [store_path], num_frames=T, shard_size=2, text_shard_size=5, progress=False)
    g = zarr.open_group(str(store_path), mode="r")
    names = [f"{grp}/{n}" for grp in ("videos", "texts", "shards") for n in g[grp].array_keys()]
    assert {"videos/ids", "videos/split", "videos/error", "videos/error_detail", "texts/ids", "texts/split",
            "videos/thumbnails", "videos/thumbnail_bytes", "shards/thumbnails_done"} <= set(names)
    for name in names:
        ts_arr = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store_path / name)}},
                                  read=True).result()
        np.testing.assert_array_equal(ts_arr.read().result(), g[name][...], err_msg=name)
    ids = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store_path / "videos/ids")}},
                           read=True).result().read().result()
    assert [bytes(r).rstrip(b"\0").decode() for r in ids] == CacheStore.open(store_path).video_ids


def test_reports_of_several_processes_merge_every_field():
    a = ExtractReport(stores=["s"], videos=10, ok=3, failed=1, skipped=4, captions_skipped=2, seconds=5.0,
                      write_seconds=1.0, frames_encoded=36, precision="bf16", device="cuda:0",
                      failures={"v1": "missing"}, decoders={"decord": 3}, appended={"s": {"videos": 2, "captions": 2}})
    b = ExtractReport(stores=["s"], videos=10, ok=2, skipped=6, captions_skipped=1, seconds=7.0,
                      write_seconds=0.5, frames_encoded=24, precision="bf16", device="cuda:1",
                      decoders={"decord": 1, "pyav": 1})
    m = ExtractReport.merged([a.to_dict(), b.to_dict()])
    assert (m.stores, m.videos, m.precision, m.device) == (["s"], 10, "bf16", "cuda:0")
    assert (m.ok, m.failed, m.frames_encoded, m.write_seconds) == (5, 1, 60, 1.5)
    assert (m.skipped, m.captions_skipped, m.seconds) == (4, 1, 7.0)
    assert m.failures == {"v1": "missing"} and m.decoders == {"decord": 4, "pyav": 1}
    assert m.appended == {"s": {"videos": 2, "captions": 2}} and m.totals == {}
    assert "bf16" in m.summary()
