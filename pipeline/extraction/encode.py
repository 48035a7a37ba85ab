"""Encoding decoded videos in frame batches on the encoder's device, and writing whole shards behind a queue."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from core.errors import EncoderError, StoreError
from pipeline.decode import DecodeResult
from pipeline.encoder_base import Encoder


class ShardBuffer:
    """Per-encoder arrays of one video shard, filled batch by batch."""

    def __init__(self, n: int, T: int, enc: Encoder) -> None:
        self.tokens = np.zeros((n, T, enc.num_tokens, enc.token_dim), dtype=np.float16)
        self.emb = np.zeros((n, T, enc.embed_dim), dtype=np.float32)


class EncodedBatch:
    """One batch's encoder outputs on their way to the host: on CUDA the device-to-host copies run
    without blocking into pinned memory while the loop collects the next batch; :meth:`finish`
    waits for them and puts each video's frames into its rows of a :class:`ShardBuffer`."""

    def __init__(self, enc: Encoder, items: list[tuple[int, DecodeResult]], tokens: Any, emb: Any,
                 finite: Any, event: Any = None) -> None:
        self.enc, self.items, self.tokens, self.emb, self.finite, self.event = enc, items, tokens, emb, finite, event

    def finish(self, buf: ShardBuffer) -> int:
        """Wait for the results, check them and write them into ``buf``; the number of frames."""
        if self.event is not None:
            self.event.synchronize()
        if not bool(self.finite):
            raise EncoderError(f"{self.enc.spec}: the visual tokens are not finite or exceed float16's range "
                               f"(|x| > 65504) at --precision {self.enc.precision}; the store keeps float16 "
                               f"tokens (try --precision fp32, or tokens from another --token-layer)")
        tokens, emb = self.tokens.numpy(), self.emb.numpy()
        pos = 0
        for row, r in self.items:
            k = int(r.mask.sum())
            where = np.flatnonzero(r.mask)
            buf.tokens[row, where] = tokens[pos:pos + k]
            buf.emb[row, where] = emb[pos:pos + k]
            pos += k
        return pos


def host_frames(items: list[tuple[int, DecodeResult]], pin: bool = False) -> list[Any]:
    """The valid frames of each of ``items`` (local row, result) as a host tensor (n, H, W, 3) uint8;
    with ``pin`` all of them in one page-locked buffer (one allocation and one copy per video, whatever
    the number of encoders: :func:`start_batch` takes the same frames for each), from which a CUDA
    device copies them without blocking."""
    import torch

    if not pin:
        return [torch.from_numpy(r.valid_frames) for _, r in items]
    shapes = [(int(r.mask.sum()),) + r.frames.shape[1:] for _, r in items]
    buf = torch.empty(sum(int(np.prod(s)) for s in shapes), dtype=torch.uint8, pin_memory=True)
    out, pos = [], 0
    for (_, r), shape in zip(items, shapes):
        view = buf[pos:pos + int(np.prod(shape))].view(shape)
        np.compress(np.asarray(r.mask, bool), r.frames, axis=0, out=view.numpy())
        out.append(view)
        pos += view.numel()
    return out


def start_batch(enc: Encoder, items: list[tuple[int, DecodeResult]], batch_size: int | None = None,
                frames: list[Any] | None = None) -> EncodedBatch:
    """Preprocess and encode the valid frames of ``items`` (local row, result) in one forward pass,
    under the encoder's precision (``Encoder.autocast``); ``frames``: those frames as
    :func:`host_frames` gives them (made here when not given). On CUDA the frames go up from pinned
    memory and the outputs come back into pinned memory without blocking, on the encoder's own
    device and its current stream (``EncodedBatch.finish`` waits for that stream's event), so any
    ``cuda:N`` is safe. CUDA out of memory is an ``EncoderError`` naming ``--batch-size``."""
    import torch

    cuda = enc.device.type == "cuda"
    try:
        if frames is None:
            frames = host_frames(items, pin=cuda)
        if not cuda:
            return _encode(enc, items, frames)
        with torch.cuda.device(enc.device):
            return _encode(enc, items, frames)
    except torch.cuda.OutOfMemoryError as exc:  # = torch.OutOfMemoryError in recent torch
        n = sum(int(r.mask.sum()) for _, r in items)
        size = f"now {batch_size}" if batch_size else f"this batch: {n} frames"
        raise EncoderError(f"{enc.device.type.upper()} out of memory encoding {n} frames with {enc.spec} at "
                           f"--precision {enc.precision}: lower --batch-size ({size})") from exc


def _encode(enc: Encoder, items: list[tuple[int, DecodeResult]], frames: list[Any]) -> EncodedBatch:
    """The body of :func:`start_batch` (on CUDA, run with ``enc.device`` the current device)."""
    import torch

    xs = [enc.preprocess(f) for f in frames]
    with enc.autocast():
        tokens, emb = enc.encode_images(torch.cat(xs))
    tokens = tokens.to(torch.float16)
    emb = emb.float()
    finite = torch.isfinite(tokens).all()
    if enc.device.type != "cuda":
        return EncodedBatch(enc, items, tokens.cpu(), emb.cpu(), finite)
    host_t = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host_e = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
    host_f = torch.empty((), dtype=torch.bool, pin_memory=True)
    host_t.copy_(tokens, non_blocking=True)  # enqueued on the current stream of the tensors' device
    host_e.copy_(emb, non_blocking=True)
    host_f.copy_(finite, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(enc.device))  # that stream, not the default device's
    return EncodedBatch(enc, items, host_t, host_e, host_f, event)


def encode_batch(enc: Encoder, items: list[tuple[int, DecodeResult]],
                 buf: ShardBuffer) -> int:
    """Encode the valid frames of ``items`` (local row, result) in one forward pass into ``buf``."""
    return start_batch(enc, items).finish(buf)


class ShardWriter:
    """Writes whole shards in a background thread, so store writes overlap decoding and encoding.

    ``submit(i, write)`` queues ``write()`` (which writes shard ``i`` into every store and marks it
    done); at most ``depth`` shards wait (the caller blocks for a slot: memory stays bounded).
    ``depth`` 0 writes in the caller. An error in the writer is raised in the caller by the next
    ``submit`` or by ``close``, naming the shard; shards already queued are still written (each is
    independent), and a shard whose write failed is not marked done, so a re-run writes it again.
    ``close`` waits until every queued shard is written."""

    def __init__(self, depth: int = 2) -> None:
        import queue
        import threading

        self.depth = int(depth)
        if self.depth < 0:
            raise ValueError(f"write_queue must be >= 0, got {depth}")
        self.errors: list[tuple[int, BaseException]] = []
        self.seconds = 0.0       # spent writing
        self.wait_seconds = 0.0  # the caller waited for a free slot
        self.written = 0
        self._queue: Any = queue.Queue(maxsize=max(1, self.depth))
        self._thread = None
        if self.depth:
            self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
            self._thread.start()

    def _write(self, i: int, write: Any) -> None:
        t0 = time.perf_counter()
        try:
            write()
            self.written += 1
        except Exception as exc:  # surfaced in the caller
            self.errors.append((i, exc))
        finally:
            self.seconds += time.perf_counter() - t0

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._write(*job)

    def check(self) -> None:
        """Raise the first error of the writer (a ``StoreError`` naming the shard and the cause)."""
        if self.errors:
            i, exc = self.errors[0]
            more = f" (and {len(self.errors) - 1} more shards)" if len(self.errors) > 1 else ""
            raise StoreError(f"writing video shard {i} failed{more}: {type(exc).__name__}: {exc}; it is not marked "
                             f"done, so running the extraction again writes it") from exc

    def submit(self, i: int, write: Any) -> None:
        """Write shard ``i`` (``write()``) in the writer thread, or here when ``depth`` is 0."""
        import queue

        self.check()
        if self._thread is None:
            self._write(i, write)
            self.check()
            return
        t0 = time.perf_counter()
        while True:
            try:
                self._queue.put((i, write), timeout=0.5)
                break
            except queue.Full:
                self.check()
                if not self._thread.is_alive():
                    raise StoreError("the store writer thread stopped") from None
        self.wait_seconds += time.perf_counter() - t0

    def close(self, check: bool = True) -> None:
        """Write what is queued, stop the thread; ``check``: raise the writer's first error."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if check:
            self.check()
