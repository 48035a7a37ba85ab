"""Bounds on hostile videos: refused before decoding when past the limits, the workers' memory, workers dying with their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.decode as decode_mod
from pipeline.config import DecodeLimits, ExtractConfig
from pipeline.decode import DECODERS, OUT_OF_MEMORY, TOO_LARGE, DecodeTask, decode_video
from pipeline.decode_pool import DecodePool
from helpers import hog_decode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def frame_reads(monkeypatch) -> list[str]:
    """Every frame a decoder decodes, by decoder ("decord" / "pyav"): demuxing and reading headers are fine."""
    import av
    import decord

    seen: list[str] = []
    for name in ("get_batch", "next"):
        real = getattr(decord.VideoReader, name)

        def spy(self, *a, _real=real, **kw):
            seen.append("decord")
            return _real(self, *a, **kw)

        monkeypatch.setattr(decord.VideoReader, name, spy)

    class Container:
        """A PyAV container that notes its ``decode`` calls."""

        def __init__(self, inner) -> None:
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __enter__(self):
            self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def decode(self, *a, **kw):
            seen.append("pyav")
            return self._inner.decode(*a, **kw)

    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **kw: Container(real_open(*a, **kw)))
    return seen


def test_a_tall_narrow_video_is_refused_before_decoding(make_video, frame_reads):
    tall = make_video("tall.mp4", num_frames=8, width=16, height=2048)  # 1:128, past the default 1:16
    for d in DECODERS:
        r = decode_video("tall", tall, 4, 224, decoders=(d,))
        assert not r.ok and r.kind == TOO_LARGE and r.frames is None
        assert r.reason == "too large: 16x2048 frames exceed the aspect limit 1:16 (--max-aspect)"
        assert str(tall) in r.detail  # the file is named where the raw messages are kept
    r = decode_video("tall", tall, 4, None, limits=DecodeLimits(max_aspect=200))  # a limit raised lets it through
    assert r.ok and r.frames.shape == (4, 2048, 16, 3)
    frame_reads.clear()
    wide = make_video("wide.mp4", num_frames=8, width=2048, height=64)
    r = decode_video("wide", wide, 4, None, limits=DecodeLimits(max_aspect=20))
    assert r.reason == "too large: 2048x64 frames exceed the aspect limit 1:20 (--max-aspect)"
    assert frame_reads == []


def test_a_refusal_is_a_failed_video_of_the_pool(make_video):
    tall, ok = make_video("tall.mp4", width=16, height=2048), make_video("ok.mp4")
    with DecodePool(4, 32, workers=1, timeout=30) as pool:
        out = list(pool.map([DecodeTask("tall", str(tall)), DecodeTask("ok", str(ok))]))
    assert out[0].kind == TOO_LARGE and out[1].ok and pool.killed == 0
    assert out[0].reason == "too large: 16x2048 frames exceed the aspect limit 1:16 (--max-aspect)"


@pytest.mark.integration
def test_a_refusal_is_a_failed_video_of_extraction(tmp_path, make_video, micro):
    from manifests.schema import Manifest
    from pipeline.extraction.job import extract

    tall, ok = make_video("tall.mp4", width=16, height=2048), make_video("ok.mp4")
    videos = [{"video_id": v, "path": str(p), "split": "test"} for v, p in (("tall", tall), ("ok", ok))]
    captions = [{"caption_id": f"{v['video_id']}-0", "video_id": v["video_id"], "text": "a clip", "split": "test"}
                for v in videos]
    manifest = Manifest.from_records("toy", videos, captions, root=tmp_path)
    store = tmp_path / "s.zarr"
    rep = extract(manifest, [micro], [store], num_frames=4, shard_size=2, workers=1,
                  timeout=30, progress=False)
    assert (rep.ok, rep.failed) == (1, 1)
    fails = json.loads((store / "failures.json").read_text())
    assert fails["tall"]["reason"] == "too large: 16x2048 frames exceed the aspect limit 1:16 (--max-aspect)"


def test_b_frame_count_limit_for_both_decoders(make_video, frame_reads, monkeypatch):
    limits = DecodeLimits(max_frames_claimed=10)
    mp4, mkv = make_video("n.mp4", num_frames=16), make_video("n.mkv", num_frames=16, container="matroska")
    for d in DECODERS:  # the container's own count
        r = decode_video("n", mp4, 4, None, decoders=(d,), limits=limits)
        assert r.kind == TOO_LARGE, (d, r.reason)
        assert r.reason == "too large: the video claims 16 frames, more than the limit of 10 (--max-frames-claimed)"
        # a container that does not count its frames claims its duration times its frame rate
        r = decode_video("n", mkv, 4, None, decoders=(d,), limits=limits)
        assert r.reason == ("too large: the video claims about 16 frames (2 s at 8 fps), more than the limit "
                            "of 10 (--max-frames-claimed)"), (d, r.reason)
    assert decode_video("n", mp4, 4, None, limits=DecodeLimits(max_frames_claimed=16)).ok
    frame_reads.clear()
    # without the header's claims, decord's count and PyAV's count of the packets refuse it
    monkeypatch.setattr(decode_mod, "_probe", lambda p: None)
    r = decode_video("n", mp4, 4, None, decoders=("decord",), limits=limits)
    assert r.reason == "too large: the video claims 16 frames, more than the limit of 10 (--max-frames-claimed)"
    monkeypatch.setattr(decode_mod, "_stream_claims", lambda c, s: decode_mod._Claims(0, 0, 0))
    r = decode_video("n", mkv, 4, None, decoders=("pyav",), limits=limits)
    assert r.reason == "too large: the video stream holds more than 10 frames (--max-frames-claimed)"
    assert frame_reads == []


def test_c_pixel_limit(make_video, frame_reads, monkeypatch):
    path = make_video("big.mp4", num_frames=8, width=96, height=64)
    limits = DecodeLimits(max_frame_pixels=5000)
    want = "too large: 96x64 frames (6,144 pixels) exceed the limit of 5,000 pixels a frame (--max-frame-pixels)"
    for d in DECODERS:
        r = decode_video("b", path, 4, None, decoders=(d,), limits=limits)
        assert r.kind == TOO_LARGE and r.reason == want, (d, r.reason)
    assert frame_reads == []
    assert decode_video("b", path, 4, None, limits=DecodeLimits(max_frame_pixels=6144)).ok
    # a header without the size: decord checks its first frame alone, PyAV each frame before converting it
    monkeypatch.setattr(decode_mod, "_probe", lambda p: None)
    monkeypatch.setattr(decode_mod, "_stream_claims", lambda c, s: decode_mod._Claims(0, 0, 0))
    frame_reads.clear()
    for d in DECODERS:
        r = decode_video("b", path, 4, None, decoders=(d,), limits=limits)
        assert r.reason == want, (d, r.reason)
    assert frame_reads == ["decord", "pyav"]  # decord's one frame (next), PyAV's decoder opened once


def test_d_decord_builds_nothing_of_the_claimed_count(make_video, monkeypatch):
    import decord

    calls: list = []
    real = decord.VideoReader.get_frame_timestamp
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp",
                        lambda self, idx: calls.append(idx) or real(self, idx))
    path = make_video("v.mp4", num_frames=16)
    r = decode_video("v", path, 4, None, decoders=("decord",), limits=DecodeLimits(max_frames_claimed=10))
    assert r.kind == TOO_LARGE and calls == []  # refused before any per-frame array exists
    r = decode_video("v", path, 4, None, decoders=("decord",))
    assert r.ok and r.indices.tolist() == [2, 6, 10, 14]
    assert calls and not any(isinstance(idx, (list, range)) for idx in calls)  # no per-frame Python list
    assert all(isinstance(idx, np.ndarray) and idx.size <= 16 for idx in calls)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` ended (a zombie nobody reaped counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """The pids still running after waiting up to ``seconds`` for them to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


ORPHAN = """
import sys, time
from pathlib import Path
from pipeline.decode import DecodeTask
from pipeline.decode_pool import DecodePool
from helpers import hog_decode
work = Path(sys.argv[1])
pool = DecodePool(2, workers=2, timeout=600, decode_fn=hog_decode)
list(pool.map([DecodeTask(f"m{i}", str(work / "missing.mp4")) for i in range(4)]))
first = sorted(pool.worker_pids)
time.sleep(0.5)  # the feeder thread that used them has ended: they must outlive it
results = pool.map([DecodeTask(f"h{i}", str(work / f"hang{i}.mp4")) for i in range(2)])
deadline = time.monotonic() + 30
while len(list(work.glob("*.started"))) < 2:
    assert time.monotonic() < deadline, "the workers never started the hanging videos"
    time.sleep(0.02)
assert sorted(pool.worker_pids) == first, (first, pool.worker_pids)
print(" ".join(str(p) for p in first), flush=True)
time.sleep(600)
"""


@pytest.mark.integration
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process handling")
def test_e_workers_die_with_a_killed_parent(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    pids: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line.strip(), parent.stderr.read() if parent.poll() is not None else "no worker pids printed"
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and not any(_gone(p) for p in pids)  # busy (hanging), not idle
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert _wait_gone(pids, 5.0) == [], "decoder workers outlived their parent"
    finally:
        _kill(pids)
        if parent.poll() is None:
            parent.kill()
        parent.wait(5)
        parent.stdout.close()
        parent.stderr.close()


WATCHED = """
import os, sys, time
from pipeline.decode_pool import watch_parent
child = os.fork()
if child == 0:
    watch_parent(os.getppid(), 0.05)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_e_the_parent_watch_alone_ends_an_orphan(tmp_path):
    """Where there is no parent-death signal, the watching thread ends the worker."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", WATCHED], stdout=subprocess.PIPE, text=True, env=env)
    pids: list[int] = []
    try:
        pids = [int(parent.stdout.readline())]
        time.sleep(0.2)
        assert not _gone(pids[0])
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert _wait_gone(pids, 3.0) == []
    finally:
        _kill(pids)
        if parent.poll() is None:
            parent.kill()
        parent.wait(5)
        parent.stdout.close()


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux")
def test_f_worker_memory_limit(make_video):
    ok0, hog, ok1 = make_video("ok0.mp4"), make_video("hog.mp4"), make_video("ok1.mp4", seed=1)
    with DecodePool(4, 32, workers=1, timeout=30, decode_fn=hog_decode,
                    limits=DecodeLimits(decoder_memory=2)) as pool:
        out = list(pool.map([DecodeTask("ok0", str(ok0)), DecodeTask("hog", str(hog)),
                             DecodeTask("ok1", str(ok1))]))
    assert out[0].ok and out[0].extra["address_space"] == 2 * 2**30
    assert not out[1].ok and out[1].kind == OUT_OF_MEMORY
    assert out[1].reason == ("out of memory: decoding needed more than the 2 GiB a decoder worker may use "
                             "(--decoder-memory)")
    assert out[2].ok and out[2].extra["pid"] != out[0].extra["pid"]  # the worker was replaced
    with DecodePool(4, 32, workers=1, timeout=30, decode_fn=hog_decode) as pool:  # the default limit
        assert next(iter(pool.map([DecodeTask("ok0", str(ok0))]))).extra["address_space"] == 16 * 2**30


def test_limits_are_checked_and_come_from_the_extraction_config():
    from core.errors import UsageError

    assert ExtractConfig().decode_limits() == DecodeLimits()
    assert ExtractConfig(max_aspect=0, decoder_memory=0).decode_limits() == DecodeLimits(max_aspect=0,
                                                                                          decoder_memory=0)
    for bad, flag in ((dict(max_aspect=0.5), "--max-aspect"), (dict(max_frame_pixels=-1), "--max-frame-pixels"),
                      (dict(decoder_memory=0.25), "--decoder-memory")):
        with pytest.raises(UsageError, match=flag):
            DecodeLimits(**bad)
