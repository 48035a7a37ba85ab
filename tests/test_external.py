"""External stage one: embeddings / similarity files -> import -> load_external, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from core.errors import StoreMismatchError
from core.metrics import retrieval_metrics
from heads import create_head
from heads.evaluation.external import (
    EXTERNAL_JSON,
    ExternalFormatError,
    SplitIds,
    import_stage_one,
    is_external,
    load_external,
    read_embeddings,
)
from heads.evaluation.similarity import encode_videos, similarity, untrained_baseline
from pipeline.store import CacheStore, StoreLayout
from helpers import E, make_split


@pytest.fixture(scope="module")
def external_case():
    """A toy test split, a non-trivial (random) seqTransf head and its embeddings."""
    split = make_split("test", 24, 2, seed=7)
    torch.manual_seed(0)
    head = create_head("seqTransf", E).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        video = encode_videos(head, split).numpy()
        text = head.encode_text(torch.from_numpy(np.array(split.text_emb))).numpy()
    return split, head, video, text, similarity(head, split)


def _perm(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def _write_h5(path: Path, ids, emb, **groups) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("emb", data=emb)
    return path


def test_hdf5_import_reproduces_our_own_stage_one(external_case, tmp_path):
    split, _, video, text, ref = external_case
    pv, pt = _perm(len(split.video_ids), 1), _perm(len(split.caption_ids), 2)  # shuffled files
    vfile = _write_h5(tmp_path / "video.h5", [split.video_ids[i] for i in pv], video[pv])
    # captions: one dataset per id (ids with a slash become nested groups)
    cids = [f"cap/{c}" for c in split.caption_ids]
    tfile = tmp_path / "text.hdf5"
    with h5py.File(tfile, "w") as f:
        for i in pt:
            f.create_dataset(cids[i], data=text[i])
    renamed = SplitIds(split="test", video_ids=list(split.video_ids), caption_ids=cids,
                       store_fingerprint=split.store_fingerprint, encoder_identity=split.encoder_identity)
    ext = import_stage_one(renamed, tmp_path / "ext", video_emb=vfile, text_emb=tfile, progress=False)
    sim = ext.similarity()
    assert sim.shape == ref.shape and sim.dtype == np.float32
    np.testing.assert_allclose(sim, ref, atol=1e-6)
    assert retrieval_metrics(sim, split.caption_video) == retrieval_metrics(ref, split.caption_video)
    ident = json.loads((tmp_path / "ext" / EXTERNAL_JSON).read_text())
    assert ident["store_fingerprint"] == split.store_fingerprint and ident["split"] == "test"
    assert {s["role"] for s in ident["sources"]} == {"video_emb", "text_emb"}
    assert all(len(s["sha256"]) == 64 for s in ident["sources"])
    assert ident["normalize"] is True and ident["embed_dim"] == E
    assert is_external(tmp_path / "ext") and is_external(tmp_path / "ext" / EXTERNAL_JSON)


def test_npy_parquet_and_similarity_formats_agree(external_case, tmp_path):
    split, _, video, text, ref = external_case
    np.save(tmp_path / "v.npy", video * 3.0)  # scale: normalisation removes it
    (tmp_path / "v.ids.txt").write_text("\n".join(split.video_ids) + "\n")
    pt = _perm(len(split.caption_ids), 3)
    table = pa.table({"id": [split.caption_ids[i] for i in pt],
                      "embedding": [row.tolist() for row in text[pt]], "note": ["x"] * len(pt)})
    pq.write_table(table, tmp_path / "t.parquet")
    a = import_stage_one(split, tmp_path / "a", video_emb=tmp_path / "v.npy", text_emb=tmp_path / "t.parquet",
                         progress=False)
    np.testing.assert_allclose(a.similarity(), ref, atol=1e-6)
    # the same as a full similarity matrix with extra rows of a video that the split lacks
    pv = _perm(len(split.video_ids), 4)
    np.save(tmp_path / "s.npy", ref[:, pv])
    (tmp_path / "s.json").write_text(json.dumps({"caption_ids": list(split.caption_ids),
                                                  "video_ids": [split.video_ids[i] for i in pv]}))
    b = import_stage_one(split, tmp_path / "b", similarity=tmp_path / "s.npy", progress=False)
    np.testing.assert_array_equal(b.similarity(), ref)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sim"] = ref[pt]
        f["caption_ids"] = np.array([split.caption_ids[i] for i in pt], dtype="S")  # bytes ids
        f["video_ids"] = np.array(split.video_ids, dtype="S")
    c = import_stage_one(split, tmp_path / "c", similarity=tmp_path / "s.h5", progress=False)
    np.testing.assert_array_equal(c.similarity(), ref)
    # raw dot products
    d = import_stage_one(split, tmp_path / "d", video_emb=tmp_path / "v.npy", text_emb=tmp_path / "t.parquet",
                         normalize=False, progress=False)
    np.testing.assert_allclose(d.similarity(), 3.0 * text @ video.T, atol=1e-5)


def test_other_split_ids_are_dropped_unknown_ids_refused(external_case, tmp_path):
    split, _, video, text, ref = external_case
    known = SplitIds(split="test", video_ids=list(split.video_ids), caption_ids=list(split.caption_ids),
                     store_fingerprint=split.store_fingerprint,
                     known_video_ids=frozenset([*split.video_ids, "train0"]),
                     known_caption_ids=frozenset(split.caption_ids))
    ids = [*split.video_ids, "train0"]
    emb = np.vstack([video, np.full((1, E), np.nan)])  # values of dropped rows are never used
    _write_h5(tmp_path / "v.h5", ids, emb)
    _write_h5(tmp_path / "t.h5", split.caption_ids, text)
    ext = import_stage_one(known, tmp_path / "ok", video_emb=tmp_path / "v.h5", text_emb=tmp_path / "t.h5",
                           progress=False)
    np.testing.assert_allclose(ext.similarity(), ref, atol=1e-6)
    assert ext.identity["dropped_other_ids"] == {"videos": 1, "captions": 0}
    _write_h5(tmp_path / "u.h5", [*split.video_ids, "nobody", "ghost"], np.vstack([video, video[:2]]))
    with pytest.raises(ExternalFormatError, match=r"u\.h5.*2 video id\(s\) are not in the store: 'nobody', 'ghost'"):
        import_stage_one(known, tmp_path / "x", video_emb=tmp_path / "u.h5", text_emb=tmp_path / "t.h5")


def _expect_error(split, tmp_path, match, **files):
    with pytest.raises(ExternalFormatError, match=match):
        import_stage_one(split, tmp_path / "err", progress=False, **files)
    assert not is_external(tmp_path / "err")


def test_clear_errors(external_case, tmp_path):
    split, _, video, text, _ = external_case
    t = _write_h5(tmp_path / "t.h5", split.caption_ids, text)
    # wrong dims
    v = _write_h5(tmp_path / "narrow.h5", split.video_ids, video[:, :8])
    _expect_error(split, tmp_path, r"narrow\.h5\) are 8-d but text embeddings .*t\.h5\) are 32-d", video_emb=v, text_emb=t)
    # missing ids
    v = _write_h5(tmp_path / "few.h5", split.video_ids[2:], video[2:])
    _expect_error(split, tmp_path, r"few\.h5: lacks 2 of the 24 video ids of split 'test': 'test0', 'test1'",
                  video_emb=v, text_emb=t)
    # unknown ids (no other ids are known to a plain split)
    v = _write_h5(tmp_path / "odd.h5", [*split.video_ids, "zz"], np.vstack([video, video[:1]]))
    _expect_error(split, tmp_path, r"odd\.h5: 1 video id\(s\) are not in the store: 'zz'", video_emb=v, text_emb=t)
    # duplicated ids
    v = _write_h5(tmp_path / "dup.h5", [*split.video_ids, "test3"], np.vstack([video, video[:1]]))
    _expect_error(split, tmp_path, r"dup\.h5: duplicated video ids: 'test3 \(x2\)'", video_emb=v, text_emb=t)
    # NaN rows, named by id
    bad = text.copy()
    bad[5, 3] = np.nan
    bad[9] = np.inf
    tb = _write_h5(tmp_path / "nan.h5", split.caption_ids, bad)
    v = _write_h5(tmp_path / "v.h5", split.video_ids, video)
    _expect_error(split, tmp_path, r"nan\.h5: 2 caption row\(s\) hold NaN/inf, ids 'testc5', 'testc9'",
                  video_emb=v, text_emb=tb)
    # zero vectors cannot be normalised
    z = video.copy()
    z[4] = 0
    vz = _write_h5(tmp_path / "zero.h5", split.video_ids, z)
    _expect_error(split, tmp_path, r"zero\.h5: 1 video embedding\(s\) are zero vectors.*'test4'", video_emb=vz, text_emb=t)
    # wrong file types
    (tmp_path / "v.csv").write_text("id,emb\n")
    _expect_error(split, tmp_path, r"v\.csv: unsupported file type '\.csv'", video_emb=tmp_path / "v.csv", text_emb=t)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    _expect_error(split, tmp_path, r"junk\.h5: not a readable HDF5 file", video_emb=tmp_path / "junk.h5", text_emb=t)
    np.save(tmp_path / "noids.npy", video)
    _expect_error(split, tmp_path, r"noids\.npy: a \.npy embedding file needs its ids in a sidecar",
                  video_emb=tmp_path / "noids.npy", text_emb=t)
    np.save(tmp_path / "v3.npy", video[:, None])
    (tmp_path / "v3.txt").write_text("\n".join(split.video_ids))
    _expect_error(split, tmp_path, r"v3\.npy: embedding array must be 2-D", video_emb=tmp_path / "v3.npy", text_emb=t)
    with h5py.File(tmp_path / "sim.h5", "w") as f:
        f["sim"] = np.zeros((3, 3))
    _expect_error(split, tmp_path, r"sim\.h5: a similarity HDF5 file needs datasets", similarity=tmp_path / "sim.h5")
    with pytest.raises(ValueError, match="either"):
        import_stage_one(split, tmp_path / "err", video_emb=v, text_emb=t, similarity=tmp_path / "sim.h5")


def test_load_external_checks_store_split_and_reorders(external_case, tmp_path):
    split, _, video, text, ref = external_case
    v = _write_h5(tmp_path / "v.h5", split.video_ids, video)
    t = _write_h5(tmp_path / "t.h5", split.caption_ids, text)
    import_stage_one(split, tmp_path / "ext", video_emb=v, text_emb=t, progress=False)
    other = make_split("test", 24, 2, seed=7)
    other.store_fingerprint = "another-store"
    with pytest.raises(StoreMismatchError, match="another-stor"):
        load_external(tmp_path / "ext", other)
    other = make_split("val", 24, 2, seed=7)
    with pytest.raises(ExternalFormatError, match="imported for split 'test', not 'val'"):
        load_external(tmp_path / "ext", other)
    # the same split listed in another order: the similarity follows the split's order
    order_c, order_v = _perm(len(split.caption_ids), 5), _perm(len(split.video_ids), 6)
    shuffled = SplitIds(split="test", video_ids=[split.video_ids[i] for i in order_v],
                        caption_ids=[split.caption_ids[i] for i in order_c], store_fingerprint=split.store_fingerprint)
    np.testing.assert_allclose(load_external(tmp_path / "ext", shuffled).similarity(), ref[order_c][:, order_v], atol=1e-6)
    fewer = SplitIds(split="test", video_ids=split.video_ids[:-1], caption_ids=list(split.caption_ids),
                     store_fingerprint=split.store_fingerprint)
    with pytest.raises(ExternalFormatError, match="1 extra.*'test23'"):
        load_external(tmp_path / "ext", fewer)
    # a stage-one checkpoint directory is not an external stage one
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    torch.save({"config": {}}, ckpt / "stage_one.pt")
    assert not is_external(ckpt) and not is_external(ckpt / "stage_one.pt") and not is_external(tmp_path / "nope")
    with pytest.raises(ExternalFormatError, match="not an external stage-one directory"):
        load_external(ckpt, split)


def test_read_embeddings_hdf5_role_groups(tmp_path):
    with h5py.File(tmp_path / "both.h5", "w") as f:
        f["video/ids"] = np.array(["a", "b"], dtype="S")
        f["video/emb"] = np.eye(2)
        f["text/ids"] = np.array(["x"], dtype="S")
        f["text/emb"] = np.ones((1, 2))
    ids, emb = read_embeddings(tmp_path / "both.h5", "video")
    assert ids == ["a", "b"] and emb.shape == (2, 2)
    ids, emb = read_embeddings(tmp_path / "both.h5", "text")
    assert ids == ["x"] and emb.tolist() == [[1.0, 1.0]]


# --------------------------------------------------------------------------- CLI on a tiny store


def _tiny_store(path: Path):
    """A complete 3-split store with random embeddings (no video decoding)."""
    T_, N_, D_, L_, DT_ = 3, 2, 4, 4, 4
    vids = [f"v{i:02d}" for i in range(12)]
    vsplit = ["train"] * 4 + ["val"] * 3 + ["test"] * 5
    cvid = [v for v in range(12) for _ in range(1 + v % 3)]  # 1..3 captions per video
    cids = [f"c{i:02d}" for i in range(len(cvid))]
    csplit = [vsplit[v] for v in cvid]
    lay = StoreLayout(dataset="toy", manifest_sha256="m" * 64, encoder={"name": "toy", "weights": "r"},
                      num_frames=T_, num_tokens=N_, token_dim=D_, embed_dim=E, text_dim=DT_,
                      max_text_tokens=L_, shard_size=4, text_shard_size=8)
    store = CacheStore.create(path, lay, vids, vsplit, cids, cvid, csplit)
    rng = np.random.default_rng(0)
    concept = rng.normal(size=(12, E))
    for i in range(store.num_shards):
        lo, hi = store.shard_range(i)
        n = hi - lo
        store.write_shard(i, status=np.ones(n, np.int8), error=[""] * n,
                          tokens=np.zeros((n, T_, N_, D_), np.float16),
                          frame_emb=(concept[lo:hi, None] + 0.5 * rng.normal(size=(n, T_, E))).astype(np.float32),
                          frame_mask=np.ones((n, T_), bool), frame_index=np.tile(np.arange(T_, dtype=np.int32), (n, 1)),
                          frame_time=np.tile(np.arange(T_, dtype=np.float32), (n, 1)))
    cv = np.array(cvid)
    for j in range(store.num_text_shards):
        lo, hi = store.text_shard_range(j)
        n = hi - lo
        store.write_text_shard(j, tokens=np.zeros((n, L_, DT_)), mask=np.ones((n, L_), bool),
                               emb=(concept[cv[lo:hi]] + 0.8 * rng.normal(size=(n, E))).astype(np.float32))
    store.consolidate()
    return store


def _cli(args: list[str], ok: bool = True):
    import cli

    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


@pytest.mark.integration
def test_import_stage_one_cli_round_trip(tmp_path):
    store = tmp_path / "toy.zarr"
    _tiny_store(store)
    work = tmp_path / "work"
    test = CacheStore.open(store).stage("test", tmp_path / "st")
    head = untrained_baseline(E)
    # export the zero-shot head's test embeddings, plus a train video (dropped as another split's)
    with torch.no_grad():
        video = encode_videos(head, test).numpy()
        text = head.encode_text(torch.from_numpy(np.array(test.text_emb))).numpy()
    _write_h5(tmp_path / "v.h5", [*test.video_ids, "v00"], np.vstack([video, video[:1]]))
    _write_h5(tmp_path / "t.h5", test.caption_ids, text)
    out = _cli(["import-stage-one", "--store", str(store), "--split", "test", "--video-emb", str(tmp_path / "v.h5"),
                "--text-emb", str(tmp_path / "t.h5"), "--out", str(tmp_path / "ext"), "--work-dir", str(work)])
    assert "R@1" in out and "'videos': 1" in out
    ext = load_external(tmp_path / "ext", test)
    ref = similarity(head, test)
    np.testing.assert_allclose(ext.similarity(), ref, atol=1e-6)
    report = json.loads((tmp_path / "ext" / "report.json").read_text())
    assert report["external ext"] == json.loads(json.dumps(retrieval_metrics(ref, test.caption_video)))
    # eval reads the external dir like a stage one, with DSL; and QB-Norm with our own head
    out = _cli(["eval", "--store", str(store), "--stage-one", str(tmp_path / "ext"), "--work-dir", str(work),
                "--out", str(tmp_path / "r1"), "--dsl"])
    assert "external ext t2v" in out and "+DSL(t=0.01) v2t" in out
    out = _cli(["eval", "--store", str(store), "--work-dir", str(work), "--out", str(tmp_path / "r2"), "--qb-norm",
                "--dsl", "--dsl-temperature", "0.05"])
    assert "+QB-Norm(val, k=1, beta=20) t2v" in out and "+DSL(t=0.05)" in out
    out = _cli(["eval", "--store", str(store), "--work-dir", str(work), "--out", str(tmp_path / "r3"), "--qb-norm",
                "--qb-bank", "test"], ok=False)
    assert "evaluated split" in out
    # clear CLI errors: unknown id, wrong split contents
    _write_h5(tmp_path / "bad.h5", [*test.video_ids, "nobody"], np.vstack([video, video[:1]]))
    out = _cli(["import-stage-one", "--store", str(store), "--video-emb", str(tmp_path / "bad.h5"),
                "--text-emb", str(tmp_path / "t.h5"), "--out", str(tmp_path / "x"), "--work-dir", str(work)], ok=False)
    assert "bad.h5" in out and "'nobody'" in out
    out = _cli(["import-stage-one", "--store", str(store), "--video-emb", str(tmp_path / "v.h5"),
                "--out", str(tmp_path / "x"), "--work-dir", str(work)], ok=False)
    assert "--text-emb" in out
