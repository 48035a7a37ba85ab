"""Decoded frames from the decoder workers to the encoding process: a memory file against the pipe.

    python bench/frame_handover.py [--videos 24] [--frames 12] [--height 1080] [--width 1920] [--workers 2]

``--resize device`` sends full-resolution frames from the decoder workers (``pipeline.decode_pool``),
75 MB per video for 12 1080p frames. The workers here make frames without decoding (a fixed random
array per worker), so what is timed is the hand-over alone: videos per second the pool delivers,
with the frames passed as an anonymous memory file (the default on Linux) and through the pipe's
pickling (the memory file turned off in the worker), and the CPU seconds the receiving process
spent per video. Prints one JSON line per mode and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import decode_pool  # noqa: E402
from pipeline.decode import DecodeResult, DecodeTask  # noqa: E402

_FRAMES: dict[tuple, np.ndarray] = {}


def _frames(shape: tuple) -> np.ndarray:
    if shape not in _FRAMES:
        _FRAMES[shape] = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    return _FRAMES[shape]


def made_frames(video_id, path, num_frames, short_side, start, end, **kw):
    """A worker's "decode": full-resolution frames of the shape the path names (``HxW``), no decoding;
    a path starting with ``pipe:`` turns the memory file off in this worker."""
    mode, size = path.split(":")
    if mode == "pipe":
        decode_pool.MEMFD_MIN_BYTES = 1 << 62
    h, w = map(int, size.split("x"))
    t = num_frames
    return DecodeResult(video_id, True, frames=_frames((t, h, w, 3)), indices=np.arange(t, dtype=np.int32),
                        times=np.arange(t, dtype=np.float32), mask=np.ones(t, bool))


def run(mode: str, args: argparse.Namespace) -> dict:
    tasks = [DecodeTask(f"v{i}", f"{mode}:{args.height}x{args.width}") for i in range(args.videos)]
    with decode_pool.DecodePool(args.frames, workers=args.workers, timeout=600, decode_fn=made_frames) as pool:
        list(pool.map(tasks[: args.workers * 2]))  # warm-up: workers started, frames made
        t0, c0 = time.perf_counter(), time.process_time()
        out = list(pool.map(tasks))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(r.ok for r in out)
    mb = out[0].frames.nbytes / 1e6
    return {"mode": mode, "videos": args.videos, "MB_per_video": round(mb, 1), "videos_per_s": round(args.videos / wall, 2),
            "GB_per_s": round(args.videos * mb / 1e3 / wall, 2),
            "receiver_cpu_ms_per_video": round(1e3 * cpu / args.videos, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    rows = [run(mode, args) for mode in ("memfd", "pipe")]
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"memfd_over_pipe_videos_per_s": round(rows[0]["videos_per_s"] / rows[1]["videos_per_s"], 2)}))


if __name__ == "__main__":
    main()
