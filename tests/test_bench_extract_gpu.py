"""bench/extract_gpu.py on the CPU: FLOPs counted in full (attention projections included), the GPU peak
table, and a tiny run giving every figure the GPU run records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.extract_gpu import flops_per_frame, main, peak_tflops
from pipeline.encoders import EncoderSpec, load_encoder


def test_flops_of_vit_b32_are_counted_in_full():
    enc = load_encoder(EncoderSpec("ViT-B-32", None))
    # 12 blocks x 50 tokens x (4 + 8) x 768^2 multiply-adds + attention (2 x 50^2 x 768) + patch embedding
    # (49 x 768 x 3072) + projection (768 x 512), 2 FLOPs each: 8.82 GFLOPs (counted naively, the fused
    # attention kernels hide the projections (5.9) or the attention products (8.73) from the counter)
    block = 50 * 12 * 768 ** 2 + 2 * 50 ** 2 * 768
    expect = 2 * (12 * block + 49 * 768 * 3072 + 768 * 512)
    assert flops_per_frame(enc) == pytest.approx(expect, rel=0.01)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


def test_a_tiny_cpu_run_records_every_figure(tmp_path):
    out = tmp_path / "r.json"
    main(["--encoders", "test-vit-micro", "--frames", "8", "--batch-size", "8", "--videos", "3", "--distinct-videos",
          "2", "--video-frames", "12", "--size", "48", "--clip-frames", "4", "--workers", "1", "--work-dir",
          str(tmp_path), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["peak_bf16_tflops"] is None and r["targets"] == {}
    e = r["encoders"]["test-vit-micro"]
    assert e["precision"] == "fp32" and e["flops_per_frame"] > 0
    assert e["encode_only"]["frames"] >= 8 and e["encode_only"]["frames_per_s"] > 0 and e["encode_only"]["mfu"] is None
    assert e["decode_only"]["frames"] == 12 and e["full_job"]["frames"] == 12 and e["full_job"]["videos"] == 3
    assert e["bound"] in ("decoding", "encoding") and e["full_over_bound"] > 0


def test_every_timed_batch_shape_is_warmed_up_and_the_model_alone_casts_per_batch(monkeypatch):
    """20 frames in clips of 4, 8 frames a batch: batches of 8, 8 and a last, shorter one of 4. Every
    shape a timed section feeds the encoder was fed to it before the clock started (under --compile a
    new shape compiles again), and the model alone runs the job's batches, entering autocast once per
    forward pass as the job does (it is where bf16 / fp16 casts the weights)."""
    import bench.extract_gpu as eg

    enc = load_encoder(EncoderSpec("test-vit-micro", None))
    phase = {"now": "warm-up", "stage": 0}
    calls: list[tuple[str, int]] = []   # (phase, frames) per encode_images call
    casts: list[str] = []               # the phase of each autocast entry

    class Clocked(eg.Stage):
        def __enter__(self):
            phase["stage"] += 1
            phase["now"] = f"timed-{phase['stage']}"
            return super().__enter__()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            phase["now"] = "warm-up"

    encode, autocast = enc.encode_images, enc.autocast

    def recording_encode(x):
        calls.append((phase["now"], int(x.shape[0])))
        return encode(x)

    def recording_autocast():
        casts.append(phase["now"])
        return autocast()

    monkeypatch.setattr(eg, "Stage", Clocked)
    monkeypatch.setattr(enc, "encode_images", recording_encode)
    monkeypatch.setattr(enc, "autocast", recording_autocast)
    out = eg.encode_only(enc, frames=20, T=4, batch_size=8, decoded_hw=(32, 32))

    # the first timed section is the job, the second the model alone; warm-ups come before each
    warmed = {n for p, n in calls if p == "warm-up"}
    job = [n for p, n in calls if p == "timed-1"]
    model = [n for p, n in calls if p == "timed-2"]
    assert job == [8, 8, 4] and out["frames"] == 20
    assert set(job) <= warmed, (set(job), warmed)
    assert model == job and out["model_only"]["frames"] == 20
    assert casts.count("timed-2") == len(model)  # one autocast per batch, as start_batch
    assert casts.count("timed-1") == len(job)
    assert out["batch_frames"] == [4, 8] and out["warmed_batch_frames"] == [4, 8]


def test_warmup_batches_cover_every_size():
    from bench.extract_gpu import warmup_batches
    from pipeline.decode import DecodeResult

    def clip(t):
        return (0, DecodeResult(video_id="x", ok=True, frames=None, indices=None, times=None,
                                mask=np.ones(t, dtype=bool)))

    batches = [[clip(4), clip(4)]] * 5 + [[clip(4)]]
    assert [len(b) for b in warmup_batches(batches)] == [2, 2, 1]
    assert [len(b) for b in warmup_batches(batches[:1])] == [2]
    assert warmup_batches([]) == []
