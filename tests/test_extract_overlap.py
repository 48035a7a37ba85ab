"""The extraction job's GPU-side options, checked on the CPU: the store writer thread gives the same
store as writing in the loop (and its errors surface without losing shards), the compute precision,
preprocessing on the device against the decoders' resize, out-of-memory and range errors, --decoder,
--compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from core.errors import EncoderError, StoreError, UsageError
from manifests.schema import Manifest
from pipeline.decode import decode_video, decoder_order
from pipeline.encoder_base import resolve_precision
from pipeline.encoders import load_encoder
from pipeline.extraction.job import extract
from pipeline.extraction.write import ShardWriter
from pipeline.store import CacheStore

pytestmark = pytest.mark.integration

T = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    from conftest import FIXTURE_VIDEO
    from helpers import write_video

    tmp_path = tmp_path_factory.mktemp("overlap")
    videos = [{"video_id": f"g{i}", "path": str(write_video(tmp_path / f"g{i}.mp4", num_frames=10 + 3 * i, seed=i)),
               "split": "train" if i < 3 else "test"} for i in range(5)]
    fixture_video = FIXTURE_VIDEO
    videos.append({"video_id": "fixture", "path": str(fixture_video), "split": "test", "start": 1.0, "end": 9.0})
    videos.append({"video_id": "missing", "path": "nope.mp4", "split": "train"})
    captions = [{"caption_id": f"{v['video_id']}-0", "video_id": v["video_id"], "text": f"a clip {v['video_id']}",
                 "split": v["split"]} for v in videos]
    return Manifest.from_records("toy", videos, captions, root=tmp_path)


def arrays(path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def walk(g, prefix=""):
        for name, v in g.members():
            if isinstance(v, zarr.Group):
                walk(v, prefix + name + "/")
            else:
                out[prefix + name] = v[...]
    walk(zarr.open_group(str(path), mode="r"))
    return out


@pytest.fixture(scope="module")
def reference(manifest, micro, tmp_path_factory) -> dict[str, np.ndarray]:
    """The store as the loop writes it (no writer thread), fp32, resize in the decoders: every array."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    rep = run(manifest, micro, path, write_queue=0)
    assert (rep.ok, rep.failed, rep.precision) == (6, 1, "fp32")  # fp32: the CPU default
    return arrays(path)


def run(manifest, enc, path, **kw):
    opts = dict(num_frames=T, shard_size=2, workers=2, timeout=30, batch_size=5, progress=False)
    return extract(manifest, [enc], [path], **{**opts, **kw})


def test_writer_thread_writes_the_same_store_as_the_loop(tmp_path, manifest, micro, reference):
    threaded = run(manifest, micro, tmp_path / "thread.zarr", write_queue=2)
    assert (threaded.ok, threaded.failed, threaded.precision) == (6, 1, "fp32")
    a, b = reference, arrays(tmp_path / "thread.zarr")
    assert sorted(a) == sorted(b) and len(a) >= 20
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert b["shards/done"].all() and b["videos/tokens"].dtype == np.float16


def test_a_writer_error_surfaces_and_no_shard_is_lost(tmp_path, manifest, micro, reference, monkeypatch):
    real = CacheStore.write_shard

    def flaky(self, i, **kw):
        if i == 1:
            raise OSError("disk full")
        return real(self, i, **kw)

    monkeypatch.setattr(CacheStore, "write_shard", flaky)
    with pytest.raises(StoreError, match="writing video shard 1 failed: OSError: disk full"):
        run(manifest, micro, tmp_path / "s.zarr", write_queue=2)
    done = CacheStore.open(tmp_path / "s.zarr").done_shards()
    assert 1 not in done and 0 in done  # the failed shard is not marked done; the one before it is written
    monkeypatch.setattr(CacheStore, "write_shard", real)
    again = run(manifest, micro, tmp_path / "s.zarr", write_queue=2)
    sizes = [2, 2, 2, 1]  # 7 videos in shards of 2
    assert again.skipped == sum(sizes[d] for d in done)  # done shards are not redone
    b = arrays(tmp_path / "s.zarr")
    for name in reference:
        assert np.array_equal(reference[name], b[name]), name


def test_shard_writer_drains_its_queue_and_reports_every_failure():
    import threading

    written: list[int] = []
    go = threading.Event()

    def job(i):
        def write():
            go.wait(10)
            if i in (1, 3):
                raise ValueError(f"bad {i}")
            written.append(i)
        return write

    w = ShardWriter(4)
    for i in range(4):  # the first write waits: all four are queued before any error
        w.submit(i, job(i))
    go.set()
    with pytest.raises(StoreError, match=r"shard 1 failed \(and 1 more shards\): ValueError: bad 1"):
        w.close()
    assert written == [0, 2]  # the shards queued after the failed one are still written
    with pytest.raises(ValueError):
        ShardWriter(-1)


def test_precision_resolution_and_bf16_on_cpu(tmp_path, manifest, reference):
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(UsageError, match="--precision must be one of auto, bf16, fp16, fp32"):
        resolve_precision("int8", "cpu")
    enc = load_encoder("test-vit-micro")
    rep = run(manifest, enc, tmp_path / "bf16.zarr", precision="bf16")
    assert rep.precision == "bf16" and rep.ok == 6
    a, b = reference, arrays(tmp_path / "bf16.zarr")
    assert b["videos/tokens"].dtype == np.float16  # stored as float16 whatever the compute precision
    ok = a["videos/frame_mask"]
    ea, eb = a["videos/frame_emb"][ok], b["videos/frame_emb"][ok]
    cos = (ea * eb).sum(-1) / np.linalg.norm(ea, axis=-1) / np.linalg.norm(eb, axis=-1)
    assert cos.min() > 0.99 and not np.array_equal(ea, eb)  # bf16 ran, and stays close to fp32
    ta, tb = a["videos/tokens"][ok].astype(np.float32), b["videos/tokens"][ok].astype(np.float32)
    assert np.abs(ta - tb).max() < 0.1 * np.abs(ta).max()
    ca, cb = a["texts/emb"], b["texts/emb"]
    assert ((ca * cb).sum(-1) / np.linalg.norm(ca, axis=-1) / np.linalg.norm(cb, axis=-1)).min() > 0.99


@pytest.mark.slow
def test_preprocessing_on_the_device_matches_the_decoders_resize(fixture_video):
    """The device resize (antialiased bicubic on full frames) against the CPU path (PIL bicubic in the
    decoder, then crop): within a few grey levels, on the real clip."""
    enc = load_encoder("ViT-B-32")  # 224 px, CLIP's normalisation
    full = decode_video("v", fixture_video, 6, short_side=None)
    small = decode_video("v", fixture_video, 6, short_side=enc.image_size)
    assert full.frames.shape[1:3] == (240, 320) and small.frames.shape[1:3] == (224, 299)
    x_dev = enc.preprocess(torch.from_numpy(full.valid_frames))
    x_cpu = enc.preprocess(torch.from_numpy(small.valid_frames))
    assert x_dev.shape == x_cpu.shape == (6, 3, 224, 224)
    grey = (x_dev - x_cpu) * torch.tensor(enc.std).view(1, 3, 1, 1) * 255  # back to pixel levels
    assert grey.abs().mean() < 1.0 and torch.quantile(grey.abs().flatten()[::7], 0.99) < 4.0
    emb_dev, emb_cpu = enc.encode_images(x_dev)[1], enc.encode_images(x_cpu)[1]
    assert torch.nn.functional.cosine_similarity(emb_dev, emb_cpu).min() > 0.99


def test_resize_on_the_device_extracts_close_to_the_worker_resize(tmp_path, manifest, micro, reference):
    run(manifest, micro, tmp_path / "d.zarr", resize="device")
    a, b = reference, arrays(tmp_path / "d.zarr")
    ok = a["videos/frame_mask"]
    assert np.array_equal(ok, b["videos/frame_mask"]) and np.array_equal(a["videos/frame_index"],
                                                                        b["videos/frame_index"])
    ea, eb = a["videos/frame_emb"][ok], b["videos/frame_emb"][ok]
    cos = (ea * eb).sum(-1) / np.linalg.norm(ea, axis=-1) / np.linalg.norm(eb, axis=-1)
    assert cos.min() > 0.98
    with pytest.raises(UsageError, match="--resize must be one of auto, worker, device"):
        run(manifest, micro, tmp_path / "x.zarr", resize="gpu")


def test_out_of_memory_names_the_batch_size(tmp_path, manifest, monkeypatch):
    enc = load_encoder("test-vit-micro")

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(enc, "encode_images", oom)
    with pytest.raises(EncoderError, match=r"out of memory encoding \d+ frames .* lower --batch-size \(now 5\)"):
        run(manifest, enc, tmp_path / "oom.zarr")


def test_tokens_beyond_float16_are_refused(tmp_path, manifest, monkeypatch):
    enc = load_encoder("test-vit-micro")
    real = enc.encode_images
    monkeypatch.setattr(enc, "encode_images", lambda x: (real(x)[0] * 1e6, real(x)[1]))
    with pytest.raises(EncoderError, match="exceed float16's range"):
        run(manifest, enc, tmp_path / "big.zarr")


def test_decoder_option(tmp_path, manifest, micro):
    assert decoder_order("auto") == ("decord", "pyav") and decoder_order("pyav") == ("pyav", "decord")
    with pytest.raises(UsageError, match="--decoder must be auto or one of decord, pyav"):
        decoder_order("ffmpeg")
    rep = run(manifest, micro, tmp_path / "pyav.zarr", decoder="pyav")
    assert rep.decoders == {"pyav": 6} and rep.failed == 1


def test_compile_runs_the_image_encoder_through_torch_compile(tmp_path, manifest, reference, monkeypatch):
    compiled: list = []
    real_compile = torch.compile

    def spy(fn, **kw):  # the eager backend: what torch.compile traces, without the slow code generation
        compiled.append(fn)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    enc2 = load_encoder("test-vit-micro")
    rep = run(manifest, enc2, tmp_path / "compiled.zarr", compile=True)
    assert len(compiled) == 1 and rep.ok == 6
    b = arrays(tmp_path / "compiled.zarr")
    np.testing.assert_allclose(reference["videos/frame_emb"], b["videos/frame_emb"], atol=1e-5)


def test_the_command_line_options(tmp_path):
    from click.testing import CliRunner

    import cli
    from helpers import make_data_root, run_cli

    make_data_root(tmp_path / "data", "msvd")
    base = ["extract", "--dataset", "msvd", "--data-root", tmp_path / "data", "--work-dir", tmp_path / "work",
            "--encoder", "test-vit-micro", "--workers", "1", "--frames", "4"]
    out = run_cli(base + ["--precision", "bf16", "--write-queue", "1", "--decoder", "pyav", "--resize", "device",
                          "--batch-size", "7"])
    (path,) = (tmp_path / "work" / "stores").glob("msvd-test-vit-micro*.zarr")
    store = CacheStore.open(path)
    assert store.is_complete() and store.failures() == {} and "by pyav" in out and "encoders at bf16 on cpu: " in out
    for bad, msg in ((["--precision", "int8"], "--precision must be one of auto, bf16, fp16, fp32, got 'int8'"),
                     (["--decoder", "ffmpeg"], "--decoder must be auto or one of decord, pyav"),
                     (["--write-queue", "-1"], "--write-queue must be >= 0")):
        result = CliRunner().invoke(cli.main, [str(a) for a in base] + ["--work-dir", str(tmp_path / "w2"), *bad])
        assert result.exit_code == 2 and msg in result.output and "Traceback" not in result.output


def test_out_of_memory_in_the_text_pass_names_its_batch_size(tmp_path, manifest, monkeypatch):
    enc = load_encoder("test-vit-micro")

    def oom(texts, max_tokens=32):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(enc, "encode_texts", oom)
    with pytest.raises(EncoderError, match=r"out of memory encoding 3 captions .* lower --text-batch-size \(now 3\)"):
        run(manifest, enc, tmp_path / "oom.zarr", text_batch_size=3)
