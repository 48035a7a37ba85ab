"""Thumbnails in the store: made by extraction from the decoded frames, readable by any zarr reader, added
to a store made without them (resumable, the store's own manifest only)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import zarr
from PIL import Image

from core.errors import StoreMismatchError
from manifests.schema import Manifest
from pipeline.decode import decode_video
from pipeline.extraction.job import extract
from pipeline.extraction.thumbnail_backfill import add_thumbnails
from pipeline.store import STATUS_OK, CacheStore
from pipeline.thumbnails import encode_jpeg, thumbnail_frames

pytestmark = pytest.mark.integration

T = 5


@pytest.fixture
def manifest(tmp_path, make_video) -> Manifest:
    videos = [{"video_id": f"v{i}", "path": str(make_video(f"v{i}.mp4", num_frames=12 + 2 * i, seed=i)),
               "split": "train" if i < 4 else "test"} for i in range(6)]
    videos.append({"video_id": "missing", "path": "nope.mp4", "split": "test"})
    captions = [{"caption_id": f"{v['video_id']}-0", "video_id": v["video_id"], "text": f"about {v['video_id']}",
                 "split": v["split"]} for v in videos]
    return Manifest.from_records("toy", videos, captions, root=tmp_path)


def jpeg(b: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(b))
    assert img.format == "JPEG"
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def test_frame_choice_and_size_limits() -> None:
    assert thumbnail_frames(np.array([1, 1, 1, 1, 1, 0, 0], bool)).tolist() == [0, 2, 4]
    assert thumbnail_frames(np.array([0, 1, 0, 1], bool), count=3).tolist() == [1, 3]
    assert thumbnail_frames(np.zeros(4, bool)).size == 0
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    small = encode_jpeg(noise, max_side=128, max_bytes=6000)  # noise barely compresses: quality, then size, give
    assert len(small) <= 6000 and max(Image.open(io.BytesIO(small)).size) <= 128
    assert Image.open(io.BytesIO(encode_jpeg(noise))).size == (128, 96)  # aspect kept


def test_extraction_stores_thumbnails_and_the_command_adds_the_same(tmp_path, manifest, micro) -> None:
    made = tmp_path / "with.zarr"
    extract(manifest, [micro], [made], num_frames=T, shard_size=3, workers=1, progress=False)
    store = CacheStore.open(made)
    assert store.has_thumbnails and store.thumbnail_shards() == {0, 1, 2}
    assert store.attrs["thumbnails"]["count"] == 3
    ok = np.flatnonzero(store.status() == STATUS_OK)
    thumbs = store.thumbnails(range(store.num_videos))
    for r, jpegs in enumerate(thumbs):
        assert len(jpegs) == (3 if r in ok else 0)
    # each thumbnail is the frame extraction sampled (decoded again here), shrunk and JPEG-compressed
    row = store.video_ids.index("v2")
    res = decode_video("v2", manifest.video_path("v2"), T, short_side=micro.image_size)
    picks = thumbnail_frames(res.mask)
    assert np.array_equal(res.indices[picks], np.asarray(store.array("videos/frame_index")[row])[picks])
    for b, t in zip(thumbs[row], picks):
        img = jpeg(b)
        want = np.asarray(Image.fromarray(res.frames[t]).resize(img.shape[1::-1], Image.BICUBIC), np.float32)
        assert np.abs(img - want).mean() < 12.0
        other = np.asarray(Image.fromarray(res.frames[picks[0] if t != picks[0] else picks[-1]]).resize(
            img.shape[1::-1], Image.BICUBIC), np.float32)
        assert np.abs(img - want).mean() < np.abs(img - other).mean()  # not just any frame of the video
    # plain zarr reads them: lengths + zero-padded bytes
    g = zarr.open_group(str(made), mode="r")
    n = int(g["videos/thumbnail_bytes"][row, 1])
    assert bytes(g["videos/thumbnails"][row, 1, :n]) == thumbs[row][1]

    # a store made without thumbnails works as before, then gets the same ones from the command
    bare = tmp_path / "without.zarr"
    extract(manifest, [micro], [bare], num_frames=T, shard_size=3, workers=1, progress=False, thumbnails=0)
    old = CacheStore.open(bare)
    assert not old.has_thumbnails and old.thumbnails([0, 1]) == [[], []] and old.thumbnail_shards() == set()
    report = add_thumbnails(bare, manifest, workers=1, progress=False)
    assert (report.shards_done, report.shards_skipped, report.videos, report.other_frames) == (3, 0, 6, 0)
    assert CacheStore.open(bare).thumbnails(range(7)) == thumbs
    # resumable: a shard not marked done is the only one done again
    CacheStore.open(bare, "r+").array("shards/thumbnails_done")[1] = False
    again = add_thumbnails(bare, manifest, workers=1, progress=False)
    assert (again.shards_done, again.shards_skipped, again.videos) == (1, 2, 2)  # rows 3-5: v3, missing, v4
    assert CacheStore.open(bare).thumbnails(range(7)) == thumbs
    assert "2 videos in 1 shards, 2 shards had them already" in again.summary()


def test_thumbnails_need_the_stores_own_manifest(tmp_path, manifest, micro) -> None:
    path = tmp_path / "s.zarr"
    extract(manifest, [micro], [path], num_frames=T, shard_size=4, workers=1, progress=False, thumbnails=0)
    other = Manifest.from_records("toy", [{"video_id": "x", "path": "x.mp4", "split": "test"}],
                                  [{"caption_id": "x-0", "video_id": "x", "text": "x", "split": "test"}],
                                  root=tmp_path)
    with pytest.raises(StoreMismatchError, match="another manifest"):
        add_thumbnails(path, other, workers=1, progress=False)
    assert not CacheStore.open(path).has_thumbnails
