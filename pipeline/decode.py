"""Video decoding with decord in worker processes, with a per-video timeout.

:func:`decode_video` decodes the uniformly sampled frames of one clip (see
``pipeline.sampling``) and resizes them so the shorter side is ``short_side`` (aspect kept;
PIL bicubic). It never raises: missing, empty, corrupt or non-video files and decord errors
(``DECORDError`` is an ``Exception``, not a ``RuntimeError``) give a :class:`DecodeResult` with
``ok=False`` and a ``reason``.

:class:`DecodePool` runs the decoding in spawned worker processes (decord can leak memory and
hang). A background thread in the calling process feeds the workers, collects results and
enforces the timeout: a worker still busy after ``timeout`` seconds (or one that died) is killed
and replaced, and its video is reported with reason ``"timeout"`` (or ``"worker crashed ..."``).
Results come back in submission order while later videos are already being decoded, so decoding
overlaps with whatever the caller does with the results (encoding). Workers are also recycled
after ``max_tasks_per_worker`` videos to bound decord's memory growth.

This module does not import torch (workers stay light).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from pipeline.sampling import FrameSample, sample_frames

TIMEOUT_REASON = "timeout"


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
    (T,) int32 frame numbers (-1 padding); ``times`` (T,) float32 seconds (-1 padding).
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
    extra: dict = field(default_factory=dict)

    @property
    def valid_frames(self) -> np.ndarray:
        """The non-padding frames (n,H,W,3)."""
        return self.frames[self.mask]


def failed(video_id: str, reason: str, seconds: float = 0.0) -> DecodeResult:
    """A failure result."""
    return DecodeResult(video_id=video_id, ok=False, reason=reason, seconds=seconds)


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
                 end: float | None = None) -> DecodeResult:
    """Decode the sampled frames of one clip with decord (in this process); never raises."""
    t0 = time.perf_counter()

    def fail(reason: str) -> DecodeResult:
        return failed(video_id, reason, time.perf_counter() - t0)

    p = Path(path)
    try:
        if not p.exists():
            return fail(f"missing file: {p}")
        if not p.is_file():
            return fail(f"not a regular file: {p}")
        if p.stat().st_size == 0:
            return fail("empty file (0 bytes)")
        import decord

        try:
            vr = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
        except Exception as exc:  # RuntimeError / DECORDError: corrupt, not a video
            return fail(f"cannot open video: {_one_line(exc)}")
        n = len(vr)
        fps = float(vr.get_avg_fps() or 0.0)
        if n <= 0:
            return fail("video has no frames")
        try:
            sample: FrameSample = sample_frames(n, fps, num_frames, start, end)
        except ValueError as exc:
            return fail(f"cannot sample frames: {exc}")
        if sample.num_valid == 0:
            return fail(f"clip [{start}, {end}) s has no frames (video: {n} frames at {fps:.3f} fps)")
        try:
            batch = vr.get_batch(sample.valid_indices.tolist()).asnumpy()
        except Exception as exc:  # DECORDError is an Exception, not a RuntimeError
            return fail(f"decode error: {_one_line(exc)}")
        del vr
        batch = resize_short_side(np.ascontiguousarray(batch, dtype=np.uint8), short_side)
        frames = np.zeros((num_frames,) + batch.shape[1:], dtype=np.uint8)
        frames[sample.mask] = batch
        return DecodeResult(video_id=video_id, ok=True, frames=frames, indices=sample.indices,
                            times=sample.times, mask=sample.mask,
                            seconds=time.perf_counter() - t0, fps=fps, num_video_frames=n)
    except Exception as exc:  # anything else: record, never kill the run
        return fail(f"{type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[:limit - 3] + "..."


DecodeFn = Callable[..., DecodeResult]


def _worker_main(conn: Connection, decode_fn: DecodeFn, num_frames: int,
                 short_side: int | None) -> None:
    """Worker loop: receive ``(seq, task)``, send ``(seq, result)``; ``None`` stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
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
            res = decode_fn(task.video_id, task.path, num_frames, short_side, task.start, task.end)
        except Exception as exc:
            res = failed(task.video_id, f"{type(exc).__name__}: {_one_line(exc)}")
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


class DecodePool:
    """Decoder worker processes with a per-video timeout; see the module docstring."""

    def __init__(self, num_frames: int, short_side: int | None = None, workers: int = 2,
                 timeout: float = 60.0, prefetch: int | None = None,
                 max_tasks_per_worker: int = 1000, decode_fn: DecodeFn | None = None,
                 start_method: str = "spawn") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.num_frames = num_frames
        self.short_side = short_side
        self.num_workers = workers
        self.timeout = float(timeout)
        self.prefetch = prefetch if prefetch is not None else max(4 * workers, 8)
        self.max_tasks_per_worker = max_tasks_per_worker
        self.decode_fn = decode_fn or decode_video
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self.killed = 0  # workers killed for a timeout or crash

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, (self.decode_fn, self.num_frames, self.short_side))

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
                        code = w.proc.exitcode
                        replace.append((w, f"worker crashed (exit code {code})"))
                        continue
                    tag, res = msg
                    if tag == "ready":
                        w.ready = True
                        continue
                    self._put(tag, res)
                    finished += 1
                    w.seq, w.task, w.done = None, None, w.done + 1
                    if w.done >= pool.max_tasks_per_worker:
                        replace.append((w, None))
            now = time.monotonic()
            for w in workers:
                if w.seq is not None and now - w.started > pool.timeout \
                        and all(w is not r for r, _ in replace):
                    replace.append((w, TIMEOUT_REASON))
            for w, reason in replace:
                if reason is not None and w.seq is None and not w.ready:
                    self.startup_failures += 1
                    if self.startup_failures >= 3:
                        raise RuntimeError(f"decoder workers die on start-up ({reason})")
                if w.seq is not None:
                    self._put(w.seq, failed(w.task.video_id, reason or TIMEOUT_REASON,
                                            time.monotonic() - w.started))
                    finished += 1
                    pool.killed += 1
                    w.kill()
                else:
                    w.stop()
                workers[workers.index(w)] = pool._spawn()
