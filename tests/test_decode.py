"""Decoding: the real fixture clip, generated clips, and failures recorded (never raised)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.decode import DECODERS, DecodeTask, decode_video, failed, resize_short_side
import pipeline.decode_pool as decode_pool
from pipeline.decode import DecodeResult
from pipeline.decode_pool import DecodePool


def slow_or_crashing_decode(video_id, path, num_frames, short_side, start, end, **kw):
    """Decode function for the pool tests (module-level so spawned workers can import it)."""
    name = Path(path).name
    if "hang" in name:
        time.sleep(600)
    if "crash" in name:
        os._exit(3)
    return decode_video(video_id, path, num_frames, short_side, start, end, **kw)


def big_frames(video_id: str) -> np.ndarray:
    """(12, 240, 320, 3) uint8 frames (2.8 MB: past the memory-file threshold) seeded by the id."""
    return np.random.default_rng(sum(map(ord, video_id))).integers(0, 256, (12, 240, 320, 3), dtype=np.uint8)


def big_decode(video_id, path, num_frames, short_side, start, end, **kw):
    """Decode function returning large frames, for the frame hand-over test."""
    if "crash" in path:
        os._exit(3)
    return DecodeResult(video_id, True, frames=big_frames(video_id), indices=np.arange(12, dtype=np.int32),
                        times=np.arange(12, dtype=np.float32), mask=np.ones(12, bool))


def test_large_frames_come_back_whole_through_the_pool():
    tasks = [DecodeTask(f"v{i}", "x.mp4") for i in range(5)] + [DecodeTask("c", "crash.mp4"),
                                                              DecodeTask("v9", "y.mp4")]
    with DecodePool(12, workers=2, timeout=30, decode_fn=big_decode) as pool:
        out = list(pool.map(tasks))
    assert [r.video_id for r in out] == [t.video_id for t in tasks]
    for r in out:
        if r.video_id == "c":
            assert r.kind == "crashed"
        else:
            assert r.ok and r.frames.flags.writeable
            np.testing.assert_array_equal(r.frames, big_frames(r.video_id))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux memory files")
def test_frames_travel_as_a_memory_file_not_in_the_pickle(monkeypatch):
    import multiprocessing as mp

    parent, child = mp.Pipe(duplex=True)
    res = big_decode("v1", "x.mp4", 12, None, None, None)
    decode_pool.send_frames(child, 4, res)
    assert res.frames is not None  # the sender's result is left as it was
    seq, got, shared = parent.recv()
    assert seq == 4 and got.frames is None and tuple(shared[0]) == (12, 240, 320, 3)
    got = decode_pool.receive_frames(parent, got, shared)
    np.testing.assert_array_equal(got.frames, big_frames("v1"))
    # small frames, or no memory file to be had: the pickle carries them
    small = DecodeResult("s", True, frames=np.ones((2, 8, 8, 3), np.uint8))
    decode_pool.send_frames(child, 5, small)
    seq, got, shared = parent.recv()
    assert shared is None and got.frames.shape == (2, 8, 8, 3)

    def refuse(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(decode_pool.os, "posix_fallocate", refuse)
    sender = threading.Thread(target=decode_pool.send_frames, args=(child, 6, res))  # 2.8 MB through the pipe
    sender.start()
    seq, got, shared = parent.recv()
    sender.join()
    assert shared is None and np.array_equal(got.frames, big_frames("v1"))
    parent.close()
    child.close()


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
    assert decode_video("m", tmp_path / "missing.mp4", 4).kind == "missing"
    assert decode_video("z", tmp_path / "zero.mp4", 4).reason == "empty: the file has 0 bytes"
    for name in ("corrupt.mp4", "text.mp4"):
        r = decode_video("c", tmp_path / name, 4)
        assert not r.ok and r.kind == "not a video" and r.reason.startswith("not a video: ")
        assert "decord:" in r.detail and "pyav:" in r.detail  # both decoders' raw messages, kept apart
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
    assert by["hang"].kind == "timeout" and not by["hang"].ok and "3 s" in by["hang"].reason
    assert by["crash"].kind == "crashed" and "exit code 3" in by["crash"].detail
    assert by["zero"].kind == "empty" and by["missing"].kind == "missing"
    assert not by["corrupt"].ok and by["corrupt"].kind == "not a video"
    for vid in ("ok0", "ok1", "fixture", "ok2"):
        assert by[vid].ok, by[vid].reason
    assert by["ok2"].indices.tolist() == [4, 5, 6, 7]  # 8 fps, [0.5, 1.0) s -> frames 4..7
    assert by["fixture"].frames.shape[1] == 32


def test_failed_helper():
    r = failed("x", "truncated", "why", "raw message")
    assert not r.ok and r.reason == "truncated: why" and r.detail == "raw message" and r.frames is None


HOSTILE = {  # name: write_video options; every one must decode to the same frames with either decoder
    "odd.mp4": dict(width=97, height=61, pix_fmt="yuv444p"),
    "vp9.webm": dict(container="webm", codec="libvpx-vp9"),
    "vp8.webm": dict(container="webm", codec="libvpx"),
    "h264.mkv": dict(container="matroska"),
    "mpeg4.avi": dict(container="avi", codec="mpeg4"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_other_containers_codecs_and_sizes(make_video, name):
    path = make_video(name, num_frames=16, **HOSTILE[name])
    by = {d: decode_video("v", path, 4, None, decoders=(d,)) for d in DECODERS}
    for d, r in by.items():
        assert r.ok and r.decoder == d, (d, r.reason)
        assert r.indices.tolist() == [2, 6, 10, 14]
        red = np.median(r.frames[:, -8:, :, 0].reshape(4, -1), axis=1)
        np.testing.assert_allclose(red, [20, 60, 100, 140], atol=10)
    assert by["decord"].frames.shape == by["pyav"].frames.shape
    np.testing.assert_allclose(by["decord"].frames.astype(float), by["pyav"].frames.astype(float), atol=6)


def test_variable_frame_rate_is_sampled_by_time(make_video):
    # 8 frames 40 ms apart, then 8 frames 250 ms apart: uniform in time, not in frame numbers
    path = make_video("vfr.mkv", num_frames=16, container="matroska", frame_ms=[40] * 8 + [250] * 8)
    for d in DECODERS:
        r = decode_video("v", path, 4, None, decoders=(d,))
        assert r.ok, r.reason
        assert r.indices.tolist() == [6, 9, 11, 14]  # not [2, 6, 10, 14]
        np.testing.assert_allclose(r.times, [0.24, 0.57, 1.07, 1.82], atol=1e-3)  # the frames' own times
    clip = decode_video("v", path, 8, None, start=0.5, end=1.5)
    assert clip.ok and clip.times[clip.mask].min() >= 0.5 and clip.times[clip.mask].max() < 1.5
    assert clip.indices[clip.mask].tolist() == [9, 10, 11, 12]  # the 4 frames shown in [0.5, 1.5) s


def test_rotation_metadata_is_applied(make_video):
    path = make_video("rot.mp4", num_frames=8, width=96, height=64, rotation=90)
    by = {d: decode_video("v", path, 2, None, decoders=(d,)) for d in DECODERS}
    for r in by.values():
        assert r.ok and r.frames.shape == (2, 96, 64, 3)  # upright, as a player shows it
    np.testing.assert_allclose(by["decord"].frames.astype(float), by["pyav"].frames.astype(float), atol=6)


def test_truncated_files_and_the_pyav_fallback(make_video, tmp_path):
    for name, opts in (("cut.mp4", {}), ("cut.mkv", {"container": "matroska"}),
                       ("cut.avi", {"container": "avi", "codec": "mpeg4"})):
        whole = make_video("whole-" + name, num_frames=16, **opts).read_bytes()
        (tmp_path / name).write_bytes(whole[: len(whole) // 2])
        r = decode_video("v", tmp_path / name, 4)
        if r.ok:  # what is there decodes: the clip is shorter, never garbage
            assert r.mask.any()
        else:
            assert r.kind == "truncated", r.reason
    # a file decord cannot open but PyAV can is served by PyAV, and says so
    r = decode_video("v", make_video("ok.mp4"), 4, decoders=("pyav",))
    assert r.ok and r.decoder == "pyav"


def test_fps_sampling(make_video):
    path = make_video("long.mp4", num_frames=24, fps=8)  # 3 s
    r = decode_video("v", path, 12, None, sample_fps=2)
    assert r.ok and r.mask.sum() == 6 and r.indices[:6].tolist() == [2, 6, 10, 14, 18, 22]
    capped = decode_video("v", path, 4, None, sample_fps=2)
    assert capped.mask.all() and capped.indices.tolist() == [3, 9, 15, 21]
