"""Training curves (``core.training_log``): every step and every validation of stage one and of both phases
of stage two in ``training_log.jsonl``; a resumed run's log is the log of an uninterrupted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from core.training_log import LOG_NAME, TrainingLog, read_training_log
from heads.stage_one.train import train_stage_one
from heads.stage_two.train import train_stage_two
from heads.training.common import cosine_with_warmup, warmup_steps
from helpers import TINY, make_split


def records(run_dir: Path, phase: str, kind: str) -> list[dict]:
    return [r for r in read_training_log(run_dir) if r["phase"] == phase and r["kind"] == kind]


def test_stage_one_logs_every_step_and_validation(tmp_path: Path) -> None:
    train, val = make_split("train", 40, 2, seed=0), make_split("val", 16, 1, seed=1)
    ckpt = train_stage_one(train, val, tmp_path / "s1", head="meanP", epochs=3, batch_size=16, lr=1e-2,
                           warmup=0.2, seed=0, progress=False)
    history = torch.load(ckpt, weights_only=True)["history"]["epochs"]
    steps = records(tmp_path / "s1", "stage_one", "step")
    per_epoch = history[0]["step"]
    total = 3 * per_epoch
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    # the learning rate each step used: warm-up then cosine, times the base lr
    warm = warmup_steps(0.2, total)
    assert [r["lr"] for r in steps] == pytest.approx([1e-2 * cosine_with_warmup(s, total, warm) for s in range(total)])
    for e, h in enumerate(history):  # the epoch means of the history are the means of the logged steps
        losses = [r["loss"] for r in steps if r["epoch"] == e]
        assert sum(losses) / len(losses) == pytest.approx(h["loss"], rel=1e-9)
    vals = records(tmp_path / "s1", "stage_one", "val")
    assert [v["step"] for v in vals] == [h["step"] for h in history]
    assert [v["metrics"] for v in vals] == [json.loads(json.dumps(h["val"])) for h in history]
    assert [v["score"] for v in vals] == pytest.approx([h["val_rsum"] for h in history])
    # training again from scratch replaces the phase's records rather than appending to them
    train_stage_one(train, val, tmp_path / "s1", head="meanP", epochs=3, batch_size=16, lr=1e-2, warmup=0.2,
                    seed=0, progress=False, reuse=False)
    assert len(records(tmp_path / "s1", "stage_one", "step")) == total


def test_stage_two_logs_both_phases_and_resume_does_not_repeat_steps(token_splits: dict, tmp_path: Path) -> None:
    w = token_splits
    kw = dict(head_config=TINY, epochs=2, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_candidates=4,
              num_threads=1, itc_steps=6, itc_batch=16, itc_cluster=2, itc_weight=1.0)
    straight = train_stage_two(w["train"], w["val"], w["stage_one"], tmp_path / "a", **kw)
    raw = torch.load(straight, weights_only=True)
    itc = records(tmp_path / "a", "itc", "step")
    itm = records(tmp_path / "a", "itm", "step")
    assert [r["step"] for r in itc] == list(range(1, 7))
    total = raw["history"]["total_steps"]
    assert [r["step"] for r in itm] == list(range(1, total + 1))
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 and 0 <= r["acc"] <= 1 for r in itc + itm)
    vals = records(tmp_path / "a", "itm", "val")
    assert [v["metrics"] for v in vals] == [e["val"] for e in raw["history"]["epochs"]]
    # stopped inside the contrastive phase, then inside the ITM epochs, then finished
    train_stage_two(w["train"], w["val"], w["stage_one"], tmp_path / "b", max_steps=4, **kw)
    assert [r["step"] for r in records(tmp_path / "b", "itc", "step")] == [1, 2, 3, 4]
    train_stage_two(w["train"], w["val"], w["stage_one"], tmp_path / "b", max_steps=6 + total - 1, **kw)
    # a crash after the last saved state wrote steps that the resumed run does again: they are dropped
    with TrainingLog(tmp_path / "b", "itm", total) as log:
        log.step(total, 99.0, 0.1)
    resumed = train_stage_two(w["train"], w["val"], w["stage_one"], tmp_path / "b", **kw)
    for key, value in raw["state_dict"].items():  # logging changes nothing in the weights
        assert torch.equal(value, torch.load(resumed, weights_only=True)["state_dict"][key]), key
    a, b = read_training_log(tmp_path / "a"), read_training_log(tmp_path / "b")
    key = lambda r: (r["phase"], r["kind"], r["step"])  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, b))
    by_key = {key(r): r for r in a}
    for r in b:
        assert r["loss" if r["kind"] == "step" else "score"] == pytest.approx(
            by_key[key(r)]["loss" if r["kind"] == "step" else "score"], rel=1e-6)


def test_the_log_changes_nothing_in_the_weights(token_splits: dict, tmp_path: Path, monkeypatch) -> None:
    """The same runs with a log that records nothing end with the same weights, bit for bit."""
    import heads.stage_one.train as s1_train
    import heads.stage_two.itc as itc_module
    import heads.stage_two.train as s2_train

    w = token_splits
    kw = dict(head_config=TINY, epochs=1, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_candidates=4,
              num_threads=1, itc_steps=4, itc_batch=16, itc_cluster=2, itc_weight=1.0)
    train, val = make_split("train", 40, 2, seed=0), make_split("val", 16, 1, seed=1)
    runs = {}
    for name in ("logged", "silent"):
        if name == "silent":
            class Silent:
                def __init__(self, *a, **k) -> None: ...
                def step(self, *a, **k) -> None: ...
                def validation(self, *a, **k) -> None: ...
                def close(self) -> None: ...
            for module in (s1_train, s2_train, itc_module):
                monkeypatch.setattr(module, "TrainingLog", Silent)
        one = train_stage_one(train, val, tmp_path / name / "s1", head="seqTransf", epochs=2, batch_size=16, seed=0,
                              progress=False)
        two = train_stage_two(w["train"], w["val"], w["stage_one"], tmp_path / name / "s2", **kw)
        runs[name] = [torch.load(p, weights_only=True)["state_dict"] for p in (one, two)]
    assert (tmp_path / "logged" / "s2" / LOG_NAME).is_file() and not (tmp_path / "silent" / "s2" / LOG_NAME).exists()
    for a, b in zip(runs["logged"], runs["silent"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_log_reader_and_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=LOG_NAME):
        read_training_log(tmp_path)
    with pytest.raises(ValueError, match="phase"):
        TrainingLog(tmp_path, "nope")
    with TrainingLog(tmp_path, "stage_one") as log:
        log.step(1, float("nan"), 0.1)
        log.validation(1, {"R@1": 50.0}, score=1.0, epoch=0)
    (tmp_path / LOG_NAME).open("a").write('{"phase": "stage_one", "kind": "st')  # torn by a crash
    recs = read_training_log(tmp_path / LOG_NAME)
    assert len(recs) == 2 and recs[0]["loss"] is None and recs[1]["metrics"] == {"R@1": 50.0}
