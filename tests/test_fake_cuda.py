"""Every GPU-reachable model path run on fake CUDA tensors, on a machine without a GPU.

PyTorch's ``FakeTensorMode`` makes tensors that carry a device, a shape and a dtype but no data,
and refuses any operation that mixes devices ("Expected all tensors to be on the same device")
exactly as a GPU would. A head left on the CPU while its inputs go to ``cuda`` (review finding 1:
``load_stage_one`` leaves the stage-one head on the CPU and ``similarity`` moved only the data)
fails here as it fails on a GPU. Fake tensors hold no values, so where a path ends in numpy or
metrics, its model part is tested: ``similarity_blocks`` (under ``similarity``),
``pair_score_blocks`` (under ``score_pairs``), the trainers' step losses (``batch_loss``,
``itm_step_loss``, ``batch_itc_loss``, ``qformer_losses``).

The harness (``fake`` below) is a ``FakeTensorMode`` with ``allow_non_fake_inputs=True``: real CPU
tensors (a split's rows read by the prefetch thread, a module built outside the mode) become fake
*CPU* tensors, so a mix of them with fake CUDA tensors still raises. Fake tensors hold no values: a
value read as a Python number (``int(counts.max())``, ``bool(mask.any())``) gets a fixed answer and
a value-dependent size (``bincount``, a boolean selection) a symbolic one; values decide shapes
there, never devices. Three limits of fake tensors on a CPU-only build are worked around, in the
test process only: ``Module.to`` swaps every fake parameter for a new one, even one already on the
target device, which fails while autograd or the mode still refer to it (the harness skips a swap
that moves nothing, as a real ``.to`` does, and drops the mode's own weak references before a real
move); the autograd engine asks the CUDA driver for device 0 before a backward pass of CUDA tensors
(pytorch/pytorch#92627), so the trainers' forward and loss run on fake ``cuda`` and their whole step
(forward, loss, backward, optimizer step) on fake ``meta``, another non-CPU device whose mixes with
the CPU raise the same way; and autocast knows no ``meta`` device (``torch.is_autocast_enabled("meta")``
raises), so it answers "off" there. Autocast itself is off on a CPU-only build (bf16 is not tested).

The commands that take ``--device`` (``grep -n device_option cli.py``) and the tests of their model
paths:

=================  ===========================================================================
command            model path: test
=================  ===========================================================================
extract            frozen encoder's batch path (``encode_frames``, ``encode_texts``):
                   ``test_frozen_encoder_batch_path``
cache verify       ``--repair`` re-extracts through the same encoder path:
                   ``test_frozen_encoder_batch_path``
train-stage-one    training step: ``test_stage_one_training_step``; validation (``evaluate``):
                   ``test_stage_one_encode_and_similarity``
eval               ``sources.stage_one_scores`` (a checkpoint loaded on the CPU, and the untrained
                   baseline) and QB-Norm's ``querybanks``: ``test_loaded_stage_one_similarity``,
                   ``test_stage_one_encode_and_similarity``
compare-stage-one  training step and ``evaluate`` of each head and of the untrained baseline:
                   ``test_stage_one_training_step``, ``test_stage_one_encode_and_similarity``
train-head         stage one's similarities (hard negatives, model selection) and embeddings
                   (video neighbours, the ranking term's ``StageOneCosine``):
                   ``test_loaded_stage_one_similarity``, ``test_stage_one_encode_and_similarity``;
                   the contrastive phase and the ITM step: ``test_stage_two_training_step``;
                   validation (``ValSet.evaluate``): ``test_pair_scores``
pretrain-qformer   ``qformer_losses``: ``test_qformer_pretraining_step``
rerank             stage one's similarity: ``test_loaded_stage_one_similarity``; index candidates
                   (``encode_texts``): ``test_stage_one_encode_and_similarity``; the head on the
                   candidate pairs: ``test_rerank_scores_candidates_on_cuda``,
                   ``test_loaded_head_scores_pairs``
ablation           as train-head and rerank; within-group accuracy scores pairs:
                   ``test_pair_scores``
index build        ``encode_videos`` / ``encode_texts``: ``test_stage_one_encode_and_similarity``
index add          ``encode_videos`` of the appended videos only, as index build:
                   ``test_stage_one_encode_and_similarity``
search             the query encoder: ``test_frozen_encoder_batch_path``; stage one's text
                   embeddings: ``test_loaded_stage_one_similarity``; re-ranking:
                   ``test_loaded_head_scores_pairs``
serve              as search, once per request (the query encoder, stage one's text embeddings,
                   the head on the K candidates): ``test_frozen_encoder_batch_path``,
                   ``test_loaded_stage_one_similarity``, ``test_loaded_head_scores_pairs``
demo               extract, train-stage-one, eval, train-head and rerank above
=================  ===========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from heads import create_head
from heads.evaluation.rerank import rerank
from heads.evaluation.similarity import encode_texts, encode_videos, similarity_blocks, untrained_baseline
from heads.stage_one.checkpoint import load_stage_one
from heads.stage_one.train import batch_loss
from heads.stage_two.checkpoint import KIND, load_stage_two
from heads.stage_two.config import StageTwoTrainConfig
from heads.stage_two.itc import batch_itc_loss, itc_batch
from heads.stage_two.negatives import PlanItem
from heads.stage_two.pairs import load_pairs
from heads.stage_two.qformer_pretrain import qformer_losses
from heads.stage_two.scoring import pair_score_blocks
from heads.stage_two.tokenizer import build_word_tokenizer, text_view, with_caption_ids
from heads.stage_two.train import StageOneCosine, itm_step_loss
from heads.training.common import make_optimizer, save
from heads.training.data import load_batch, uses_text_tokens
from helpers import TINY, D, make_token_split

STAGE_ONE_HEADS = ("meanP", "seqTransf", "clip2video")
STAGE_ONE_OPTIONS = {"meanP": {}, "seqTransf": {"num_layers": 1, "num_heads": 2},
                     "clip2video": {"num_layers": 1, "num_heads": 2, "text_dim": D, "tab_dim": 8, "num_centers": 2}}
# stage-two heads as the commands build them: CrossTVR with its contrastive projection (the default
# recipe), without it (ITM only), BLIP-2's layout reading caption ids (--init-from), and T2V2T
STAGE_TWO_HEADS = {
    "crosstvr": ("crosstvr", {**TINY, "itc_dim": 8}),
    "crosstvr-itm": ("crosstvr", dict(TINY)),
    "crosstvr-ids": ("crosstvr", {**TINY, "itc_dim": 8, "text_input": "ids", "visual_proj": False,
                                  "standardize": False, "embed_norm": True, "itc_text_pool": "cls",
                                  "max_positions": 16}),
    "t2v2t": ("t2v2t", {"width": 16, "heads": 2, "spatial_frames": 2}),
}
WORDS = ("red", "green", "blue", "ball", "cube", "moves", "left", "right", "small", "large")


class ValueFreeMode(FakeTensorMode):
    """``FakeTensorMode`` in which reading a tensor's value as a Python number gives a fixed answer
    (1, 1.0 or True) and an operation whose output size depends on values (``bincount``, a boolean
    selection) gets a symbolic size: fake tensors hold no values, and here values decide shapes
    only, never devices."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    """``fake()``: a ``ValueFreeMode`` context in which ``Module.to`` leaves a fake parameter that is
    already where it is sent as it is (see the module docstring)."""
    swap = torch.utils.swap_tensors

    def swap_if_moved(t1: torch.Tensor, t2: torch.Tensor) -> None:
        if (t1.device, t1.dtype, t1.shape, t1.stride()) == (t2.device, t2.dtype, t2.shape, t2.stride()):
            return
        converter = getattr(t1, "fake_mode", None) and t1.fake_mode.fake_tensor_converter
        if converter is not None:  # its weak references (memo, constants) would block the swap
            for key in [k for k, v in list(converter.tensor_memo.items()) if v is t1 or v is t2]:
                del converter.tensor_memo[key]
            for refs in converter.constant_storage_mapping.values():
                refs[:] = [r for r in refs if r() is not t1 and r() is not t2]
        swap(t1, t2)

    autocast_enabled = torch.is_autocast_enabled

    def autocast_enabled_or_meta(*device_type: str) -> bool:  # autocast knows no meta device
        return False if device_type == ("meta",) else autocast_enabled(*device_type)

    monkeypatch.setattr(torch.utils, "swap_tensors", swap_if_moved)
    monkeypatch.setattr(torch, "is_autocast_enabled", autocast_enabled_or_meta)
    return ValueFreeMode


@pytest.fixture(scope="module")
def splits() -> dict:
    """Small token splits (every array a stage-one or stage-two head reads), its captions' text
    and the ids a word tokenizer gives them (for heads reading caption ids)."""
    train = make_token_split("train", 8, 2, seed=0)
    texts = [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(1 + i % 4)) for i in range(len(train.caption_ids))]
    tokenizer = build_word_tokenizer(texts)
    return {"train": train, "with_ids": with_caption_ids(train, tokenizer, texts, 8), "vocab": tokenizer.vocab_size}


def stage_one_head(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_head(name, D, stage=1, **STAGE_ONE_OPTIONS[name])


def stage_two_head(variant: str, splits: dict) -> tuple[torch.nn.Module, object]:
    """A stage-two head as the trainer builds it (standardiser fitted) and the split it reads."""
    name, options = STAGE_TWO_HEADS[variant]
    torch.manual_seed(0)
    if options.get("text_input") == "ids":
        head = create_head(name, D, 0, stage=2, **options, vocab_size=splits["vocab"])
        split = splits["with_ids"]
    else:
        head = create_head(name, D, D, stage=2, **options)
        split = splits["train"]
    head.fit_standardizer(split, seed=0)
    return head, split


def on(device: str, *tensors: torch.Tensor) -> None:
    """Every tensor is a fake tensor on ``device``."""
    for t in tensors:
        assert isinstance(t, FakeTensor) and t.device.type == device, f"{type(t).__name__} on {t.device}, not {device}"


def test_fake_cuda_catches_a_device_mix(fake) -> None:
    """The harness itself: a module left on the CPU refuses CUDA inputs, one moved there takes them."""
    head = stage_one_head("seqTransf")
    with fake():
        frames, mask = torch.zeros(2, 4, D, device="cuda"), torch.ones(2, 4, dtype=torch.bool, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            head.encode_video(frames, mask)
        head.to("cuda")
        on("cuda", head.encode_video(frames, mask))


@pytest.mark.parametrize("name", STAGE_ONE_HEADS)
def test_stage_one_encode_and_similarity(fake, splits: dict, name: str) -> None:
    """A stage-one head built on the CPU (as loaded, and as the untrained baseline is) encodes and
    scores a split on the device it is given: index build, QB-Norm, the trainers' stage-one cosine."""
    train = splits["train"]
    head, fresh = stage_one_head(name).eval(), stage_one_head(name)
    with fake():
        videos = encode_videos(head, train, batch=3, device="cuda")
        texts = encode_texts(head, train, slice(0, 5), device="cuda")
        on("cuda", videos, texts)
        assert videos.shape[0] == 8 and texts.shape[0] == 5 and videos.shape[1] == texts.shape[1]
        blocks = list(similarity_blocks(head, train, batch=6, device="cuda"))
        on("cuda", *(b for _, b in blocks))
        assert [tuple(b.shape) for _, b in blocks] == [(6, 8), (6, 8), (4, 8)]
        if not uses_text_tokens(head):  # the ranking term's cosine: embeddings kept on the host
            on("cpu", StageOneCosine(fresh, train, "cuda")(np.array([0, 3]), np.array([1, 2])))
    baseline = untrained_baseline(D)
    with fake():
        on("cuda", *(b for _, b in similarity_blocks(baseline, train, device="cuda")))


def test_loaded_stage_one_similarity(fake, splits: dict, tmp_path: Path) -> None:
    """Finding 1 as the commands meet it: ``load_stage_one`` gives a CPU head; eval, rerank,
    train-head (hard negatives, model selection) and search compute with it on ``cuda``."""
    train, head = splits["train"], stage_one_head("seqTransf")
    path = save({"config": head.config(), "state_dict": head.state_dict(), "store_fingerprint": train.store_fingerprint,
                 "encoder_identity": train.encoder_identity}, tmp_path / "stage_one.pt")
    loaded = load_stage_one(path, expect_encoder_identity=train.encoder_identity).head
    with fake():
        on("cuda", *(b for _, b in similarity_blocks(loaded, train, device="cuda")))
        on("cuda", encode_texts(loaded, train, device="cuda"))


@pytest.mark.parametrize("name", STAGE_ONE_HEADS)
def test_stage_one_training_step(fake, splits: dict, name: str) -> None:
    """train-stage-one / compare-stage-one: a step's forward and loss on cuda; the whole step
    (backward, AdamW, the text projection's decay) on meta."""
    train = splits["train"]
    captions, videos = np.array([0, 3, 5, 9]), train.caption_video[[0, 3, 5, 9]]
    for device in ("cuda", "meta"):
        model = stage_one_head(name)
        batch = load_batch(train, captions, videos, text_tokens=uses_text_tokens(name))
        with fake():
            model.to(device)
            loss = batch_loss(model, batch.to(device))
            on(device, loss)
            if device == "meta":
                optimizer, _ = make_optimizer(model, 1e-3, 0.01, 10, 1)
                loss.backward()
                optimizer.step()
                model.decay_text_proj(1e-3, 0.01)
                on(device, *(p.grad for p in model.parameters() if p.grad is not None))


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # bf16 autocast (precision=auto) needs a GPU
@pytest.mark.parametrize("variant", ["crosstvr", "crosstvr-itm", "crosstvr-ids", "t2v2t"])
def test_stage_two_training_step(fake, splits: dict, variant: str) -> None:
    """train-head / ablation: the contrastive phase's step and the ITM step (with the ranking term
    from a CPU stage one's cosine, and the positives' contrastive loss) on cuda; the whole ITM step
    on meta."""
    item = PlanItem(video=np.array([0, 2, 5]), caption=np.array([0, 4, 10]), neg_video=np.array([2, 5, 0]),
                    neg_caption=np.array([4, 10, 0]), hard_share=0.0)
    contrastive = STAGE_TWO_HEADS[variant][1].get("itc_dim", 0) > 0
    for device in ("cuda", "meta"):
        model, split, cosine_head = *stage_two_head(variant, splits), stage_one_head("meanP")
        view = text_view(split, getattr(model, "text_input", "tokens"))
        cfg = StageTwoTrainConfig(device=device, itc_weight=0.5 if contrastive else 0.0, rank_weight=1.0)
        batch = load_pairs(view, *item.pairs())
        with fake():
            model.to(device)
            cosine = StageOneCosine(cosine_head, splits["train"], device)
            loss, logits = itm_step_loss(model, batch.to(device), item, cfg, cosine)
            on(device, loss, logits)
            if contrastive:
                caps, vids = itc_batch(view.caption_video, len(view.video_ids), 4, np.random.default_rng(0))
                itc_pairs = load_pairs(view, caps, vids).to(device)
                itc, itc_logits = batch_itc_loss(model, itc_pairs, itc_pairs.pair_text, itc_pairs.pair_video)
                on(device, itc, itc_logits)
            if device == "meta":
                optimizer, _ = make_optimizer(model, 1e-3, 0.01, 10, 1)
                (loss + itc if contrastive else loss).backward()
                optimizer.step()
                on(device, *(p.grad for p in model.parameters() if p.grad is not None))


def test_qformer_pretraining_step(fake, splits: dict) -> None:
    """pretrain-qformer: ITC + ITM on single frames with in-batch negatives, on cuda; backward on meta."""
    view = text_view(splits["with_ids"], "ids")
    caps, vids = itc_batch(view.caption_video, len(view.video_ids), 4, np.random.default_rng(0))
    options = {**STAGE_TWO_HEADS["crosstvr-ids"][1], "mode": "spatial", "spatial_frames": None,
               "vocab_size": splits["vocab"]}
    for device in ("cuda", "meta"):
        torch.manual_seed(0)
        head = create_head("crosstvr", D, 0, stage=2, **options)
        with fake():
            head.to(device)
            itc, itm, match, labels = qformer_losses(head, load_pairs(view, caps, vids).to(device))
            on(device, itc, itm, match, labels)
            if device == "meta":
                (itc + itm).backward()
                on(device, *(p.grad for p in head.parameters() if p.grad is not None))


@pytest.mark.parametrize("variant", list(STAGE_TWO_HEADS))
def test_pair_scores(fake, splits: dict, variant: str) -> None:
    """A stage-two head on the CPU scores pairs on cuda (validation, re-ranking, within-group accuracy,
    search), with its contrastive caption embeddings computed there once; validation asks for the
    score's parts."""
    parts = variant == "crosstvr"
    head, split = stage_two_head(variant, splits)
    head.eval()
    caps, vids = np.array([0, 0, 3, 7, 12, 15, 3]), np.array([0, 4, 1, 3, 6, 7, 2])
    with fake():
        blocks = list(pair_score_blocks(head, split, caps, vids, batch=3, device="cuda", parts=parts))
        on("cuda", *(b for _, b in blocks))
        assert [tuple(b.shape) for _, b in blocks] == ([(3, 2), (3, 2), (1, 2)] if parts else [(3,), (3,), (1,)])


def test_rerank_scores_candidates_on_cuda(fake, splits: dict) -> None:
    """rerank: every query's stage-one top K, as ``rerank`` asks for them, scored by a CPU head on cuda."""
    head, split = stage_two_head("crosstvr", splits)
    head.eval()
    sim = np.random.default_rng(0).normal(size=(len(split.caption_ids), len(split.video_ids))).astype(np.float32)
    asked: list[int] = []

    def scorer(caps: np.ndarray, vids: np.ndarray) -> np.ndarray:
        with fake():
            for sl, scores in pair_score_blocks(head, split, caps, vids, batch=64, device="cuda"):
                on("cuda", scores)
                asked.append(sl.stop - sl.start)
        return np.zeros(len(caps), np.float32)  # fake tensors hold no values

    res = rerank(sim, split, scorer, k=3)
    assert sum(asked) == res.num_pairs > 0


def test_loaded_head_scores_pairs(fake, splits: dict, tmp_path: Path) -> None:
    """rerank / search / ablation: a stage-two head from its checkpoint (loaded on the CPU) scores on cuda."""
    head, split = stage_two_head("crosstvr", splits)
    path = save({"kind": KIND, "config": head.config(), "state_dict": head.state_dict(),
                 "store_fingerprint": split.store_fingerprint, "encoder_identity": split.encoder_identity,
                 "stage_one_identity": {}}, tmp_path / "stage_two.pt")
    loaded = load_stage_two(path, expect_encoder_identity=split.encoder_identity).head
    with fake():
        on("cuda", *(b for _, b in pair_score_blocks(loaded, split, np.arange(4), np.arange(4), device="cuda")))


def test_frozen_encoder_batch_path(fake) -> None:
    """extract / cache verify --repair / search: the frozen encoder built for cuda takes uint8 frames
    from the host and captions, and gives tokens and embeddings on cuda."""
    from pipeline.encoders import load_encoder

    with fake():
        enc = load_encoder("test-vit-micro", device="cuda")
        tokens, emb = enc.encode_frames(torch.zeros(3, 40, 52, 3, dtype=torch.uint8))
        words, mask, text = enc.encode_texts(["a red ball", "a cube"], max_tokens=8)
        on("cuda", tokens, emb, words, mask, text)
        assert tokens.shape[:2] == (3, enc.num_tokens) and tuple(words.shape[:2]) == (2, 8)


def test_every_command_taking_device_is_mapped() -> None:
    """The table in this module's docstring names every command that takes ``--device``."""
    import click

    import cli

    def taking_device(group: click.Group, prefix: str = "") -> Iterator[str]:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from taking_device(command, f"{prefix}{name} ")
            elif any(p.name == "device" for p in command.params):
                yield f"{prefix}{name}"

    rows = {line[:19].strip() for line in __doc__.splitlines() if line[:1].isalpha()}
    commands = set(taking_device(cli.main))
    assert "train-head" in commands and not commands - rows, f"not in the table: {sorted(commands - rows)}"
