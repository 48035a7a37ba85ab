"""The FAISS index over stage-one video embeddings: exact search equals brute force, approximate
kinds report their recall, the index directory round-trips and is refused for another store /
split / stage one; `index build`, `search` (with and without a head, JSON / Parquet output) and
`rerank --index` from the command line on the tiny synthetic store."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from core.errors import StoreMismatchError
from heads.evaluation.index import build_index, exact_top_k, load_index, recall_at, save_index, search, unit_rows
from helpers import run_cli


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, n // 20), d))
    return (centers[rng.integers(0, len(centers), n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


def test_exact_index_equals_brute_force_and_round_trips(tmp_path):
    emb, queries = _clustered(500, 16, 0), _clustered(40, 16, 1)
    ids = [f"v{i}" for i in range(500)]
    vi = build_index(emb, ids, "flat", meta={"split": "test", "store_fingerprint": "abc"})
    scores, rows = vi.search(queries, 10)
    brute = unit_rows(queries) @ unit_rows(emb).T
    expect = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    assert recall_at(rows, expect, 10) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(brute, rows, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-7).all()  # best first
    save_index(vi, tmp_path / "idx")
    back = load_index(tmp_path / "idx")
    assert back.video_ids == ids and back.size == 500 and back.kind == "flat"
    np.testing.assert_array_equal(back.search(queries, 10)[1], rows)
    back.check(store_fingerprint="abc", split="test", video_ids=ids)
    with pytest.raises(StoreMismatchError, match="store"):
        back.check(store_fingerprint="other")
    with pytest.raises(StoreMismatchError, match="split"):
        back.check(split="val")
    with pytest.raises(StoreMismatchError, match="differ"):
        back.check(video_ids=ids[::-1])


@pytest.mark.parametrize("kind,options", [("ivf", {"nlist": 8, "nprobe": 8}), ("hnsw", {"m": 8})])
def test_approximate_kinds_measure_their_recall(kind, options):
    emb, queries = _clustered(600, 16, 2), _clustered(50, 16, 3)
    vi = build_index(emb, [str(i) for i in range(600)], kind, options, recall_queries=queries)
    rec = vi.meta["recall"]
    assert rec["queries"] == 50 and 0.0 <= rec["recall@100"] <= 1.0
    _, exact = search(build_index(emb, [str(i) for i in range(600)]).index, queries, 100)
    _, approx = vi.search(queries, 100)
    assert rec["recall@100"] == pytest.approx(recall_at(approx, exact, 100))
    if kind == "ivf":  # every cell scanned: exact
        assert rec["recall@10"] == 1.0
    narrow = build_index(emb, [str(i) for i in range(600)], "ivf", {"nlist": 16, "nprobe": 1}, recall_queries=queries)
    assert narrow.meta["recall"]["recall@100"] < 1.0  # one cell of 16 cannot hold every top 100


def test_unknown_option_is_refused():
    from core.errors import UsageError

    with pytest.raises(UsageError, match="nprob"):
        build_index(_clustered(50, 8, 0), [str(i) for i in range(50)], "ivf", {"nprob": 3})


@pytest.fixture
def runs(tiny_runs):
    """The shared tiny runs, given as run directories (the commands take a checkpoint or its run dir)."""
    work, store, s1, s2 = tiny_runs
    return work, store, s1.parent, s2.parent


def test_search_cli_encodes_the_query_as_the_store_did(runs, tiny_world, tmp_path):
    """A caption's own text as the query: its stage-one scores against the split's videos are that
    caption's row of the stage-one similarity (the store's encoder, rebuilt from its identity)."""
    from heads.evaluation.sources import stage_one_scores
    from manifests.schema import Manifest
    from workflows.workdir import WorkDir

    work, store, s1, s2 = runs
    data = WorkDir(work).stage(str(store), "test")
    sim = stage_one_scores(str(s1), data).sim
    texts = dict(zip(*[Manifest.read(tiny_world["manifest"]).captions.column(c).to_pylist()
                       for c in ("caption_id", "text")]))
    caption = texts[data.caption_ids[0]]
    nv = len(data.video_ids)
    out = run_cli(["search", "--store", store, "--stage-one", s1, "--work-dir", work, "--top", nv,
                   "--out", tmp_path / "r.json", caption])
    assert "building the exact index" in out and f"query: {caption}" in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["rank"] for r in rows] == list(range(1, nv + 1))
    got = {r["video_id"]: r["stage_one_score"] for r in rows}
    for v, vid in enumerate(data.video_ids):
        assert got[vid] == pytest.approx(float(sim[0, v]), abs=1e-4)
    assert all(r["head_score"] is None for r in rows)

    # with the head: the top --candidates re-ranked by cosine + head score, written as Parquet
    out = run_cli(["search", "--store", store, "--stage-one", s1, "--stage-two", s2, "--work-dir", work, "--top", 3,
                   "--candidates", 4, "--out", tmp_path / "r.parquet", caption, "another query"])
    t = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert len(t) == 6 and "another query" in out
    for q in (caption, "another query"):
        mine = [r for r in t if r["query"] == q]
        finals = [r["final_score"] for r in mine]
        assert finals == sorted(finals, reverse=True)
        for r in mine:
            assert r["stage_one_rank"] <= 4
            assert r["final_score"] == pytest.approx(r["stage_one_score"] + r["head_score"], abs=1e-5)


def test_index_build_and_rerank_over_the_index(runs, tmp_path):
    work, store, s1, s2 = runs
    out = run_cli(["index", "build", "--store", store, "--stage-one", s1, "--work-dir", work,
                   "--out", tmp_path / "flat"])
    assert "flat index of" in out
    meta = json.loads((tmp_path / "flat" / "index.json").read_text())
    assert meta["split"] == "test" and meta["stage_one"]["head"] == "meanP"
    base = ["rerank", "--store", store, "--stage-one", s1, "--stage-two", s2, "--candidates", 3, "--work-dir", work]
    run_cli(base + ["--out", tmp_path / "plain"])
    out = run_cli(base + ["--out", tmp_path / "via", "--index", tmp_path / "flat"])
    assert "100.0% of the exact top 3" in out
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    via = json.loads((tmp_path / "via" / "metrics.json").read_text())
    assert plain == via
    assert json.loads((tmp_path / "via" / "run.json").read_text())["t2v_candidates_from_index"]["kind"] == "flat"

    out = run_cli(["index", "build", "--store", store, "--stage-one", s1, "--work-dir", work, "--kind", "ivf",
                   "--option", "nlist=2", "--option", "nprobe=2", "--out", tmp_path / "ivf"])
    assert "recall vs exact" in out and "R@10 100.0%" in out

    # an index of another split is refused with one line
    run_cli(["index", "build", "--store", store, "--stage-one", s1, "--work-dir", work, "--split", "val",
             "--out", tmp_path / "val"])
    import cli

    res = CliRunner().invoke(cli.main, [str(a) for a in base + ["--out", tmp_path / "x", "--index", tmp_path / "val"]])
    assert res.exit_code == 1 and "holds split 'val', not 'test'" in res.output


def test_query_encoder_found_by_the_checkpoint_sha256(tmp_path):
    """A store made by an encoder with local weights (the demo's pretrained synthetic encoder): the
    checkpoint whose sha256 the identity records is found among the candidates; without it, or with
    another one, one clear error."""
    import torch

    from core.errors import EncoderError
    from pipeline.encoders import encoder_for_identity, load_encoder

    base = load_encoder("test-vit-micro")
    good, other = tmp_path / "good.pt", tmp_path / "other.pt"
    torch.save(base.model.state_dict(), good)
    torch.save({k: v + 1 for k, v in base.model.state_dict().items()}, other)
    identity = load_encoder(f"test-vit-micro:{good}").identity()
    assert identity["weights"]["kind"] == "checkpoint"
    enc = encoder_for_identity(identity, [str(other), str(good)])
    assert enc.identity() == identity
    texts = ["a small red ring", "a big blue star"]
    np.testing.assert_allclose(enc.encode_texts(texts)[2].numpy(), base.encode_texts(texts)[2].numpy(), atol=1e-6)
    with pytest.raises(EncoderError, match="give the checkpoint"):
        encoder_for_identity(identity, [])
    with pytest.raises(EncoderError, match="give the checkpoint"):
        encoder_for_identity(identity, [str(other)])


def test_exact_search_blocks_and_ties_match_a_full_sort():
    # small blocks (several per search) and duplicated rows (ties at the k-th score, across blocks)
    emb = _clustered(3000, 8, 2)
    emb[2500:2520] = emb[7]
    x = unit_rows(emb)
    queries = np.concatenate([x[:30], x[7:8]])
    scores, rows = exact_top_k(x, queries, 12, block_bytes=4 * 31 * 700)
    full = queries @ x.T
    for q in range(len(queries)):
        expect = np.lexsort((np.arange(full.shape[1]), -full[q]))[:12]
        order = np.lexsort((rows[q], -scores[q]))
        np.testing.assert_array_equal(rows[q][order], expect)
    np.testing.assert_allclose(scores, np.take_along_axis(full, rows, axis=1), atol=1e-6)
    assert list(np.sort(rows[-1])[:12]) == [7] + list(range(2500, 2511))  # the lower tied rows win
