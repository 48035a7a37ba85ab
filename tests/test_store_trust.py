"""The store's trust defects, one test each: torn shards, cut strings, interrupted appends, hostile pulls,
what verify covers, stale pulls, unverifiable pulls (docs/STORE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import StoreError
from pipeline import integrity
from pipeline.sharing import checked_key, pull
from pipeline.store import STATUS_OK, STATUS_PENDING, CacheStore
from helpers import CIDS, CSPLIT, CVID, VIDS, VSPLIT, fill, layout, run_cli, video_data


def cli_exit(args: list) -> int:
    """The command line's exit code, in-process."""
    from click.testing import CliRunner

    import cli

    return CliRunner().invoke(cli.main, [str(a) for a in args]).exit_code


def made(path: Path, **kw) -> CacheStore:
    s = CacheStore.open_or_create(path, layout(**kw), VIDS, VSPLIT, CIDS, CVID, CSPLIT)
    fill(s)
    return s


# 1. torn shards ---------------------------------------------------------------------------------
def test_a_shard_not_committed_reads_as_pending_whatever_its_status(tmp_path):
    """A writer killed after the status and before the tokens and the done flag: the rows are pending,
    no split, staging or failure list holds them."""
    s = CacheStore.open_or_create(tmp_path / "s.zarr", layout(), VIDS, VSPLIT, CIDS, CVID, CSPLIT)
    fill(s)
    s.reset_shards([0])  # shard 0 (videos a, b) taken back, as a rewrite starts
    s.array("videos/status")[0:2] = STATUS_OK  # what the old order wrote first
    s.array("videos/tokens")[0:2] = 0  # tokens never written
    assert list(s.status()[:2]) == [STATUS_PENDING, STATUS_PENDING]
    rows, _, _ = s.split_rows("train")
    assert 0 not in rows and 1 not in rows
    cov = s.split_coverage("train")
    assert cov["missing_videos"] == {"a": "pending", "b": "pending"}
    staged = s.stage("train", tmp_path / "stage")
    assert "a" not in staged.video_ids and "b" not in staged.video_ids


def test_staging_is_keyed_by_the_shards_it_copied(tmp_path):
    """A shard rewritten with other tokens (resume, --repair) is staged again, though its status did not
    change."""
    s = made(tmp_path / "s.zarr")
    first = s.stage("train", tmp_path / "stage")
    assert float(first.tokens[0, 0, 0, 0]) == 0.0
    data = video_data(0, 2)
    data["tokens"] = data["tokens"] + 7
    s.reset_shards([0])
    s.write_shard(0, **data)
    again = CacheStore.open(tmp_path / "s.zarr").stage("train", tmp_path / "stage")
    assert float(again.tokens[0, 0, 0, 0]) == 7.0


# 2. strings are never cut ---------------------------------------------------------------------
def test_an_append_widens_ids_and_splits_instead_of_cutting_them(tmp_path):
    """A store made from val/test rows grown with train rows and longer ids keeps them whole."""
    vids, vsplit = ["a", "b"], ["test", "val"]
    s = CacheStore.open_or_create(tmp_path / "s.zarr", layout(manifest_sha256="1" * 64), vids, vsplit,
                                  ["a#0", "b#0"], [0, 1], vsplit)
    for i in range(s.num_shards):
        s.write_shard(i, **video_data(*s.shard_range(i)))
    long_id = "a-video-id-much-longer-than-the-first-manifest-had"
    vids2, vsplit2 = vids + [long_id, "c"], vsplit + ["train", "train"]
    s.append(layout(manifest_sha256="2" * 64), vids2, vsplit2, ["a#0", "b#0", f"{long_id}#0", "c#0"],
             [0, 1, 2, 3], vsplit2)
    r = CacheStore.open(tmp_path / "s.zarr")
    assert r.video_ids == vids2 and r.strings("videos/split") == vsplit2
    assert r.caption_ids[2] == f"{long_id}#0" and r.strings("texts/split")[2] == "train"
    assert "train" in r.splits()
    problems = integrity.verify(r, progress=False).problems  # old shards' records still cover them
    assert problems and all(p.state == "missing" and "not written" in p.detail for p in problems)


def test_a_value_past_the_store_limit_is_refused_with_its_name(tmp_path):
    with pytest.raises(StoreError, match=r"videos/ids: value .* is 5000 bytes"):
        CacheStore.create(tmp_path / "s.zarr", layout(), ["x" * 5000], ["train"], [], [], [])


# 3. an interrupted append is finished ---------------------------------------------------------
def test_an_append_killed_before_its_commit_is_finished_by_the_next_writer(tmp_path, monkeypatch):
    from pipeline.store import backend

    s = made(tmp_path / "s.zarr")
    vids2, vsplit2 = VIDS + ["f", "g"], VSPLIT + ["train", "train"]
    cids2, cvid2 = CIDS + ["c7", "c8"], CVID + [5, 6]
    csplit2 = [vsplit2[v] for v in cvid2]
    real = backend.set_attrs

    class Killed(BaseException):
        pass

    def killed(group, values):  # the arrays grew and the ids were written; the attributes never are
        raise Killed

    monkeypatch.setattr(backend, "set_attrs", killed)
    with pytest.raises(Killed):
        s.append(layout(manifest_sha256="2" * 64), vids2, vsplit2, cids2, cvid2, csplit2)
    monkeypatch.setattr(backend, "set_attrs", real)
    before = CacheStore.open(tmp_path / "s.zarr")  # a reader: the old store, whole
    assert before.num_videos == 5 and before.video_ids == VIDS
    report = integrity.verify(before, progress=False)
    assert any("append is unfinished" in n for n in report.notes)
    after = CacheStore.open_or_create(tmp_path / "s.zarr", layout(manifest_sha256="2" * 64), vids2, vsplit2,
                                      cids2, cvid2, csplit2)  # the next writer finishes it
    assert after.video_ids == vids2 and after.num_videos == 7
    assert after.read_object("append/journal.npz") is None


# 4. pull stays inside DEST ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["../escape.txt", "videos/../../escape.txt", "/etc/passwd", "videos//x",
                                 "videos/./x", "videos\\..\\x", "", "c:/x", "a\0b"])
def test_pull_refuses_a_key_that_leaves_dest(tmp_path, key):
    with pytest.raises(StoreError, match="refusing to pull"):
        checked_key(key, tmp_path / "dest", "s3://bucket/store")


def test_a_hostile_listing_writes_nothing(tmp_path, monkeypatch):
    import pipeline.sharing as sharing

    made(tmp_path / "s.zarr")
    real = sharing.list_objects
    monkeypatch.setattr(sharing, "list_objects", lambda url, store=None: {**real(url, store), "../escape.txt": 3})
    with pytest.raises(StoreError, match="refusing to pull object key '../escape.txt'"):
        pull(tmp_path / "s.zarr", tmp_path / "dest", progress=False)
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_pull_follows_no_link_out_of_dest(tmp_path):
    made(tmp_path / "s.zarr")
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "videos").symlink_to(tmp_path / "elsewhere")
    (dest / ".pull").write_text("x")
    with pytest.raises(StoreError, match="outside"):
        pull(tmp_path / "s.zarr", dest, progress=False)
    assert not any((tmp_path / "elsewhere").iterdir())


# 5. verify covers the record's key set and the metadata; the digest covers the rest --------------
def test_an_empty_record_does_not_pass(tmp_path):
    s = made(tmp_path / "s.zarr")
    rec = json.loads(s.read_object("checksums/videos/1.json"))
    rec["objects"] = {}
    s.write_object("checksums/videos/1.json", json.dumps(rec).encode())
    report = integrity.verify(CacheStore.open(tmp_path / "s.zarr"), progress=False)
    assert not report.ok and report.bad_shards("videos") == [1]
    assert "does not cover the shard's objects" in report.summary()


def test_a_record_of_another_shard_does_not_pass(tmp_path):
    s = made(tmp_path / "s.zarr")
    s.write_object("checksums/videos/1.json", s.read_object("checksums/videos/0.json"))
    report = integrity.verify(CacheStore.open(tmp_path / "s.zarr"), progress=False)
    assert report.bad_shards("videos") == [1]


def test_a_changed_fill_value_or_codec_is_caught(tmp_path):
    s = made(tmp_path / "s.zarr")
    meta_key = tmp_path / "s.zarr" / "videos" / "frame_index" / "zarr.json"
    meta = json.loads(meta_key.read_text())
    meta["fill_value"] = 7  # absent chunks (and padding) would now decode as 7
    meta_key.write_text(json.dumps(meta))
    report = integrity.verify(CacheStore.open(tmp_path / "s.zarr"), progress=False)
    assert not report.ok and "metadata" in report.summary()


def test_the_digest_covers_attributes_failures_and_flags(tmp_path):
    s = made(tmp_path / "s.zarr")
    d0 = integrity.store_digest(s)
    assert d0 and len(d0) == 64
    s.write_object("failures.json", b"{}\n")
    d1 = integrity.store_digest(s)
    assert d1 != d0
    s.update_attrs({"dataset": "other"})
    d2 = integrity.store_digest(s)
    assert d2 != d1
    s.reset_shards([2])
    assert integrity.store_digest(s) != d2
    assert integrity.verify(CacheStore.open(tmp_path / "s.zarr"), progress=False, expect=d0).ok is False


def test_info_prints_the_digest_and_verify_checks_it(tmp_path):
    made(tmp_path / "s.zarr")
    digest = integrity.store_digest(CacheStore.open(tmp_path / "s.zarr"))
    assert f"digest      {digest}" in run_cli(["cache", "info", str(tmp_path / "s.zarr")])
    assert "digest is the one expected" in run_cli(["cache", "verify", str(tmp_path / "s.zarr"), "--expect", digest])
    assert cli_exit(["cache", "verify", str(tmp_path / "s.zarr"), "--expect", "0" * 64]) == 1


# 6. pull compares by sha256 -------------------------------------------------------------------
def test_a_repull_replaces_same_size_objects_that_changed(tmp_path):
    src = made(tmp_path / "s.zarr")
    rep, check = pull(tmp_path / "s.zarr", tmp_path / "dest", progress=False)
    assert rep.ok and check.ok
    data = video_data(0, 2)
    data["tokens"] = data["tokens"] + 3  # same size, other bytes
    src.reset_shards([0])
    src.write_shard(0, **data)
    rep, check = pull(tmp_path / "s.zarr", tmp_path / "dest", progress=False)
    assert rep.ok and check.ok and any(k.startswith("videos/tokens/") for k in rep.copied)
    copy = CacheStore.open(tmp_path / "dest")
    assert float(np.asarray(copy.array("videos/tokens")[0, 0, 0, 0])) == 3.0
    assert integrity.store_digest(copy) == integrity.store_digest(CacheStore.open(tmp_path / "s.zarr"))


def test_pull_expect_refuses_another_store(tmp_path):
    made(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="not the expected"):
        pull(tmp_path / "s.zarr", tmp_path / "dest", progress=False, expect="f" * 64)
    assert not (tmp_path / "dest").exists()


# 7. nothing verifiable is a failure ----------------------------------------------------------
def test_pull_of_a_store_without_records_exits_1(tmp_path):
    import shutil

    made(tmp_path / "s.zarr")
    shutil.rmtree(tmp_path / "s.zarr" / "checksums")
    rep, _ = pull(tmp_path / "s.zarr", tmp_path / "dest", progress=False)
    assert not rep.ok and "cannot be verified" in rep.summary()
    assert cli_exit(["cache", "pull", str(tmp_path / "s.zarr"), str(tmp_path / "dest2")]) == 1
