"""The GPU paths of extraction and of the stage-two batches, checked on the CPU: CUDA events on the
encoder's own device, one pinned copy of a video's frames whatever the number of encoders, thumbnails
made by the decoder workers (the same bytes as before), the default number of decoder workers, pinned
batches for a CUDA device, and a store's compute precision and resize mode in its identity."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

import pipeline.decode_pool as decode_module
import pipeline.thumbnails as thumbnails_module
from core.errors import StoreMismatchError
from manifests.schema import Manifest
from pipeline.config import ExtractConfig
from pipeline.decode import DecodeTask, decode_video
from pipeline.decode_pool import DecodePool
from pipeline.encoder_base import Encoder, resize_short_crop
from pipeline.encoders import encoder_for_identity, load_encoder
from pipeline.extraction.job import extract
from pipeline.store import STATUS_OK, CacheStore
from pipeline.thumbnails import THUMBNAIL_BYTES, THUMBNAIL_SIDE, thumbnails_of

T = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    from helpers import write_video

    root = tmp_path_factory.mktemp("gpu-paths")
    videos = [{"video_id": f"v{i}", "path": str(write_video(root / f"v{i}.mp4", num_frames=10 + 3 * i, seed=i)),
               "split": "train" if i < 3 else "test"} for i in range(5)]
    videos.append({"video_id": "missing", "path": "nope.mp4", "split": "train"})
    captions = [{"caption_id": f"{v['video_id']}-0", "video_id": v["video_id"], "text": f"a clip {v['video_id']}",
                 "split": v["split"]} for v in videos]
    return Manifest.from_records("toy", videos, captions, root=root)


# ------------------------------------------------------------------ a CUDA device faked on the CPU
class _Spec:
    def __init__(self, name: str) -> None:
        self.name = name

    def short_name(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


class CudaLike(Encoder):
    """An encoder that says its device is ``cuda:1`` but computes on the CPU (what extraction does with
    its device is what these tests watch)."""

    def __init__(self, name: str, device: str = "cuda:1") -> None:
        self.spec, self.device, self.dtype = _Spec(name), torch.device(device), torch.float32
        self.image_size, self.mean, self.std, self.context_length = 8, (0.5,) * 3, (0.25,) * 3, 8
        self.num_tokens, self.token_dim, self.embed_dim, self.text_dim = 64, 3, 3, 3

    def preprocess(self, frames_uint8: torch.Tensor) -> torch.Tensor:
        return resize_short_crop(frames_uint8.permute(0, 3, 1, 2).float(), self.image_size) / 255.0

    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(2).transpose(1, 2).contiguous(), x.mean(dim=(2, 3))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.zeros(len(texts), self.context_length, dtype=torch.long)

    def encode_texts(self, texts: list[str], max_tokens: int = 32):
        n = len(texts)
        return torch.ones(n, max_tokens, self.text_dim), torch.ones(n, max_tokens, dtype=torch.bool), torch.ones(n, 3)

    def identity(self) -> dict:
        return {"name": self.spec.name, "image_size": self.image_size}


class FakeCuda:
    """torch.cuda's events, streams and device context faked, and pinned memory taken as plain memory:
    each records which device it was given; every page-locked allocation or copy is counted."""

    def __init__(self, monkeypatch, current: int = 0) -> None:
        self.current = torch.device("cuda", current)  # the process's current device: not the encoder's
        self.recorded: list = []   # the stream each event was recorded on (None: the current device's)
        self.entered: list = []    # devices made current with torch.cuda.device
        self.pinned: list = []     # (what, dtype, shape) of each pinned allocation / pin_memory call
        fake = self

        class Stream:
            def __init__(self, device) -> None:
                self.device = fake.current if device is None else torch.device(device)

        class Event:
            def record(self, stream=None) -> None:
                fake.recorded.append(stream)

            def synchronize(self) -> None:
                pass

        @contextlib.contextmanager
        def device(dev):
            fake.entered.append(torch.device(dev))
            yield

        real_empty = torch.empty

        def empty(*args, pin_memory=False, **kw):
            out = real_empty(*args, **kw)
            if pin_memory:
                fake.pinned.append(("empty", out.dtype, tuple(out.shape)))
            return out

        def pin_memory(self, *args, **kw):
            fake.pinned.append(("pin_memory", self.dtype, tuple(self.shape)))
            return self

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)

    def frame_pins(self) -> int:
        """Pinned allocations of decoded frames (uint8 images), not of the encoders' outputs."""
        return sum(1 for _, dtype, shape in self.pinned if dtype == torch.uint8 and len(shape) != 0)


def no_thumbnails_here(monkeypatch) -> None:
    """Making a thumbnail in this process (the encoding loop) fails; spawned decoder workers are untouched."""
    def boom(*a, **k):
        raise AssertionError("thumbnails made in the encoding process")

    import pipeline.extraction.job as extract_module
    import pipeline.extraction.thumbnail_backfill as backfill_module

    for module in (thumbnails_module, decode_module, extract_module, backfill_module):
        monkeypatch.setattr(module, "thumbnails_of", boom, raising=False)


def fake_gpu_extract(monkeypatch, manifest, tmp_path, names) -> tuple[FakeCuda, list]:
    fake = FakeCuda(monkeypatch)
    encs = [CudaLike(n) for n in names]
    paths = [tmp_path / f"{n}.zarr" for n in names]
    rep = extract(manifest, encs, paths, device="cuda:1", num_frames=T, shard_size=3, workers=1, timeout=60,
                  batch_size=1000, precision="fp32", progress=False)
    assert rep.ok == 5 and rep.failed == 1 and rep.device == "cuda:1"
    return fake, paths


def test_events_and_streams_are_those_of_the_encoders_device(monkeypatch, manifest, tmp_path):
    fake, _ = fake_gpu_extract(monkeypatch, manifest, tmp_path, ["a"])
    assert fake.recorded, "no CUDA event was recorded"
    for stream in fake.recorded:  # torch.cuda.Event().record() would take the current device's stream (cuda:0)
        assert stream is not None and stream.device == torch.device("cuda", 1)
    assert fake.entered and set(fake.entered) == {torch.device("cuda", 1)}


def test_a_videos_frames_are_pinned_once_whatever_the_number_of_encoders(monkeypatch, manifest, tmp_path):
    one, _ = fake_gpu_extract(monkeypatch, manifest, tmp_path / "one", ["a"])
    monkeypatch.undo()
    two, paths = fake_gpu_extract(monkeypatch, manifest, tmp_path / "two", ["a", "b"])
    assert one.frame_pins() >= 1
    assert two.frame_pins() == one.frame_pins()  # not once per encoder
    assert two.frame_pins() <= CacheStore.open(paths[0]).num_shards  # one pinned buffer per batch (a shard here)
    a, b = CacheStore.open(paths[0]), CacheStore.open(paths[1])
    np.testing.assert_array_equal(a.array("videos/tokens")[...], b.array("videos/tokens")[...])


def test_the_thumbnails_of_a_device_resize_are_those_of_the_full_frames(monkeypatch, manifest, tmp_path):
    """--resize device: the decoders keep the decoded size, and the thumbnails are made from those frames
    by the workers, byte for byte what the encoding loop made before."""
    no_thumbnails_here(monkeypatch)
    _, (path,) = fake_gpu_extract(monkeypatch, manifest, tmp_path, ["a"])
    monkeypatch.undo()
    expect_thumbnails(CacheStore.open(path), manifest, short_side=None)


def expect_thumbnails(store: CacheStore, manifest: Manifest, short_side: int | None) -> None:
    """Each ok video's stored thumbnails are ``thumbnails_of`` its frames decoded at ``short_side``."""
    ok = set(np.flatnonzero(store.status() == STATUS_OK).tolist())
    stored = store.thumbnails(range(store.num_videos))
    assert len(ok) == 5
    for row, vid in enumerate(store.video_ids):
        if row not in ok:
            assert stored[row] == []
            continue
        res = decode_video(vid, manifest.video_path(vid), T, short_side=short_side)
        assert stored[row] == thumbnails_of(res.frames, res.mask, 3, THUMBNAIL_SIDE, THUMBNAIL_BYTES), vid


@pytest.mark.integration
def test_the_worker_resize_thumbnails_come_from_the_workers_unchanged(monkeypatch, manifest, micro, tmp_path):
    no_thumbnails_here(monkeypatch)
    path = tmp_path / "w.zarr"
    extract(manifest, [micro], [path], num_frames=T, shard_size=3, workers=1, progress=False)
    monkeypatch.undo()
    expect_thumbnails(CacheStore.open(path), manifest, short_side=micro.image_size)


def test_the_decode_result_carries_its_thumbnails(manifest):
    tasks = [DecodeTask(v, str(manifest.video_path(v))) for v in ("v0", "v3", "missing")]
    with DecodePool(T, 32, workers=1, timeout=60, thumbnails=(2, 64, THUMBNAIL_BYTES)) as pool:
        results = list(pool.map(tasks))
    for res in results[:2]:
        assert res.ok and res.thumbnails == thumbnails_of(res.frames, res.mask, 2, 64, THUMBNAIL_BYTES)
        assert len(res.thumbnails) == 2
    assert not results[2].ok and not results[2].thumbnails
    with DecodePool(T, 32, workers=1, timeout=60) as pool:  # none asked for: none made
        assert next(iter(pool.map(tasks[:1]))).thumbnails is None


def test_decoder_workers_default_to_the_machine(monkeypatch):
    from pipeline.config import MAX_AUTO_WORKERS, decoder_workers

    assert ExtractConfig().workers == 0  # 0: from the machine
    for cores, want in ((1, 1), (2, 1), (4, 3), (16, MAX_AUTO_WORKERS), (64, MAX_AUTO_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert decoder_workers(0) == want
    assert decoder_workers(3) == 3
    from core.errors import UsageError

    with pytest.raises(UsageError, match="--workers must be >= 0"):
        decoder_workers(-1)


# ------------------------------------------------------------------ stage-two / stage-one batches
def _record_pins(monkeypatch) -> list:
    pinned: list = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kw):
        out = real_empty(*args, **kw)
        if pin_memory:
            pinned.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA runtime to pin with
    return pinned


def test_stage_two_batches_are_pinned_for_cuda_only(monkeypatch):
    from heads.stage_two.pairs import load_pairs
    from helpers import make_token_split

    split = make_token_split("train", 12, 2, seed=0)
    caps, vids = np.array([3, 0, 5, 3]), np.array([1, 0, 2, 1])
    plain = load_pairs(split, caps, vids, labels=np.array([1, 0, 0, 1]))
    pinned = _record_pins(monkeypatch)
    on_cpu = load_pairs(split, caps, vids, labels=np.array([1, 0, 0, 1]), device="cpu")
    assert pinned == []
    on_gpu = load_pairs(split, caps, vids, labels=np.array([1, 0, 0, 1]), device=torch.device("cuda", 1))
    assert len(pinned) == 7  # every tensor of the batch
    assert tuple(on_gpu.tokens.shape) in pinned
    for a, b, c in zip(plain.pair_inputs() + (plain.labels,), on_cpu.pair_inputs() + (on_cpu.labels,),
                       on_gpu.pair_inputs() + (on_gpu.labels,)):
        assert a.dtype == b.dtype == c.dtype and torch.equal(a, b) and torch.equal(a, c)


def test_stage_one_batches_are_pinned_for_cuda_only(monkeypatch):
    from heads.training.data import iterate_batches, load_batch
    from helpers import make_token_split

    split = make_token_split("train", 12, 2, seed=0)
    caps, vids = np.array([4, 1, 7]), np.array([2, 0, 3])
    plain = load_batch(split, caps, vids, text_tokens=True)
    pinned = _record_pins(monkeypatch)
    assert load_batch(split, caps, vids, text_tokens=True, device="cpu") is not None and pinned == []
    (on_gpu,) = list(iterate_batches(split, [(caps, vids)], prefetch=1, text_tokens=True, device="cuda"))
    assert len(pinned) == 7
    for name in ("video_index", "caption_index", "frame_emb", "frame_mask", "text_emb", "text_tokens", "text_mask"):
        a, b = getattr(plain, name), getattr(on_gpu, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


# ------------------------------------------------------------------ precision and resize in the identity
def run(manifest, enc, path, **kw):
    opts = dict(num_frames=T, shard_size=2, workers=1, timeout=60, batch_size=5, progress=False)
    return extract(manifest, [enc], [path], **{**opts, **kw})


@pytest.mark.integration
def test_a_store_records_and_keeps_its_precision_and_resize(tmp_path, manifest, micro):
    path = tmp_path / "fp32.zarr"
    run(manifest.split("train"), micro, path, part=(0, 2))  # half the shards: a store to finish
    store = CacheStore.open(path)
    done = store.done_shards()
    before = store.fingerprint
    for kw, theirs, ours in ((dict(precision="bf16"), "precision fp32", "precision bf16"),
                             (dict(resize="device"), "resize worker", "resize device"),
                             (dict(precision="bf16", retry_failed=True), "precision fp32", "precision bf16")):
        with pytest.raises(StoreMismatchError) as err:
            run(manifest.split("train"), load_encoder("test-vit-micro"), path, **kw)
        line = str(err.value)
        assert "\n" not in line and theirs in line and ours in line and str(path) in line, line
    with pytest.raises(StoreMismatchError, match="precision fp32.*precision bf16"):  # growing it, too
        run(manifest, load_encoder("test-vit-micro"), path, precision="bf16")
    again = CacheStore.open(path)
    assert again.done_shards() == done and again.num_videos == store.num_videos and again.fingerprint == before
    from pipeline.encoder_base import EXTRACTION_KEY

    assert store.encoder_identity[EXTRACTION_KEY] == {"precision": "fp32", "resize": "worker"}
    # the same precision and resize finish it, and grow it
    rep = run(manifest, micro, path, precision="fp32", resize="worker")
    assert rep.appended and CacheStore.open(path).is_complete()
    # the encoder is still the encoder: rebuilt from the store's identity to encode queries
    ident = CacheStore.open(path).encoder_identity
    assert encoder_for_identity(ident).identity() == micro.identity()


@pytest.mark.integration
def test_bf16_and_device_stores_are_other_stores(tmp_path, manifest, micro):
    bf16 = tmp_path / "bf16.zarr"
    run(manifest, load_encoder("test-vit-micro"), bf16, precision="bf16", resize="device", retry_failed=True)
    store = CacheStore.open(bf16)
    with pytest.raises(StoreMismatchError, match="precision bf16, resize device.*precision fp32, resize worker"):
        run(manifest, micro, bf16, retry_failed=True)  # a retry on a CPU machine
    from pipeline.encoder_base import EXTRACTION_KEY

    assert store.encoder_identity[EXTRACTION_KEY] == {"precision": "bf16", "resize": "device"}
    fp32 = tmp_path / "fp32.zarr"
    run(manifest, micro, fp32)
    assert CacheStore.open(fp32).fingerprint != store.fingerprint


@pytest.mark.integration
def test_a_store_made_before_the_record_takes_no_more_features(tmp_path, manifest, micro):
    from pipeline.encoder_base import EXTRACTION_KEY

    path = tmp_path / "old.zarr"
    run(manifest, micro, path, part=(0, 2))
    store = CacheStore.open(path, mode="r+")
    old = {k: v for k, v in store.encoder_identity.items() if k != EXTRACTION_KEY}
    store.update_attrs({"encoder": old})  # as a store made before precision and resize were recorded
    store.consolidate()
    with pytest.raises(StoreMismatchError, match="made before stores recorded their compute precision"):
        run(manifest, micro, path)
    # still read as before: its encoder, its rows
    assert encoder_for_identity(CacheStore.open(path).encoder_identity).identity() == micro.identity()


def test_a_worker_resize_to_a_larger_encoders_size_is_recorded():
    from pipeline.extraction.plan import resize_record

    assert resize_record("worker", 224, 224) == "worker"
    assert resize_record("device", None, 224) == "device"
    assert resize_record("worker", 364, 224) == "worker to 364 px, then device"
