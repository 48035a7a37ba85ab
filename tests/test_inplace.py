"""Reading a local store's token arrays in place (``pipeline.store.inplace``): every row read through
the memory maps of the store's own shard and chunk files equals zarr-python's read of it, for a store
written by extraction, after an append and after a repair; nothing is copied; a compressed or remote
store is staged instead, and ``copy=True`` forces the copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from core.errors import StoreError
from helpers import run_cli
from pipeline.store import CacheStore
from pipeline.store.inplace import MappedRows, in_place_reason

pytestmark = pytest.mark.integration
ARRAYS = ("frame_emb", "tokens", "text")


def assert_matches_zarr(store_path: Path, stage_dir: Path, split: str = "train") -> None:
    """Every row of ``split`` read in place equals zarr's read of the same store rows, and the staged
    directory holds no copy of the token arrays."""
    store = CacheStore.open(store_path)
    staged = store.stage(split, stage_dir, arrays=ARRAYS)
    assert staged.access == {"tokens": "in place", "text_tokens": "in place"}
    assert not (stage_dir / split / "tokens.npy").exists() and not (stage_dir / split / "text_tokens.npy").exists()
    rows, crows, _ = store.split_rows(split)
    want = np.asarray(store.array("videos/tokens")[...])[rows]
    assert staged.tokens.shape == want.shape and staged.tokens.dtype == want.dtype
    order = np.random.default_rng(0).permutation(len(rows))
    np.testing.assert_array_equal(staged.tokens[order], want[order])
    np.testing.assert_array_equal(staged.tokens[2:5], want[2:5])
    np.testing.assert_array_equal(staged.tokens[-1], want[-1])
    assert staged.tokens[1, 0, 2, 3] == want[1, 0, 2, 3]
    np.testing.assert_array_equal(staged.tokens[1:3, 0, :, 1], want[1:3, 0, :, 1])
    np.testing.assert_array_equal(staged.tokens[[2, 0], -1], want[[2, 0], -1])
    np.testing.assert_array_equal(np.asarray(staged.tokens), want)
    text = np.asarray(store.array("texts/tokens")[...])[crows]
    np.testing.assert_array_equal(staged.text_tokens[np.arange(len(crows))[::-1]], text[::-1])
    copied = store.stage(split, stage_dir.parent / (stage_dir.name + "-copy"), arrays=ARRAYS, copy=True)
    assert copied.access == {"tokens": "staged", "text_tokens": "staged"}
    np.testing.assert_array_equal(np.asarray(copied.tokens), want)
    np.testing.assert_array_equal(np.asarray(copied.text_tokens), text)


def test_an_extracted_store_is_read_in_place(tiny_world, tmp_path):
    assert_matches_zarr(Path(tiny_world["store"]), tmp_path / "staged")
    assert_matches_zarr(Path(tiny_world["store"]), tmp_path / "staged-test", split="test")


def test_a_repaired_shard_is_read_anew(tiny_world, tmp_path):
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny_world["store"], store)
    first = CacheStore.open(store).stage("train", tmp_path / "s1", arrays=ARRAYS)
    good = np.asarray(first.tokens)
    shard = store / "videos" / "tokens" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x40  # a byte of a video's tokens (not the index)
    shard.write_bytes(bytes(data))
    assert not np.array_equal(np.asarray(CacheStore.open(store).stage("train", tmp_path / "s2",
                                                                      arrays=ARRAYS).tokens), good)
    out = run_cli(["cache", "verify", store, "--repair", "--manifest", tiny_world["manifest"],
                   "--encoder", "test-vit-micro", "--workers", "1"])
    assert "every shard is intact" in out
    assert_matches_zarr(store, tmp_path / "s3")
    np.testing.assert_array_equal(np.asarray(CacheStore.open(store).stage("train", tmp_path / "s4",
                                                                          arrays=ARRAYS).tokens), good)


def test_a_grown_store_is_read_in_place(tmp_path):
    from helpers import write_video
    from manifests.schema import Manifest
    from pipeline.encoders import load_encoder
    from pipeline.extraction.job import extract

    def manifest(n: int, name: str) -> Manifest:
        videos = [{"video_id": f"v{i}", "path": str(write_video(tmp_path / f"v{i}.mp4", num_frames=8, seed=i)),
                   "split": "train"} for i in range(n)]
        captions = [{"caption_id": f"v{i}-0", "video_id": f"v{i}", "text": f"clip {i}", "split": "train"}
                    for i in range(n)]
        return Manifest.read(Manifest.from_records("toy", videos, captions, root=tmp_path).write(tmp_path / name))

    micro = load_encoder("test-vit-micro")
    opts = dict(num_frames=4, shard_size=2, text_shard_size=3, workers=1, progress=False)
    store = tmp_path / "grow.zarr"
    extract(manifest(3, "m1"), [micro], [store], **opts)
    before = CacheStore.open(store).stage("train", tmp_path / "s1", arrays=ARRAYS)
    assert before.tokens.shape[0] == 3
    extract(manifest(6, "m2"), [micro], [store], **opts)  # appends v3..v5, rewrites the partial shard 1
    assert_matches_zarr(store, tmp_path / "s2")


def test_a_compressed_store_is_staged(tiny_world, tmp_path):
    store = tmp_path / "zstd.zarr"
    run_cli(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tmp_path / "w", "--encoder",
             "test-vit-micro", "--store", store, "--frames", "4", "--shard-size", "8", "--workers", "1",
             "--compressor", "zstd"])
    assert "encoded (" in in_place_reason(store, "videos/tokens")
    s = CacheStore.open(store)
    staged = s.stage("train", tmp_path / "staged", arrays=ARRAYS)
    assert staged.access["tokens"] == "staged" and (tmp_path / "staged" / "train" / "tokens.npy").is_file()
    plain = CacheStore.open(tiny_world["store"]).stage("train", tmp_path / "plain", arrays=ARRAYS)
    np.testing.assert_array_equal(np.asarray(staged.tokens), np.asarray(plain.tokens))
    with pytest.raises(StoreError, match="cannot be read in place"):
        MappedRows(store, "videos/tokens", np.arange(2))


def test_a_corrupt_shard_index_is_refused(tiny_world, tmp_path):
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny_world["store"], store)
    shard = store / "videos" / "tokens" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # inside the shard index
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="crc32c"):
        MappedRows(store, "videos/tokens", np.arange(3))


def test_the_commands_say_how_they_read(tiny_runs, tmp_path, monkeypatch):
    """A re-ranking of the local store reads its tokens in place and says so in run.json; with
    --copy-tokens it stages a copy and says that; the figures are the same."""
    import json

    from workflows.workdir import COPY_TOKENS_ENV

    monkeypatch.setenv(COPY_TOKENS_ENV, "0")  # restored (unset) after the test, which --copy-tokens sets
    work, store, s1, s2 = tiny_runs
    base = ["rerank", "--store", store, "--stage-one", s1, "--stage-two", s2, "--candidates", 3,
            "--device", "cpu"]
    run_cli(base + ["--work-dir", tmp_path / "w1", "--out", tmp_path / "in-place"])
    run_cli(base + ["--work-dir", tmp_path / "w2", "--out", tmp_path / "copied", "--copy-tokens"])
    in_place = json.loads((tmp_path / "in-place" / "run.json").read_text())
    copied = json.loads((tmp_path / "copied" / "run.json").read_text())
    assert in_place["reads"] == {"tokens": "in place", "text_tokens": "in place"}
    assert copied["reads"] == {"tokens": "staged", "text_tokens": "staged"}
    assert not list((tmp_path / "w1").rglob("tokens.npy")) and list((tmp_path / "w2").rglob("tokens.npy"))
    m1 = json.loads((tmp_path / "in-place" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "copied" / "metrics.json").read_text())
    assert m1["re-ranked"] == m2["re-ranked"]


def test_a_chunk_zarr_did_not_write_reads_as_the_fill_value(tmp_path):
    """zarr skips an inner chunk equal to the fill value (its index entry stays empty): read in place
    it is the fill value, as zarr reads it; rows across two shards and a partial last shard."""
    import zarr

    from bench.cache import write_store

    path = write_store(tmp_path / "s.zarr", 7, frames=2, tokens=3, width=4, text_len=2, text_width=4, embed=4,
                       shard_size=4)
    tokens = zarr.open_array(str(path / "videos" / "tokens"), mode="r+")
    tokens[5] = 0
    mapped = MappedRows(path, "videos/tokens", np.array([6, 5, 0, 3]))
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(tokens[...])[[6, 5, 0, 3]])
    assert not np.asarray(mapped)[1].any()
    text = zarr.open_array(str(path / "texts" / "tokens"), mode="r+")
    text[...] = 0  # the one chunk file is removed: every caption reads as zeros
    assert not (path / "texts" / "tokens" / "c" / "0" / "0" / "0").exists()
    np.testing.assert_array_equal(np.asarray(MappedRows(path, "texts/tokens", np.arange(7))), text[...])
