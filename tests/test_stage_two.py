"""Stage-two heads and their trainer: selector, sharing, widths, hard negatives, ITM training,
resume, identity checks, test-split refusal, and the ``train-head`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError, ForbiddenSplitError, StoreMismatchError
from heads import create_head
from heads.evaluation.similarity import encode_videos, similarity
from heads.stage_one.checkpoint import load_stage_one
from heads.stage_two.checkpoint import load_stage_two, stage_one_identity
from heads.stage_two.layers import QFormer
from heads.stage_two.negatives import (HardNegativeSampler, MixedNegatives, VideoNeighbourSimilarity, hard_fraction,
                                      video_sampler)
from heads.stage_two.pairs import load_pairs
from heads.stage_two.scoring import score_pairs
from heads.stage_two.config import StageTwoTrainConfig
from heads.stage_two.train import StageOneCosine, hard_negatives, rank_loss, train_stage_two
from helpers import ITM_ONLY, TINY, D, L, N, make_token_split, random_pair_inputs, run_cli
from helpers import T2 as T
from helpers import TOKEN_IDENTITY as IDENTITY

TOY_EPOCHS = 60  # ~5 s on 2 cores; 8-30 epochs stay near the class-prior loss (measured)


@pytest.fixture(scope="session")
def splits(token_splits: dict) -> dict:
    """Stage two's attribute splits with their stage one (``conftest.token_splits``)."""
    return token_splits


def logits_of(head, tokens, fm, text, tm) -> torch.Tensor:
    """Match logits (B, 2) of B aligned (video, caption) pairs."""
    ar = torch.arange(tokens.shape[0])
    return head.match(text, tm, head.encode_video(tokens, fm), ar, ar)


def score_of(head, tokens, fm, text, tm) -> torch.Tensor:
    """Head score (B,) of B aligned (video, caption) pairs."""
    ar = torch.arange(tokens.shape[0])
    return head.pair_score(text, tm, tokens, fm, ar, ar)


# -- the head ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_cls", [True, False])
def test_selector_keeps_m_tokens_per_frame(keep_cls: bool) -> None:
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **{**TINY, "num_selected": 3, "keep_cls": keep_cls})
    vis = torch.randn(2, T, N, 32)
    selected, index = head.select_tokens(vis)
    assert selected.shape == (2, T, 3, 32) and index.shape == (2, T, 3)
    for b in range(2):
        for t in range(T):
            assert len(set(index[b, t].tolist())) == 3  # three distinct tokens of this frame
    if keep_cls:
        assert (index[..., 0] == 0).all()
    expected = vis.gather(2, index[..., None].expand(-1, -1, -1, 32))
    torch.testing.assert_close(selected, expected)  # the forward pass uses the exact tokens


def test_spatial_frame_pos_makes_the_spatial_pass_see_frame_order() -> None:
    """The spatial pass averages its frames' query outputs, so without frame positions reversing the
    frames changes nothing; with ``spatial_frame_pos`` it does. Saved configs without the option
    build the same head as before."""
    torch.manual_seed(0)
    tokens, fm, _, _ = random_pair_inputs(2, T, N, D, D)
    for on in (False, True):
        torch.manual_seed(1)
        head = create_head("crosstvr", D, D, **{**TINY, "mode": "spatial", "spatial_frames": None,
                                                "spatial_frame_pos": on})
        head.eval()
        ones = torch.ones_like(fm)
        with torch.no_grad():
            a = head.video_queries(head.encode_video(tokens, ones))
            b = head.video_queries(head.encode_video(tokens.flip(1), ones))
        assert torch.allclose(a, b, atol=1e-5) is (not on)
        assert ("spatial_frame_pos" in head.config()) is on
    assert not hasattr(create_head("crosstvr", D, D, **{**TINY, "mode": "spatial"}), "frame_pos")


def test_frame_diff_keys_carry_what_changed() -> None:
    """With ``frame_diff`` k the temporal pass reads, per frame, the selected tokens and the same
    tokens minus their value k frames before: two still videos of different content get the same
    difference keys, a frame with no valid frame k before it gets none, and a moving one differs."""
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **{**TINY, "mode": "temporal", "num_selected": N, "frame_diff": 2,
                                            "token_pos": True})
    head.eval()
    still = torch.randn(2, 1, N, D).expand(-1, T, -1, -1).contiguous()  # two videos, each one still frame
    fm = torch.ones(2, T, dtype=torch.bool)
    fm[1, T - 1:] = False
    with torch.no_grad():
        video = head.encode_video(still, fm)
    keys = video["keys"].view(2, T, 2 * N, -1)
    valid = video["key_valid"].view(2, T, 2 * N)
    assert valid[:, :, :N].tolist() == fm[:, :, None].expand(-1, -1, N).tolist()
    assert not valid[:, :2, N:].any() and valid[0, 2:, N:].all() and not valid[1, T - 1, N:].any()
    def by_position(k: torch.Tensor) -> torch.Tensor:  # the selector orders tokens by its score: sort them
        return k.gather(-2, k[..., :1].argsort(dim=-2).expand_as(k))

    # nothing changed in either video: their difference keys are the same set (positions and embeddings)
    torch.testing.assert_close(by_position(keys[0, 2:3, N:]), by_position(keys[1, 2:3, N:]))
    assert not torch.allclose(keys[0, 2:, :N], keys[1, 2:, :N])           # though their content differs
    moving = still.clone()
    moving[0, 3:] += torch.randn(N, D)
    with torch.no_grad():
        moved = head.encode_video(moving, fm)["keys"].view(2, T, 2 * N, -1)
    assert not torch.allclose(moved[0, 3:5, N:], keys[0, 3:5, N:])


def test_gradients_reach_the_selector() -> None:
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D, **{**TINY, "mode": "temporal"})
    logits = logits_of(head, *random_pair_inputs(3, T, N, D, D))
    logits[:, 1].sum().backward()
    grads = [p.grad for p in head.selector.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_shared_mode_shares_parameters() -> None:
    shared = create_head("crosstvr", D, D, **{**TINY, "shared": True})
    unshared = create_head("crosstvr", D, D, **{**TINY, "shared": False})
    assert shared.temporal_block is shared.block
    for a, b in zip(shared.block.parameters(), shared.temporal_block.parameters()):
        assert a is b
    assert unshared.temporal_block is not unshared.block
    spatial_ids = {id(p) for p in unshared.block.parameters()}
    assert not spatial_ids & {id(p) for p in unshared.temporal_block.parameters()}
    block_params = sum(p.numel() for p in shared.block.parameters())
    assert unshared.num_parameters() == shared.num_parameters() + block_params


@pytest.mark.parametrize("name,cfg", [("crosstvr", {"mode": "spatial"}), ("crosstvr", {"mode": "temporal"}),
                                      ("crosstvr", {"mode": "both"}), ("crosstvr", {"shared": False}),
                                      ("t2v2t", {})])
def test_every_variant_runs_and_learns_a_step(name: str, cfg: dict) -> None:
    torch.manual_seed(0)
    tiny = {k: v for k, v in TINY.items() if name == "crosstvr" or k in ("width", "layers", "heads",
                                                                          "spatial_frames", "ff_mult")}
    head = create_head(name, D, D, **tiny, **cfg)
    inputs = random_pair_inputs(3, T, N, D, D)
    logits = logits_of(head, *inputs)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    assert score_of(head, *inputs).shape == (3,)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1])).backward()
    assert head.fc.weight.grad is not None
    again = create_head(**head.config())
    assert again.config() == head.config()


@pytest.mark.parametrize("token_dim,text_dim", [(768, 512), (1408, 768)])
@pytest.mark.parametrize("name", ["crosstvr", "t2v2t"])
def test_encoder_widths(name: str, token_dim: int, text_dim: int) -> None:
    """ViT-B/32 (768-d tokens, 512-d text) and EVA ViT-g/14 (1408-d tokens, 768-d text) shapes."""
    torch.manual_seed(0)
    head = create_head(name, token_dim, text_dim, width=64, layers=1, heads=2)
    with torch.no_grad():
        logits = logits_of(head, *random_pair_inputs(2, 3, 10, token_dim, text_dim))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# -- hard negatives ------------------------------------------------------------------------------
def test_hard_negatives_exclude_positives_and_follow_the_softmax() -> None:
    rng = np.random.default_rng(0)
    cv = np.array([0, 0, 1, 2, 2, 2, 3, 4])  # several captions per video
    sim = rng.uniform(-1, 1, size=(cv.size, 5)).astype(np.float32)
    tau = 0.5
    sampler = HardNegativeSampler(sim, cv, temperature=tau, pool=None)
    draws = 40000
    captions = np.full(draws, 3)
    got = sampler.negative_videos(captions, np.random.default_rng(1))
    assert not (got == cv[3]).any()
    logits = sim[3] / tau
    logits[cv[3]] = -np.inf
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    freq = np.bincount(got, minlength=5) / draws
    np.testing.assert_allclose(freq, expected, atol=0.01)
    # one negative caption per video: never any caption of the same video
    videos = np.full(draws, 2)
    got_t = sampler.negative_texts(videos, np.random.default_rng(2))
    assert not np.isin(got_t, np.flatnonzero(cv == 2)).any()
    col = sim[:, 2] / tau
    col[cv == 2] = -np.inf
    expected_t = np.exp(col - col.max())
    expected_t /= expected_t.sum()
    np.testing.assert_allclose(np.bincount(got_t, minlength=cv.size) / draws, expected_t, atol=0.01)
    # every row, many draws, a restricted pool: still never a positive, always inside the pool
    small = HardNegativeSampler(sim, cv, temperature=0.05, pool=2)
    rows = np.repeat(np.arange(cv.size), 200)
    v = small.negative_videos(rows, np.random.default_rng(3))
    assert not (v == cv[rows]).any()
    assert all(v[i] in small.text_cand[rows[i]] for i in range(0, rows.size, 37))
    t = small.negative_texts(np.repeat(np.arange(5), 200), np.random.default_rng(4))
    assert not (cv[t] == np.repeat(np.arange(5), 200)).any()


def test_video_neighbour_negatives_are_the_videos_nearest_to_the_positive() -> None:
    rng = np.random.default_rng(0)
    # five pairs of near-duplicate videos (one embedding plus a little noise each), 1-3 captions each
    base = rng.normal(size=(5, 16))
    emb = np.repeat(base, 2, axis=0) + 0.01 * rng.normal(size=(10, 16))
    cv = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 9])
    sim = VideoNeighbourSimilarity(emb, cv)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(sim[2:5], unit[cv[2:5]] @ unit.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sim[:, 3:6], (unit[cv] @ unit.T)[:, 3:6], rtol=1e-5, atol=1e-6)
    assert sim.shape == (cv.size, 10)
    twin = np.arange(10) ^ 1  # each video's near-duplicate
    sampler = video_sampler(emb, cv, temperature=0.05, pool=1)
    rows = np.repeat(np.arange(cv.size), 50)
    np.testing.assert_array_equal(sampler.negative_videos(rows, np.random.default_rng(1)), twin[cv[rows]])
    videos = np.repeat(np.arange(10), 50)
    got = sampler.negative_texts(videos, np.random.default_rng(2))
    # a caption of the twin, never one of the video itself, and every caption of the twin is drawn
    np.testing.assert_array_equal(cv[got], twin[videos])
    assert set(got[videos == 3].tolist()) == set(np.flatnonzero(cv == 2).tolist())
    # mixed: about half of the draws from each source
    other = HardNegativeSampler(rng.uniform(-1, 1, size=(cv.size, 10)), cv, temperature=0.05, pool=None)
    mixed = MixedNegatives(other, sampler)
    draws = mixed.negative_videos(np.zeros(4000, dtype=np.int64), np.random.default_rng(3))
    assert 0.4 < (draws == 1).mean() < 0.7 and not (draws == 0).any()
    assert mixed.text_cand is sampler.text_cand


def test_hard_negatives_follow_neg_source(splits: dict) -> None:
    head = load_stage_one(splits["stage_one"]).head
    train = splits["train"]
    cfg = StageTwoTrainConfig()
    text = hard_negatives(head, train, cfg)
    assert isinstance(text, HardNegativeSampler) and text.text_cand.shape[1] == min(128, len(train.video_ids) - 1)
    video = hard_negatives(head, train, StageTwoTrainConfig(neg_source="video", neg_video_pool=3))
    assert video.text_cand.shape[1] == 3
    # the video source's candidates are the nearest videos of the caption's own video
    with torch.no_grad():
        emb = torch.nn.functional.normalize(encode_videos(head, train), dim=-1).numpy()
    cv = np.asarray(train.caption_video)
    vv = emb[cv[:20]] @ emb.T
    vv[np.arange(20), cv[:20]] = -np.inf
    np.testing.assert_array_equal(np.sort(video.text_cand[:20], axis=1), np.sort(np.argsort(-vv, axis=1)[:, :3], axis=1))
    assert isinstance(hard_negatives(head, train, StageTwoTrainConfig(neg_source="mixed")), MixedNegatives)
    with pytest.raises(ConfigError, match="neg_source must be one of"):
        StageTwoTrainConfig(neg_source="audio").resolved()
    # a stage one whose video embedding depends on the caption has no video-to-video similarity
    aligned = type("Aligned", (), {"name": "clip2video", "training": False})()
    with pytest.raises(ConfigError, match="neg_source=video needs .* clip2video has text-token alignment"):
        hard_negatives(aligned, train, StageTwoTrainConfig(neg_source="video"))


def test_training_with_mixed_negatives_and_neighbour_batches(splits: dict, tmp_path: Path) -> None:
    """--neg-source mixed wired through both phases: its video-to-video neighbours build the
    contrastive clusters, its draws the ITM negatives; the run records the source and differs from the
    same run on caption-to-video negatives."""
    common = dict(head_config=TINY, epochs=1, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16,
                  val_candidates=4, num_threads=1, hard_negatives="hard", itc_steps=2, itc_batch=8, itc_cluster=2,
                  itc_weight=1.0)
    mixed = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "mixed",
                            neg_source="mixed", neg_video_pool=2, **common)
    text = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "text", **common)
    a, b = (torch.load(p, weights_only=True) for p in (mixed, text))
    assert a["train_args"]["neg_source"] == "mixed" and a["train_args"]["neg_video_pool"] == 2
    assert b["train_args"]["neg_source"] == "text"
    assert [e["loss"] for e in a["history"]["epochs"]] != pytest.approx([e["loss"] for e in b["history"]["epochs"]])


def test_rank_loss_orders_positives_above_their_negatives() -> None:
    # layout [positives; (caption, negative video); (negative caption, video)], b = 2
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, -1.0, 0.5])
    cosine = torch.tensor([0.5, 0.2, 0.4, 0.1, 0.0, 0.2])
    r = scores + cosine
    expect = 0.5 * (torch.nn.functional.softplus(r[2:4] - r[:2]).mean()
                    + torch.nn.functional.softplus(r[4:] - r[:2]).mean())
    assert float(rank_loss(scores, cosine)) == pytest.approx(float(expect))
    # a common shift of every score (e.g. towards the class prior) changes nothing ...
    assert float(rank_loss(scores - 3.0, cosine)) == pytest.approx(float(expect))
    # ... only the order does: a wide margin for the positives drives it to zero
    wide = torch.tensor([20.0, 20.0, 0.0, 0.0, 0.0, 0.0])
    assert float(rank_loss(wide, cosine)) < 1e-6
    assert float(rank_loss(-wide, cosine)) > 19.0


def test_stage_one_cosine_matches_the_similarity_matrix(splits: dict) -> None:
    head = load_stage_one(splits["stage_one"]).head
    sim = similarity(head, splits["train"])
    cos = StageOneCosine(head, splits["train"])
    caps, vids = np.array([0, 5, 17, 100]), np.array([3, 5, 90, 0])
    np.testing.assert_allclose(cos(caps, vids).numpy(), sim[caps, vids], rtol=1e-5, atol=1e-6)


def test_anneal_schedule() -> None:
    assert hard_fraction("random", 50, 100, 0.5) == 0.0 and hard_fraction("hard", 0, 100, 0.5) == 1.0
    assert hard_fraction("anneal", 0, 100, 0.5) == 0.0
    assert hard_fraction("anneal", 25, 100, 0.5) == pytest.approx(0.5)
    assert hard_fraction("anneal", 80, 100, 0.5) == 1.0
    # a random-only phase first, then the rise
    assert hard_fraction("anneal", 39, 100, 0.3, start=0.4) == 0.0
    assert hard_fraction("anneal", 55, 100, 0.3, start=0.4) == pytest.approx(0.5)
    assert hard_fraction("anneal", 70, 100, 0.3, start=0.4) == 1.0
    with pytest.raises(ValueError, match="hard_negatives"):
        hard_fraction("sometimes", 0, 1, 0.5)


def test_load_pairs_reads_only_distinct_rows(splits: dict) -> None:
    train = splits["train"]
    batch = load_pairs(train, np.array([0, 7, 7]), np.array([5, 3, 5]), np.array([1, 0, 0]))
    assert batch.tokens.shape[0] == 2 and batch.text_tokens.shape[0] == 2
    # distinct rows in ascending order, the pair index maps back: pair i = (caption c_i, video v_i)
    tok, text = batch.tokens[batch.pair_video], batch.text_tokens[batch.pair_text]
    assert torch.equal(tok[0], torch.from_numpy(np.array(train.tokens[5])))
    assert torch.equal(tok[1], torch.from_numpy(np.array(train.tokens[3])))
    length = int(np.asarray(train.text_mask[[0, 7]]).any(axis=0).nonzero()[0].max()) + 1
    assert text.shape[1] == length  # padding beyond the longest caption is cut
    assert torch.equal(text[1], torch.from_numpy(np.array(train.text_tokens[7, :length])))


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(splits: dict) -> Path:
    return train_stage_two(splits["train"], splits["val"], splits["stage_one"], splits["root"] / "head",
                           head_config=TINY, epochs=TOY_EPOCHS, batch_size=16, lr=3e-3, seed=0, progress=False,
                           val_queries=32, val_candidates=8, num_threads=1, **ITM_ONLY)


def test_training_learns_to_match(trained: Path, splits: dict) -> None:
    history = json.loads((trained.parent / "history.json").read_text())
    epochs = history["epochs"]
    assert history["finished"] and len(epochs) == TOY_EPOCHS
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"] and epochs[-1]["loss"] < 0.6
    assert epochs[-1]["hard_share"] == 1.0 and epochs[0]["hard_share"] < 0.5  # annealed
    # the head learns to match (val ITM accuracy on stage one's top candidates, balanced) ...
    assert max(e["val"]["itm_acc_balanced"] for e in epochs) > 0.7
    # ... and the epoch is selected on val re-ranked R@1, the mean of T2V and V2T (32 queries each:
    # noisy, so not always that epoch)
    for e in epochs:
        assert e["val"]["selection_R@1"] == pytest.approx((e["val"]["reranked_R@1"] + e["val"]["v2t_reranked_R@1"]) / 2)
    assert history["selected_on"] == "val re-ranked T2V and V2T R@1 (their mean) of stage-one top-8"
    scores = [e["val"]["selection_R@1"] + 1e-3 * e["val"]["score_acc_balanced"] for e in epochs]
    assert all(e["val"]["score_acc_balanced"] == e["val"]["itm_acc_balanced"] for e in epochs)  # no ITC
    assert history["best_epoch"] == int(np.argmax(scores))
    # the selected head separates the true pairs from stage one's top candidates on test too
    head = load_stage_two(trained).head
    test = splits["test"]
    pos = score_pairs(head, test, np.arange(32), np.arange(32))
    neg = score_pairs(head, test, np.arange(32), (np.arange(32) + 5) % 32)
    assert (pos > neg).mean() > 0.8


def test_val_selection_scores_both_directions_as_the_reranker_does(trained: Path, splits: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Model selection's T2V and V2T R@1 over every val query equal the re-ranker's on the same split,
    each distinct pair scored once; a bad direction is refused with the option's name."""
    from heads.evaluation.rerank import rerank
    from heads.stage_two.scoring import pair_scorer
    from heads.stage_two import selection
    from heads.stage_two.selection import ValSet, selection_score

    head, val = load_stage_two(trained).head, splits["val"]
    sim = similarity(load_stage_one(splits["stage_one"]).head, val)
    want = rerank(sim, val, pair_scorer(head, val, progress=False), k=6).metrics()["re-ranked"]
    scored: list[np.ndarray] = []
    real = selection.score_pairs
    monkeypatch.setattr(selection, "score_pairs",
                        lambda h, sp, c, v, **kw: scored.append(c * 10**6 + v) or real(h, sp, c, v, **kw))
    got = ValSet(val, sim, 6, 0, seed=0, directions="t2v,v2t").evaluate(head, batch=64, device="cpu")
    pairs = np.concatenate(scored)
    assert np.unique(pairs).size == pairs.size < 2 * 6 * len(val.caption_ids)  # shared pairs scored once
    assert got["reranked_R@1"] == pytest.approx(want["t2v"]["R@1"])
    assert got["v2t_reranked_R@1"] == pytest.approx(want["v2t"]["R@1"])
    assert got["selection_R@1"] == pytest.approx((want["t2v"]["R@1"] + want["v2t"]["R@1"]) / 2)
    assert selection_score(got) == pytest.approx(got["selection_R@1"] + 1e-3 * got["score_acc_balanced"])
    t2v_only = ValSet(val, sim, 6, 0, seed=0, directions="t2v").evaluate(head, batch=64, device="cpu")
    assert "v2t_reranked_R@1" not in t2v_only and t2v_only["selection_R@1"] == got["reranked_R@1"]
    with pytest.raises(ConfigError, match="val_directions must be t2v, v2t or t2v,v2t, got 'v2t,t2i'"):
        StageTwoTrainConfig(val_directions="v2t,t2i").resolved()


def test_checkpoint_contents(trained: Path, splits: dict) -> None:
    raw = torch.load(trained, weights_only=True)
    assert raw["kind"] == "stage_two" and raw["store_fingerprint"] == "toy-token-store"
    assert raw["encoder_identity"] == IDENTITY
    assert raw["stage_one_identity"] == stage_one_identity(splits["stage_one"])
    assert raw["stage_one_identity"]["sha256"] and raw["config"]["name"] == "crosstvr"
    assert raw["train_args"]["val_split"] == "val" and raw["train_args"]["hard_negatives"] == "anneal"
    assert bool(raw["state_dict"]["standardizer.fitted"])
    assert (trained.parent / "train_state.pt").is_file()
    ckpt = load_stage_two(trained.parent, expect_encoder_identity=dict(IDENTITY))
    assert not ckpt.head.training and ckpt.config == raw["config"]


def test_other_encoder_refused(trained: Path) -> None:
    with pytest.raises(StoreMismatchError, match="token_dim: expected 1408, found 16"):
        load_stage_two(trained, expect_encoder_identity={**IDENTITY, "token_dim": 1408})


def test_finished_run_is_not_repeated_and_other_arguments_are_refused(trained: Path, splits: dict) -> None:
    before = trained.stat().st_mtime_ns
    again = train_stage_two(splits["train"], splits["val"], splits["stage_one"], trained.parent, head_config=TINY,
                            epochs=TOY_EPOCHS, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=32,
                            val_candidates=8, num_threads=1, **ITM_ONLY)
    assert again == trained and trained.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="lr"):
        train_stage_two(splits["train"], splits["val"], splits["stage_one"], trained.parent, head_config=TINY,
                        epochs=TOY_EPOCHS, batch_size=16, lr=1e-3, seed=0, progress=False, val_queries=32, val_candidates=8,
                        **ITM_ONLY)


def test_resume_gives_the_uninterrupted_result(splits: dict, tmp_path: Path) -> None:
    kwargs = dict(head_config={**TINY, "dropout": 0.1}, epochs=3, batch_size=24, lr=3e-3, seed=4, progress=False,
                  val_queries=16, val_candidates=4, num_threads=1, hard_negatives="anneal", anneal=0.6, **ITM_ONLY)
    straight = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "a", **kwargs)
    # 4 steps per epoch: stop inside epoch 0, then inside epoch 2, then finish
    first = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "b", max_steps=3,
                            **kwargs)
    assert not json.loads((tmp_path / "b" / "history.json").read_text())["finished"]
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["step"] == 3
    train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "b", max_steps=10, **kwargs)
    resumed = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "b", **kwargs)
    assert first == resumed
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    sa = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    ha, hb = a["history"]["epochs"], b["history"]["epochs"]
    assert [e["loss"] for e in ha] == pytest.approx([e["loss"] for e in hb], rel=1e-6)
    assert a["history"]["best_epoch"] == b["history"]["best_epoch"]


def test_rank_term_trains_and_is_recorded(splits: dict, tmp_path: Path) -> None:
    ckpt = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "rank", head_config=TINY,
                           epochs=2, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_candidates=4,
                           num_threads=1, rank_weight=1.0, **ITM_ONLY)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["train_args"]["rank_weight"] == 1.0
    plain = train_stage_two(splits["train"], splits["val"], splits["stage_one"], tmp_path / "plain", head_config=TINY,
                            epochs=2, batch_size=16, lr=3e-3, seed=0, progress=False, val_queries=16, val_candidates=4,
                            num_threads=1, **ITM_ONLY)
    # same seed and batches: the rank term alone makes the losses differ (it is really added)
    la = [e["loss"] for e in raw["history"]["epochs"]]
    lb = [e["loss"] for e in torch.load(plain, weights_only=True)["history"]["epochs"]]
    assert la != pytest.approx(lb)


def test_trainer_refuses_test_and_bad_input(splits: dict, tmp_path: Path) -> None:
    with pytest.raises(ForbiddenSplitError, match="val split is named 'test'"):
        train_stage_two(splits["train"], splits["test"], splits["stage_one"], tmp_path, progress=False)
    with pytest.raises(ForbiddenSplitError, match="train split"):
        train_stage_two(splits["test"], None, splits["stage_one"], tmp_path, progress=False)
    no_tokens = make_token_split("train", 8, 1, seed=9)
    no_tokens.tokens = None
    with pytest.raises(ValueError, match="has no tokens"):
        train_stage_two(no_tokens, None, splits["stage_one"], tmp_path, progress=False)
    with pytest.raises(ValueError, match="hard_negatives"):
        train_stage_two(splits["train"], None, splits["stage_one"], tmp_path, hard_negatives="easy", progress=False)
    other = make_token_split("train", 8, 1, seed=9)
    other.encoder_identity = {**IDENTITY, "name": "other"}
    with pytest.raises(StoreMismatchError, match="name"):
        train_stage_two(other, None, splits["stage_one"], tmp_path, progress=False)
    assert not (tmp_path / "stage_two.pt").exists()


# -- command line ------------------------------------------------------------------------------
def test_train_head_help() -> None:
    out = run_cli(["train-head", "--help"])
    for option in ("--store", "--stage-one", "--head", "--mode", "--no-shared", "--num-selected", "--precision",
                   "--val-candidates",
                   "--hard-negatives", "--epochs", "--batch-size", "--lr", "--out", "--seed", "--device"):
        assert option in out


def test_train_head_from_the_cli(tiny_world: dict, tmp_path: Path) -> None:
    work, store = tiny_world["work"], tiny_world["store"]
    s1_dir = tmp_path / "s1"
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP",
             "--epochs", "1", "--batch-size", "8", "--out", s1_dir])
    out = run_cli(["train-head", "--store", store, "--work-dir", work, "--stage-one", s1_dir / "stage_one.pt",
                   "--epochs", "1", "--batch-size", "4", "--num-selected", "2", "--head-option", "width=32",
                   "--head-option", "layers=1", "--out", tmp_path / "head", "--itc-steps", "3", "--itc-batch", "4",
                   "--device", "cpu"])
    ckpt_path = tmp_path / "head" / "stage_two.pt"
    assert f"checkpoint: {ckpt_path}" in out
    ckpt = load_stage_two(ckpt_path)
    assert ckpt.config["num_selected"] == 2 and ckpt.config["width"] == 32
    assert ckpt.config["itc_dim"] == 128 and ckpt.train_args["itc_steps"] == 3
    assert ckpt.train_args["itc_weight"] == 1.0  # the default for crosstvr
    assert ckpt.encoder_identity["name"] == "test-vit-micro"
    assert ckpt.history["finished"]
    # its run.json reproduces it: the same weights from the file alone
    record = json.loads((tmp_path / "head" / "run.json").read_text())
    assert record["options"]["head_option"] == ["width=32", "layers=1", "num_selected=2"]
    assert record["config"]["itc_steps"] == 3 and record["config"]["itc_weight"] == 1.0
    run_cli(["train-head", "--config", tmp_path / "head" / "run.json", "--out", tmp_path / "again"])
    again = torch.load(tmp_path / "again" / "stage_two.pt", weights_only=True)["state_dict"]
    first = torch.load(ckpt_path, weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("name,cfg", [
    ("crosstvr", {}), ("crosstvr", {"mode": "spatial"}), ("crosstvr", {"mode": "temporal"}),
    ("crosstvr", {"shared": False, "text_cross": False}), ("t2v2t", {}),
])
def test_match_encodes_each_video_once_and_equals_aligned_pairs(name: str, cfg: dict) -> None:
    kw = {k: v for k, v in TINY.items() if name == "crosstvr" or k in ("width", "layers", "heads", "ff_mult")}
    torch.manual_seed(0)
    head = create_head(name, D, D, **{**kw, **cfg}).eval()
    tokens, fm, text, tm = random_pair_inputs(3, T, N, D, D)
    pair_video, pair_text = torch.tensor([2, 0, 2, 1, 2]), torch.tensor([0, 1, 2, 2, 1])
    calls = []
    original = head.encode_video
    head.encode_video = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    shared = head.match(text, tm, head.encode_video(tokens, fm), pair_text, pair_video)
    assert calls == [3]  # three distinct videos, encoded once for five pairs
    expanded = logits_of(head, tokens[pair_video], fm[pair_video], text[pair_text], tm[pair_text])
    torch.testing.assert_close(shared, expanded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.pair_score(text, tm, tokens, fm, pair_text, pair_video),
                               expanded[:, 1] - expanded[:, 0], rtol=1e-5, atol=1e-5)
    # gradients agree as well (a video shared by pairs sums its pairs' gradients)
    head.train()
    grads = []
    for fn in (lambda: head.match(text, tm, head.encode_video(tokens, fm), pair_text, pair_video),
               lambda: logits_of(head, tokens[pair_video], fm[pair_video], text[pair_text], tm[pair_text])):
        head.zero_grad()
        fn()[:, 1].sum().backward()
        grads.append({k: p.grad.clone() for k, p in head.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("layers,prenorm,text_cross,cross_every", [
    (2, False, True, 1), (1, False, True, 1), (3, True, True, 2), (2, False, False, 1), (2, True, False, 1)])
def test_qformer_shortcuts_give_the_full_computation(layers: int, prenorm: bool, text_cross: bool,
                                                     cross_every: int) -> None:
    """Running the first layer's self-attention once per pair (``expand``) and skipping the last
    layer's unused text rows (``need_text=False``) change the cost, not the query outputs."""
    torch.manual_seed(0)
    qf = QFormer(layers, 16, 2, kv_dim=12, cross_every=cross_every, text_cross=text_cross, ff_mult=2.0,
                 prenorm=prenorm).eval()
    p, f, nq, lt, nv = 3, 4, 5, 6, 7
    queries, text = torch.randn(p, nq, 16), torch.randn(p, lt, 16)
    text_valid = torch.arange(lt)[None, :] < torch.tensor([[6], [3], [1]])
    visual = torch.randn(2 * f, nv, 12)  # 2 distinct videos x f frames
    visual_valid = torch.rand(2 * f, nv) > 0.3
    rows = (torch.tensor([1, 0, 1])[:, None] * f + torch.arange(f)[None, :]).reshape(-1)
    rep = lambda x: x.repeat_interleave(f, dim=0)  # noqa: E731
    full_q, full_t = qf(rep(queries), rep(text), rep(text_valid), visual, visual_valid, rows)
    fast_q, fast_t = qf(queries, text, text_valid, visual, visual_valid, rows, expand=f, need_text=False)
    assert fast_t is None and full_t is not None
    torch.testing.assert_close(fast_q, full_q, rtol=1e-5, atol=1e-5)
    part_q, part_t = qf(queries, text, text_valid, visual, visual_valid, rows, expand=f)
    torch.testing.assert_close(part_q, full_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part_t, full_t, rtol=1e-5, atol=1e-5)


def test_folded_standardisation_equals_standardise_then_project() -> None:
    torch.manual_seed(0)
    head = create_head("crosstvr", D, D + 3, **TINY).eval()
    std = head.standardizer
    std.visual_mean.copy_(torch.randn(D))
    std.visual_std.copy_(torch.rand(D) + 0.5)
    std.text_mean.copy_(torch.randn(D + 3))
    std.text_std.copy_(torch.rand(D + 3) + 0.5)
    tokens, fm, _, _ = random_pair_inputs(3, T, N, D, D)
    text = torch.randn(3, L, D + 3).half()
    tm = torch.arange(L)[None, :] < torch.tensor([[L], [2], [4]])
    with torch.no_grad():
        vis, _ = head.visual(tokens, fm)
        plain = std.visual(tokens).where(fm[:, :, None, None], torch.zeros(()))
        torch.testing.assert_close(vis, head.visual_proj(plain), rtol=1e-5, atol=1e-5)
        txt, _ = head._text(text, tm)
        plain_t = std.text(text).where(tm[:, :, None], torch.zeros(()))
        torch.testing.assert_close(txt, head.text_proj(plain_t), rtol=1e-5, atol=1e-5)
