"""The extraction config: every option of an extraction job, as data (torch-free, so the command
line builds its options from it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


@dataclass
class ExtractConfig:
    """Every option of an extraction, as data (``help``: the command line's option help)."""

    num_frames: int = _opt(12, "Frames per video (uniformly; the most with --fps).", "--frames")
    sample_fps: float | None = _opt(None, "Sample this many frames per second instead, up to --frames.", "--fps")
    shard_size: int = _opt(64, "Videos per shard (the unit of work).")
    workers: int = _opt(2, "Decoder worker processes.")
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
