"""Video decoding (decord, PyAV where decord fails) in worker processes, with a per-video timeout.

:func:`decode_video` decodes the sampled frames of one clip (see ``pipeline.sampling``) and
resizes them so the shorter side is ``short_side`` (aspect kept; PIL bicubic). It never raises:
missing, empty, corrupt, truncated or non-video files give a :class:`DecodeResult` with
``ok=False``, a ``kind`` (missing / empty / not a video / truncated / decode error / too large /
out of memory / timeout / crashed), a short ``reason`` ("<kind>: <one line>", what the store
keeps) and the decoders' raw messages in ``detail``. decord is tried first; PyAV reads what decord cannot (other containers,
damaged indexes), and the result says which decoder served the clip. ``decoder_order`` puts another
one first (``extract --decoder pyav``). With ``short_side=None`` frames keep their decoded size (the
encoder's device resizes them: ``extract --resize device``).

Hostile files are refused before their frames are decoded (:class:`pipeline.config.DecodeLimits`):
a video whose frames claim more pixels, a more extreme aspect ratio, or which claims more frames
than the limits allow fails as ``too large``. The claims come from the container's header (PyAV,
nothing decoded) and from each decoder's own count; PyAV also checks every decoded frame's size
before converting it.

:class:`DecodePool` runs the decoding in spawned worker processes (decord can leak memory and
hang). A background thread in the calling process feeds the workers, collects results and
enforces the timeout: a worker still busy after ``timeout`` seconds (or one that died) is killed
and replaced, and its video is reported as a ``timeout`` (or ``crashed``).
Results come back in submission order while later videos are already being decoded, so decoding
overlaps with whatever the caller does with the results (encoding). Workers are also recycled
after ``max_tasks_per_worker`` videos to bound decord's memory growth. Each worker runs under an
address-space limit (``DecodeLimits.decoder_memory``): a decoder that still asks for more gets a
``MemoryError`` (the video fails as ``out of memory`` and the worker is replaced) or dies (``crashed``).
Workers die with the process that started them, even one killed with SIGKILL: on Linux through the
parent-death signal (armed in the worker; the workers are started by one thread that lives as long
as the pool, since the signal follows the thread that started a process), elsewhere too through a
thread in the worker that watches its parent process id. A pool given ``thumbnails`` also makes each
video's thumbnails in the worker, from the frames it returns (``DecodeResult.thumbnails``), so the
process that encodes never spends time on JPEGs.

This module does not import torch (workers stay light).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from pipeline.config import DecodeLimits
from pipeline.sampling import FrameSample, is_constant_rate, sample_by_time, sample_frames
from pipeline.thumbnails import thumbnails_of

TIMEOUT = "timeout"
CRASHED = "crashed"
TOO_LARGE = "too large"          # the video claims more than DecodeLimits allow (refused before decoding)
OUT_OF_MEMORY = "out of memory"  # decoding needed more than a worker's DecodeLimits.decoder_memory
# What a failure can be, for people: the short reason stored is "<kind>: <one line>".
FAILURE_KINDS = ("missing", "empty", "not a video", "truncated", "decode error", TOO_LARGE, OUT_OF_MEMORY,
                 TIMEOUT, CRASHED)
DECODERS = ("decord", "pyav")  # the default order (``decoder_order("auto")``)
# the first bytes of the containers videos come in (offset, magic): a file that starts like one but
# cannot be read is damaged or cut short, not something else
_SIGNATURES = ((4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (0, b"\x1aE\xdf\xa3"),
               (0, b"RIFF"), (0, b"OggS"), (0, b"FLV"), (0, b"\x00\x00\x01\xba"), (0, b"G"))


@dataclass
class DecodeTask:
    """One clip to decode."""

    video_id: str
    path: str
    start: float | None = None
    end: float | None = None


@dataclass
class DecodeResult:
    """Decoded frames of one clip, or why it failed.

    ``frames`` (T,H,W,3) uint8 with zero rows where ``mask`` is False (padding); ``indices``
    (T,) int32 frame numbers (-1 padding); ``times`` (T,) float32 seconds (-1 padding). A failure
    has ``kind`` (one of ``FAILURE_KINDS``), ``reason`` (``"<kind>: <one line>"``, what the store
    keeps) and ``detail`` (the decoders' raw messages). ``decoder`` names the decoder that served it.
    ``thumbnails``: the video's JPEGs (``pipeline.thumbnails.thumbnails_of`` of ``frames``), made in the
    worker of a :class:`DecodePool` given ``thumbnails``; ``None`` otherwise.
    """

    video_id: str
    ok: bool
    frames: np.ndarray | None = None
    indices: np.ndarray | None = None
    times: np.ndarray | None = None
    mask: np.ndarray | None = None
    reason: str = ""
    seconds: float = 0.0
    fps: float = 0.0
    num_video_frames: int = 0
    kind: str = ""
    detail: str = ""
    decoder: str = ""
    extra: dict = field(default_factory=dict)
    thumbnails: list[bytes] | None = None

    @property
    def valid_frames(self) -> np.ndarray:
        """The non-padding frames (n,H,W,3)."""
        return self.frames[self.mask]


def failed(video_id: str, kind: str, line: str = "", detail: str = "", seconds: float = 0.0) -> DecodeResult:
    """A failure result of ``kind`` (``FAILURE_KINDS``) with a short line and the raw ``detail``."""
    return DecodeResult(video_id=video_id, ok=False, kind=kind, reason=f"{kind}: {line}" if line else kind,
                        detail=detail, seconds=seconds)


class DecodeFailure(Exception):
    """Raised by a decoder: ``kind`` (``FAILURE_KINDS``), a short line for people, the raw message."""

    def __init__(self, kind: str, line: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {line}")
        self.kind, self.line, self.detail = kind, line, detail


def resize_short_side(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize (n,H,W,3) uint8 so min(H,W) == short_side (aspect kept); no-op when equal/None."""
    if not short_side or frames.shape[0] == 0:
        return frames
    h, w = frames.shape[1:3]
    if min(h, w) == short_side:
        return frames
    from PIL import Image

    scale = short_side / min(h, w)
    nh, nw = max(short_side, round(h * scale)), max(short_side, round(w * scale))
    out = np.empty((frames.shape[0], nh, nw, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(f).resize((nw, nh), Image.BICUBIC))
    return out


def decode_video(video_id: str, path: str | os.PathLike, num_frames: int,
                 short_side: int | None = None, start: float | None = None,
                 end: float | None = None, sample_fps: float | None = None,
                 decoders: tuple[str, ...] = DECODERS, limits: DecodeLimits | None = None) -> DecodeResult:
    """Decode the sampled frames of one clip (in this process); never raises.

    The decoders are tried in order (decord, then PyAV where decord cannot read the file); the
    first that reads the clip serves it (``DecodeResult.decoder``). When none does, the failure
    is classified (``FAILURE_KINDS``) and every decoder's raw message kept in ``detail``. A video
    past ``limits`` (default :class:`DecodeLimits`) fails as ``too large`` at once, no other decoder
    tried; one that exhausts the memory fails as ``out of memory``.
    """
    t0 = time.perf_counter()
    p = Path(path)
    limits = limits or DecodeLimits()
    try:
        if not p.exists():
            return failed(video_id, "missing", f"no file at {p}", seconds=time.perf_counter() - t0)
        if not p.is_file():
            return failed(video_id, "missing", f"{p} is not a regular file", seconds=time.perf_counter() - t0)
        if p.stat().st_size == 0:
            return failed(video_id, "empty", "the file has 0 bytes", seconds=time.perf_counter() - t0)
        failures: list[tuple[str, DecodeFailure]] = []
        for name in decoders:
            try:
                frames, sample, fps, n = _READERS[name](p, num_frames, start, end, sample_fps, limits)
            except DecodeFailure as exc:
                if exc.kind == TOO_LARGE:  # refused, not unreadable: no other decoder may try it
                    return failed(video_id, TOO_LARGE, exc.line, f"{p}: {name}: {exc.detail or exc.line}",
                                  time.perf_counter() - t0)
                failures.append((name, exc))
                continue
            except MemoryError:
                raise
            except Exception as exc:  # a decoder's own error: DECORDError is an Exception, not a RuntimeError
                failures.append((name, DecodeFailure("decode error", _one_line(exc), _one_line(exc, 1000))))
                continue
            batch = resize_short_side(np.ascontiguousarray(frames, dtype=np.uint8), short_side)
            out = np.zeros((num_frames,) + batch.shape[1:], dtype=np.uint8)
            out[sample.mask] = batch
            return DecodeResult(video_id=video_id, ok=True, frames=out, indices=sample.indices, times=sample.times,
                                mask=sample.mask, seconds=time.perf_counter() - t0, fps=fps, num_video_frames=n,
                                decoder=name)
        kind, line = _classify(p, failures)
        detail = "; ".join(f"{name}: {f.detail or f.line}" for name, f in failures)
        return failed(video_id, kind, line, detail, time.perf_counter() - t0)
    except MemoryError as exc:
        return out_of_memory(video_id, exc, time.perf_counter() - t0)
    except Exception as exc:  # anything else: record, never kill the run
        return failed(video_id, "decode error", _one_line(exc), _one_line(exc, 1000), time.perf_counter() - t0)


def _classify(path: Path, failures: list[tuple[str, DecodeFailure]]) -> tuple[str, str]:
    """One kind and line for a file no decoder could read: what the decoders found, and a file that
    starts like a video container but cannot be opened counts as truncated (damaged or cut short)."""
    kinds = [f.kind for _, f in failures]
    for kind in ("truncated", "decode error"):
        if kind in kinds:
            return kind, failures[kinds.index(kind)][1].line
    if kinds and all(k == "not a video" for k in kinds):
        if _looks_like_a_container(path):
            return "truncated", "the file starts like a video container but cannot be read (cut short or damaged)"
        return "not a video", "no decoder recognises the file as a video"
    return (kinds[0], failures[0][1].line) if failures else ("decode error", "no decoder available")


def _looks_like_a_container(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return any(head[off:off + len(magic)] == magic for off, magic in _SIGNATURES if magic != b"G") or (
        len(head) > 0 and head[:1] == b"G" and path.suffix.lower() in (".ts", ".m2ts", ".mts"))


def out_of_memory(video_id: str, exc: BaseException, seconds: float = 0.0) -> DecodeResult:
    """The failure of a video whose decoding raised ``MemoryError`` (the worker's limit, when one is set)."""
    limit = _memory_limit()
    line = (f"decoding needed more than the {limit / 2**30:g} GiB a decoder worker may use (--decoder-memory)"
            if limit else "decoding ran out of memory")
    return failed(video_id, OUT_OF_MEMORY, line, _one_line(exc, 1000), seconds)


def _memory_limit() -> int | None:
    """This process's address-space limit in bytes (None: none)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class _Claims:
    """What a container says of its video stream before any frame is decoded (0: not said)."""

    width: int
    height: int
    frames: int
    frames_from: str = ""  # how ``frames`` was found, for the message ("" when the container counts them)


def _stream_claims(container, stream) -> _Claims:
    """The claims of PyAV's ``stream`` of ``container`` (its header: nothing decoded). A container that
    does not count its frames claims its duration times its frame rate."""
    frames, frames_from = int(stream.frames or 0), ""
    rate = float(stream.average_rate or 0.0)  # measured on the first packets (a guessed rate can be a time base)
    if frames <= 0 and rate > 0:
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = float(container.duration or 0) / 1_000_000  # AV_TIME_BASE
        if seconds > 0:
            frames, frames_from = int(np.ceil(seconds * rate)), f"{seconds:.0f} s at {rate:g} fps"
    return _Claims(int(stream.width or 0), int(stream.height or 0), max(frames, 0), frames_from)


def _probe(p: Path) -> _Claims | None:
    """The claims of the file's first video stream, read by PyAV (None where PyAV cannot open it)."""
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                return None
            return _stream_claims(container, container.streams.video[0])
    except Exception:
        return None


def _check_claims(claims: _Claims, limits: DecodeLimits) -> None:
    """Raise ``DecodeFailure(TOO_LARGE)`` when ``claims`` are past ``limits``."""
    if claims.width > 0 and claims.height > 0:
        _check_size(claims.width, claims.height, limits)
    if claims.frames > 0:
        _check_count(claims.frames, limits, claims.frames_from)


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    """Raise ``DecodeFailure(TOO_LARGE)`` for frames of ``width`` x ``height`` past ``limits``."""
    pixels = width * height
    if limits.max_frame_pixels and pixels > limits.max_frame_pixels:
        raise DecodeFailure(TOO_LARGE, f"{width}x{height} frames ({pixels:,} pixels) exceed the limit of "
                                       f"{limits.max_frame_pixels:,} pixels a frame (--max-frame-pixels)")
    if limits.max_aspect and max(width, height) > limits.max_aspect * min(width, height):
        raise DecodeFailure(TOO_LARGE, f"{width}x{height} frames exceed the aspect limit 1:{limits.max_aspect:g} "
                                       f"(--max-aspect)")


def _check_count(frames: int, limits: DecodeLimits, frames_from: str = "") -> None:
    """Raise ``DecodeFailure(TOO_LARGE)`` for a video that claims ``frames`` frames, more than ``limits``."""
    if limits.max_frames_claimed and frames > limits.max_frames_claimed:
        about = f"about {frames:,} frames ({frames_from})" if frames_from else f"{frames:,} frames"
        raise DecodeFailure(TOO_LARGE, f"the video claims {about}, more than the limit of "
                                       f"{limits.max_frames_claimed:,} (--max-frames-claimed)")


def _sample(n: int, fps: float, num_frames: int, start: float | None, end: float | None,
            sample_fps: float | None, timestamps: np.ndarray | None = None) -> FrameSample:
    """The frames to decode: by frame number, or by time for a variable-frame-rate video."""
    if n <= 0:
        raise DecodeFailure("not a video", "the video stream has no frames")
    try:
        if timestamps is not None and len(timestamps) == n and not is_constant_rate(timestamps, fps):
            sample = sample_by_time(timestamps, num_frames, start, end, sample_fps)
        else:
            sample = sample_frames(n, fps, num_frames, start, end, sample_fps=sample_fps)
    except ValueError as exc:
        raise DecodeFailure("decode error", f"cannot sample frames: {exc}") from None
    if sample.num_valid == 0:
        dur = f"{n / fps:.2f} s" if fps else f"{n} frames"
        raise DecodeFailure("truncated", f"the clip [{start}, {end}) s lies beyond the video ({dur})")
    return sample


def _read_decord(p: Path, num_frames: int, start: float | None, end: float | None,
                 sample_fps: float | None, limits: DecodeLimits) -> tuple[np.ndarray, FrameSample, float, int]:
    """decord: the header's claims (PyAV) and decord's frame count are checked against ``limits``
    before any frame is decoded; where PyAV cannot read the header, the frame size is checked on the
    first frame alone."""
    import av  # noqa: F401  (loaded before decord: decord's own FFmpeg libraries would shadow PyAV's codecs)
    import decord

    claims = _probe(p)
    if claims is not None:
        _check_claims(claims, limits)
    try:
        vr = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # RuntimeError / DECORDError: corrupt, not a video
        raise DecodeFailure("not a video", "cannot be opened as a video", _one_line(exc, 1000)) from None
    n = len(vr)
    _check_count(n, limits)
    if claims is None or not (claims.width and claims.height):
        try:
            height, width = vr.next().shape[:2]
        except Exception:  # unreadable frames: get_batch says so below
            pass
        else:
            _check_size(width, height, limits)
    fps = float(vr.get_avg_fps() or 0.0)
    try:  # every frame's time (a variable frame rate is sampled by time), as an array: n is bounded above
        timestamps = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0] if n else None
    except Exception:  # no usable timestamps: frame numbers and the average rate
        timestamps = None
    sample = _sample(n, fps, num_frames, start, end, sample_fps, timestamps)
    try:
        batch = vr.get_batch(sample.valid_indices.tolist()).asnumpy()
    except Exception as exc:
        raise DecodeFailure("decode error", "frames could not be decoded", _one_line(exc, 1000)) from None
    return batch, sample, fps, n


def _read_pyav(p: Path, num_frames: int, start: float | None, end: float | None,
               sample_fps: float | None, limits: DecodeLimits) -> tuple[np.ndarray, FrameSample, float, int]:
    """PyAV: check the stream's claims against ``limits``, count the video packets (no decoding; more
    than ``limits`` allow stops the count), then decode in order up to the last frame needed (frame
    ``i`` is the ``i``-th decoded frame, as decord counts them), each frame's size checked before it
    is converted."""
    import av

    try:
        container = av.open(str(p))
    except Exception as exc:
        raise DecodeFailure("not a video", "cannot be opened as a video", _one_line(exc, 1000)) from None
    with container:
        if not container.streams.video:
            raise DecodeFailure("not a video", "the file has no video stream")
        stream = container.streams.video[0]
        _check_claims(_stream_claims(container, stream), limits)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        pts = _packet_times(container, stream, limits)
        n = len(pts)
        timestamps = None
        if n and all(p is not None for p in pts) and stream.time_base:
            timestamps = np.sort(np.asarray(pts, dtype=np.float64)) * float(stream.time_base)
            timestamps -= float(stream.start_time or 0) * float(stream.time_base)
    sample = _sample(n, fps, num_frames, start, end, sample_fps, timestamps)
    wanted = {int(i): k for k, i in enumerate(sample.valid_indices)}
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    got = 0
    try:
        with av.open(str(p)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                got = i + 1
                if i in wanted:  # turned upright as players show it (and as decord returns it)
                    _check_size(frame.width, frame.height, limits)  # the size may change mid-stream
                    frames[i] = np.rot90(frame.to_ndarray(format="rgb24"), round(frame.rotation / 90) % 4)
                if i >= last:
                    break
    except (DecodeFailure, MemoryError):
        raise
    except Exception as exc:
        if len(frames) < len(wanted):
            raise DecodeFailure("truncated", f"only {got} of {n} frames could be decoded",
                                _one_line(exc, 1000)) from None
    if len(frames) < len(wanted):
        raise DecodeFailure("truncated", f"only {got} of {n} frames could be decoded")
    shapes = {f.shape for f in frames.values()}
    if len(shapes) > 1:  # the size changes mid-stream: bring every frame to the first one's size
        h, w = frames[min(frames)].shape[:2]
        from PIL import Image

        frames = {i: np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) if f.shape[:2] != (h, w) else f
                  for i, f in frames.items()}
    return np.stack([frames[int(i)] for i in sample.valid_indices]), sample, fps, n


def _packet_times(container, stream, limits: DecodeLimits) -> list:
    """The presentation times of the video packets of ``stream`` (demuxed, nothing decoded); more
    packets than ``limits.max_frames_claimed`` stop the count (``too large``)."""
    cap = limits.max_frames_claimed
    pts: list = []
    try:
        for pkt in container.demux(stream):
            if pkt.size:
                pts.append(pkt.pts)
                if cap and len(pts) > cap:
                    break
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeFailure("truncated", "the file ends before its video stream does", _one_line(exc, 1000)) from None
    if cap and len(pts) > cap:
        raise DecodeFailure(TOO_LARGE, f"the video stream holds more than {cap:,} frames (--max-frames-claimed)")
    return pts


_READERS = {"decord": _read_decord, "pyav": _read_pyav}


def decoder_order(first: str | None = "auto") -> tuple[str, ...]:
    """The decoders to try, ``first`` first (``--decoder``): ``auto`` (or None) is :data:`DECODERS`;
    a named decoder is tried first and the others read what it cannot."""
    name = (first or "auto").lower()
    if name == "auto":
        return DECODERS
    if name not in _READERS:
        from core.errors import UsageError

        raise UsageError(f"--decoder must be auto or one of {', '.join(_READERS)}, got {first!r}")
    return (name,) + tuple(d for d in DECODERS if d != name)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[:limit - 3] + "..."


DecodeFn = Callable[..., DecodeResult]


PARENT_GONE = 70  # a worker's exit status when it finds its parent gone
_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent thread ends


def _die_with_parent(parent_pid: int | None, interval: float = 0.5) -> None:
    """Make this worker process die with its parent ``parent_pid`` (None: the parent it has now), even
    one killed with SIGKILL: on Linux the parent-death signal (SIGKILL, sent by the kernel), and
    everywhere a thread that polls the parent process id every ``interval`` seconds."""
    expected = parent_pid or os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the thread below still watches
            pass
    if os.getppid() != expected:  # the parent died before the signal was armed
        os._exit(PARENT_GONE)
    watch_parent(expected, interval)


def watch_parent(parent_pid: int, interval: float = 0.5) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit``, no clean-up) once its parent process
    id is no longer ``parent_pid`` (the parent died and the process was handed to another)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(PARENT_GONE)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def _limit_memory(limit: int | None) -> None:
    """Cap this process's address space (``RLIMIT_AS``) at ``limit`` bytes (None: no cap); a lower
    limit already set stays."""
    if not limit:
        return
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):  # a system that does not let a process set it
        pass


def with_thumbnails(res: DecodeResult, thumbnails: tuple[int, int, int] | None) -> DecodeResult:
    """``res`` with its ``thumbnails`` (``(count, max_side, max_bytes)`` of ``thumbnails_of``) made from
    its frames, when it decoded and ``thumbnails`` is given. A frame no JPEG can hold leaves the video
    without thumbnails (``extra["thumbnails"]`` says why) rather than failing it."""
    if not thumbnails or not res.ok or res.frames is None:
        return res
    try:
        res.thumbnails = thumbnails_of(res.frames, res.mask, *thumbnails)
    except Exception as exc:  # the video's tokens are still good
        res.thumbnails = []
        res.extra["thumbnails"] = _one_line(exc)
    return res


def _worker_main(conn: Connection, decode_fn: DecodeFn, num_frames: int,
                 short_side: int | None, sample_fps: float | None = None,
                 decoders: tuple[str, ...] | None = None, limits: DecodeLimits | None = None,
                 parent_pid: int | None = None, thumbnails: tuple[int, int, int] | None = None) -> None:
    """Worker loop: receive ``(seq, task)``, send ``(seq, result)``; ``None`` stops. The worker dies
    with its parent (``parent_pid``) and runs under ``limits.decoder_memory``; ``decode_fn`` gets
    ``limits`` when its checks are not the defaults. With ``thumbnails`` each decoded video's
    thumbnails come with its result (:func:`with_thumbnails`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _die_with_parent(parent_pid)
    limits = limits or DecodeLimits()
    _limit_memory(limits.decoder_memory_bytes)
    checks = dataclasses.replace(limits, decoder_memory=DecodeLimits.decoder_memory) != DecodeLimits()
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        seq, task = msg
        try:
            res = decode_fn(task.video_id, task.path, num_frames, short_side, task.start, task.end,
                            **({"sample_fps": sample_fps} if sample_fps else {}),
                            **({"decoders": decoders} if decoders and decoders != DECODERS else {}),
                            **({"limits": limits} if checks else {}))
            res = with_thumbnails(res, thumbnails)
        except MemoryError as exc:
            res = out_of_memory(task.video_id, exc)
        except Exception as exc:
            res = failed(task.video_id, "decode error", _one_line(exc), _one_line(exc, 1000))
        conn.send((seq, res))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, args: tuple) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child,) + args, daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.seq: int | None = None
        self.task: DecodeTask | None = None
        self.started = 0.0
        self.done = 0

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        finally:
            self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        self.conn.close()


class _Spawner:
    """Starts the pool's workers from one thread that lives until the pool is closed: Linux sends the
    parent-death signal when the *thread* that started a process ends, and the feeder thread that
    starts and replaces workers ends with each ``map``."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="decode-spawner", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            make, out, done = job
            try:
                out.append(make())
            except BaseException as exc:  # handed to the caller
                out.append(exc)
            done.set()

    def run(self, make: Callable[[], "_Worker"]) -> "_Worker":
        """``make()`` in the spawner thread; its result (or its exception, raised here)."""
        out: list = []
        done = threading.Event()
        self._jobs.put((make, out, done))
        while not done.wait(0.5):
            if not self._thread.is_alive():  # closed meanwhile
                raise RuntimeError("the decoder pool was closed while it started a worker")
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class DecodePool:
    """Decoder worker processes with a per-video timeout; see the module docstring.

    ``limits`` (default :class:`DecodeLimits`): what a video may claim, and each worker's memory.
    ``thumbnails`` (``(count, max_side, max_bytes)``): each decoded video's thumbnails are made in its
    worker, from the frames the result carries (``DecodeResult.thumbnails``)."""

    def __init__(self, num_frames: int, short_side: int | None = None, workers: int = 2,
                 timeout: float = 60.0, prefetch: int | None = None,
                 max_tasks_per_worker: int = 1000, decode_fn: DecodeFn | None = None,
                 start_method: str = "spawn", sample_fps: float | None = None,
                 decoders: tuple[str, ...] | None = None, limits: DecodeLimits | None = None,
                 thumbnails: tuple[int, int, int] | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.num_frames = num_frames
        self.short_side = short_side
        self.num_workers = workers
        self.timeout = float(timeout)
        self.prefetch = prefetch if prefetch is not None else max(4 * workers, 8)
        self.max_tasks_per_worker = max_tasks_per_worker
        self.decode_fn = decode_fn or decode_video
        self.sample_fps = sample_fps
        self.decoders = tuple(decoders) if decoders else None  # None / DECODERS: decode_fn's own order
        self.limits = limits or DecodeLimits()
        self.thumbnails = tuple(int(v) for v in thumbnails) if thumbnails else None
        self._ctx = mp.get_context(start_method)
        # forkserver's workers are the server's children, not ours: they watch the parent they find
        self._parent_pid = os.getpid() if start_method in ("spawn", "fork") else None
        self._workers: list[_Worker] = []
        self._spawner: _Spawner | None = None
        self.killed = 0  # workers killed for a timeout or crash

    def _spawn(self) -> _Worker:
        if self._spawner is None:
            self._spawner = _Spawner()
        args = (self.decode_fn, self.num_frames, self.short_side, self.sample_fps, self.decoders, self.limits,
                self._parent_pid, self.thumbnails)
        return self._spawner.run(lambda: _Worker(self._ctx, args))

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [w.proc.pid for w in self._workers]

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker."""
        for w in self._workers:
            if w.seq is not None:
                w.kill()
            else:
                w.stop()
        self._workers = []
        if self._spawner is not None:
            self._spawner.close()
            self._spawner = None

    def map(self, tasks: Iterable[DecodeTask]) -> Iterator[DecodeResult]:
        """Decode ``tasks``; results in order. Decoding starts at once (before iteration)."""
        return _OrderedRun(self, list(tasks))


class _OrderedRun(Iterator[DecodeResult]):
    """One ``map`` call: a feeder thread plus an ordered iterator over its results."""

    def __init__(self, pool: DecodePool, tasks: list[DecodeTask]) -> None:
        self.pool, self.tasks = pool, tasks
        self.results: dict[int, DecodeResult] = {}
        self.cond = threading.Condition()
        self.next_out = 0
        self.stop = False
        self.error: BaseException | None = None
        self.startup_failures = 0
        self.thread = threading.Thread(target=self._run, name="decode-feeder", daemon=True)
        self.thread.start()

    # -- consumer side ----------------------------------------------------------------------
    def __iter__(self) -> "_OrderedRun":
        return self

    def __next__(self) -> DecodeResult:
        if self.next_out >= len(self.tasks):
            self.close()
            raise StopIteration
        with self.cond:
            while self.next_out not in self.results and self.error is None:
                self.cond.wait(0.5)
            if self.error is not None and self.next_out not in self.results:
                raise RuntimeError("decode feeder thread failed") from self.error
            res = self.results.pop(self.next_out)
            self.next_out += 1
            self.cond.notify_all()
        return res

    def close(self) -> None:
        """Stop feeding; workers still busy with abandoned tasks are killed."""
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()
        keep = []
        for w in self.pool._workers:
            if w.seq is not None:
                w.kill()
            else:
                keep.append(w)
        self.pool._workers = keep

    def __del__(self) -> None:
        try:
            if not self.stop:
                self.close()
        except Exception:
            pass

    # -- feeder thread ----------------------------------------------------------------------
    def _put(self, seq: int, res: DecodeResult) -> None:
        with self.cond:
            self.results[seq] = res
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            self._feed()
        except BaseException as exc:  # surfaced to the consumer
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _feed(self) -> None:
        pool = self.pool
        workers = pool._workers
        while len(workers) < pool.num_workers:
            workers.append(pool._spawn())
        next_in, finished, total = 0, 0, len(self.tasks)
        while finished < total:
            with self.cond:
                if self.stop:
                    return
                window = self.next_out + pool.prefetch
            # hand tasks to idle, ready workers
            for w in workers:
                if next_in >= total or next_in >= window:
                    break
                if w.ready and w.seq is None:
                    task = self.tasks[next_in]
                    try:
                        w.conn.send((next_in, task))
                    except OSError:
                        continue  # dead worker: noticed below
                    w.seq, w.task, w.started = next_in, task, time.monotonic()
                    next_in += 1
            busy = [w for w in workers if w.seq is not None]
            now = time.monotonic()
            wait_s = 0.2
            if busy:
                wait_s = min(wait_s, max(0.0, min(w.started + pool.timeout for w in busy) - now))
            ready = wait([w.conn for w in workers], timeout=wait_s)
            replace: list[tuple[_Worker, str | None]] = []
            for w in workers:
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(1)  # the exit code is known once the process is reaped
                        code = w.proc.exitcode
                        replace.append((w, f"decoder worker crashed (exit code {code})"))
                        continue
                    tag, res = msg
                    if tag == "ready":
                        w.ready = True
                        continue
                    self._put(tag, res)
                    finished += 1
                    w.seq, w.task, w.done = None, None, w.done + 1
                    if w.done >= pool.max_tasks_per_worker or getattr(res, "kind", "") == OUT_OF_MEMORY:
                        replace.append((w, None))  # recycled (an exhausted heap is not trusted again)
            now = time.monotonic()
            for w in workers:
                if w.seq is not None and now - w.started > pool.timeout \
                        and all(w is not r for r, _ in replace):
                    replace.append((w, TIMEOUT))
            for w, reason in replace:
                if reason is not None and w.seq is None and not w.ready:
                    self.startup_failures += 1
                    if self.startup_failures >= 3:
                        raise RuntimeError(f"decoder workers die on start-up ({reason})")
                if w.seq is not None:
                    elapsed = time.monotonic() - w.started
                    if reason in (None, TIMEOUT):
                        res = failed(w.task.video_id, TIMEOUT, f"decoding took longer than {pool.timeout:g} s",
                                     seconds=elapsed)
                    else:
                        res = failed(w.task.video_id, CRASHED, "the decoder process died on this file", reason,
                                     elapsed)
                    self._put(w.seq, res)
                    finished += 1
                    pool.killed += 1
                    w.kill()
                else:
                    w.stop()
                workers[workers.index(w)] = pool._spawn()
