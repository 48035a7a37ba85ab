"""Data loading, trainer, checkpoints and evaluation on a toy separable problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ForbiddenSplitError, StoreMismatchError
from core.metrics import write_report
from core.split import StagedSplit
from heads.evaluation.similarity import evaluate, similarity, untrained_baseline
from heads.stage_one.checkpoint import load_stage_one
from heads.stage_one.train import train_stage_one
from heads.training.data import EpochSampler, gather_rows, iterate_batches, load_batch
from helpers import E, IDENTITY, T, make_split

@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StagedSplit]:
    root = tmp_path_factory.mktemp("staged")
    return {
        "train": make_split("train", 400, 2, seed=1, directory=root / "train"),
        "val": make_split("val", 100, 1, seed=2, directory=root / "val"),
        "test": make_split("test", 100, 2, seed=3, directory=root / "test"),
    }


@pytest.fixture(scope="module")
def trained(splits: dict[str, StagedSplit], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run_meanp")
    return train_stage_one(splits["train"], splits["val"], head="meanP", out_dir=out, epochs=12,
                           batch_size=64, lr=1e-2, weight_decay=0.01, warmup=0.1, seed=0, progress=False)


# -- data ------------------------------------------------------------------------------------
def test_gather_rows_matches_fancy_indexing(splits: dict[str, StagedSplit]) -> None:
    idx = np.array([5, 1, 5, 399, 0])
    arr = splits["train"].frame_emb
    assert isinstance(arr, np.memmap)
    out = gather_rows(arr, idx)
    assert not isinstance(out, np.memmap)
    assert np.array_equal(out, np.asarray(arr)[idx])


def test_sampler_one_caption_per_video_deterministic() -> None:
    cv = np.array([2, 0, 0, 1, 2, 2, 4])  # video 3 has no caption
    assert len(EpochSampler(cv, num_videos=5, batch_size=3)) == 1  # a lone leftover pair is dropped
    s = EpochSampler(cv, num_videos=5, batch_size=2, seed=7)
    plan = s.epoch(0)
    assert len(plan) == len(s) == 2
    captions = np.concatenate([c for c, _ in plan])
    videos = np.concatenate([v for _, v in plan])
    assert sorted(videos.tolist()) == [0, 1, 2, 4]
    assert (cv[captions] == videos).all()
    again = EpochSampler(cv, num_videos=5, batch_size=2, seed=7).epoch(0)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(plan, again))
    other = [s.epoch(e) for e in range(1, 6)]
    assert any(not np.array_equal(np.concatenate([v for _, v in p]), videos) for p in other)


def test_prefetch_matches_plain(splits: dict[str, StagedSplit]) -> None:
    train = splits["train"]
    plan = EpochSampler(train.caption_video, len(train.video_ids), 64, seed=0).epoch(3)
    plain = list(iterate_batches(train, plan, prefetch=0))
    threaded = list(iterate_batches(train, plan, prefetch=2))
    assert len(plain) == len(threaded) == len(plan)
    for a, b in zip(plain, threaded):
        assert torch.equal(a.frame_emb, b.frame_emb) and torch.equal(a.text_emb, b.text_emb)
    b0 = load_batch(train, *plan[0])
    assert b0.frame_emb.shape == (64, T, E) and b0.frame_mask.dtype == torch.bool
    # an early exit from the consumer stops the reader thread
    for _ in iterate_batches(train, plan, prefetch=1):
        break


# -- training --------------------------------------------------------------------------------
def test_training_learns_and_beats_zero_shot(trained: Path, splits: dict[str, StagedSplit]) -> None:
    history = json.loads((trained.parent / "history.json").read_text())
    losses = [e["loss"] for e in history["epochs"]]
    assert losses[-1] < 0.5 * losses[0]
    scores = [e["val_rsum"] for e in history["epochs"]]
    assert history["best_epoch"] == int(np.argmax(scores)) and history["selected_on"] == "val rsum"
    head = load_stage_one(trained).head
    test = splits["test"]
    base = evaluate(untrained_baseline(E), test)
    ours = evaluate(head, test)
    assert base["t2v"]["R@1"] < 10
    assert ours["t2v"]["R@1"] > base["t2v"]["R@1"] + 40
    assert ours["v2t"]["R@1"] > base["v2t"]["R@1"] + 40
    assert ours["t2v"]["n"] == 200 and ours["v2t"]["n"] == 100


def test_checkpoint_contents_and_round_trip(trained: Path, splits: dict[str, StagedSplit]) -> None:
    raw = torch.load(trained, weights_only=True)
    assert set(raw) >= {"config", "state_dict", "store_fingerprint", "encoder_identity", "train_args", "history"}
    assert raw["train_args"]["val_split"] == "val" and raw["store_fingerprint"] == "toy-store-0"
    head = load_stage_one(trained).head
    a = similarity(head, splits["test"])
    b = similarity(load_stage_one(trained.parent).head, splits["test"])
    assert a.shape == (200, 100) and np.array_equal(a, b)
    np.testing.assert_allclose(similarity(head, splits["test"], batch=7), a, atol=1e-6)


def test_seqtransf_trains_and_round_trips(splits: dict[str, StagedSplit], tmp_path: Path) -> None:
    path = train_stage_one(splits["train"], None, head="seqTransf", out_dir=tmp_path, epochs=2,
                           batch_size=128, lr=1e-3, seed=1, progress=False,
                           head_config={"num_layers": 1, "num_heads": 4})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["history"]["best_epoch"] == 1 and ckpt["history"]["selected_on"] is None
    assert ckpt["config"]["num_layers"] == 1
    trained_out = ckpt["state_dict"]["out.weight"]
    assert trained_out.abs().sum() > 0  # left the meanP initialisation
    loaded = load_stage_one(path)
    assert loaded.config["name"] == "seqTransf"
    fresh = train_stage_one(splits["train"], None, head="seqTransf", out_dir=tmp_path / "again", epochs=2,
                            batch_size=128, lr=1e-3, seed=1, progress=False,
                            head_config={"num_layers": 1, "num_heads": 4})
    again = load_stage_one(fresh)
    assert np.array_equal(similarity(loaded.head, splits["val"]), similarity(again.head, splits["val"]))


def test_finished_run_is_reused_not_retrained(splits: dict[str, StagedSplit], tmp_path: Path) -> None:
    import hashlib

    kwargs = dict(head="meanP", out_dir=tmp_path, epochs=1, batch_size=128, lr=1e-3, seed=2, progress=False)
    path = train_stage_one(splits["train"], splits["val"], **kwargs)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # same arguments, same store: the very same file (stage-two heads record its sha256)
    assert train_stage_one(splits["train"], splits["val"], **kwargs) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # other arguments, or reuse=False: trained again and written again
    train_stage_one(splits["train"], splits["val"], **{**kwargs, "lr": 2e-3})
    assert torch.load(path, weights_only=True)["train_args"]["lr"] == 2e-3
    os.utime(path, ns=(1, 1))  # a marker the rewrite replaces
    train_stage_one(splits["train"], splits["val"], **{**kwargs, "lr": 2e-3}, reuse=False)
    assert path.stat().st_mtime_ns != 1


def test_mismatched_encoder_refused(trained: Path) -> None:
    assert load_stage_one(trained, expect_encoder_identity=dict(IDENTITY)).encoder_identity == IDENTITY
    with pytest.raises(StoreMismatchError, match="different encoder.*name: expected 'other'"):
        load_stage_one(trained, expect_encoder_identity={**IDENTITY, "name": "other"})
    with pytest.raises(StoreMismatchError, match="store"):
        load_stage_one(trained, expect_fingerprint="another-store")


def test_trainer_never_sees_test(splits: dict[str, StagedSplit], tmp_path: Path) -> None:
    with pytest.raises(ForbiddenSplitError, match="val split is named 'test'"):
        train_stage_one(splits["train"], splits["test"], out_dir=tmp_path, epochs=1, progress=False)
    with pytest.raises(ForbiddenSplitError, match="train split"):
        train_stage_one(splits["test"], None, out_dir=tmp_path, epochs=1, progress=False)
    other_store = make_split("val", 20, 1, seed=5)
    other_store.store_fingerprint = "elsewhere"
    with pytest.raises(StoreMismatchError):
        train_stage_one(splits["train"], other_store, out_dir=tmp_path, epochs=1, progress=False)
    assert not (tmp_path / "stage_one.pt").exists()


def test_report(splits: dict[str, StagedSplit], tmp_path: Path) -> None:
    results = {"zero-shot": evaluate(untrained_baseline(E), splits["val"])}
    json_path, table = write_report(results, tmp_path)
    assert json.loads(json_path.read_text())["zero-shot"]["t2v"]["n"] == 100
    assert "zero-shot t2v" in table and (tmp_path / "report.txt").read_text().strip() == table
