"""The extraction config: every option of an extraction job, as data (torch-free, so the command
line builds its options from it without importing torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from core.errors import UsageError


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


MAX_AUTO_WORKERS = 8  # decoder workers that --workers 0 (the default) starts at most


def decoder_workers(workers: int = 0) -> int:
    """The decoder worker processes to start: ``workers``, or for 0 one per CPU core this process may
    use but one (the encoder loop's), at least 1 and at most :data:`MAX_AUTO_WORKERS`: a GPU job is bound
    by decoding, so a fixed 2 left a GPU idle on a machine with 16 cores."""
    if workers < 0:
        raise UsageError(f"--workers must be >= 0 (0: one per CPU core but one, at most {MAX_AUTO_WORKERS}), "
                         f"got {workers}")
    if workers:
        return int(workers)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this system
        cores = os.cpu_count() or 2
    return max(1, min(MAX_AUTO_WORKERS, cores - 1))


@dataclass(frozen=True)
class DecodeLimits:
    """What a video may claim before any of its frames is decoded, and the memory of a decoder worker.

    A video whose frames are larger than ``max_frame_pixels`` (width x height), longer than
    ``max_aspect`` times their shorter side, or that claims more than ``max_frames_claimed`` frames is
    refused as a failed video (``too large``). ``decoder_memory``: GiB of address space a decoder worker
    process may use (``RLIMIT_AS``); a video that needs more fails (``out of memory``) and the worker is
    replaced. 0 turns a limit off. The defaults pass every real dataset (docs/STORE.md, "Bounds on
    hostile videos").
    """

    max_frame_pixels: int = 40_000_000
    max_aspect: float = 16.0
    max_frames_claimed: int = 2_000_000
    decoder_memory: float = 16.0

    def __post_init__(self) -> None:
        for name in ("max_frame_pixels", "max_aspect", "max_frames_claimed", "decoder_memory"):
            value = getattr(self, name)
            if value != 0 and not value >= 1:  # NaN fails too
                raise UsageError(f"--{name.replace('_', '-')} must be 0 (no limit) or at least 1, got {value}")

    @property
    def decoder_memory_bytes(self) -> int | None:
        """``decoder_memory`` in bytes (None: no limit)."""
        return int(self.decoder_memory * 2**30) if self.decoder_memory else None


@dataclass
class ExtractConfig:
    """Every option of an extraction, as data (``help``: the command line's option help)."""

    num_frames: int = _opt(12, "Frames per video (uniformly; the most with --fps).", "--frames")
    sample_fps: float | None = _opt(None, "Sample this many frames per second instead, up to --frames.", "--fps")
    shard_size: int = _opt(64, "Videos per shard (the unit of work).")
    workers: int = _opt(0, f"Decoder worker processes (default 0: one per CPU core but one, at most "
                           f"{MAX_AUTO_WORKERS}).")
    timeout: float = _opt(60.0, "Seconds before a video's decoding is abandoned.")
    max_text_tokens: int = _opt(32, "Text tokens kept per caption.")
    batch_size: int = _opt(96, "Frames per encoder forward pass (lower it when the GPU runs out of memory).")
    text_batch_size: int = _opt(256, "Captions per text-encoder forward pass.")
    text_shard_size: int = _opt(1024, "Captions per text shard.")
    compressor: str | None = _opt(None, "Compression of the token arrays: zstd, blosc-zstd or blosc-lz4 "
                                          "(default: none; sizes in BENCHMARKS.md).")
    retry_failed: bool = _opt(False, "Decode the shards holding failed videos again (after fixing the files).")
    token_layer: int | None = _opt(None, "Visual tokens of every open_clip encoder from the output of this transformer "
                                         "block (negative: from the end, -2 = second-last), no final norm "
                                         "(default: after the final norm). Same as the spec suffix model:tag@N.")
    thumbnails: int = _opt(3, "Small JPEGs of the sampled frames stored per video, for reports (0: none).")
    precision: str = _opt("auto", "Encoder compute precision: auto (bf16 autocast on CUDA, fp32 elsewhere), bf16, fp16 "
                                  "(autocast) or fp32. Tokens are stored as float16 whatever the precision.")
    compile: bool = _opt(False, "torch.compile the image encoder (slower start, faster steady state on a GPU).")
    resize: str = _opt("auto", "Where frames are resized to the encoder's size: worker (the decoder processes, PIL "
                               "bicubic), device (the encoder's device, antialiased bicubic) or auto (device on CUDA, "
                               "worker elsewhere).")
    write_queue: int = _opt(2, "Encoded shards waiting for the store writer thread (0: write in the main loop).")
    decoder: str = _opt("auto", "Video decoder tried first: decord or pyav (auto: decord); the other reads what it "
                                "cannot.")
    max_frame_pixels: int = _opt(DecodeLimits.max_frame_pixels, "A video whose frames have more pixels (width x "
                                 "height) is refused before decoding, as failed (0: no limit).")
    max_aspect: float = _opt(DecodeLimits.max_aspect, "A video whose frames are longer than this many times their "
                             "shorter side is refused before decoding, as failed (0: no limit).")
    max_frames_claimed: int = _opt(DecodeLimits.max_frames_claimed, "A video that claims more frames is refused "
                                   "before decoding, as failed (0: no limit).")
    decoder_memory: float = _opt(DecodeLimits.decoder_memory, "GiB of address space each decoder worker may use; a "
                                 "video that needs more fails and its worker is replaced (0: no limit).")

    def decode_limits(self) -> DecodeLimits:
        """The decoders' limits of this config (``DecodePool(limits=...)``)."""
        return DecodeLimits(self.max_frame_pixels, self.max_aspect, self.max_frames_claimed, self.decoder_memory)
