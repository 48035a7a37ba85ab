"""Runs saved before the architecture pass (tests/fixtures/old_runs, written by its make.py with the
code of commit 67eaafd) still load, score as they did, and count as finished runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from heads.stage_one.checkpoint import load_stage_one
from heads.stage_two.checkpoint import load_stage_two
from heads.stage_two.scoring import score_pairs
from heads.stage_two.train import train_stage_two
from helpers import TINY, TOKEN_IDENTITY, make_token_split

OLD = Path(__file__).resolve().parent / "fixtures" / "old_runs"


def test_old_checkpoints_load_and_score_as_before() -> None:
    s1 = load_stage_one(OLD / "s1", expect_encoder_identity=dict(TOKEN_IDENTITY))
    assert s1.config["name"] == "meanP"
    s2 = load_stage_two(OLD / "s2", expect_encoder_identity=dict(TOKEN_IDENTITY))
    assert s2.config["itc_dim"] == 128 and "head_cfg" in s2.train_args  # saved under the old name
    expected = json.loads((OLD / "expected.json").read_text())
    test = make_token_split("test", 32, 1, seed=3)
    got = score_pairs(s2.head, test, np.array(expected["captions"]), np.array(expected["videos"]))
    np.testing.assert_allclose(got, expected["scores"], rtol=1e-5, atol=1e-5)


def test_an_old_finished_run_is_reused(tmp_path: Path) -> None:
    shutil.copytree(OLD, tmp_path / "old")
    train = make_token_split("train", 96, 2, seed=1)
    val = make_token_split("val", 32, 1, seed=2)
    ckpt = tmp_path / "old" / "s2" / "stage_two.pt"
    before = ckpt.read_bytes()
    again = train_stage_two(train, val, tmp_path / "old" / "s1" / "stage_one.pt", ckpt.parent, head_config=TINY,
                            epochs=1, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_candidates=4,
                            num_threads=1, itc_steps=3, itc_batch=8, val_directions="t2v")  # selected on T2V then
    assert again == ckpt and ckpt.read_bytes() == before  # same arguments under today's names: not retrained
    with pytest.raises(ValueError, match="other arguments"):
        train_stage_two(train, val, tmp_path / "old" / "s1" / "stage_one.pt", ckpt.parent, head_config=TINY,
                        epochs=2, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_candidates=4,
                        num_threads=1, itc_steps=3, itc_batch=8)


def test_a_store_of_schema_version_1_still_reads_stages_and_takes_writes(tmp_path: Path) -> None:
    """tests/fixtures/old_store.zarr was written by the code of commit 67eaafd (make_old_store.py):
    variable-length string arrays, no raw failure messages."""
    import numpy as np

    from core.errors import IncompleteSplitError
    from core.split import check_complete
    from pipeline.store import CacheStore

    shutil.copytree(OLD.parent / "old_store.zarr", tmp_path / "old.zarr")
    store = CacheStore.open(tmp_path / "old.zarr", mode="r+")
    assert store.attrs["schema_version"] == 1
    assert store.video_ids == ["v0", "v1", "v2", "v3", "v4"] and store.splits() == ["train", "val", "test"]
    assert store.failures() == {"v4": "missing file: v4.mp4"}
    assert store.failures(detail=True) == {"v4": {"reason": "missing file: v4.mp4", "detail": ""}}
    test = store.stage("test", tmp_path / "staged")
    assert test.video_ids == ["v3"] and test.caption_ids == ["c3", "c4"]
    assert test.coverage["missing_videos"] == {"v4": "missing file: v4.mp4"}
    with pytest.raises(IncompleteSplitError, match="1 of 2 videos"):
        check_complete(test)
    # a shard written again (as --retry-failed does) into the old layout
    lo, hi = store.shard_range(2)
    before = store.array("videos/frame_emb")[lo:hi]
    store.reset_shards([2])
    store.write_shard(2, status=np.ones(1, np.int8), error=[""], tokens=np.zeros((1, 2, 3, 4)),
                      frame_emb=before, frame_mask=np.ones((1, 2), bool), frame_index=np.zeros((1, 2), np.int32),
                      frame_time=np.zeros((1, 2), np.float32), error_detail=["ignored"], decoder=["decord"])
    again = CacheStore.open(tmp_path / "old.zarr")
    assert again.failures() == {} and again.done_shards() == {0, 1, 2}
