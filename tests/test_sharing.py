"""Stores a team shares: s3:// (a moto server on 127.0.0.1) and http(s):// (a Range-honouring server),
checksums and `cache verify` (--repair), `cache info`, resumable `cache pull`, resumable staging,
two `extract --part` writers at once, a grown manifest appended, HDF5 out and in."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from pipeline.sharing import array_names
from core.errors import StoreError
from pipeline.store import CacheStore, StoreMismatchError
from helpers import RangeHandler, run_cli, write_video

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
class Interrupted(Exception):
    """Stands for a crash or a Ctrl-C midway."""


TINY_EXTRACT = ["--encoder", "test-vit-micro", "--frames", "4", "--shard-size", "8", "--workers", "1"]


def invoke(args: list) -> object:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def assert_same_store(a: str | Path, b: str | Path, attrs: bool = True) -> None:
    """Every array (and the root attributes) of two stores equal."""
    sa, sb = CacheStore.open(a), CacheStore.open(b)
    assert array_names(sa) == array_names(sb)
    for name in array_names(sa):
        assert np.array_equal(np.asarray(sa.array(name)[...]), np.asarray(sb.array(name)[...])), name
    if attrs:
        assert sa.attrs == sb.attrs


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1 (moto's server mode) with a bucket ``team``; the AWS variables
    point at it for the module's tests."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "CROSSTVR_S3_ENDPOINT": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def http_root(tmp_path):
    """A static HTTP server on 127.0.0.1 honouring Range requests, serving ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_s3_extract_info_verify_pull_and_train(tiny_world, s3, tmp_path):
    url = "s3://team/tiny.zarr"
    out = run_cli(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tmp_path / "work", *TINY_EXTRACT,
                   "--store", url])
    assert f"failures listed in {url}/failures.json" in out
    assert_same_store(url, tiny_world["store"])  # written straight to S3: the same store as on disk
    info = json.loads(run_cli(["cache", "info", url, "--json"]))
    assert info["videos"] == 28 and info["splits"]["train"] == {"videos": 14, "ok": 14, "failed": 0, "pending": 0,
                                                                "captions": 42}
    assert info["shards"]["videos"] == [4, 4] and info["checksums_recorded"]["videos"] == 4
    assert info["failure_list"] == f"{url}/failures.json" and info["sizes_exact"]
    assert info["arrays"]["videos/tokens"]["stored_bytes"] > 0 and info["compression_ratio"] > 0
    assert "every shard is intact" in run_cli(["cache", "verify", url])
    # training reads the remote store through a local staged copy
    run_cli(["train-stage-one", "--store", url, "--work-dir", tmp_path / "work", "--epochs", "1",
             "--out", tmp_path / "run"])
    staged = list((tmp_path / "work" / "staged").glob("*/train/frame_emb.npy"))
    assert len(staged) == 1
    local = CacheStore.open(tiny_world["store"]).stage("train", tmp_path / "local-stage")
    assert np.array_equal(np.load(staged[0]), local.frame_emb)
    out = run_cli(["cache", "pull", url, tmp_path / "pulled.zarr"])
    assert "0 already there" in out and "every shard is intact" in out
    assert_same_store(tmp_path / "pulled.zarr", tiny_world["store"])


def test_http_info_pull_and_stage(tiny_world, http_root, tmp_path):
    root, base = http_root
    shutil.copytree(tiny_world["store"], root / "tiny.zarr")
    url = f"{base}/tiny.zarr"
    info = json.loads(run_cli(["cache", "info", url, "--json"]))
    assert info["videos"] == 28 and info["shards"]["texts"] == [1, 1]
    # http(s) cannot list: sizes come from the checksum records of the written shards
    assert not info["sizes_exact"] and info["arrays"]["videos/tokens"]["stored_bytes"] == \
        sum(p.stat().st_size for p in (root / "tiny.zarr" / "videos" / "tokens" / "c").rglob("*") if p.is_file())
    out = run_cli(["cache", "pull", url, tmp_path / "pulled.zarr"])
    assert "every shard is intact" in out
    assert_same_store(tmp_path / "pulled.zarr", tiny_world["store"])
    st = CacheStore.open(url).stage("val", tmp_path / "stage")
    assert st.video_ids == CacheStore.open(tiny_world["store"]).stage("val", tmp_path / "stage-local").video_ids
    result = invoke(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tmp_path, *TINY_EXTRACT,
                     "--store", url])
    assert result.exit_code != 0 and "read-only" in result.output and "Traceback" not in result.output


def test_verify_names_a_flipped_byte_and_a_missing_object_and_repairs(tiny_world, tmp_path):
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny_world["store"], store)
    shard = store / "videos" / "tokens" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (store / "texts" / "emb" / "c" / "0" / "0").unlink()
    result = invoke(["cache", "verify", store])
    assert result.exit_code == 1, result.output
    assert "video shard 1: corrupt (videos/tokens)" in result.output
    assert "text shard 0: missing (texts/emb)" in result.output
    assert "video shard 0:" not in result.output and "2 bad" in result.output
    repaired = invoke(["cache", "verify", store, "--repair", "--manifest", tiny_world["manifest"],
                       "--encoder", "test-vit-micro", "--workers", "1"])
    assert repaired.exit_code == 0, repaired.output
    assert "after repair" in repaired.output and repaired.output.rstrip().endswith("every shard is intact")
    assert_same_store(store, tiny_world["store"])


def test_verify_of_a_store_without_checksums_says_so(tiny_world, tmp_path):
    store = tmp_path / "old.zarr"
    shutil.copytree(tiny_world["store"], store)
    shutil.rmtree(store / "checksums")
    result = invoke(["cache", "verify", store])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "4 video shards have no checksum recorded" in result.output and "cannot verify" in result.output
    assert json.loads(run_cli(["cache", "info", store, "--json"]))["checksums_recorded"]["videos"] == 0


@pytest.mark.slow
def test_two_writers_at_once_make_the_one_writer_store(tiny_world, tmp_path):
    store = tmp_path / "parts.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "cli.py", "extract", "--manifest", str(tiny_world["manifest"]),
                               "--work-dir", str(tmp_path / "work"), *TINY_EXTRACT, "--store", str(store),
                               "--part", f"{k}/2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_same_store(store, tiny_world["store"])
    for kind, n in (("videos", 4), ("texts", 1)):
        for i in range(n):
            rel = Path("checksums") / kind / f"{i}.json"
            assert (store / rel).read_bytes() == (tiny_world["store"] / rel).read_bytes()
    assert json.loads((store / "failures.json").read_text()) == {}
    assert "every shard is intact" in run_cli(["cache", "verify", store])


def test_part_option_is_checked(tiny_world, tmp_path):
    result = invoke(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tmp_path, *TINY_EXTRACT,
                     "--part", "2/2"])
    assert result.exit_code == 2 and "Invalid value for '--part': 2/2: K must be in 0..N-1" in result.output
    result = invoke(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tmp_path, *TINY_EXTRACT,
                     "--part", "half"])
    assert result.exit_code == 2 and "expected K/N (e.g. 0/2), got 'half'" in result.output


@pytest.fixture
def grown(tmp_path):
    """A manifest of 5 videos and its grown version (3 more videos, captions of old and new videos)."""
    from manifests.schema import Manifest

    def video(i: int, split: str) -> dict:
        return {"video_id": f"v{i}", "path": str(write_video(tmp_path / f"v{i}.mp4", num_frames=8, seed=i)),
                "split": split}

    old_v = [video(i, "train" if i < 3 else "test") for i in range(5)]
    new_v = old_v + [video(i, "train" if i < 7 else "test") for i in range(5, 8)]

    def captions(videos: list[dict], extra: bool) -> list[dict]:
        out = [{"caption_id": f"{v['video_id']}-0", "video_id": v["video_id"], "text": f"a clip {v['video_id']}",
                "split": v["split"]} for v in videos]
        if extra:
            out.append({"caption_id": "v1-1", "video_id": "v1", "text": "another caption of v1", "split": "train"})
        return out

    old = Manifest.read(Manifest.from_records("toy", old_v, captions(old_v, False), root=tmp_path).write(tmp_path / "m1"))
    new = Manifest.read(Manifest.from_records("toy", new_v, captions(new_v, True), root=tmp_path).write(tmp_path / "m2"))
    return {"old": old, "new": new, "videos": new_v, "captions": captions(new_v, True)}


def test_a_grown_manifest_appends_without_recomputing(grown, tmp_path, monkeypatch):
    from manifests.schema import Manifest
    from pipeline.extraction import job as extract_mod
    from pipeline.encoders import load_encoder

    micro = load_encoder("test-vit-micro")
    opts = dict(num_frames=4, shard_size=2, text_shard_size=3, workers=1, progress=False)
    store = tmp_path / "grow.zarr"
    first = extract_mod.extract(grown["old"], [micro], [store], **opts)
    assert first.ok == 5
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()
              and p.parts[-4:-2] != ("shards", "done")}
    decoded = []
    real = extract_mod.DecodePool.map

    def counting(self, tasks):
        decoded.extend(t.video_id for t in tasks)
        return real(self, tasks)

    monkeypatch.setattr(extract_mod.DecodePool, "map", counting)
    encoded = []
    real_texts = type(micro).encode_texts

    def counting_texts(self, texts, **kw):
        encoded.extend(texts)
        return real_texts(self, texts, **kw)

    monkeypatch.setattr(type(micro), "encode_texts", counting_texts)
    second = extract_mod.extract(grown["new"], [micro], [store], **opts)
    assert sorted(decoded) == ["v5", "v6", "v7"] and second.ok == 3  # only the new videos
    assert "grown by 3 videos and 4 captions" in second.summary()
    assert sorted(encoded) == sorted(["a clip v5", "a clip v6", "a clip v7", "another caption of v1"])
    s = CacheStore.open(store)
    assert s.video_ids == ["v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7"]  # old rows first, unchanged
    assert [h["num_videos"] for h in s.attrs["manifest_history"]] == [5, 8]
    assert s.attrs["manifest_history"][0]["manifest_sha256"] == grown["old"].sha256()
    assert s.attrs["manifest_sha256"] == grown["new"].sha256() and s.is_complete()
    # the full old shards' objects are untouched
    for rel in (Path("videos/tokens/c/0/0/0/0"), Path("videos/tokens/c/1/0/0/0"), Path("checksums/videos/0.json")):
        assert (store / rel).read_bytes() == before[rel]
    assert "every shard is intact" in run_cli(["cache", "verify", store])
    again = extract_mod.extract(grown["new"], [micro], [store], **opts)  # a re-run (or another --part) of the grown store
    assert again.ok == 0 and again.skipped == 8 and not decoded[3:]
    # the same content as extracting the grown manifest at once (rows matched by id)
    monkeypatch.undo()
    fresh = tmp_path / "fresh.zarr"
    extract_mod.extract(grown["new"], [micro], [fresh], **opts)
    f = CacheStore.open(fresh)
    order = [f.video_ids.index(v) for v in s.video_ids]
    for name in ("videos/tokens", "videos/frame_emb", "videos/status", "videos/frame_index"):
        assert np.array_equal(np.asarray(s.array(name)[...]), np.asarray(f.array(name)[...])[order]), name
    corder = [f.caption_ids.index(c) for c in s.caption_ids]
    # (captions are encoded in other batches: equal up to float rounding)
    assert np.allclose(np.asarray(s.array("texts/emb")[...]), np.asarray(f.array("texts/emb")[...])[corder], atol=1e-4)
    st = s.stage("train", tmp_path / "stage")
    assert st.video_ids == ["v0", "v1", "v2", "v5", "v6"] and len(st.caption_ids) == 6
    # removing or changing existing rows is refused: a new store is needed
    shrunk = Manifest.from_records("toy", grown["videos"][1:], [c for c in grown["captions"] if c["video_id"] != "v0"],
                                   root=tmp_path)
    with pytest.raises(StoreMismatchError, match="lacks 1 of the store's videos.*make a new store"):
        extract_mod.extract(shrunk, [micro], [store], **opts)
    changed = [dict(c, text="something else") if c["caption_id"] == "v2-0" else c for c in grown["captions"]]
    other = Manifest.from_records("toy", grown["videos"], changed, root=tmp_path)
    with pytest.raises(StoreMismatchError, match="changes 1 of the store's captions.*'v2-0'.*make a new store"):
        extract_mod.extract(other, [micro], [store], **opts)


def test_pull_resumes_without_copying_twice(tiny_world, tmp_path):
    from pipeline.sharing import pull

    seen: list[str] = []

    def stop_after_some(key: str) -> None:
        seen.append(key)
        if len(seen) == 20:
            raise Interrupted

    with pytest.raises(Interrupted):
        pull(tiny_world["store"], tmp_path / "copy.zarr", progress=False, on_copied=stop_after_some)
    report, check = pull(tiny_world["store"], tmp_path / "copy.zarr", progress=False)
    assert report.skipped == 20 and not set(report.copied) & set(seen)
    assert len(report.copied) + 20 == report.objects and check.ok
    assert not list((tmp_path / "copy.zarr").rglob("*.part"))
    assert_same_store(tmp_path / "copy.zarr", tiny_world["store"])


def test_staging_resumes_where_it_stopped(tiny_world, tmp_path, monkeypatch):
    import pipeline.staging as staging

    monkeypatch.setattr(staging, "_STAGE_BLOCK_BYTES", 1)  # one row per read
    store = CacheStore.open(tiny_world["store"])
    reads: list[tuple[str, int]] = []
    armed = [True]
    real = CacheStore.array

    class Counting:
        def __init__(self, arr, name):
            self.arr, self.name = arr, name

        def __getitem__(self, sel):
            reads.append((self.name, sel.start))
            if armed and len(reads) == 30:
                raise Interrupted
            return self.arr[sel]

        def __getattr__(self, attr):
            return getattr(self.arr, attr)

    monkeypatch.setattr(CacheStore, "array", lambda self, name: Counting(real(self, name), name)
                        if name in ("videos/tokens", "videos/frame_emb", "texts/emb") else real(self, name))
    with pytest.raises(Interrupted):
        store.stage("train", tmp_path / "stage", arrays=("frame_emb", "tokens"))
    first = list(reads)
    reads.clear()
    armed.clear()
    st = store.stage("train", tmp_path / "stage", arrays=("frame_emb", "tokens"))
    assert not set(first[:-1]) & set(reads)  # nothing read twice (the interrupted read excepted)
    monkeypatch.undo()
    whole = CacheStore.open(tiny_world["store"]).stage("train", tmp_path / "whole", arrays=("frame_emb", "tokens"))
    assert np.array_equal(st.tokens, whole.tokens) and np.array_equal(st.frame_emb, whole.frame_emb)


def test_hdf5_round_trip_and_other_tools_features(tiny_world, tmp_path):
    import h5py

    out = tmp_path / "tiny.h5"
    run_cli(["cache", "export", tiny_world["store"], out])
    with h5py.File(out, "r") as f:
        assert f["videos/tokens"].compression == "gzip" and f["videos/tokens"].chunks[0] == 8
        assert json.loads(f.attrs["store:encoder"]) == CacheStore.open(tiny_world["store"]).encoder_identity
    run_cli(["cache", "import", out, tmp_path / "back.zarr"])
    assert_same_store(tmp_path / "back.zarr", tiny_world["store"])
    assert "every shard is intact" in run_cli(["cache", "verify", tmp_path / "back.zarr"])

    # per-frame features another tool wrote: one dataset per video, (frames, tokens, dim)
    from manifests.schema import Manifest

    m = Manifest.read(tiny_world["manifest"])
    ids = m.videos.column("video_id").to_pylist()
    rng = np.random.default_rng(0)
    feats = {v: rng.normal(size=(3 + i % 4, 5, 16)).astype(np.float32) for i, v in enumerate(ids[1:])}
    with h5py.File(tmp_path / "other.h5", "w") as f:
        for v, x in feats.items():
            f.create_dataset(f"videos/{v}", data=x)
        for c in m.captions.column("caption_id").to_pylist():
            f.create_dataset(f"texts/{c}", data=rng.normal(size=(16,)).astype(np.float32))
        f.attrs["encoder"] = json.dumps({"name": "other-tool-vit"})
    result = invoke(["cache", "import", tmp_path / "other.h5", tmp_path / "other.zarr"])
    assert result.exit_code == 2 and "--manifest" in result.output
    out = run_cli(["cache", "import", tmp_path / "other.h5", tmp_path / "other.zarr", "--manifest",
                   tiny_world["manifest"], "--frames", "4", "--shard-size", "8"])
    assert "imported 27 videos and 56 captions" in out and "1 manifest videos not in the file" in out
    s = CacheStore.open(tmp_path / "other.zarr")
    assert s.encoder_identity["name"] == "other-tool-vit" and s.attrs["dims"]["num_tokens"] == 5
    assert s.failures() == {ids[0]: "missing: not in other.h5"}
    row = s.video_ids.index(ids[5])
    x = feats[ids[5]]
    k = min(4, x.shape[0])
    assert np.allclose(s.array("videos/tokens")[row, :k], x[np.linspace(0, x.shape[0] - 1, k).round().astype(int)],
                       atol=1e-2)
    assert s.array("videos/frame_mask")[row].sum() == k
    st = s.stage("train", tmp_path / "stage-other")
    assert st.tokens.shape[1:] == (4, 5, 16)


@pytest.mark.slow
def test_two_writers_create_and_fill_one_s3_store_at_once(s3, tmp_path, monkeypatch):
    """No lock on S3: two writers racing to create the store both end up writing into one store."""
    from helpers import CVID, CIDS, CSPLIT, VIDS, VSPLIT, fill, layout, video_data

    url = "s3://team/race.zarr"
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            s = CacheStore.open_or_create(url, layout(), VIDS, VSPLIT, CIDS, CVID, CSPLIT)
            for i in range(k, s.num_shards, 2):
                s.write_shard(i, **video_data(*s.shard_range(i)))
            for j in range(k, s.num_text_shards, 2):
                lo, hi = s.text_shard_range(j)
                r = np.arange(lo, hi)
                s.write_text_shard(j, tokens=np.broadcast_to(r[:, None, None], (hi - lo, 5, 8)),
                                   mask=np.ones((hi - lo, 5), bool),
                                   emb=np.broadcast_to(r[:, None], (hi - lo, 6)).astype(np.float32))
            s.consolidate()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    one = CacheStore.open_or_create(tmp_path / "one.zarr", layout(), VIDS, VSPLIT, CIDS, CVID, CSPLIT)
    fill(one)
    assert_same_store(url, tmp_path / "one.zarr")
    assert "every shard is intact" in run_cli(["cache", "verify", url])
    monkeypatch.delenv("CROSSTVR_S3_ENDPOINT")  # the endpoint given as an option instead
    assert json.loads(run_cli(["--s3-endpoint", s3, "cache", "info", url, "--json"]))["videos"] == 5


def test_root_attributes_are_never_written_half(tmp_path, monkeypatch):
    """Another writer may read the root metadata at any moment: every write of it holds a whole set of
    attributes (creation: all of them at once; growing: the new manifest with its own sizes)."""
    from zarr.storage import LocalStore

    from helpers import CVID, CIDS, CSPLIT, VIDS, VSPLIT, fill, layout

    written: list[dict] = []
    set_ = LocalStore.set

    async def spy(self, key, value):
        if key == "zarr.json":
            written.append(json.loads(value.to_bytes()).get("attributes", {}))
        return await set_(self, key, value)

    monkeypatch.setattr(LocalStore, "set", spy)
    store = CacheStore.open_or_create(tmp_path / "s.zarr", layout(), VIDS, VSPLIT, CIDS, CVID, CSPLIT)
    fill(store)
    store.append(layout(manifest_sha256="n" * 64), VIDS + ["f"], VSPLIT + ["test"], CIDS, CVID, CSPLIT)
    full = set(layout().attrs(5, len(CIDS)))
    stamped = [a for a in written if a]
    assert stamped and all(full <= set(a) for a in stamped)
    for a in stamped:  # a manifest version always comes with its sizes
        assert a["num_videos"] == (6 if a["manifest_sha256"] == "n" * 64 else 5)
    assert any(a["manifest_sha256"] == "n" * 64 for a in stamped)


def test_append_to_an_old_store_keeps_the_partial_shards_rows(tmp_path):
    """A store made before row digests existed grows too; the reopened last shard gets its old rows back
    from what the append kept aside, whatever the writer passes for them."""
    from helpers import CVID, CIDS, CSPLIT, VIDS, VSPLIT, fill, layout, video_data

    store = CacheStore.open_or_create(tmp_path / "old.zarr", layout(), VIDS, VSPLIT, CIDS, CVID, CSPLIT)
    fill(store)
    assert not store.has_array("videos/source")
    before = np.asarray(store.array("videos/tokens")[...])
    grown = layout(manifest_sha256="n" * 64)
    added = store.append(grown, VIDS + ["f", "g"], VSPLIT + ["test", "test"], CIDS + ["c7"], CVID + [5], CSPLIT + ["test"])
    assert added == {"videos": 2, "captions": 1}
    s = CacheStore.open(tmp_path / "old.zarr", mode="r+")
    assert s.num_videos == 7 and s.num_shards == 4 and s.done_shards() == {0, 1}  # shard 2 (row 4 + new 5) reopened
    assert s.num_kept_rows("videos", 2) == 1 and s.num_kept_rows("texts", 2) == 1
    assert [h["manifest_sha256"][0] for h in s.attrs["manifest_history"]] == ["m", "n"]
    for i in (2, 3):
        lo, hi = s.shard_range(i)
        data = video_data(lo, hi)
        data["tokens"][:] = -1  # what a writer passes for the kept row is ignored
        s.write_shard(i, **data)
    tokens = np.asarray(s.array("videos/tokens")[...])
    assert np.array_equal(tokens[:5], before) and (tokens[5:] == -1).all()
    assert s.read_object("append/videos-2.npz") is None  # the kept rows are gone once the shard is whole
    with pytest.raises(StoreMismatchError, match="moves 1 of the store's videos to another split"):
        s.append(layout(manifest_sha256="o" * 64), VIDS + ["f", "g"], ["test"] + VSPLIT[1:] + ["test", "test"],
                 CIDS + ["c7"], CVID + [5], CSPLIT + ["test"])


def test_a_part_writer_of_an_s3_store_waits_for_part_0_to_grow_it(s3, tmp_path):
    """No lock on S3: only --part 0/N creates and grows a remote store; part K > 0 waits for it (and names
    what it waits for), so two writers never read-modify-write the root attributes."""
    from pipeline.extraction.plan import wait_for_grower

    url = "s3://team/single-grower.zarr"
    with pytest.raises(StoreError, match="start part 0"):
        wait_for_grower(url, "a" * 64, thumbnails=False, wait=1.0)
    with pytest.raises(StoreError):
        CacheStore.open(url)  # the waiting writer created nothing
    from helpers import layout

    s = CacheStore.open_or_create(url, layout(), ["a", "b"], ["train", "test"], ["c0"], [0], ["train"])
    wait_for_grower(url, s.attrs["manifest_sha256"], thumbnails=False, wait=1.0)  # grown: returns at once
    with pytest.raises(StoreError, match="waited"):
        wait_for_grower(url, s.attrs["manifest_sha256"], thumbnails=True, wait=1.0)  # no thumbnail arrays yet


def test_an_old_store_opens_and_says_it_has_no_digest(tmp_path):
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(Path(__file__).parent / "fixtures" / "old_store.zarr", old)
    out = run_cli(["cache", "info", old])
    assert "digest      none" in out
