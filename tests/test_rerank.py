"""Stage-two re-ranking: top-K permutation only, unique-pair scoring, V2T, outputs, DSL, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from core.metrics import t2v_ranks, v2t_ranks
from heads import create_head
from heads.evaluation import rerank as rerank_module
from heads.evaluation.rerank import lift, top_k, unique_pairs, write_outputs
from heads.stage_two.scoring import pair_scorer
from helpers import TINY_HEAD, row_split, run_cli


class TableHead(nn.Module):
    """Fake stage-two head: score of (caption c, video v) = table[c, v]; records every pair scored.
    It reads its pairs through the tokens of ``helpers.row_split``, which encode their own rows."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.pairs: list[tuple[int, int]] = []

    def pair_score(self, text_tokens, text_mask, tokens, frame_mask, pair_text, pair_video):
        c = text_tokens[pair_text][:, 0, 0].long()
        v = tokens[pair_video][:, 0, 0, 0].long()
        self.pairs += list(zip(c.tolist(), v.tolist()))
        return self.table[c, v]


def rerank(sim, split, head, batch_size: int = 64, **kwargs):
    """Re-rank with ``head`` scoring the split's pairs (as the command line does)."""
    return rerank_module.rerank(sim, split, pair_scorer(head, split, batch_size=batch_size), **kwargs)


# Hand-built world: 3 captions x 4 videos, K = 2 (video 2 has no caption: not a V2T query).
S = np.array([[0.9, 0.8, 0.1, 0.0],
              [0.5, 0.7, 0.6, 0.2],
              [0.3, 0.3, 0.9, 0.4]], dtype=np.float32)
CV = np.array([1, 3, 0])
H = np.zeros((3, 4), np.float32)
H[0, 1] = 1.0    # T2V c0: lifts its video v1 over v0 (both in c0's top 2)
H[1, 1] = 2.0    # V2T v1: caption c1 overtakes the true caption c0
H[1, 3] = 100.0  # c1's true video v3 is outside c1's T2V top 2 (never helps T2V), but c1 is in v3's V2T top 2
H[2, 0] = 50.0   # (c2, v0) is in neither candidate set: must never be scored


def test_top_k_breaks_ties_by_index():
    s = np.array([[1.0, 2.0, 2.0, 0.5, 2.0]])
    assert top_k(s, 3).tolist() == [[1, 2, 4]]
    assert top_k(s, 10).shape == (1, 5)
    with pytest.raises(ValueError, match="K must be"):
        top_k(s, 0)


def test_hand_built_ranks_and_metrics():
    split = row_split(CV, 4)
    head = TableHead(H)
    res = rerank(S, split, head, k=2)
    # T2V: c0 -> v1 moves from rank 1 to 0; c1's v3 (rank 3) and c2's v0 (rank 3, tie) stay
    assert t2v_ranks(res.stage_one_t2v, CV).tolist() == [1, 3, 3]
    assert t2v_ranks(res.t2v_matrix, CV).tolist() == [0, 3, 3]
    # V2T queries v0, v1, v3: v1's true caption c0 drops to 1, v3's true caption c1 rises to 0
    assert res.v2t_videos.tolist() == [0, 1, 3]
    assert v2t_ranks(res.stage_one_v2t, CV).tolist() == [2, 0, 1]
    assert v2t_ranks(res.v2t_matrix, CV).tolist() == [2, 1, 0]
    m = res.metrics()
    assert m["stage one"]["t2v"]["R@1"] == 0.0
    assert m["re-ranked"]["t2v"]["R@1"] == pytest.approx(100 / 3)
    assert m["stage one"]["t2v"]["R@2"] == pytest.approx(100 / 3)  # stage one's R@K
    assert m["re-ranked"]["t2v"]["R@2"] == pytest.approx(100 / 3)
    assert m["stage one"]["t2v"]["MnR"] == pytest.approx((2 + 4 + 4) / 3)
    assert m["re-ranked"]["t2v"]["MnR"] == pytest.approx((1 + 4 + 4) / 3)
    assert m["stage one"]["v2t"]["R@1"] == pytest.approx(100 / 3)
    assert m["re-ranked"]["v2t"]["R@1"] == pytest.approx(100 / 3)
    assert m["re-ranked"]["v2t"]["MnR"] == pytest.approx((3 + 2 + 1) / 3)
    # final scores of the candidates are sim + head score
    assert res.t2v_candidates.tolist() == [[0, 1], [1, 2], [2, 3]]
    np.testing.assert_allclose(res.t2v_final, [[0.9, 1.8], [2.7, 0.6], [0.9, 0.4]], rtol=1e-6)


def test_each_unique_pair_scored_once():
    split = row_split(CV, 4)
    head = TableHead(H)
    res = rerank(S, split, head, k=2, batch_size=3)
    t2v = {(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3)}
    v2t = {(0, 0), (1, 0), (0, 1), (1, 1), (2, 3), (1, 3)}
    assert sorted(head.pairs) == sorted(t2v | v2t)  # 8 distinct pairs, none twice
    assert res.num_pairs == 8 and res.num_candidates == 12
    assert (2, 0) not in head.pairs
    caps, vids = unique_pairs(res.t2v_candidates, res.v2t_videos, res.v2t_candidates, 4)
    assert list(vids) == sorted(vids)  # batches read videos in order


def test_t2v_only_scores_t2v_pairs():
    head = TableHead(H)
    res = rerank(S, row_split(CV, 4), head, k=2, directions=("t2v",))
    assert len(head.pairs) == 6 and res.v2t_matrix is None
    assert set(res.metrics()["re-ranked"]) == {"t2v"}


def test_oracle_head_fixes_inside_top_k_never_beyond():
    rng = np.random.default_rng(0)
    num_v, k = 40, 5
    cv = np.concatenate([np.arange(num_v - 4), rng.integers(0, num_v - 4, size=30)])  # 4 videos uncaptioned
    sim = rng.normal(size=(cv.size, num_v)).astype(np.float32)
    oracle = (cv[:, None] == np.arange(num_v)[None, :]).astype(np.float32) * 10.0
    res = rerank(sim, row_split(cv, num_v), TableHead(oracle), k=k)
    r1, r2 = t2v_ranks(sim, cv), t2v_ranks(res.t2v_matrix, cv)
    assert (r1 >= k).any() and (r1[r1 < k] > 0).any()  # the test covers both cases
    np.testing.assert_array_equal(r2, np.where(r1 < k, 0, r1))
    v1, v2 = v2t_ranks(sim, cv), v2t_ranks(res.v2t_matrix, cv)
    np.testing.assert_array_equal(v2, np.where(v1 < k, 0, v1))
    m = res.metrics()
    for d in ("t2v", "v2t"):
        assert m["re-ranked"][d][f"R@{k}"] == m["stage one"][d][f"R@{k}"]
        assert m["re-ranked"][d]["R@1"] == m["stage one"][d][f"R@{k}"]


def test_adversarial_head_only_permutes_top_k():
    rng = np.random.default_rng(1)
    cv = np.arange(12)
    sim = rng.normal(size=(12, 12)).astype(np.float32)
    res = rerank(sim, row_split(cv, 12), TableHead(rng.normal(size=(12, 12)) * 100), k=4)
    for c in range(12):  # the top 4 set is unchanged, and the rest keep stage-one order
        new_order = np.argsort(-res.t2v_matrix[c], kind="stable")
        old_order = np.argsort(-sim[c], kind="stable")
        assert set(new_order[:4]) == set(old_order[:4])
        assert new_order[4:].tolist() == old_order[4:].tolist()


def test_lift_offset_keeps_lifted_entries_on_top():
    base = np.array([[0.0, 5.0, -3.0]])
    out = lift(base, np.array([[0]]), np.array([[2]]), np.array([[-7.0]]))
    assert out[0, 2] > out[0, 1] and out[0, 1] == 5.0


def test_outputs_written(tmp_path):
    split = row_split(CV, 4)
    res = rerank(S, split, TableHead(H), k=2)
    paths, table = write_outputs(res, split, tmp_path, meta={"head": "table"})
    t2v = pq.read_table(paths["t2v"])
    assert t2v.column_names == ["query_id", "query_index", "rank", "candidate_id", "candidate_index",
                                "stage_one_rank", "stage_one_score", "head_score", "final_score", "positive"]
    rows = [r for r in t2v.to_pylist() if r["query_id"] == "cap0"]
    assert [r["rank"] for r in rows] == [1, 2]
    assert [r["candidate_id"] for r in rows] == ["vid1", "vid0"]
    assert [r["stage_one_rank"] for r in rows] == [2, 1]
    assert [r["positive"] for r in rows] == [True, False]
    np.testing.assert_allclose([r["final_score"] for r in rows], [1.8, 0.9], rtol=1e-6)
    np.testing.assert_allclose([r["head_score"] for r in rows], [1.0, 0.0], rtol=1e-6)
    v2t = pq.read_table(paths["v2t"])
    assert v2t.num_rows == 3 * 2 and set(v2t.column("query_id").to_pylist()) == {"vid0", "vid1", "vid3"}
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics) == {"stage one", "re-ranked"} and set(metrics["re-ranked"]) == {"t2v", "v2t"}
    assert "R@2" in metrics["stage one"]["t2v"]
    run = json.loads(paths["run"].read_text())
    assert run["pairs_scored"] == 8 and run["head"] == "table"
    assert "t2v re-ranked" in table and "v2t stage one" in table


def test_dsl_applies_dual_softmax_to_final_matrices(monkeypatch):
    calls = []

    def fake_dual_softmax(sim, temperature=0.01, direction="t2v"):
        calls.append(direction)
        return np.asarray(sim, dtype=np.float64) * 2.0  # rank-preserving

    monkeypatch.setattr(rerank_module, "dual_softmax", fake_dual_softmax)
    split = row_split(CV, 4)
    plain = rerank(S, split, TableHead(H), k=2).metrics()
    res = rerank(S, split, TableHead(H), k=2, dsl=True)
    assert res.metrics() == plain
    assert calls.count("t2v") == 2 and calls.count("v2t") == 2  # stage one and re-ranked, per direction
    np.testing.assert_allclose(res.t2v_final, 2 * np.array([[0.9, 1.8], [2.7, 0.6], [0.9, 0.4]]), rtol=1e-6)


def test_real_dual_softmax_runs():
    res = rerank(S, row_split(CV, 4), TableHead(H), k=2, dsl=True, dsl_temperature=1.0)
    assert set(res.metrics()["re-ranked"]) == {"t2v", "v2t"}
    assert np.isfinite(res.t2v_matrix).all()


def test_crosstvr_head_batches_match_single_pairs():
    rng = np.random.default_rng(3)
    split = row_split(np.array([0, 1, 2, 2, 3]), 5)
    split.tokens = rng.normal(size=(5, 3, 5, 8)).astype(np.float16)
    split.frame_mask = np.ones((5, 3), bool)
    split.frame_mask[4, 2] = False
    split.text_tokens = rng.normal(size=(5, 4, 6)).astype(np.float16)
    split.text_mask = np.ones((5, 4), bool)
    split.text_mask[0, 2:] = False
    torch.manual_seed(0)
    head = create_head("crosstvr", 8, 6, width=16, layers=1, heads=2, num_queries=2, num_selected=2)
    head.standardizer.fit(split)
    sim = rng.normal(size=(5, 5)).astype(np.float32)
    res = rerank(sim, split, head, k=3, batch_size=4)
    c, v = 2, int(res.t2v_candidates[2, 1])
    with torch.no_grad():
        one = head.eval().pair_score(torch.from_numpy(split.text_tokens[[c]]), torch.from_numpy(split.text_mask[[c]]),
                                     torch.from_numpy(split.tokens[[v]]), torch.from_numpy(split.frame_mask[[v]]),
                                     torch.tensor([0]), torch.tensor([0]))
    assert res.t2v_head[2, 1] == pytest.approx(float(one), abs=1e-4)


def test_missing_tokens_and_bad_shapes_are_clear_errors():
    split = row_split(CV, 4)
    split.tokens = None
    with pytest.raises(ValueError, match="tokens"):
        rerank(S, split, TableHead(H), k=2)
    with pytest.raises(ValueError, match="shape"):
        rerank(S[:, :3], row_split(CV, 4), TableHead(H), k=2)


# ---------------------------------------------------------------------------- command line
def _invoke(args: list[str]):
    from click.testing import CliRunner

    import cli

    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def test_rerank_help():
    out = run_cli(["rerank", "--help"])
    for opt in ("--store", "--stage-one", "--stage-two", "--split", "--candidates", "--dsl", "--out"):
        assert opt in out
    assert "--head " not in out and "--k " not in out  # the former spellings are hidden aliases
    assert "ablation" in run_cli(["--help"])


def test_rerank_cli_on_a_tiny_store(tiny_runs, tmp_path):
    work, store, s1, s2 = tiny_runs
    out = run_cli(["rerank", "--store", str(store), "--stage-one", str(s1), "--stage-two", str(s2), "--split", "test",
                "--candidates", "3", "--work-dir", str(work), "--out", str(tmp_path / "rr"), "--device", "cpu"])
    assert "t2v re-ranked" in out and "v2t stage one" in out and "R@3" in out
    metrics = json.loads((tmp_path / "rr" / "metrics.json").read_text())
    assert metrics["stage one"]["t2v"]["R@3"] == metrics["re-ranked"]["t2v"]["R@3"]
    t2v = pq.read_table(tmp_path / "rr" / "ranked_t2v.parquet")
    assert t2v.num_rows == 3 * metrics["stage one"]["t2v"]["n"]
    run = json.loads((tmp_path / "rr" / "run.json").read_text())
    assert run["pairs_scored"] <= run["candidates"]
    # every query's positive's rank over the split, before and after: the metrics follow from them
    ranks = pq.read_table(tmp_path / "rr" / "positive_ranks.parquet").to_pydict()
    for d in ("t2v", "v2t"):
        rows = [i for i, x in enumerate(ranks["direction"]) if x == d]
        before = np.array([ranks["stage_one_rank"][i] for i in rows])
        after = np.array([ranks["reranked_rank"][i] for i in rows])
        assert len(rows) == metrics["stage one"][d]["n"]
        for name, r in (("stage one", before), ("re-ranked", after)):
            for k in (1, 3):
                assert 100.0 * (r <= k).mean() == pytest.approx(metrics[name][d][f"R@{k}"])
        assert (before[before > 3] == after[before > 3]).all()  # beyond K nothing moves



def test_renamed_rerank_options_still_work_with_a_notice(tiny_runs, tmp_path):
    """``--head`` (now ``--stage-two``) and ``--k`` (now ``--candidates``) are kept as hidden aliases:
    the same re-ranking, and one line saying what the option is called now."""
    work, store, s1, s2 = tiny_runs
    result = _invoke(["rerank", "--store", str(store), "--stage-one", str(s1), "--head", str(s2), "--k", "3",
                      "--work-dir", str(work), "--out", str(tmp_path / "old"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "note: --head is now --stage-two" in result.output and "note: --k is now --candidates" in result.output
    new = _invoke(["rerank", "--store", str(store), "--stage-one", str(s1), "--stage-two", str(s2), "--candidates",
                   "3", "--work-dir", str(work), "--out", str(tmp_path / "new"), "--device", "cpu"])
    assert new.exit_code == 0 and "note:" not in new.output
    old_m = json.loads((tmp_path / "old" / "metrics.json").read_text())
    new_m = json.loads((tmp_path / "new" / "metrics.json").read_text())
    assert old_m["re-ranked"] == new_m["re-ranked"] and "R@3" in new_m["stage one"]["t2v"]

def test_rerank_refuses_a_head_of_another_encoder(tiny_runs, tmp_path):
    work, store, s1, s2 = tiny_runs
    for path, name in ((s2, "stage_two.pt"), (s1, "stage_one.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["encoder_identity"] = {**ckpt["encoder_identity"], "name": "some-other-encoder"}
        bad = tmp_path / path.parent.name / name
        bad.parent.mkdir()
        torch.save(ckpt, bad)
        args = {"stage_two.pt": (s1, bad), "stage_one.pt": (bad, s2)}[name]
        result = _invoke(["rerank", "--store", str(store), "--stage-one", str(args[0]), "--stage-two", str(args[1]),
                          "--candidates", "3", "--work-dir", str(work), "--out", str(tmp_path / "x"), "--device", "cpu"])
        assert result.exit_code != 0
        assert "different encoder" in result.output and "some-other-encoder" in result.output


def test_ablation_cli_on_a_tiny_store(tiny_runs, tmp_path):
    work, store, s1, _ = tiny_runs
    out_dir = tmp_path / "abl"
    args = ["ablation", "--store", str(store), "--stage-one", str(s1), "--variants", "spatial,both-itm-only,t2v2t",
            "--candidates", "3", "--epochs", "1", "--rank-weight", "0.5", "--itc-steps", "2", "--work-dir", str(work),
            "--out", str(out_dir),
            "--device", "cpu", "--head-option", "width=16", "--head-option", "layers=1",
            "--head-option", "heads=2"]
    out = run_cli(args)
    assert "stage one" in out and "+spatial" in out and "T2V2T" in out and "ITM only" in out
    table = json.loads((out_dir / "ablation.json").read_text())
    assert table.pop("split")["complete"] and len(table) == 4 and "T2V R@3 (stage one)" in table["stage one"]
    runs = json.loads((out_dir / "ablation.runs.json").read_text())["variants"]
    assert set(runs) == {"spatial", "both-itm-only", "t2v2t"}
    steps = {name: torch.load(run["checkpoint"], weights_only=True)["train_args"]["itc_steps"]
             for name, run in runs.items()}
    assert steps == {"spatial": 2, "both-itm-only": 0, "t2v2t": 0}  # contrastive only where it applies
    for name, run in runs.items():
        ckpt = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
        assert ckpt["train_args"]["rank_weight"] == 0.5 and ckpt["train_args"]["epochs"] == 1
        assert (out_dir / name / "metrics.json").is_file()
    assert torch.load(runs["spatial"]["checkpoint"], weights_only=True)["config"]["mode"] == "spatial"
    # a second run reuses the finished heads instead of training them again
    before = {name: Path(run["checkpoint"]).stat().st_mtime_ns for name, run in runs.items()}
    run_cli(args)
    assert {name: Path(run["checkpoint"]).stat().st_mtime_ns for name, run in runs.items()} == before
    # ... and trains again, with a line saying why, a head of its own made with other arguments
    out = run_cli(args + ["--val-candidates", "2"])
    assert "belongs to a run with other arguments (val_candidates" in out and "training the head again" in out
    assert all(Path(run["checkpoint"]).stat().st_mtime_ns != before[name] for name, run in runs.items())
    assert all(torch.load(run["checkpoint"], weights_only=True)["train_args"]["val_candidates"] == 2
               for run in runs.values())


def test_ablation_over_seeds_reports_means_and_within_group_accuracy(tiny_runs, tmp_path):
    """--seeds trains each variant once per seed; the table holds the seeds' means and spread, and on a
    store with near-duplicate groups the within-group accuracy of stage one and of each variant."""
    from heads.evaluation.sources import stage_one_scores
    from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

    work, store, s1, _ = tiny_runs
    out_dir = tmp_path / "abl"
    run_cli(["ablation", "--store", str(store), "--stage-one", str(s1), "--variants", "spatial", "--seeds", "0,1",
             "--candidates", "3", "--epochs", "1", "--itc-steps", "2", "--itc-batch", "4", "--batch-size", "4",
             "--work-dir", str(work), "--out", str(out_dir), "--device", "cpu", *TINY_HEAD])
    runs = json.loads((out_dir / "ablation.runs.json").read_text())
    assert set(runs["variants"]) == {"spatial-seed0", "spatial-seed1"} and runs["seeds"] == [0, 1]
    seeds = [runs["variants"][f"spatial-seed{s}"] for s in (0, 1)]
    assert [torch.load(r["checkpoint"], weights_only=True)["train_args"]["seed"] for r in seeds] == [0, 1]
    row = json.loads((out_dir / "ablation.json").read_text())["+spatial"]
    r1 = [r["metrics"]["t2v"]["R@1"] for r in seeds]
    assert row["T2V R@1"] == pytest.approx(np.mean(r1)) and row["T2V R@1 sd"] == pytest.approx(np.std(r1))
    assert (out_dir / "spatial-seed1" / "metrics.json").is_file()

    # the tiny world's test split has one group of near-duplicates: stage one's within-group accuracy,
    # recomputed here from its cosine: a caption is right when its own video beats every other member
    groups = json.loads((out_dir / "ablation-groups.json").read_text())
    test = WorkDir(work).stage(str(store), "test", STAGE_TWO_ARRAYS)
    videos = pq.read_table(Path(work) / "synthetic" / "manifest" / "videos.parquet").to_pylist()
    group_of = {r["video_id"]: r["group_id"] for r in videos if r.get("group_id") not in (None, "")}
    ids = list(test.video_ids)
    sim = stage_one_scores(str(s1), test).sim
    right = []
    for c, v in enumerate(np.asarray(test.caption_video)):
        if ids[v] not in group_of:
            continue
        others = [j for j, vid in enumerate(ids) if group_of.get(vid) == group_of[ids[v]] and j != v]
        right.append(all(sim[c, v] > sim[c, j] for j in others))
    assert right and groups["stage one (cosine)"]["all"] == pytest.approx(100 * np.mean(right))
    variant = groups["+spatial, cosine + head"]
    assert variant["all"] == pytest.approx(np.mean([r["within_group"]["all"] for r in seeds]))
    assert "all sd" in variant and all(0 <= r["within_group"]["all"] <= 100 for r in seeds)

    # bench/groups.py gives each seed's figure, also for two checkpoints of one run directory
    from bench.groups import main as groups_main

    both = tmp_path / "both"
    both.mkdir()
    for s, r in zip((0, 1), seeds):
        shutil.copy(r["checkpoint"], both / f"seed{s}.pt")
    table = groups_main(["--store", str(store), "--manifest", str(Path(work) / "synthetic" / "manifest"),
                         "--stage-one", str(s1), "--stage-two", str(both / "seed0.pt"), "--stage-two", str(both / "seed1.pt"),
                         "--split", "test", "--work-dir", str(work)])["accuracy"]
    assert table["both cosine+head"]["all"] == pytest.approx(seeds[0]["within_group"]["all"])
    assert table["both/seed1 cosine+head"]["all"] == pytest.approx(seeds[1]["within_group"]["all"])
