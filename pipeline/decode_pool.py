"""Decoder worker processes with a per-video timeout: ``DecodePool`` runs ``pipeline.decode.decode_video``.

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
A result's frames (full resolution with ``--resize device``: 75 MB for 12 1080p frames) do not go
through the pipe's pickling: on Linux the worker writes them to an anonymous memory file
(``memfd_create``, its pages reserved first so that a full memory limit is an error, not a crash)
and passes its descriptor over the socket; the pool maps the file's pages, privately, as the
result's array: no copy, and freed with the array (``send_frames`` / ``receive_frames``). Small
results, other systems, and a memory file that cannot be made take the pipe.

This module does not import torch (workers stay light).
"""

from __future__ import annotations

import dataclasses
import mmap
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle

import numpy as np

from pipeline.config import DecodeLimits
from pipeline.decode import (CRASHED, DECODERS, OUT_OF_MEMORY, TIMEOUT, DecodeFn, DecodeResult, DecodeTask,
                             decode_video, failed, one_line, out_of_memory)
from pipeline.thumbnails import thumbnails_of
PARENT_GONE = 70  # a worker's exit status when it finds its parent gone
_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent thread ends
MEMFD_MIN_BYTES = 1 << 20  # frames smaller than this go through the pipe


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
        res.extra["thumbnails"] = one_line(exc)
    return res


def _memory_file(frames: np.ndarray) -> int | None:
    """An anonymous memory file holding ``frames``' bytes (its descriptor), or None where one cannot be
    made (no ``memfd_create``, or no room: the pages are reserved before they are written)."""
    if not hasattr(os, "memfd_create") or frames.nbytes < MEMFD_MIN_BYTES:
        return None
    fd = None
    try:
        fd = os.memfd_create("crosstvr-frames", os.MFD_CLOEXEC)
        os.posix_fallocate(fd, 0, frames.nbytes)
        view, done = memoryview(np.ascontiguousarray(frames)).cast("B"), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
        return fd
    except OSError:
        if fd is not None:
            os.close(fd)
        return None


def send_frames(conn: Connection, seq: int, res: DecodeResult) -> None:
    """Send ``(seq, result, shared)``: with ``shared`` = (shape, dtype) the frames follow as a memory
    file's descriptor (``res.frames`` travels empty), with None they are in the pickled result."""
    frames = res.frames if res.ok else None
    fd = _memory_file(frames) if frames is not None else None
    if fd is None:
        conn.send((seq, res, None))
        return
    try:
        res.frames = None
        conn.send((seq, res, (frames.shape, frames.dtype.str)))
        send_handle(conn, fd, os.getppid())
    finally:
        os.close(fd)
        res.frames = frames


def receive_frames(conn: Connection, res: DecodeResult, shared: tuple | None) -> DecodeResult:
    """The result of a ``send_frames`` message with its frames back in place (read from the memory
    file that follows the message on ``conn`` when ``shared`` says so)."""
    if shared is None:
        return res
    shape, dtype = tuple(shared[0]), np.dtype(shared[1])
    fd = recv_handle(conn)
    try:
        size = int(np.prod(shape)) * dtype.itemsize
        if os.fstat(fd).st_size < size:
            raise EOFError(f"the frames' memory file holds {os.fstat(fd).st_size} of {size} bytes")
        # the array is the file's pages, mapped privately: no copy; they are freed with the array
        frames = np.frombuffer(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE), dtype=dtype).reshape(shape)
    finally:
        os.close(fd)
    res.frames = frames
    return res


def _worker_main(conn: Connection, decode_fn: DecodeFn, num_frames: int,
                 short_side: int | None, sample_fps: float | None = None,
                 decoders: tuple[str, ...] | None = None, limits: DecodeLimits | None = None,
                 parent_pid: int | None = None, thumbnails: tuple[int, int, int] | None = None) -> None:
    """Worker loop: receive ``(seq, task)``, send the result (``send_frames``); ``None`` stops. The worker dies
    with its parent (``parent_pid``) and runs under ``limits.decoder_memory``; ``decode_fn`` gets
    ``limits`` when its checks are not the defaults. With ``thumbnails`` each decoded video's
    thumbnails come with its result (:func:`with_thumbnails`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _die_with_parent(parent_pid)
    limits = limits or DecodeLimits()
    _limit_memory(limits.decoder_memory_bytes)
    checks = dataclasses.replace(limits, decoder_memory=DecodeLimits.decoder_memory) != DecodeLimits()
    conn.send(("ready", None, None))
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
            res = failed(task.video_id, "decode error", one_line(exc), one_line(exc, 1000))
        send_frames(conn, seq, res)


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
                        tag, res, shared = w.conn.recv()
                        if tag != "ready":
                            res = receive_frames(w.conn, res, shared)
                    except (EOFError, OSError, RuntimeError):  # RuntimeError: the descriptor never came
                        w.proc.join(1)  # the exit code is known once the process is reaped
                        code = w.proc.exitcode
                        replace.append((w, f"decoder worker crashed (exit code {code})"))
                        continue
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
