"""Contrastive (ITC) training of the CrossTVR head: batches, loss, the head's text-free / text-only
passes and ITM + ITC score, pre-training (learning, resume), and the trainer's ITC options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import RunMismatchError
from heads import create_head
from heads.stage_two.checkpoint import load_stage_two
from heads.stage_two.config import ITC_DEFAULTS, StageTwoTrainConfig
from heads.stage_two.itc import batch_itc_loss, itc_batch, itc_loss, pretrain_itc, supports_itc
from heads.stage_two.pairs import load_pairs
from heads.stage_two.scoring import score_pairs
from heads.stage_two.train import train_stage_two
from helpers import TINY, D, random_pair_inputs

ITC = {**TINY, "itc_dim": 16}


@pytest.fixture(scope="session")
def splits(token_splits: dict) -> dict:
    """Stage two's attribute splits with their stage one (``conftest.token_splits``)."""
    return token_splits


def test_itc_batch_random_and_clustered() -> None:
    cv = np.repeat(np.arange(20), 3)  # 3 captions per video
    rng = np.random.default_rng(0)
    captions, videos = itc_batch(cv, 20, 8, rng)
    assert len(set(videos.tolist())) == 8 and (cv[captions] == videos).all()
    # clusters: a caption's video first, then its listed neighbours not yet taken
    neighbours = np.stack([(cv + k) % 20 for k in (1, 2, 3, 4)], axis=1)  # caption -> next videos
    captions, videos = itc_batch(cv, 20, 8, np.random.default_rng(1), neighbours, cluster=4)
    assert len(set(videos.tolist())) == 8 and (cv[captions] == videos).all()
    first = videos[:4]
    assert (np.diff(first) % 20 == 1).all()  # seed video, then its 3 nearest (v+1, v+2, v+3)
    with pytest.raises(ValueError, match="no caption"):
        itc_batch(np.array([0, 0, 2]), 3, 3, np.random.default_rng(0))  # video 1 has no caption


def test_itc_loss_hand_values() -> None:
    b = 5
    assert float(itc_loss(torch.zeros(b, b))) == pytest.approx(math.log(b))
    assert float(itc_loss(100.0 * torch.eye(b))) == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(b, b)
    by_hand = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(b))
                     + torch.nn.functional.cross_entropy(logits.t(), torch.arange(b)))
    assert float(itc_loss(logits)) == pytest.approx(float(by_hand))


def test_text_free_and_text_only_passes() -> None:
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **ITC).eval()
    tokens, fm, text, tm = random_pair_inputs(3, 4, 5, D, D)
    with torch.no_grad():
        video = head.encode_video(tokens, fm)
        q = head.video_queries(video)
        assert q.shape == (3, TINY["num_queries"], TINY["width"])
        # the queries of a video do not depend on the other videos of the batch
        alone = head.video_queries(head.encode_video(tokens[1:2], fm[1:2]))
        torch.testing.assert_close(alone[0], q[1])
        t = head.text_features(text, tm)
        assert t.shape == (3, TINY["width"])
        # padding does not leak into the text feature
        text2 = text.clone()
        text2[1, 3:] = 99.0
        torch.testing.assert_close(head.text_features(text2, tm)[1], t[1])


def test_score_is_itm_log_odds_plus_itc_logit() -> None:
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **ITC).eval()
    tokens, fm, text, tm = random_pair_inputs(3, 4, 5, D, D)
    pv, pt = torch.tensor([0, 2, 1, 1]), torch.tensor([1, 1, 0, 2])
    with torch.no_grad():
        video = head.encode_video(tokens, fm)
        logits = head.match(text, tm, video, pt, pv)
        itc = head.itc_logits(head.video_queries(video), head.text_features(text, tm))  # (C, V)
        expected = logits[:, 1] - logits[:, 0] + itc[pt, pv]
        torch.testing.assert_close(head.pair_score(text, tm, tokens, fm, pt, pv), expected)
        parts = head.pair_score(text, tm, tokens, fm, pt, pv, parts=True)  # (ITM log-odds, ITC logit)
        torch.testing.assert_close(parts, torch.stack([logits[:, 1] - logits[:, 0], itc[pt, pv]], dim=1))
    # without a contrastive projection the score is the ITM log-odds, and old configs build that head
    plain = create_head("crosstvr", D, D, **TINY)
    assert "itc_dim" not in plain.config() and not supports_itc(plain)
    assert not any(n.startswith("itc_") for n, _ in plain.named_parameters())
    assert create_head(**head.config()).config()["itc_dim"] == 16 and supports_itc(head)


@pytest.mark.slow
def test_pretrain_itc_learns_and_resumes(splits: dict, tmp_path: Path) -> None:
    train = splits["train"]

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        head = create_head("crosstvr", D, D, **ITC)
        head.standardizer.fit(train)
        return head

    kw = dict(steps=40, batch_size=16, lr=3e-3, warmup=5, seed=3, save_every=10, progress=False,
              args={"run": 1})
    straight = fresh()
    done, history = pretrain_itc(straight, train, tmp_path / "a.pt", **kw)
    assert done and [h["step"] for h in history] == [10, 20, 30, 40]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]  # it learns to tell the videos apart
    assert history[-1]["acc"] > 0.3  # in-batch caption -> video accuracy (chance 1/16)
    # interrupted at step 17 (between saves), then continued: the same weights
    part = fresh()
    done, _ = pretrain_itc(part, train, tmp_path / "b.pt", max_steps=17, **kw)
    assert not done and torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 17
    resumed = fresh()
    done, _ = pretrain_itc(resumed, train, tmp_path / "b.pt", **kw)
    assert done
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished state is not trained again; other arguments are refused
    again = fresh()
    pretrain_itc(again, train, tmp_path / "a.pt", **kw)
    torch.testing.assert_close(again.state_dict()["queries"], straight.state_dict()["queries"])
    with pytest.raises(RunMismatchError, match="other arguments"):
        pretrain_itc(fresh(), train, tmp_path / "a.pt", **{**kw, "args": {"run": 2}})
    with pytest.raises(ValueError, match="contrastive projection"):
        pretrain_itc(create_head("crosstvr", D, D, **TINY), train, tmp_path / "c.pt", **kw)


def test_batch_itc_loss_matches_the_head_logits(splits: dict) -> None:
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **ITC)
    head.standardizer.fit(splits["train"])
    batch = load_pairs(splits["train"], np.array([10, 2, 18]), np.array([5, 1, 9]))
    loss, logits = batch_itc_loss(head, batch, batch.pair_text, batch.pair_video)
    assert logits.shape == (3, 3) and loss.item() == pytest.approx(itc_loss(logits).item())


def test_score_pairs_text_embeddings_once_per_caption(splits: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """score_pairs computes each caption's contrastive embedding once, and scores as pair_score does
    batch by batch (the caption embeddings are those of a batch's own text pass)."""
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **ITC).eval()
    head.standardizer.fit(splits["train"])
    rng = np.random.default_rng(3)
    vids = np.sort(rng.integers(0, splits["test"].tokens.shape[0], size=40))  # sorted by video, as rerank does
    caps = rng.integers(0, splits["test"].text_tokens.shape[0], size=40)
    expected = []
    with torch.no_grad():
        for sl in (slice(0, 16), slice(16, 32), slice(32, 40)):
            b = load_pairs(splits["test"], caps[sl], vids[sl])
            expected.append(head.pair_score(*b.pair_inputs()).numpy())
    calls = []
    original = head.itc_text_embed
    monkeypatch.setattr(head, "itc_text_embed", lambda t, m: calls.append(t.shape[0]) or original(t, m))
    got = score_pairs(head, splits["test"], caps, vids, batch=16)
    np.testing.assert_allclose(got, np.concatenate(expected), rtol=1e-4, atol=1e-4)
    assert sum(calls) == len(np.unique(caps))  # one text pass per distinct caption, not per batch
    parts = score_pairs(head, splits["test"], caps, vids, batch=16, parts=True)
    assert parts.shape == (40, 2)
    np.testing.assert_array_equal(parts[:, 0] + parts[:, 1], got)  # the same float32 sum
    b = load_pairs(splits["test"], caps[:4], vids[:4])
    with pytest.raises(ValueError, match="text_embed has shape"):
        head.pair_score(*b.pair_inputs(), text_embed=torch.zeros(1, 3))


def test_trainer_with_itc(splits: dict, tmp_path: Path) -> None:
    kw = dict(head_config=TINY, epochs=2, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16,
              val_candidates=4, num_threads=1)
    ckpt = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "itc", itc_steps=12,
                           itc_batch=16, itc_cluster=4, itc_weight=1.0, **kw)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["config"]["itc_dim"] == 128  # default projection width
    assert raw["train_args"]["itc_steps"] == 12 and raw["train_args"]["itc_weight"] == 1.0
    assert raw["history"]["itc_steps"] == 12 and raw["history"]["itc"][-1]["step"] == 12
    assert (tmp_path / "itc" / "itc_state.pt").is_file()
    head = load_stage_two(ckpt).head
    s = score_pairs(head, splits["test"], np.arange(8), np.arange(8))
    assert s.shape == (8,) and np.isfinite(s).all()
    # val logs the ITM log-odds' accuracy apart from the whole score's (ITM + ITC)
    val = raw["history"]["epochs"][-1]["val"]
    assert {"itm_acc_balanced", "score_acc_balanced"} <= set(val)
    # the contrastive term is really added to the ITM loss
    itm_only = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "plain",
                               itc_steps=12, itc_batch=16, itc_cluster=4, itc_weight=0.0, **kw)
    la = [e["loss"] for e in raw["history"]["epochs"]]
    lb = [e["loss"] for e in torch.load(itm_only, weights_only=True)["history"]["epochs"]]
    assert la != pytest.approx(lb)
    # stopped inside the contrastive phase, then finished: the result of an uninterrupted run
    stopped = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "resume",
                              itc_steps=12, itc_batch=16, itc_cluster=4, itc_weight=1.0, max_steps=7, **kw)
    assert not torch.load(stopped, weights_only=True)["history"]["finished"]
    assert not (tmp_path / "resume" / "train_state.pt").exists()
    resumed = torch.load(train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "resume",
                                         itc_steps=12, itc_batch=16, itc_cluster=4, itc_weight=1.0, **kw),
                         weights_only=True)
    for key, value in raw["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # other contrastive arguments on the same run directory are refused; fresh starts again
    with pytest.raises(RunMismatchError):
        train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "resume",
                        itc_steps=12, itc_batch=8, itc_cluster=4, itc_weight=1.0, **kw)
    with pytest.raises(ValueError, match="needs a head with learnable queries \\(crosstvr\\), not 't2v2t'"):
        train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "t2v2t", head="t2v2t",
                        head_config={"width": 32, "layers": 1, "heads": 2}, itc_steps=4, progress=False)
    history = json.loads((tmp_path / "itc" / "history.json").read_text())
    assert history["itc"] and history["finished"]
    # defaults: contrastive training for crosstvr, none for t2v2t
    def resolved(head: str, steps, weight) -> tuple:
        cfg = StageTwoTrainConfig(head=head, itc_steps=steps, itc_weight=weight).resolved()
        return cfg.itc_steps, cfg.itc_weight

    assert resolved("crosstvr", None, None) == (ITC_DEFAULTS["itc_steps"], ITC_DEFAULTS["itc_weight"])
    assert resolved("t2v2t", None, None) == (0, 0.0)
    assert resolved("crosstvr", 0, 0.0) == (0, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        resolved("crosstvr", -1, None)


def test_score_pairs_sends_each_video_once_for_caption_by_caption_pairs(splits: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation and re-ranking list pairs caption by caption (each caption's K candidates), so a
    video recurs across batches; score_pairs groups them by video, loads each video's tokens about
    once, and returns the scores in the pairs' own order."""
    import heads.stage_two.scoring as scoring

    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **ITC).eval()
    head.standardizer.fit(splits["train"])
    num_v, num_c = splits["test"].tokens.shape[0], splits["test"].text_tokens.shape[0]
    rng = np.random.default_rng(5)
    queries = rng.choice(num_c, size=12, replace=False)
    top = np.stack([rng.choice(num_v, size=6, replace=False) for _ in queries])
    caps, vids = np.repeat(queries, top.shape[1]), top.reshape(-1)
    with torch.no_grad():
        b = load_pairs(splits["test"], caps, vids)
        alone = head.pair_score(*b.pair_inputs()).numpy()  # one batch: every pair scored at once
    sent = []
    original = scoring.load_pairs
    monkeypatch.setattr(scoring, "load_pairs",
                        lambda split, c, v, **kw: sent.append(len(np.unique(v))) or original(split, c, v, **kw))
    got = score_pairs(head, splits["test"], caps, vids, batch=8)
    np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-4)
    distinct = len(np.unique(vids))
    assert sum(sent) <= distinct + len(sent) - 1  # a video is split across two batches at most once
