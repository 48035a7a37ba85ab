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
from worlds import TINY, TOKEN_IDENTITY, make_token_split

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
                            epochs=1, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_k=4,
                            num_threads=1, itc_steps=3, itc_batch=8)
    assert again == ckpt and ckpt.read_bytes() == before  # same arguments under today's names: not retrained
    with pytest.raises(ValueError, match="other arguments"):
        train_stage_two(train, val, tmp_path / "old" / "s1" / "stage_one.pt", ckpt.parent, head_config=TINY,
                        epochs=2, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_k=4,
                        num_threads=1, itc_steps=3, itc_batch=8)
