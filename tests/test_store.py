"""Store round trip, documented shapes, refusals and staging."""

from __future__ import annotations

import threading
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.store import CacheStore, StoreError, StoreMismatchError, decode_strings, fingerprint_of
from helpers import CIDS, CSPLIT, CVID, STORE, VIDS, VSPLIT, RangeHandler, fill, layout, video_data

V, C, T, N, D, E, L, DT, S, ST = STORE


def make(path: Path, **kw) -> CacheStore:
    return CacheStore.open_or_create(path, layout(**kw), VIDS, VSPLIT, CIDS, CVID, CSPLIT)


def test_layout_roundtrip_with_plain_zarr(tmp_path):
    path = tmp_path / "s.zarr"
    store = make(path)
    assert store.done_shards() == set() and store.num_shards == 3 and store.num_text_shards == 3
    fill(store, failed={3})
    g = zarr.open_group(str(path), mode="r")
    a = dict(g.attrs)
    assert a["schema_version"] == 2 and a["dataset"] == "toy" and a["num_shards"] == 3
    assert a["sampling"] == {"num_frames": T, "strategy": "uniform-midpoint"}
    assert a["encoder"] == {"name": "x", "weights": "r"} and a["max_text_tokens"] == L
    expect = {"videos/status": (V,), "videos/tokens": (V, T, N, D), "videos/frame_emb": (V, T, E),
              "videos/frame_mask": (V, T), "videos/frame_index": (V, T),
              "videos/frame_time": (V, T), "texts/video_index": (C,), "texts/tokens": (C, L, DT), "texts/mask": (C, L),
              "texts/emb": (C, E), "shards/done": (3,), "shards/text_done": (3,)}
    for name, shape in expect.items():
        assert g[name].shape == shape, name
    for name, rows in (("videos/ids", V), ("videos/split", V), ("videos/error", V), ("texts/ids", C),
                       ("texts/split", C)):
        assert g[name].shape[0] == rows and g[name].ndim == 2, name
    tok = g["videos/tokens"]
    assert tok.dtype == np.float16 and tok.chunks == (1, T, N, D) and tok.shards == (S, T, N, D)
    assert g["videos/frame_emb"].dtype == np.float32 and g["texts/tokens"].dtype == np.float16
    assert decode_strings(g["videos/ids"][...]) == VIDS
    assert g["videos/ids"].dtype == np.uint8  # fixed-width UTF-8: any zarr reader gets the ids
    assert g["videos/status"][...].tolist() == [1, 1, 1, 2, 1]
    assert decode_strings(g["videos/error"][3:4]) == ["timeout"]
    assert float(g["videos/tokens"][4, 0, 0, 0]) == 4.0
    assert g["texts/video_index"][...].tolist() == CVID
    assert g["shards/done"][...].all() and g["shards/text_done"][...].all()
    reopened = CacheStore.open(path)
    assert reopened.is_complete() and reopened.failures() == {"d": "timeout"}
    assert reopened.fingerprint == fingerprint_of(a) and reopened.splits() == ["train", "test"]
    assert CacheStore.open(f"file://{path}").fingerprint == reopened.fingerprint


def test_write_shard_checks_shapes_and_readonly(tmp_path):
    store = make(tmp_path / "s.zarr")
    bad = video_data(0, 1)
    with pytest.raises(ValueError, match="shape"):
        store.write_shard(0, **bad)
    assert store.done_shards() == set()
    with pytest.raises(StoreError, match="read-only"):
        CacheStore.open(tmp_path / "s.zarr").write_shard(0, **video_data(0, 2))


def test_refusals(tmp_path):
    make(tmp_path / "s.zarr")
    with pytest.raises(StoreMismatchError, match="manifest_sha256"):
        make(tmp_path / "s.zarr", manifest_sha256="n" * 64)
    with pytest.raises(StoreMismatchError, match="encoder"):
        make(tmp_path / "s.zarr", encoder={"name": "y"})
    with pytest.raises(StoreMismatchError, match="sampling"):
        make(tmp_path / "s.zarr", num_frames=T + 1)
    make(tmp_path / "s.zarr")  # same request: fine
    with pytest.raises(StoreError, match="not a feature cache"):
        CacheStore.open(tmp_path / "nothing")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match="not a feature cache"):
        CacheStore.open(tmp_path / "other.zarr")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema_version"):
        CacheStore.open(tmp_path / "s.zarr")


def test_stage_rows_and_idempotent(tmp_path):
    store = make(tmp_path / "s.zarr")
    fill(store, failed={1})
    st = CacheStore.open(tmp_path / "s.zarr").stage("train", tmp_path / "stage")
    assert st.video_ids == ["a", "c"]  # b failed
    assert st.caption_ids == ["c0", "c1", "c3"]  # captions of a and c only
    assert st.caption_video.tolist() == [0, 0, 1]
    assert isinstance(st.frame_emb, np.memmap) and st.frame_emb.shape == (2, T, E)
    assert st.frame_emb[:, 0, 0].tolist() == [0.0, 2.0]
    assert st.tokens.shape == (2, T, N, D) and st.tokens.dtype == np.float16
    assert st.tokens[1, 0, 0, 0] == 2.0
    assert st.text_emb[:, 0].tolist() == [0.0, 1.0, 3.0]
    assert st.text_tokens.shape == (3, L, DT) and st.text_mask.dtype == bool
    assert st.frame_mask.dtype == bool and not st.frame_mask[:, -1].any()
    assert st.store_fingerprint == store.fingerprint
    mtime = (tmp_path / "stage" / "train" / "frame_emb.npy").stat().st_mtime_ns
    again = CacheStore.open(tmp_path / "s.zarr").stage("train", tmp_path / "stage")
    assert (tmp_path / "stage" / "train" / "frame_emb.npy").stat().st_mtime_ns == mtime
    assert again.video_ids == st.video_ids
    light = store.stage("test", tmp_path / "stage", arrays=("frame_emb",))
    assert light.tokens is None and light.text_tokens is None and light.video_ids == ["d", "e"]
    assert light.caption_video.tolist() == [0, 0, 1]
    with pytest.raises(StoreError, match="no videos of split"):
        store.stage("val", tmp_path / "stage")


def test_stage_blocks_within_shards(tmp_path, monkeypatch):
    import pipeline.staging as staging

    monkeypatch.setattr(staging, "_STAGE_BLOCK_BYTES", 1)  # one row per read
    store = make(tmp_path / "s.zarr")
    fill(store)
    st = store.stage("train", tmp_path / "stage")
    assert st.tokens[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]


def test_stage_refuses_incomplete_text(tmp_path):
    store = make(tmp_path / "s.zarr")
    for i in range(store.num_shards):
        store.write_shard(i, **video_data(*store.shard_range(i)))
    with pytest.raises(StoreError, match="text shards"):
        store.stage("train", tmp_path / "stage")


def test_open_over_http(tmp_path):
    pytest.importorskip("aiohttp")
    store = make(tmp_path / "s.zarr")
    fill(store)
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(RangeHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s.zarr"
        remote = CacheStore.open(url)
        assert remote.fingerprint == store.fingerprint and remote.video_ids == VIDS
        st = remote.stage("test", tmp_path / "stage-http")
        assert st.tokens[:, 0, 0, 0].tolist() == [3.0, 4.0]
    finally:
        server.shutdown()
        server.server_close()
