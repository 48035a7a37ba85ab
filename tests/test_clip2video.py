"""CLIP2Video stage-one head: TDB + TAB, masks, gradients, explicit similarity, training, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import cli
from core.split import StagedSplit
from heads import create_head
from heads.evaluation.similarity import evaluate, similarity, untrained_baseline
from heads.stage_one.checkpoint import load_stage_one
from heads.stage_one.clip2video import CLIP2Video
from heads.stage_one.losses import symmetric_infonce
from heads.stage_one.models import MeanP
from heads.stage_one.train import train_stage_one
from heads.training.data import EpochSampler, iterate_batches
from helpers import E, T, make_split, run_cli

DT, L = 24, 8  # text token width (differs from E on purpose) and words per caption
SMALL = {"width": 16, "tab_dim": 16, "num_heads": 4}


def _head(seed: int = 0, open_residual: bool = True, **cfg) -> CLIP2Video:
    torch.manual_seed(seed)
    head = create_head("clip2video", E, text_dim=DT, **{**SMALL, **cfg})
    if open_residual:  # leave the meanP initialisation so every block influences the output
        with torch.no_grad():
            head.out.weight.normal_(0, 0.2)
            head.out.bias.normal_(0, 0.05)
    return head.eval()


def _inputs(b: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, T, E, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([T, 1, 3, T - 1, 2][:b])[:, None]
    text = torch.randn(b, E, generator=g)
    words = torch.randn(b, L, DT, generator=g)
    wmask = torch.arange(L)[None, :] < torch.tensor([L, 1, 4, 2, 6][:b])[:, None]
    return frames, mask, text, words, wmask


# -- structure -------------------------------------------------------------------------------
def test_shapes_unit_norm_and_meanp_start() -> None:
    head = _head(open_residual=False, num_centers=3)
    frames, mask, text, words, wmask = _inputs()
    v, t = head.encode_video(frames, mask), head.encode_text(text, words, wmask)
    assert head.output_dim == E + 3 * 16
    assert v.shape == (5, head.output_dim) and t.shape == (5, head.output_dim)
    assert torch.allclose(v.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(5), atol=1e-5)
    global_v, aligned_v = head.video_parts(frames, mask)
    assert aligned_v.shape == (5, 3 * 16)
    # zero-initialised residual: the global video embedding is exactly meanP at the start
    torch.testing.assert_close(global_v, MeanP(E).encode_video(frames, mask), atol=1e-6, rtol=0)
    assert head(text, frames, mask, text_tokens=words, text_mask=wmask).shape == (5, 5)
    one = head.encode_video(frames[:, :1], torch.ones(5, 1, dtype=torch.bool))  # a single frame: no difference
    assert torch.isfinite(one).all()


def test_tdb_interleaves_frames_and_differences() -> None:
    head = _head()
    frames, mask, *_ = _inputs()
    seen = {}
    head.transformer.register_forward_pre_hook(lambda mod, args, kw: seen.update(seq=args[0], pad=kw["src_key_padding_mask"]),
                                               with_kwargs=True)
    head.encode_video(frames, mask)
    seq, pad = seen["seq"], seen["pad"]
    assert seq.shape == (5, 2 * T - 1, 16)
    clean = F.normalize(torch.where(mask[..., None], frames, torch.zeros(())), dim=-1)
    frame_slots = head.inp(clean) + head.pos_emb[0: 2 * T - 1: 2] + head.type_emb[0]
    torch.testing.assert_close(seq[:, 0::2], frame_slots)
    diff = seq[:, 1::2] - head.pos_emb[1: 2 * T - 1: 2] - head.type_emb[1]
    assert diff.abs().max() < 1.0  # 2 * sigmoid(x) - 1 lies in (-1, 1)
    # slot validity: frame t valid; difference (t, t+1) valid only when both frames are
    assert pad[1].tolist() == [False] + [True] * (2 * T - 2)  # one-frame video
    assert pad[2].tolist() == [False] * 5 + [True] * (2 * T - 6)  # f1 d12 f2 d23 f3 | padding


def test_padded_frames_and_words_change_nothing() -> None:
    head = _head()
    frames, mask, text, words, wmask = _inputs()
    v, t = head.encode_video(frames, mask), head.encode_text(text, words, wmask)
    garbage = frames.clone()
    garbage[~mask] = torch.where(torch.rand_like(garbage[~mask]) < 0.5, 1e4, float("nan"))
    longer = torch.cat([garbage, torch.randn(5, 3, E)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(5, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(head.encode_video(garbage, mask), v, atol=1e-5, rtol=0)
    torch.testing.assert_close(head.encode_video(longer, longer_mask), v, atol=1e-5, rtol=0)
    bad_words = words.clone()
    bad_words[~wmask] = float("nan")
    more_words = torch.cat([bad_words, 1e3 * torch.randn(5, 4, DT)], dim=1)
    more_mask = torch.cat([wmask, torch.zeros(5, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(head.encode_text(text, bad_words, wmask), t, atol=1e-5, rtol=0)
    torch.testing.assert_close(head.encode_text(text, more_words, more_mask), t, atol=1e-5, rtol=0)
    # but a *valid* frame or word does matter
    moved = frames.clone()
    moved[0, 0] += 1.0
    assert (head.encode_video(moved, mask)[0] - v[0]).abs().max() > 1e-4
    other = words.clone()
    other[0, 0] += 1.0
    assert (head.encode_text(text, other, wmask)[0] - t[0]).abs().max() > 1e-4
    # no valid frame / word: finite, aligned part zero
    empty_v = head.encode_video(frames, torch.zeros_like(mask))
    empty_t = head.encode_text(text, words, torch.zeros_like(wmask))
    assert torch.isfinite(empty_v).all() and torch.isfinite(empty_t).all()
    assert empty_t[:, E:].abs().max() == 0


def test_gradients_reach_tdb_and_tab() -> None:
    head = _head().train()
    frames, mask, text, words, wmask = _inputs()
    loss = symmetric_infonce(head(text, frames, mask, text_tokens=words, text_mask=wmask), torch.eye(5, dtype=torch.bool))
    loss.backward()
    groups = {
        "TDB": ["inp.weight", "diff_pos_emb", "diff_transformer.layers.0.self_attn.in_proj_weight",
                "pos_emb", "type_emb", "transformer.layers.0.linear1.weight", "out.weight"],
        "TAB": ["frame_to_tab.weight", "word_to_tab.weight", "assign.weight", "centers"],
        "text/scale": ["text_proj.weight", "logit_scale"],
    }
    params = dict(head.named_parameters())
    for names in groups.values():
        for name in names:
            grad = params[name].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def _explicit_aligned(tokens: torch.Tensor, valid: torch.Tensor, head: CLIP2Video) -> torch.Tensor:
    """One sample's VLAD vector, written out with loops."""
    parts = []
    for k in range(head.num_centers):
        acc = torch.zeros(head.tab_dim)
        for n in range(tokens.shape[0]):
            if valid[n]:
                a = torch.softmax(head.assign(tokens[n]), dim=-1)[k]
                acc = acc + a * (tokens[n] - head.centers[k])
        parts.append(acc / acc.norm())
    flat = torch.cat(parts)
    return flat / flat.norm()


@torch.no_grad()
def test_similarity_is_weighted_global_plus_aligned() -> None:
    w = 0.3
    head = _head(weight=w, num_centers=4)
    frames, mask, text, words, wmask = _inputs()
    enhanced = head.enhanced_frames(frames, mask)
    expected = torch.zeros(5, 5)
    for i in range(5):
        g_t = F.normalize(head.text_proj(F.normalize(text[i], dim=-1)), dim=-1)
        tok_t = F.normalize(head.word_to_tab(F.normalize(words[i], dim=-1)), dim=-1)
        a_t = _explicit_aligned(tok_t, wmask[i], head)
        for j in range(5):
            g_v = enhanced[j][mask[j]].mean(dim=0)
            g_v = g_v / g_v.norm()
            a_v = _explicit_aligned(F.normalize(head.frame_to_tab(enhanced[j]), dim=-1), mask[j], head)
            expected[i, j] = w * torch.dot(g_t, g_v) + (1 - w) * torch.dot(a_t, a_v)
    got = head(text, frames, mask, text_tokens=words, text_mask=wmask) / head.scale()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    split = StagedSplit(split="val", video_ids=[f"v{i}" for i in range(5)], caption_ids=[f"c{i}" for i in range(5)],
                        caption_video=np.arange(5), frame_emb=frames.numpy(), frame_mask=mask.numpy(),
                        text_emb=text.numpy(), text_tokens=words.numpy(), text_mask=wmask.numpy())
    np.testing.assert_allclose(similarity(head, split, batch=2), expected.numpy(), atol=1e-5)


def test_clear_errors() -> None:
    head = _head()
    frames, mask, text, words, wmask = _inputs()
    with pytest.raises(ValueError, match="needs the text word tokens"):
        head.encode_text(text)
    with pytest.raises(ValueError, match="text_dim=24"):
        head.encode_text(text, torch.randn(5, L, 7), wmask)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['centers'\].*num_centers"):
        create_head("clip2video", E, centers=3)
    no_words = make_split("val", 10, 1, seed=9)
    with pytest.raises(ValueError, match="has no text_tokens"):
        similarity(head, no_words)
    with pytest.raises(ValueError, match="has no text_tokens"):
        train_stage_one(make_split("train", 10, 1, seed=8), None, head="clip2video", epochs=1, progress=False)


# -- training on the toy problem -----------------------------------------------------------
def with_words(split: StagedSplit, seed: int) -> StagedSplit:
    """Give a toy split word tokens (float16, like the store) that carry the caption's content."""
    rng = np.random.default_rng(seed)
    text = np.asarray(split.text_emb, dtype=np.float64)
    c = text.shape[0]
    mix = np.random.default_rng(77).normal(size=(E, DT)) / math.sqrt(E)  # same map in every split
    words = text[:, None, :] @ mix + 0.3 * rng.normal(size=(c, L, DT))
    mask = np.arange(L)[None, :] < rng.integers(2, L + 1, size=c)[:, None]
    words[~mask] = 50 * rng.normal(size=(int((~mask).sum()), DT))  # garbage in padding
    split.text_tokens, split.text_mask = words.astype(np.float16), mask
    return split


@pytest.fixture(scope="module")
def toy() -> dict[str, StagedSplit]:
    return {"train": with_words(make_split("train", 300, 2, seed=1), 11),
            "val": with_words(make_split("val", 80, 1, seed=2), 12),
            "test": with_words(make_split("test", 80, 2, seed=3), 13)}


@pytest.fixture(scope="module")
def trained(toy: dict[str, StagedSplit], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_stage_one(toy["train"], toy["val"], head="clip2video", out_dir=tmp_path_factory.mktemp("c2v"),
                           epochs=6, batch_size=64, lr=5e-3, weight_decay=0.01, seed=0, progress=False,
                           num_threads=1, head_config={**SMALL, "num_centers": 3})


def test_batches_carry_word_tokens(toy: dict[str, StagedSplit]) -> None:
    train = toy["train"]
    plan = EpochSampler(train.caption_video, len(train.video_ids), 16, seed=0).epoch(0)[:2]
    plain = list(iterate_batches(train, plan, prefetch=0))
    assert plain[0].text_tokens is None and plain[0].text_kwargs() == {}
    for b in iterate_batches(train, plan, prefetch=1, text_tokens=True):
        c = b.caption_index.numpy()
        assert b.text_tokens.dtype == torch.float32 and b.text_mask.dtype == torch.bool
        assert np.array_equal(b.text_tokens.numpy(), train.text_tokens[c].astype(np.float32))
        assert np.array_equal(b.text_mask.numpy(), train.text_mask[c])
        assert set(b.to("cpu").text_kwargs()) == {"text_tokens", "text_mask"}


def test_trains_beats_baseline_and_round_trips(trained: Path, toy: dict[str, StagedSplit]) -> None:
    history = json.loads((trained.parent / "history.json").read_text())
    losses = [e["loss"] for e in history["epochs"]]
    assert losses[-1] < 0.6 * losses[0]
    raw = torch.load(trained, weights_only=True)
    assert raw["config"]["name"] == "clip2video" and raw["config"]["text_dim"] == DT
    assert raw["config"]["num_centers"] == 3
    assert raw["state_dict"]["out.weight"].abs().sum() > 0  # left the meanP start
    test = toy["test"]
    base = evaluate(untrained_baseline(E), test)
    head = load_stage_one(trained).head
    ours = evaluate(head, test)
    print("toy test R@1 t2v/v2t: untrained", base["t2v"]["R@1"], base["v2t"]["R@1"],
          "clip2video", ours["t2v"]["R@1"], ours["v2t"]["R@1"])
    assert ours["t2v"]["R@1"] > base["t2v"]["R@1"] + 30
    assert ours["v2t"]["R@1"] > base["v2t"]["R@1"] + 30
    a = similarity(head, test)
    assert a.shape == (160, 80)
    assert np.array_equal(a, similarity(load_stage_one(trained.parent).head, test))
    np.testing.assert_allclose(similarity(head, test, batch=7), a, atol=1e-5)


# -- command line ----------------------------------------------------------------------------
def test_cli_train_eval_and_compare(tiny_world: dict, tmp_path: Path) -> None:
    work, store = tiny_world["work"], tiny_world["store"]
    run = tmp_path / "run"
    run_cli(["train-stage-one", "--store", str(store), "--work-dir", str(work), "--head", "clip2video",
          "--head-option", "num_centers=3", "--head-option", "width=32", "--epochs", "2", "--batch-size", "8",
          "--out", str(run)])
    ckpt = torch.load(run / "stage_one.pt", weights_only=True)
    assert ckpt["config"]["name"] == "clip2video" and ckpt["config"]["num_centers"] == 3
    assert ckpt["config"]["width"] == 32
    out = run_cli(["eval", "--store", str(store), "--work-dir", str(work), "--stage-one", str(run / "stage_one.pt"),
                "--out", str(tmp_path / "report")])
    assert "R@1" in out
    # the comparison finds the work dir's synthetic store by itself
    cmp_dir = tmp_path / "compare"
    out = run_cli(["compare-stage-one", "--work-dir", str(work), "--heads", "meanP,clip2video",
                "--head-option", "clip2video:num_centers=2", "--epochs", "1", "--batch-size", "8",
                "--threads", "1", "--out", str(cmp_dir)])
    report = json.loads((cmp_dir / "compare-stage-one.json").read_text())
    assert report.pop("split")["complete"] is True
    assert list(report) == ["meanP (untrained)", "meanP (trained)", "clip2video (trained)"]
    for metrics in report.values():
        assert set(metrics["t2v"]) >= {"R@1", "R@5", "R@10", "MdR", "MnR"}
    runs = json.loads((cmp_dir / "compare-stage-one.runs.json").read_text())
    assert runs["heads"]["clip2video"]["config"]["num_centers"] == 2
    assert "clip2video (trained) t2v" in out and (cmp_dir / "compare-stage-one.txt").is_file()
    result = CliRunner().invoke(cli.main, ["compare-stage-one", "--work-dir", str(work), "--heads", "meanP,xpool"])
    assert result.exit_code != 0 and "xpool" in result.output
