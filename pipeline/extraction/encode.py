"""Decoded videos through the encoders in frame batches: pinned copies up and back, one batch in flight."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import EncoderError
from pipeline.decode import DecodeResult
from pipeline.encoder_base import Encoder
from pipeline.encoders import EncoderSpec, load_encoder, parse_encoder, with_token_layer
from pipeline.extraction.plan import ShardTask
from pipeline.extraction.report import ExtractReport
from pipeline.sampling import PAD_INDEX, PAD_TIME
from pipeline.store import STATUS_FAILED, STATUS_OK


def _as_encoder(e: EncoderSpec | str | Encoder, device: str, token_layer: int | None) -> Encoder:
    """A built encoder, or the encoder of a spec with ``token_layer`` applied (``--token-layer``)."""
    if isinstance(e, Encoder):
        if token_layer is not None and getattr(e.spec, "token_layer", None) != token_layer:
            raise ValueError(f"token_layer={token_layer} but encoder {e.spec} was built with "
                             f"token layer {getattr(e.spec, 'token_layer', None)}")
        return e
    spec = parse_encoder(e) if isinstance(e, str) else e
    return load_encoder(with_token_layer(spec, token_layer), device=device)


def load_encoders(encoders: Sequence[EncoderSpec | str | Encoder], device: str, token_layer: int | None,
                  precision: str, compile: bool) -> list[Encoder]:
    """The run's encoders, built on ``device`` (``token_layer`` applied), at ``precision``, compiled if asked."""
    encs = [_as_encoder(e, device, token_layer) for e in encoders]
    for enc in encs:
        enc.set_precision(precision)
        if compile:
            enc.compile()
    return encs


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


@dataclass
class EncodedShard:
    """One video shard decoded and encoded: what ``write.write_to_stores`` writes whole into each store that
    lacks it (``buffers`` by store index; ``thumbnails`` None when the stores keep none)."""

    task: ShardTask
    buffers: dict[int, ShardBuffer]
    status: np.ndarray
    error: list[str]
    detail: list[str]
    decoder: list[str]
    mask: np.ndarray
    index: np.ndarray
    times: np.ndarray
    thumbnails: list[list[bytes]] | None

    @classmethod
    def empty(cls, task: ShardTask, encs: Sequence[Encoder], num_frames: int, thumbnails: bool) -> "EncodedShard":
        """Shard ``task`` before any of its videos came: every row pending, padded, no features."""
        n, T = task.hi - task.lo, num_frames
        return cls(task, {k: ShardBuffer(n, T, encs[k]) for k in task.need}, np.zeros(n, dtype=np.int8),
                   [""] * n, [""] * n, [""] * n, np.zeros((n, T), dtype=bool),
                   np.full((n, T), PAD_INDEX, dtype=np.int32), np.full((n, T), PAD_TIME, dtype=np.float32),
                   [[] for _ in range(n)] if thumbnails else None)


class _Batches:
    """The decoded videos of one shard waiting for the encoders, and the batch whose results are on their way
    back: ``add`` launches a batch once ``batch_size`` frames wait, landing the previous one meanwhile."""

    def __init__(self, encs: Sequence[Encoder], shard: EncodedShard, batch_size: int, report: ExtractReport) -> None:
        self.encs, self.shard, self.batch_size, self.report = encs, shard, batch_size, report
        self.pending: list[tuple[int, DecodeResult]] = []
        self.pending_frames = 0
        self.inflight: list[tuple[int, EncodedBatch]] = []
        self.pin = any(encs[k].device.type == "cuda" for k in shard.task.need)

    def add(self, row: int, res: DecodeResult) -> None:
        self.pending.append((row, res))
        self.pending_frames += int(res.mask.sum())
        if self.pending_frames >= self.batch_size:
            self.launch()

    def launch(self) -> None:
        """Start the waiting videos through every encoder that needs the shard, then land the previous batch."""
        if not self.pending:
            return
        t0 = time.perf_counter()
        frames = host_frames(self.pending, pin=self.pin)  # once, for every encoder
        started = [(k, start_batch(self.encs[k], self.pending, self.batch_size, frames)) for k in self.shard.task.need]
        self.report.encode_seconds += time.perf_counter() - t0
        self.land()  # the previous batch's results, copied back while this one was launched
        self.inflight = started
        self.pending, self.pending_frames = [], 0

    def land(self) -> None:
        """Wait for the batch in flight and put its results into the shard's buffers."""
        t0 = time.perf_counter()
        for k, batch in self.inflight:
            self.report.frames_encoded += batch.finish(self.shard.buffers[k])
        self.inflight = []
        self.report.encode_seconds += time.perf_counter() - t0


@dataclass
class ShardEncoder:
    """Encodes the video shards of a run as their videos come decoded, counting into ``report``: what
    travels with every shard (the encoders, frames per video, the frame batch, whether thumbnails are kept)."""

    encs: Sequence[Encoder]
    num_frames: int
    batch_size: int
    thumbnails: bool
    report: ExtractReport
    bar: Any = None  # progress, one step per video

    def encode(self, task: ShardTask, results: Iterator[DecodeResult], video_ids: Sequence[str]) -> EncodedShard:
        """Take shard ``task``'s videos from ``results`` (in store row order, ``video_ids``), each decoded or
        failed (status 2 and its reason; the run goes on), and encode the decoded ones."""
        report, lo = self.report, task.lo
        shard = EncodedShard.empty(task, self.encs, self.num_frames, self.thumbnails)
        batches = _Batches(self.encs, shard, self.batch_size, report)
        for row in range(task.kept, task.hi - lo):
            t0 = time.perf_counter()
            res = next(results)
            report.decode_wait_seconds += time.perf_counter() - t0
            if res.video_id != video_ids[lo + row]:
                raise RuntimeError(f"decode results out of order: got {res.video_id!r} for "
                                   f"row {lo + row}")
            if res.ok:
                shard.status[row] = STATUS_OK
                shard.mask[row], shard.index[row], shard.times[row] = res.mask, res.indices, res.times
                shard.decoder[row] = res.decoder
                report.decoders[res.decoder or "?"] = report.decoders.get(res.decoder or "?", 0) + 1
                if shard.thumbnails is not None:  # made by the decoder worker from the frames it decoded
                    shard.thumbnails[row] = list(res.thumbnails or [])
                report.ok += 1
                batches.add(row, res)
            else:
                shard.status[row] = STATUS_FAILED
                shard.error[row], shard.detail[row] = res.reason or "decode error", res.detail
                report.failed += 1
                report.failures[res.video_id] = shard.error[row]
            if self.bar is not None:
                self.bar.update(1)
        batches.launch()
        batches.land()
        return shard
