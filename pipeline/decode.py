"""Decoding one video (decord, PyAV where decord fails): its sampled frames, or why it failed.

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

The worker pool that runs it with a per-video timeout (``DecodePool``) is ``pipeline.decode_pool``.

This module does not import torch (workers stay light).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import DecodeLimits
from pipeline.sampling import FrameSample, is_constant_rate, sample_by_time, sample_frames

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
                failures.append((name, DecodeFailure("decode error", one_line(exc), one_line(exc, 1000))))
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
        return failed(video_id, "decode error", one_line(exc), one_line(exc, 1000), time.perf_counter() - t0)


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
    return failed(video_id, OUT_OF_MEMORY, line, one_line(exc, 1000), seconds)


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
        raise DecodeFailure("not a video", "cannot be opened as a video", one_line(exc, 1000)) from None
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
        raise DecodeFailure("decode error", "frames could not be decoded", one_line(exc, 1000)) from None
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
        raise DecodeFailure("not a video", "cannot be opened as a video", one_line(exc, 1000)) from None
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
                                one_line(exc, 1000)) from None
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
        raise DecodeFailure("truncated", "the file ends before its video stream does", one_line(exc, 1000)) from None
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


def one_line(exc: BaseException, limit: int = 300) -> str:
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[:limit - 3] + "..."


DecodeFn = Callable[..., DecodeResult]
