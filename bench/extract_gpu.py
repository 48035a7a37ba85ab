"""The extraction job measured, per encoder: encode-only, decode-only and the full job, and what bounds it.

    python bench/extract_gpu.py                                    # a GPU: ViT-B-32 and EVA01-g-14
    python bench/extract_gpu.py --frames 24 --videos 4 --encoders ViT-B-32   # a quick CPU run

For every encoder (open_clip configs with random weights: nothing is downloaded):

* FLOPs per frame, counted on one forward pass of the image encoder with
  ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add);
* encode-only frames/s: ``--frames`` decoded-size uint8 frames through the job's own path
  (``pipeline.extraction.encode.start_batch``: pinned copy up, resize / crop / normalise on the device, the
  encoder under ``--precision``, tokens back to pinned host memory), and the model alone on
  preprocessed device tensors (the job's batch sizes in its order, autocast entered per batch as the
  job does); their TFLOP/s and model FLOP utilisation (MFU) against the GPU's bf16 dense peak
  (:data:`PEAK_BF16_TFLOPS`; none on a CPU); both warmed up first on every batch shape they time, so
  ``--compile`` never compiles inside a timed section;
* decode-only frames/s: the decoder pool (``--workers`` processes) over ``--videos`` generated clips;
* full-job frames/s: ``pipeline.extraction.job.extract`` of those clips into a fresh store (decode, encode,
  texts, thumbnails, the store writer thread), with the time the loop waited for decoding, encoding
  and the writer;
* GPU memory peak of each stage, and which stage bounds the job (the slower of decode-only and
  encode-only, and how close the full job comes to it).

Targets (issue 12): EVA01-g-14 encode MFU >= 50 % in bf16; ViT-B-32 full job >= 0.9 x decode-only.
The figures go to stdout and, after every stage (so a run cut short keeps what it measured), to
``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, first match wins (most specific first).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU by its name (``torch.cuda.get_device_name``); None when unknown."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def flops_per_frame(enc: Any, n: int = 2) -> float:
    """FLOPs of the image encoder per frame (one counted forward pass of ``n`` preprocessed frames)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # attention through the math kernel: its matrix products are counted on every device (the counter
    # knows CUDA's flash / efficient kernels but not the CPU's fused one); an input that requires grad keeps nn.MultiheadAttention off its fused inference kernel, which the
    # counter does not see (its projections would go uncounted); the arithmetic is the same
    x = torch.zeros(n, 3, enc.image_size, enc.image_size, device=enc.device, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter, enc.autocast():
        inner = getattr(type(enc).encode_images, "__wrapped__", None)  # past its torch.no_grad
        inner(enc, x) if inner is not None else enc.encode_images(x)
    return counter.get_total_flops() / n


class Stage:
    """Wall time and GPU memory peak of one stage."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Stage":
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_gib = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if self.cuda else None


def fake_results(n: int, T: int, h: int, w: int, seed: int = 0) -> list:
    """``n`` decoded clips of ``T`` random frames (h x w), as the decoder pool returns them."""
    from pipeline.decode import DecodeResult

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(T, h, w, 3), dtype=np.uint8)
    idx = np.arange(T, dtype=np.int32)
    return [DecodeResult(video_id=f"f{i}", ok=True, frames=frames, indices=idx, times=idx.astype(np.float32),
                         mask=np.ones(T, dtype=bool)) for i in range(n)]


def batch_frames(batch: list) -> int:
    """Frames one forward pass of the job encodes for ``batch`` ((row, DecodeResult) pairs): its valid frames."""
    return sum(int(r.mask.sum()) for _, r in batch)


def warmup_batches(batches: list) -> list:
    """The batches the warm-up runs: the first two (allocator, kernels, the pipelined copy), then the
    first batch of every other size in ``batches``. The last batch is shorter when the clips do not
    divide evenly, and under ``--compile`` a new input shape compiles again: without it, that
    compilation would land in the timed section."""
    warm = list(batches[:2])
    seen = {batch_frames(b) for b in warm}
    for b in batches[2:]:
        if batch_frames(b) not in seen:
            seen.add(batch_frames(b))
            warm.append(b)
    return warm


def encode_only(enc: Any, frames: int, T: int, batch_size: int, decoded_hw: tuple[int, int]) -> dict:
    """The job's encode path (start_batch / finish, one batch in flight) over ``frames`` frames, and the
    model alone on preprocessed device tensors.

    Both are warmed up on every batch shape they then time (``warmup_batches``), so ``--compile``
    compiles before the clock starts. The model alone runs the job's batches (the same sizes, in the
    same order, the last shorter one included), each forward pass in its own ``enc.autocast()`` as
    ``start_batch`` enters it, so under bf16 / fp16 it casts the weights per batch as the job does;
    it leaves out what the job adds around the model (the uint8 copy up, resize / crop / normalise,
    the float16 tokens copied back to pinned memory), which is the difference between the two figures."""
    import torch

    from pipeline.extraction.encode import ShardBuffer, start_batch

    per = max(1, batch_size // T)  # clips per batch, as the job groups them
    clips = fake_results(max(per, -(-frames // T)), T, *decoded_hw)
    buf = ShardBuffer(len(clips), T, enc)
    batches = [list(enumerate(clips))[i:i + per] for i in range(0, len(clips), per)]
    sizes = [batch_frames(b) for b in batches]

    def job_pass(bs: list) -> int:
        inflight, done = None, 0
        for b in bs:
            started = start_batch(enc, b, batch_size)
            if inflight is not None:
                done += inflight.finish(buf)
            inflight = started
        if inflight is not None:
            done += inflight.finish(buf)
        return done

    warm = warmup_batches(batches)
    job_pass(warm)  # warm-up (allocator, kernels, compile: every batch shape timed below)
    with Stage(enc.device) as s:
        n = job_pass(batches)
    out = {"frames": n, "seconds": round(s.seconds, 4), "frames_per_s": round(n / s.seconds, 1),
           "gpu_mem_peak_gib": s.peak_gib, "batch_frames": sorted(set(sizes)),
           "warmed_batch_frames": sorted({batch_frames(b) for b in warm})}
    # the model alone: one preprocessed device tensor per batch size, the job's batch sequence
    inputs = {k: enc.preprocess(torch.from_numpy(clips[0].frames[np.arange(k) % T])) for k in sorted(set(sizes))}

    def model_pass(ks: list[int]) -> int:
        with torch.no_grad():
            for k in ks:
                with enc.autocast():  # per batch, as start_batch
                    enc.encode_images(inputs[k])
        return sum(ks)

    model_pass(sorted(inputs))  # warm-up: every size once
    with Stage(enc.device) as m:
        nm = model_pass(sizes)
    out["model_only"] = {"frames": nm, "seconds": round(m.seconds, 4), "frames_per_s": round(nm / m.seconds, 1),
                         "gpu_mem_peak_gib": m.peak_gib, "autocast": "per batch, as the job"}
    return out


def _write_one(args: tuple) -> str:
    from bench.extract import write_video

    path, frames, size, seed = args
    if not Path(path).exists():
        write_video(Path(path), frames, size, 24, seed=seed)
    return path


def make_videos(work: Path, distinct: int, frames: int, size: int, workers: int) -> list[str]:
    """``distinct`` generated h264 clips (in parallel)."""
    jobs = [(str(work / f"gpu{size}-{frames}-{i:04d}.mp4"), frames, size, i) for i in range(distinct)]
    import multiprocessing as mp

    # spawned: the parent may hold a CUDA context already, which forked children must not inherit
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_write_one, jobs))


def decode_only(paths: list[str], T: int, short_side: int | None, workers: int) -> dict:
    from pipeline.decode import DecodeTask
    from pipeline.decode_pool import DecodePool

    tasks = [DecodeTask(f"v{i:05d}", p) for i, p in enumerate(paths)]
    with DecodePool(T, short_side, workers=workers, timeout=120) as pool:
        list(pool.map(tasks[: min(len(tasks), workers)]))  # workers started and warm
        t0 = time.perf_counter()
        res = list(pool.map(tasks))
        sec = time.perf_counter() - t0
    bad = [r.video_id for r in res if not r.ok]
    if bad:
        raise SystemExit(f"decode failed for {bad[:5]}")
    n = sum(int(r.mask.sum()) for r in res)
    return {"videos": len(res), "frames": n, "seconds": round(sec, 4), "frames_per_s": round(n / sec, 1),
            "workers": workers, "resize_in": "worker" if short_side else "device"}


def full_job(enc: Any, paths: list[str], work: Path, T: int, batch_size: int, workers: int, precision: str,
             resize: str, write_queue: int) -> dict:
    from manifests.schema import Manifest
    from pipeline.extraction.job import extract

    videos = [{"video_id": f"v{i:05d}", "path": p, "split": "train"} for i, p in enumerate(paths)]
    captions = [{"caption_id": v["video_id"], "video_id": v["video_id"], "text": "a square moves across the frame",
                 "split": "train"} for v in videos]
    m = Manifest.from_records("bench", videos, captions, root=work)
    store = work / f"full-{time.time_ns()}.zarr"
    with Stage(enc.device) as s:
        rep = extract(m, [enc], [store], num_frames=T, workers=workers, batch_size=batch_size, precision=precision,
                      resize=resize, write_queue=write_queue, progress=False, timeout=120)
    if rep.failed:
        raise SystemExit(f"extraction failed for {list(rep.failures)[:5]}")
    n = rep.frames_encoded
    return {"videos": rep.ok, "frames": n, "seconds": round(s.seconds, 4), "frames_per_s": round(n / s.seconds, 1),
            "decode_wait_s": round(rep.decode_wait_seconds, 3), "encode_s": round(rep.encode_seconds, 3),
            "text_s": round(rep.text_seconds, 3), "write_s": round(rep.write_seconds, 3),
            "write_wait_s": round(rep.write_wait_seconds, 3), "gpu_mem_peak_gib": s.peak_gib,
            "precision": rep.precision}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoders", default="ViT-B-32,EVA01-g-14", help="open_clip model names (random weights)")
    p.add_argument("--device", default="auto", help="auto: cuda if any")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--frames", type=int, default=None, help="frames for encode-only (default 4096 GPU, 48 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="frames per forward pass (default 384 GPU, 24 CPU)")
    p.add_argument("--videos", type=int, default=None, help="clips for decode-only and the full job "
                                                            "(default 384 GPU, 8 CPU)")
    p.add_argument("--distinct-videos", type=int, default=64, help="distinct generated clips (the list repeats them)")
    p.add_argument("--video-frames", type=int, default=96, help="frames per generated clip")
    p.add_argument("--size", type=int, default=320, help="generated clip side (pixels)")
    p.add_argument("--clip-frames", type=int, default=12, help="frames sampled per clip")
    p.add_argument("--workers", type=int, default=None, help="decoder processes (default: CPU count, at most 16)")
    p.add_argument("--resize", default="auto", help="auto (device on CUDA), worker or device")
    p.add_argument("--write-queue", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoders")
    p.add_argument("--skip", default="", help="stages to skip: comma list of decode,full")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", default=None, help="write the figures here (after every stage)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from pipeline.encoders import EncoderSpec, load_encoder

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    gpu = device.type == "cuda"
    frames = a.frames or (4096 if gpu else 48)
    batch = a.batch_size or (384 if gpu else 24)
    nvid = a.videos or (384 if gpu else 8)
    workers = a.workers or min(16, os.cpu_count() or 1)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak = peak_tflops(name) if gpu else None
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    out: dict = {"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__, "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "workers": workers, "batch_size": batch,
                 "clip_frames": a.clip_frames, "compile": a.compile, "encoders": {}}

    def save() -> None:
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(out, indent=1))

    print(f"device {name} (bf16 peak {peak or '-'} TFLOP/s), torch {torch.__version__}, {workers} decoder workers, "
          f"batch {batch}")
    tmp = tempfile.TemporaryDirectory() if a.work_dir is None else None
    work = Path(a.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    if not {"decode", "full"} <= skip:
        t0 = time.perf_counter()
        distinct = make_videos(work, min(a.distinct_videos, nvid), a.video_frames, a.size, workers)
        paths = [distinct[i % len(distinct)] for i in range(nvid)]
        print(f"{len(distinct)} clips of {a.video_frames} frames {a.size}x{a.size} generated in "
              f"{time.perf_counter() - t0:.1f}s; {nvid} in the job")
    decode_cache: dict = {}
    for model in [m.strip() for m in a.encoders.split(",") if m.strip()]:
        t0 = time.perf_counter()
        enc = load_encoder(EncoderSpec(model, None), device=str(device))
        precision = enc.set_precision(a.precision)
        r: dict = {"precision": precision, "image_size": enc.image_size,
                   "tokens": [enc.num_tokens, enc.token_dim], "load_s": round(time.perf_counter() - t0, 1)}
        out["encoders"][model] = r
        fl = flops_per_frame(enc)
        r["flops_per_frame"] = fl
        r["gflops_per_frame"] = round(fl / 1e9, 3)
        if a.compile:
            enc.compile()
        # frames reach the encoder at the decoded size: short side = the encoder's, or the clip's own
        side = enc.image_size
        resize = a.resize if a.resize != "auto" else ("device" if gpu else "worker")
        hw = (side, side) if resize == "worker" else (a.size, a.size)
        e = encode_only(enc, frames, a.clip_frames, batch, hw)
        for key, part in (("encode_only", e), ("model_only", e.pop("model_only"))):
            tflops = fl * part["frames_per_s"] / 1e12
            part["tflops"] = round(tflops, 3)
            part["mfu"] = round(tflops / peak, 4) if peak else None
            r[key] = part
        print(f"{model:12s} {precision}: {r['gflops_per_frame']} GFLOP/frame | encode-only "
              f"{e['frames_per_s']:.1f} frames/s {e['tflops']:.2f} TFLOP/s MFU {e['mfu'] if peak else '-'} | "
              f"model alone {r['model_only']['frames_per_s']:.1f} frames/s MFU {r['model_only']['mfu'] or '-'} | "
              f"mem {e['gpu_mem_peak_gib'] or '-'} GiB")
        save()
        if "decode" not in skip:
            key = (resize, side)
            if key not in decode_cache:
                decode_cache[key] = decode_only(paths, a.clip_frames, side if resize == "worker" else None, workers)
            r["decode_only"] = decode_cache[key]
            print(f"{'':12s} decode-only {r['decode_only']['frames_per_s']:.1f} frames/s ({workers} workers, "
                  f"resize in the {r['decode_only']['resize_in']})")
            save()
        if "full" not in skip:
            f = full_job(enc, paths, work, a.clip_frames, batch, workers, precision, resize, a.write_queue)
            r["full_job"] = f
            print(f"{'':12s} full job {f['frames_per_s']:.1f} frames/s (waited for decoding {f['decode_wait_s']}s, "
                  f"encoding {f['encode_s']}s, writer {f['write_wait_s']}s; mem {f['gpu_mem_peak_gib'] or '-'} GiB)")
        dec = r.get("decode_only", {}).get("frames_per_s")
        enc_fps = e["frames_per_s"]
        r["bound"] = ("decoding" if dec and dec < enc_fps else "encoding") if dec else "encoding (decode not measured)"
        if dec and "full_job" in r:
            r["full_over_bound"] = round(r["full_job"]["frames_per_s"] / min(dec, enc_fps), 3)
            r["full_over_decode"] = round(r["full_job"]["frames_per_s"] / dec, 3)
        print(f"{'':12s} bound by {r['bound']}" + (f"; full job / slower stage = {r['full_over_bound']}"
                                                   if "full_over_bound" in r else ""))
        save()
        del enc
        if gpu:
            torch.cuda.empty_cache()
    targets = {}  # on a GPU only: a CPU is bound by encoding whatever the job does
    if "EVA01-g-14" in out["encoders"] and peak:
        targets["eva_g14_encode_mfu_ge_0.5"] = out["encoders"]["EVA01-g-14"]["model_only"]["mfu"] >= 0.5
    if gpu and "full_over_decode" in out["encoders"].get("ViT-B-32", {}):
        targets["vit_b32_full_ge_0.9_decode"] = out["encoders"]["ViT-B-32"]["full_over_decode"] >= 0.9
    out["targets"] = targets
    if targets:
        print("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    save()
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
