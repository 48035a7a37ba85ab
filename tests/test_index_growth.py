"""An index that grows with its store: `index build` on a small store, an append of new test videos,
`index_freshness` saying so (and `search` printing it while still answering), `index add` encoding only
the new videos and ending with the index a fresh `index build` of the grown store makes (flat, IVF,
HNSW), a re-run adding nothing, a rewritten shard, another store or another stage one refused, and a
writer killed at each of its writes leaving the old index whole."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from heads.evaluation.index import index_vectors, load_index
from helpers import run_cli, write_video

SHARD = dict(num_frames=4, shard_size=2, text_shard_size=3, workers=1, progress=False)


def _manifest(tmp_path, n_test: int, name: str):
    """One train video and ``n_test`` test videos (v0..), one caption each."""
    from manifests.schema import Manifest

    videos = [{"video_id": "t0", "path": str(write_video(tmp_path / "t0.mp4", num_frames=8, seed=99)), "split": "train"}]
    videos += [{"video_id": f"v{i}", "path": str(write_video(tmp_path / f"v{i}.mp4", num_frames=8, seed=i)),
                "split": "test"} for i in range(n_test)]
    captions = [{"caption_id": f"{v['video_id']}-0", "video_id": v["video_id"], "text": f"a clip {v['video_id']}",
                 "split": v["split"]} for v in videos]
    return Manifest.read(Manifest.from_records("toy", videos, captions, root=tmp_path).write(tmp_path / name))


@pytest.fixture
def grown_store(tiny_runs, tmp_path):
    """A store of a train video and 4 test videos (video shards of 2: the last one partial) and a function
    that grows it by 3 test videos (an append, which reopens that partial shard and writes it again with
    its old row kept); the tiny runs' stage one (the same encoder)."""
    from pipeline.encoders import load_encoder
    from pipeline.extraction.job import extract

    micro = load_encoder("test-vit-micro")
    store = tmp_path / "grow.zarr"
    first = extract(_manifest(tmp_path, 4, "m1"), [micro], [store], **SHARD)
    assert first.ok == 5

    def grow() -> None:
        assert extract(_manifest(tmp_path, 7, "m2"), [micro], [store], **SHARD).ok == 3

    return {"store": store, "grow": grow, "stage_one": tiny_runs[2], "work": tmp_path / "work"}


def _build(g, out, *extra) -> str:
    return run_cli(["index", "build", "--store", g["store"], "--stage-one", g["stage_one"], "--work-dir", g["work"],
                    "--out", out, *extra])


def _invoke(args):
    import cli

    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _same_index(a, b, queries):
    """Same ids in the same order, same vectors (1e-6), same search answers."""
    assert a.video_ids == b.video_ids and a.size == b.size
    np.testing.assert_allclose(index_vectors(a.index), index_vectors(b.index), atol=1e-6)
    sa, ra = a.search(queries, a.size)
    sb, rb = b.search(queries, b.size)
    np.testing.assert_array_equal(ra, rb)
    np.testing.assert_allclose(sa, sb, atol=1e-6)


def test_index_add_grows_the_index_to_a_fresh_builds(grown_store, tmp_path, monkeypatch):
    from workflows import index_add
    from workflows.search import index_freshness

    g = grown_store
    idx = tmp_path / "idx"
    _build(g, idx)
    vi = load_index(idx)
    assert vi.video_ids == [f"v{i}" for i in range(4)]
    covers = vi.meta["covers"]
    assert covers["manifest"]["num_videos"] == 5 and covers["store_digest"]
    assert [e[:2] for e in covers["video_shards"]] == [[0, 1], [1, 2], [2, 1]]  # row 0 is the train video
    # full shards are proven by their checksum record; the partial one, which an append rewrites, by its inputs
    assert [e[3] is None for e in covers["video_shards"]] == [True, True, False]
    assert index_freshness(vi, str(g["store"])) is None

    g["grow"]()
    line = index_freshness(vi, str(g["store"]))
    assert line is not None and "\n" not in line
    assert "covers 4 of the store's 7 test videos" in line and f"index add --index {idx}" in line
    assert covers["store_digest"][:12] in line

    # search still answers from the index it has, after saying so
    out = run_cli(["search", "--store", g["store"], "--stage-one", g["stage_one"], "--work-dir", g["work"],
                   "--index", idx, "--top", 7, "--out", tmp_path / "r.json", "a clip"])
    assert out.index("covers 4 of the store's 7 test videos") < out.index("query: a clip")
    assert sorted(r["video_id"] for r in json.loads((tmp_path / "r.json").read_text())) == vi.video_ids

    encoded: list[str] = []
    real = index_add.encode_videos

    def counting(head, split, **kw):
        encoded.extend(split.video_ids)
        return real(head, split, **kw)

    monkeypatch.setattr(index_add, "encode_videos", counting)
    out = run_cli(["index", "add", "--index", idx, "--work-dir", g["work"]])
    assert "added 3 vectors" in out and "now 7 videos" in out
    assert encoded == ["v4", "v5", "v6"]  # only the new videos
    monkeypatch.undo()

    grown, fresh = load_index(idx), None
    _build(g, tmp_path / "fresh")
    fresh = load_index(tmp_path / "fresh")
    queries = np.random.default_rng(0).normal(size=(6, grown.index.d)).astype(np.float32)
    _same_index(grown, fresh, queries)
    assert grown.meta["covers"]["video_shards"] == fresh.meta["covers"]["video_shards"]
    assert grown.meta["store_fingerprint"] == fresh.meta["store_fingerprint"]
    assert grown.meta["generation"] == 1 and sorted(p.name for p in idx.iterdir() if not p.name.startswith(".")) == \
        ["index.1.faiss", "index.json", "video_ids.1.json"]
    assert index_freshness(grown, str(g["store"])) is None

    # a re-run adds nothing and leaves the files as they are
    before = {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()}
    out = run_cli(["index", "add", "--index", idx, "--work-dir", g["work"], "--store", g["store"]])
    assert "nothing new" in out
    assert {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("kind,options", [("ivf", ["nlist=2", "nprobe=2"]), ("hnsw", ["m=4"])])
def test_approximate_kinds_grow_too(grown_store, tmp_path, kind, options):
    g = grown_store
    opts = [x for o in options for x in ("--option", o)]
    _build(g, tmp_path / "idx", "--kind", kind, *opts)
    g["grow"]()
    out = run_cli(["index", "add", "--index", tmp_path / "idx", "--work-dir", g["work"]])
    assert "added 3 vectors" in out and "recall vs exact" in out
    grown = load_index(tmp_path / "idx")
    _build(g, tmp_path / "flat")
    flat = load_index(tmp_path / "flat")
    # the IVF cells stay as trained on the 5 videos and every cell is scanned; HNSW's graph over 8 holds all:
    # the same vectors in the same order, and exact answers
    _same_index(grown, flat, np.random.default_rng(1).normal(size=(5, flat.index.d)).astype(np.float32))
    assert grown.meta["params"] == load_index(tmp_path / "idx").meta["params"] and grown.meta["recall"]["videos"] == 7


def test_another_store_or_stage_one_is_refused(grown_store, tiny_world, tmp_path):
    g = grown_store
    idx = tmp_path / "idx"
    _build(g, idx)
    g["grow"]()
    other = tmp_path / "other.pt"  # other bytes: another stage one
    other.write_bytes(g["stage_one"].read_bytes() + b"\0")
    res = _invoke(["index", "add", "--index", idx, "--work-dir", g["work"], "--stage-one", other])
    assert res.exit_code == 1 and "not the stage one" in res.output and len(res.output.strip().splitlines()) == 1
    res = _invoke(["index", "add", "--index", idx, "--work-dir", g["work"], "--store", tiny_world["store"]])
    assert res.exit_code == 1 and "--store" in res.output and "nor a grown version" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert load_index(idx).size == 4


@pytest.mark.parametrize("shard,why", [(1, "were not recorded to compare"), (2, "differ")])
def test_a_rewritten_shard_is_refused(grown_store, tmp_path, shard, why):
    """A shard of indexed videos written again with other features (as a repair might) is not "only new
    rows": a full shard is caught by its checksum record, the reopened one by its inputs' digest."""
    from pipeline.store import CacheStore
    from workflows.search import index_freshness

    g = grown_store
    idx = tmp_path / "idx"
    _build(g, idx)
    g["grow"]()
    s = CacheStore.open(g["store"], mode="r+")
    lo, hi = s.shard_range(shard)
    arrays = {n: np.asarray(s.array(f"videos/{n}")[lo:hi]) for n in
              ("status", "tokens", "frame_emb", "frame_mask", "frame_index", "frame_time")}
    arrays["frame_emb"][0] += 0.25  # the shard's first row: an indexed video
    s.write_shard(shard, error=[""] * (hi - lo), **arrays)
    line = index_freshness(load_index(idx), str(g["store"]))
    assert line and f"video shard {shard} was rewritten" in line and why in line and "index build" in line
    res = _invoke(["index", "add", "--index", idx, "--work-dir", g["work"]])
    assert res.exit_code == 1 and f"video shard {shard} was rewritten" in res.output and "index build" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert load_index(idx).size == 4


def test_a_writer_killed_at_each_write_leaves_the_old_index(grown_store, tmp_path, monkeypatch):
    """Each write of `index add` into the index directory fails in turn (as a kill there would stop it):
    the old index still loads, whole, and the next `index add` finishes the job."""
    import core.fileio
    from workflows.index_add import add_to_index
    from workflows.workdir import WorkDir

    g = grown_store
    idx = tmp_path / "idx"
    _build(g, idx)
    g["grow"]()
    old = load_index(idx)
    old_vectors = index_vectors(old.index)
    real_gate = core.fileio.gate

    for k in (1, 2, 3):  # the index file, the ids, index.json (the commit point)
        seen = []

        def gate(what, torn=None, k=k, seen=seen):
            if str(idx) in what:
                seen.append(what)
                if len(seen) == k:
                    raise OSError(f"killed at write {k}: {what}")
            return real_gate(what, torn)

        monkeypatch.setattr(core.fileio, "gate", gate)
        with pytest.raises(OSError, match=f"killed at write {k}"):
            add_to_index(WorkDir(g["work"]), idx)
        monkeypatch.setattr(core.fileio, "gate", real_gate)
        back = load_index(idx)
        assert back.video_ids == old.video_ids and back.meta == old.meta
        np.testing.assert_array_equal(index_vectors(back.index), old_vectors)
    assert seen[-1].endswith("index.json")

    done = add_to_index(WorkDir(g["work"]), idx)
    assert done.added == 3 and load_index(idx).size == 7


def test_an_index_dir_copied_elsewhere_still_loads(tmp_path):
    """The generation's file names travel in index.json, so a grown index directory can be moved."""
    from heads.evaluation.index import add_vectors, build_index, save_index

    rng = np.random.default_rng(0)
    vi = build_index(rng.normal(size=(10, 8)).astype(np.float32), [f"a{i}" for i in range(10)])
    save_index(vi, tmp_path / "a")
    add_vectors(vi, rng.normal(size=(4, 8)).astype(np.float32), [f"b{i}" for i in range(4)])
    save_index(vi, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    back = load_index(tmp_path / "b")
    assert back.size == 14 and back.video_ids[-1] == "b3" and back.meta["files"]["index"] == "index.1.faiss"
    with pytest.raises(ValueError, match="already in the index"):
        add_vectors(back, rng.normal(size=(1, 8)).astype(np.float32), ["a0"])
