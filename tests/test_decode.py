"""Decoding: the real fixture clip, generated clips, and failures recorded (never raised)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from pipeline.decode import DecodePool, DecodeTask, decode_video, failed, resize_short_side


def slow_or_crashing_decode(video_id, path, num_frames, short_side, start, end):
    """Decode function for the pool tests (module-level so spawned workers can import it)."""
    name = Path(path).name
    if "hang" in name:
        time.sleep(600)
    if "crash" in name:
        os._exit(3)
    return decode_video(video_id, path, num_frames, short_side, start, end)


def test_fixture_video(fixture_video):
    r = decode_video("v", fixture_video, 12, short_side=224)
    assert r.ok, r.reason
    assert r.num_video_frames == 355 and abs(r.fps - 19.62) < 0.01
    assert r.indices.tolist() == [14, 44, 73, 103, 133, 162, 192, 221, 251, 281, 310, 340]
    assert r.frames.shape == (12, 224, 299, 3) and r.frames.dtype == np.uint8  # 320x240 -> short 224
    assert r.mask.all()
    np.testing.assert_allclose(r.times, r.indices / r.fps, rtol=1e-5)
    clip = decode_video("v", fixture_video, 4, short_side=None, start=2.0, end=4.0)
    assert clip.ok and clip.frames.shape == (4, 240, 320, 3)
    assert (clip.times >= 2.0).all() and (clip.times < 4.0).all()


def test_generated_frames_in_order(make_video):
    path = make_video("g.mp4", num_frames=16, width=96, height=64, fps=8)
    r = decode_video("g", path, 4, short_side=32)
    assert r.ok and r.indices.tolist() == [2, 6, 10, 14]
    assert r.frames.shape == (4, 32, 48, 3)
    red = np.median(r.frames[:, 20:, :, 0].reshape(4, -1), axis=1)
    np.testing.assert_allclose(red, [20, 60, 100, 140], atol=8)


def test_short_video_is_padded(make_video):
    path = make_video("short.mp4", num_frames=3)
    r = decode_video("s", path, 5, short_side=None)
    assert r.ok and r.mask.tolist() == [True] * 3 + [False] * 2
    assert r.indices.tolist() == [0, 1, 2, -1, -1] and not r.frames[3:].any()
    assert r.valid_frames.shape[0] == 3


def test_bad_files_in_process(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4096))
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 100)
    assert "missing" in decode_video("m", tmp_path / "missing.mp4", 4).reason
    assert "empty" in decode_video("z", tmp_path / "zero.mp4", 4).reason
    for name in ("corrupt.mp4", "text.mp4"):
        r = decode_video("c", tmp_path / name, 4)
        assert not r.ok and r.reason
    assert "not a regular file" in decode_video("d", tmp_path, 4).reason


def test_resize_short_side_keeps_aspect():
    f = np.zeros((2, 60, 100, 3), np.uint8)
    assert resize_short_side(f, 30).shape == (2, 30, 50, 3)
    assert resize_short_side(f, 60) is f


def test_pool_records_failures_and_timeouts(tmp_path, make_video, fixture_video):
    good = [make_video(f"ok{i}.mp4", num_frames=12, seed=i) for i in range(3)]
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(2048))
    (tmp_path / "hang.mp4").write_bytes(b"x")
    (tmp_path / "crash.mp4").write_bytes(b"x")
    tasks = [DecodeTask("ok0", str(good[0])), DecodeTask("hang", str(tmp_path / "hang.mp4")),
             DecodeTask("zero", str(tmp_path / "zero.mp4")),
             DecodeTask("missing", str(tmp_path / "missing.mp4")),
             DecodeTask("corrupt", str(tmp_path / "corrupt.mp4")),
             DecodeTask("crash", str(tmp_path / "crash.mp4")),
             DecodeTask("ok1", str(good[1])), DecodeTask("fixture", str(fixture_video)),
             DecodeTask("ok2", str(good[2]), start=0.5, end=1.0)]
    t0 = time.monotonic()
    with DecodePool(4, short_side=32, workers=2, timeout=3.0,
                    decode_fn=slow_or_crashing_decode) as pool:
        out = list(pool.map(tasks))
        assert pool.killed == 2
        # the pool keeps working after replacing workers
        again = list(pool.map([DecodeTask("ok0", str(good[0]))]))
        assert again[0].ok
    assert time.monotonic() - t0 < 30
    assert [r.video_id for r in out] == [t.video_id for t in tasks]
    by = {r.video_id: r for r in out}
    assert by["hang"].reason == "timeout" and not by["hang"].ok
    assert by["crash"].reason.startswith("worker crashed")
    assert "empty" in by["zero"].reason and "missing" in by["missing"].reason
    assert not by["corrupt"].ok and by["corrupt"].reason
    for vid in ("ok0", "ok1", "fixture", "ok2"):
        assert by[vid].ok, by[vid].reason
    assert by["ok2"].indices.tolist() == [4, 5, 6, 7]  # 8 fps, [0.5, 1.0) s -> frames 4..7
    assert by["fixture"].frames.shape[1] == 32


def test_failed_helper():
    r = failed("x", "why")
    assert not r.ok and r.reason == "why" and r.frames is None
