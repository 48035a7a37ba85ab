"""Within-group accuracy (``synthetic.groups``, ``synthetic.head_groups``; ties count against the caption) and the
benches that use it: bench/groups.py, bench/error_types.py, bench/negatives.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synthetic.groups import within_group_accuracy


def test_within_group_accuracy_per_attribute_and_ties() -> None:
    s = np.array([[0.9, 0.1, 0.2],    # own = 0, right
                  [0.5, 0.5, 0.1],    # own = 1, tie with 0: wrong
                  [0.1, 0.3, 0.2],    # own = 2, wrong
                  [0.0, 0.0, 0.4]])   # own = 2, right
    own = np.array([0, 1, 2, 2])
    attr = np.array(["motion", "motion", "timing", "timing"])
    cand = np.tile(np.arange(3), (4, 1))  # three distinct members in every group
    res = within_group_accuracy({"x": s}, np.arange(4), cand, own, attr)["x"]
    assert res == pytest.approx({"motion": 50.0, "timing": 50.0, "all": 50.0})
    flipped = within_group_accuracy({"neg": -s}, np.arange(4), cand, own, attr)["neg"]
    assert flipped["all"] == 0.0  # no row has its own video strictly highest after the flip


def test_the_padding_of_a_smaller_group_is_no_rival() -> None:
    """A group of 3 in a table of groups of 4 repeats its first member; a caption of that member
    must not lose to its own copy, and the copy counts for nothing else either."""
    from synthetic.groups import member_columns

    cand = np.array([[10, 11, 12, 10],    # a group of 3, padded with its first member
                     [20, 21, 22, 23]])   # a full group
    assert member_columns(cand).tolist() == [[True, True, True, False], [True, True, True, True]]
    s = np.array([[0.9, 0.1, 0.2, 0.9],   # own = 0, strictly above the real rivals: right
                  [0.9, 0.1, 0.2, 0.9]])  # own = 0, tied with a real member: wrong
    own = np.array([0, 0])
    res = within_group_accuracy({"x": s}, np.arange(2), cand, own, np.array(["timing", "motion"]))["x"]
    assert res == pytest.approx({"motion": 0.0, "timing": 100.0, "all": 50.0})


def test_error_types_splits_errors_into_near_duplicates_and_other_scenes(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.error_types import error_types

    man = tmp_path / "manifest"
    man.mkdir()
    pq.write_table(pa.table({"video_id": ["a", "b", "c", "d"], "group_id": ["g1", "g1", "", ""],
                             "varied": ["motion", "motion", "", ""]}), man / "videos.parquet")
    rows = []

    def query(qid, ranked, stage_one_order, positive):
        for rank, cand in enumerate(ranked, 1):
            rows.append({"query_id": qid, "rank": rank, "stage_one_rank": stage_one_order.index(cand) + 1,
                         "candidate_id": cand, "positive": cand == positive})

    query("a#0", ["a", "b"], ["b", "a"], "a")      # stage one wrong (near-duplicate b), re-ranked right
    query("b#0", ["c", "b"], ["c", "b"], "b")      # both wrong, on another scene
    query("c#0", ["c", "d"], ["d", "c"], "c")      # random scene: stage one wrong, re-ranked right
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ranked_t2v.parquet")
    out = error_types(man, tmp_path)
    assert out["motion"] == {"n": 2, "stage_one_R@1": 0.0, "reranked_R@1": 50.0, "stage_one_errors": 2,
                             "stage_one_errors_in_group": 1, "reranked_errors": 1, "reranked_errors_in_group": 0}
    assert out["random scene"]["stage_one_errors"] == 1 and out["random scene"]["reranked_R@1"] == 100.0
    assert out["random scene"]["stage_one_errors_in_group"] == 0


def test_within_group_accuracy_from_ranked_lists() -> None:
    from synthetic.groups import ranked_within_group

    by_id = {"a": {"group_id": "g1", "varied": "motion"}, "b": {"group_id": "g1", "varied": "motion"},
             "c": {"group_id": "g2", "varied": "timing"}, "d": {"group_id": "g2", "varied": "timing"},
             "e": {"group_id": "", "varied": ""}}
    rows = []

    def query(qid, ranked, stage_one_order, positive):
        for rank, cand in enumerate(ranked, 1):
            rows.append((qid, cand, rank, stage_one_order.index(cand) + 1, cand == positive))

    query("a#0", ["a", "e", "b"], ["b", "a", "e"], "a")  # stage one puts b above a, re-ranked a above b
    query("b#0", ["a", "b", "e"], ["b", "a", "e"], "b")  # re-ranking hurts
    query("c#0", ["e", "c", "a"], ["e", "c", "a"], "c")  # d outside the top K: right both times
    query("d#0", ["e", "a", "b"], ["e", "a", "b"], "d")  # d itself outside the top K: left out
    query("e#0", ["e", "a", "b"], ["e", "a", "b"], "e")  # not grouped
    res = ranked_within_group(*zip(*rows), by_id=by_id, caption_video={q: q[0] for q in "a#0 b#0 c#0 d#0 e#0".split()})
    assert res["motion"] == {"n": 2, "stage one": 50.0, "re-ranked": 50.0}
    assert res["timing"] == {"n": 1, "stage one": 100.0, "re-ranked": 100.0}
    assert res["all"]["n"] == 3 and res["all"]["re-ranked"] == pytest.approx(200 / 3)
    assert res["outside top K"] == {"n": 1}
    assert ranked_within_group(*zip(*rows[-3:]), by_id=by_id) == {}


def test_group_queries_and_stage_one_accuracy() -> None:
    """Grouped captions get their group's members (uneven groups padded with a member that never wins)
    and the column of their own video; stage one's accuracy follows from the cosine."""
    from synthetic.head_groups import group_queries, head_group_accuracy

    rows = {"a": {"group_id": "g1", "varied": "motion"}, "b": {"group_id": "g1", "varied": "motion"},
            "c": {"group_id": "g1", "varied": "motion"}, "d": {"group_id": "g2", "varied": "timing"},
            "e": {"group_id": "g2", "varied": "timing"}, "f": {"group_id": None}}
    ids = ["a", "b", "c", "d", "e", "f"]
    caption_video = np.array([0, 1, 3, 4, 5, 2])
    gq = group_queries(ids, caption_video, rows)
    assert gq.captions.tolist() == [0, 1, 2, 3, 5] and gq.group_size == 3
    assert gq.candidates[2].tolist() == [3, 4, 3] and gq.own.tolist() == [0, 1, 0, 1, 2]
    assert gq.counts() == {"motion": 3, "timing": 2}
    sim = np.zeros((6, 6))
    sim[0, 0] = sim[1, 1] = sim[3, 4] = 1.0   # captions 0, 1 and 3 score their own video highest
    sim[2, 4] = 1.0                           # caption 2 prefers its group's other member
    sim[5, 0] = 1.0                           # so does caption 5 (video c)
    acc = head_group_accuracy(gq, sim)["stage one"]
    assert acc == {"motion": pytest.approx(200 / 3), "timing": 50.0, "all": 60.0}
    assert group_queries(["f"], np.array([0]), rows) is None


def test_negatives_bench_counts_group_members_among_the_trainers_negatives(tiny_runs, tmp_path) -> None:
    """bench/negatives.py: with pools of one, the video source's negative is the nearest video of the
    caption's own video (stage one's video embeddings) and the text source's the video stage one scores
    highest for the caption, its own aside; each share of group members is recomputed here."""
    import torch

    from bench.groups import manifest_videos
    from bench.negatives import main
    from heads.evaluation.similarity import encode_videos, similarity
    from heads.stage_one.checkpoint import load_stage_one
    from synthetic.groups import group_members
    from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

    work, store, s1, _ = tiny_runs
    manifest = Path(work) / "synthetic" / "manifest"
    train = WorkDir(work).stage(str(store), "train", STAGE_TWO_ARRAYS)
    group, _ = group_members(list(train.video_ids), manifest_videos(manifest))
    cv = np.asarray(train.caption_video)
    caps = np.flatnonzero(group[cv] >= 0)
    assert caps.size > 0  # the tiny world's train split has groups (TINY_WORLD: train_groups=2)
    head = load_stage_one(s1).head
    with torch.no_grad():
        emb = torch.nn.functional.normalize(encode_videos(head, train), dim=-1).numpy()
    vv = emb @ emb.T
    np.fill_diagonal(vv, -np.inf)
    nearest = vv.argmax(axis=1)
    expect = 100 * np.mean(group[nearest[cv[caps]]] == group[cv[caps]])
    with torch.no_grad():
        cs = np.array(similarity(head, train)[caps], dtype=np.float64)
    cs[np.arange(caps.size), cv[caps]] = -np.inf
    expect_text = 100 * np.mean(group[cs.argmax(axis=1)] == group[cv[caps]])
    out = main(["--store", str(store), "--manifest", str(manifest), "--stage-one", str(s1), "--work-dir", str(work),
                "--neg-source", "text", "video", "--neg-pool", "1", "--neg-video-pool", "1",
                "--json", str(tmp_path / "n.json")])
    assert out["captions"] == caps.size and set(out["sources"]) == {"text", "video"}
    assert out["sources"]["video"]["videos %"] == pytest.approx(expect)
    assert json.loads((tmp_path / "n.json").read_text())["sources"]["video"]["videos %"] == pytest.approx(expect)
    assert out["sources"]["text"]["videos %"] == pytest.approx(expect_text)
