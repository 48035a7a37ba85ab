"""Extraction throughput: decode-only, encode-only and full extraction on the same videos.

    python bench/extract.py [--encoder ViT-B-32] [--videos 32] [--frames 12] [--workers 2]

Generates N short h264 videos (PyAV), then measures in one process:

* decode-only: the decoder worker pool over all videos (results consumed, nothing else);
* encode-only: the encoder on the frames decoded above (same batching as extraction);
* full: ``pipeline.extraction.job.extract`` into a fresh store (decode + encode + text + writes).

Prints videos/s and frames/s for each and the ratio full / max(decode-only, encode-only) in
seconds (1.0 = perfect overlap of decoding with encoding). The default encoder is ViT-B-32 with
random weights (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_video(path: Path, num_frames: int, size: int, fps: int, seed: int) -> None:
    """A moving square on a changing background (h264, yuv420p)."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3).astype(np.uint8)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23"}
        for i in range(num_frames):
            img = np.empty((size, size, 3), np.uint8)
            img[:] = base
            img[..., 1] = (7 * i) % 256
            x = (5 * i) % (size - size // 4)
            img[size // 3: size // 3 + size // 4, x:x + size // 4] = 255
            img += rng.integers(0, 12, size=img.shape, dtype=np.uint8)  # texture for the codec
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="ViT-B-32", help="encoder spec (default: random ViT-B-32)")
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--frames", type=int, default=12, help="frames sampled per video")
    p.add_argument("--video-frames", type=int, default=96, help="frames per generated video")
    p.add_argument("--size", type=int, default=320, help="generated video side (pixels)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", default=None, help="where videos/stores go (default: temp)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from manifests.schema import Manifest
    from pipeline.decode import DecodeTask
    from pipeline.decode_pool import DecodePool
    from pipeline.extraction.encode import ShardBuffer, encode_batch
    from pipeline.encoders import load_encoder
    from pipeline.extraction.job import extract

    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory() if a.work_dir is None else None
    work = Path(a.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = []
    for i in range(a.videos):
        path = work / f"bench{i:04d}.mp4"
        if not path.exists():
            write_video(path, a.video_frames, a.size, 24, seed=i)
        paths.append(path)
    print(f"videos: {a.videos} x {a.video_frames} frames {a.size}x{a.size} "
          f"({time.perf_counter() - t0:.1f}s to generate)")
    enc = load_encoder(a.encoder, device=a.device)
    print(f"encoder: {enc.spec} image {enc.image_size} tokens {enc.num_tokens}x{enc.token_dim} "
          f"| torch threads {torch.get_num_threads()} | workers {a.workers}")
    tasks = [DecodeTask(f"v{i:04d}", str(pth)) for i, pth in enumerate(paths)]
    nf = a.videos * a.frames

    # warm-up: one forward pass so lazy initialisation is not timed
    enc.encode_frames(torch.zeros(2, enc.image_size, enc.image_size, 3, dtype=torch.uint8))

    t = time.perf_counter()
    with DecodePool(a.frames, enc.image_size, workers=a.workers, timeout=120) as pool:
        decoded = list(pool.map(tasks))
    t_dec = time.perf_counter() - t
    bad = [r.video_id for r in decoded if not r.ok]
    if bad:
        raise SystemExit(f"decode failed for {bad}")

    t = time.perf_counter()
    buf = ShardBuffer(len(decoded), a.frames, enc)
    batch: list = []
    for row, r in enumerate(decoded):
        batch.append((row, r))
        if sum(int(x.mask.sum()) for _, x in batch) >= a.batch_size:
            encode_batch(enc, batch, buf)
            batch = []
    if batch:
        encode_batch(enc, batch, buf)
    t_enc = time.perf_counter() - t
    del decoded

    m = Manifest.from_records("bench", [{"video_id": tk.video_id, "path": tk.path,
                                         "split": "train"} for tk in tasks],
                              [{"caption_id": tk.video_id, "video_id": tk.video_id,
                                "text": "a white square moves across the frame",
                                "split": "train"} for tk in tasks], root=work)
    store = work / f"bench-{time.time_ns()}.zarr"
    t = time.perf_counter()
    rep = extract(m, [enc], [store], num_frames=a.frames, shard_size=a.shard_size,
                  workers=a.workers, batch_size=a.batch_size, device=a.device, progress=False)
    t_full = time.perf_counter() - t
    if rep.failed:
        raise SystemExit(f"extraction failed for {rep.failures}")

    def line(name: str, s: float) -> None:
        print(f"{name:12s} {s:7.2f} s  {a.videos / s:7.2f} videos/s  {nf / s:8.1f} frames/s")

    line("decode-only", t_dec)
    line("encode-only", t_enc)
    line("full", t_full)
    print(f"ratio full / max(decode, encode) = {t_full / max(t_dec, t_enc):.3f}  "
          f"(encode wait on decode {rep.decode_wait_seconds:.2f}s, text {rep.text_seconds:.2f}s)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
