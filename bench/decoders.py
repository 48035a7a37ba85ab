"""Decoders compared: frames per second per CPU core for decord, PyAV and torchcodec.

    python bench/decoders.py [--videos 16] [--frames 12] [--repeat 3] [--json out.json]

Each decoder decodes the sampled frames of a clip in this process, one clip after another, the way a
decoder worker does (``pipeline.decode.decode_video`` with only that decoder: open, count, sample,
decode, and the resize to the encoder's 224 px shorter side with PIL, or none for a resize on the
device); torchcodec (if it loads: it needs FFmpeg's shared libraries on the machine) through its
``VideoDecoder.get_frames_at`` with one FFmpeg thread, and on a GPU also on the CUDA device (NVDEC).
Inputs: the real fixture clip (tests/fixtures, 320x240 h264, 355 frames), generated h264 clips
(``--size`` px square, ``--video-frames`` frames) and a few long ones (``--long-frames``: PyAV reads
a clip from its start to the last frame wanted, decord seeks). "frames/s/core" is frames decoded per CPU second
of this process (all its threads), "frames/s" per wall second. A truncated clip (the first half of a
generated one) shows what each decoder alone makes of a damaged file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "fixtures" / "videos" / "v_GGSY1Qvo990.mp4"


def torchcodec_status(device: str = "cpu") -> str:
    """'' when torchcodec decodes here on ``device``, else one line saying why not."""
    try:
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(str(FIXTURE), device=device).get_frames_at([0])
    except Exception as exc:  # ImportError, or its FFmpeg libraries are missing (a RuntimeError / OSError)
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "cannot open shared object" in ln), lines[0] if lines else "")
        return f"{type(exc).__name__}: {why.strip()[:200]}"
    return ""


def decode_torchcodec(path: str, num_frames: int, short_side: int | None, device: str = "cpu") -> int:
    """torchcodec: the sampled frames of one clip (same sampling as the pipeline), resized like the
    pipeline does when ``short_side`` is set; returns the number of frames."""
    from torchcodec.decoders import VideoDecoder

    from pipeline.decode import resize_short_side
    from pipeline.sampling import sample_frames

    dec = VideoDecoder(path, device=device, num_ffmpeg_threads=1, seek_mode="exact")
    n = int(dec.metadata.num_frames)
    fps = float(dec.metadata.average_fps or 0.0)
    sample = sample_frames(n, fps, num_frames, None, None)
    idx = [int(i) for i in sample.valid_indices]
    frames = dec.get_frames_at(idx).data  # (n, 3, H, W) uint8
    if device != "cpu":
        frames = frames.cpu()
    frames = frames.permute(0, 2, 3, 1).numpy()
    if short_side:
        frames = resize_short_side(np.ascontiguousarray(frames), short_side)
    return len(idx)


def time_decoder(name: str, paths: list[str], num_frames: int, short_side: int | None, repeat: int) -> dict:
    """Best of ``repeat`` passes over ``paths``: frames, wall and CPU seconds, frames/s and per core."""
    from pipeline.decode import decode_video

    best: dict | None = None
    for _ in range(repeat):
        frames = 0
        w0, c0 = time.perf_counter(), time.process_time()
        for p in paths:
            if name.startswith("torchcodec"):
                frames += decode_torchcodec(p, num_frames, short_side, "cuda" if name.endswith("cuda") else "cpu")
            else:
                r = decode_video("v", p, num_frames, short_side, decoders=(name,))
                if not r.ok:
                    raise RuntimeError(f"{name} failed on {p}: {r.reason}")
                frames += int(r.mask.sum())
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        run = {"frames": frames, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
               "frames_per_s": round(frames / wall, 1), "frames_per_cpu_s": round(frames / max(cpu, 1e-9), 1)}
        if best is None or run["wall_s"] < best["wall_s"]:
            best = run
    return best or {}


def truncated_check(path: Path, names: list[str], num_frames: int) -> dict:
    """What each decoder alone makes of the first half of ``path``: ok (with how many frames) or the kind."""
    from pipeline.decode import decode_video

    cut = path.with_name("cut-" + path.name)
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = {}
    for name in names:
        r = decode_video("v", cut, num_frames, None, decoders=(name,))
        out[name] = f"ok ({int(r.mask.sum())} frames)" if r.ok else r.reason[:80]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=16, help="generated clips")
    p.add_argument("--video-frames", type=int, default=96, help="frames per generated clip")
    p.add_argument("--size", type=int, default=320, help="generated clip side (pixels)")
    p.add_argument("--long-videos", type=int, default=2, help="generated long clips (a minute at 24 fps)")
    p.add_argument("--long-frames", type=int, default=1440, help="frames per long clip")
    p.add_argument("--frames", type=int, default=12, help="frames sampled per clip")
    p.add_argument("--fixture-repeats", type=int, default=8, help="times the fixture clip is decoded per pass")
    p.add_argument("--repeat", type=int, default=3, help="passes; the fastest counts")
    p.add_argument("--short-side", type=int, default=224, help="resize in the decoder (0: none, as for --resize device)")
    p.add_argument("--decoders", default="decord,pyav,torchcodec,torchcodec-cuda")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)

    from bench.extract import write_video

    names = [n.strip() for n in a.decoders.split(",") if n.strip()]
    unavailable = {}
    for n in [n for n in names if n.startswith("torchcodec")]:
        why = torchcodec_status("cuda" if n.endswith("cuda") else "cpu")
        if why:
            unavailable[n] = why
    tmp = tempfile.TemporaryDirectory() if a.work_dir is None else None
    work = Path(a.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    gen = []
    for i in range(a.videos):
        path = work / f"dec{a.size}-{a.video_frames}-{i:04d}.mp4"
        if not path.exists():
            write_video(path, a.video_frames, a.size, 24, seed=i)
        gen.append(str(path))
    long = []
    for i in range(a.long_videos):
        path = work / f"long{a.size}-{a.long_frames}-{i:04d}.mp4"
        if not path.exists():
            write_video(path, a.long_frames, a.size, 24, seed=100 + i)
        long.append(str(path))
    inputs = {"fixture 320x240 355 fr": [str(FIXTURE)] * a.fixture_repeats,
              f"generated {a.size}x{a.size} {a.video_frames} fr": gen}
    if long:
        inputs[f"generated {a.size}x{a.size} {a.long_frames} fr"] = long
    short = a.short_side or None
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": None}, "frames_per_video": a.frames,
              "short_side": short, "unavailable": unavailable, "results": {}, "truncated": {}}
    print(f"{a.frames} frames per clip, resize to short side {short or 'none'}; one process, one clip at a time")
    print(f"{'input':32s} {'decoder':16s} {'frames/s':>9s} {'frames/s/core':>14s}")
    for label, paths in inputs.items():
        for n in names:
            if n in unavailable:
                continue
            r = time_decoder(n, paths, a.frames, short, a.repeat)
            result["results"].setdefault(label, {})[n] = r
            print(f"{label:32s} {n:16s} {r['frames_per_s']:9.1f} {r['frames_per_cpu_s']:14.1f}")
    for n, why in unavailable.items():
        print(f"{n}: not measured ({why})")
    result["truncated"] = truncated_check(Path(gen[0]), [n for n in names if n in ("decord", "pyav")], a.frames)
    print("first half of a generated clip, each decoder alone: " +
          "; ".join(f"{k}: {v}" for k, v in result["truncated"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
