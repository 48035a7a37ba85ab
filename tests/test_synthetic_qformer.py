"""The synthetic world's own pre-trained Q-Former: frame captions say what each frame shows, the
pre-training pairs each frame with its own caption, and the result is made once and keyed by what
it was trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.errors import UnknownOptionError
from heads.stage_two.qformer_pretrain import FrameTexts, qformer_losses
from manifests import Manifest
from synthetic import world as W
from synthetic.qformer import QFormerSettings, frame_captions
from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

SMALL = {"steps": 3, "batch_size": 4}


def staged_train(tiny_world: dict):
    work = WorkDir(tiny_world["work"])
    return work, Manifest.read(tiny_world["manifest"]), work.stage(str(tiny_world["store"]), "train", STAGE_TWO_ARRAYS)


def test_frame_captions_name_the_detail_exactly_in_the_frames_that_show_it(tiny_world: dict) -> None:
    _, manifest, train = staged_train(tiny_world)
    attrs = W.manifest_attrs(manifest)
    caps = frame_captions(train, attrs, p_detail=1.0, seed=0)
    times = np.asarray(train.frame_time) / (W.NUM_FRAMES / W.FPS)
    mask = np.asarray(train.frame_mask, dtype=bool)
    seen = {True: 0, False: 0}
    for row, vid in enumerate(train.video_ids):
        for t in np.flatnonzero(mask[row]):
            visible = W.detail_visible(attrs[vid], min(float(times[row, t]), 0.999))
            named = any(f" {w} {attrs[vid]['detail_color']} " in f" {caps[row][t].lower()} " for w in W._SMALL)
            assert named == visible, (vid, t, caps[row][t])
            seen[visible] += 1
            assert not any(w in caps[row][t] for p in W.TIMING_PHRASES.values() for w in p)
    assert seen[True] and seen[False]  # both kinds of frame occur in the tiny world
    assert frame_captions(train, attrs, p_detail=1.0, seed=0) == caps
    assert frame_captions(train, attrs, p_detail=1.0, seed=1) != caps
    with pytest.raises(KeyError, match="not in the synthetic manifest"):
        frame_captions(train, {}, p_detail=1.0)


def test_settings_refuse_unknown_options_and_bad_caption_kinds() -> None:
    assert QFormerSettings.from_options({"steps": "7"}).steps == 7
    with pytest.raises(UnknownOptionError, match="stepz"):
        QFormerSettings.from_options({"stepz": 1})
    with pytest.raises(ValueError, match="captions must be one of"):
        QFormerSettings(captions="paragraph")
    with pytest.raises(ValueError, match="itm_negatives must be 1 or 2"):  # at once, not after the encoders
        QFormerSettings.from_options({"itm_negatives": 3})


class _Probe(torch.nn.Module):
    """A stand-in head that records which text rows the losses read."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.texts: list[torch.Tensor] = []

    def encode_video(self, tokens, fm):
        return tokens.float().mean(dim=(1, 2))

    def video_queries(self, video):
        return video

    def text_features(self, ids, mask):
        self.texts.append(ids.clone())
        return ids.float()[:, :1].expand(-1, 2) + self.w

    def itc_logits(self, v, t):
        return v[:, :2] @ t.t()

    def match(self, ids, mask, video, pair_text, pair_video):
        return torch.stack([ids.float()[pair_text, 0], video[pair_video, 0]], dim=1) * (1 + self.w)


def test_pretraining_pairs_each_frame_with_its_own_caption() -> None:
    from heads.stage_two.pairs import ItmBatch

    b, T = 3, 4
    tokens = torch.arange(b * T, dtype=torch.float32).reshape(b, T, 1, 1).expand(b, T, 2, 2).contiguous()
    frame_ids = (100 * torch.arange(b)[:, None] + torch.arange(T)[None]).reshape(b, T, 1).long()
    batch = ItmBatch(text_tokens=torch.full((b, 1), -1), text_mask=torch.ones(b, 1, dtype=torch.bool),
                     tokens=tokens, frame_mask=torch.ones(b, T, dtype=torch.bool), pair_text=torch.arange(b),
                     pair_video=torch.arange(b), labels=torch.zeros(b, dtype=torch.long))
    head = _Probe()
    gen = torch.Generator().manual_seed(0)
    qformer_losses(head, batch, gen, (frame_ids, torch.ones_like(frame_ids, dtype=torch.bool)))
    read = head.texts[0][:, 0]
    # the frame drawn for video i is the one whose tokens went in; its caption is 100 * i + frame
    assert (read // 100).tolist() == list(range(b))
    assert all(0 <= int(x) % 100 < T for x in read)
    head.texts.clear()
    qformer_losses(head, batch, torch.Generator().manual_seed(0))
    assert head.texts[0][:, 0].tolist() == [-1] * b  # without frame captions: the video's caption


class _PairProbe(_Probe):
    """Records the ITM pairs the losses ask for."""

    def match(self, ids, mask, video, pair_text, pair_video):
        self.pairs = (pair_text.clone(), pair_video.clone())
        return super().match(ids, mask, video, pair_text, pair_video)


@pytest.mark.parametrize("itm_negatives", [1, 2])
def test_itm_pairs_are_the_positives_and_one_or_two_in_batch_negatives_each(itm_negatives: int) -> None:
    from heads.stage_two.pairs import ItmBatch

    b, T = 6, 2
    tokens = torch.randn(b, T, 2, 2)
    batch = ItmBatch(text_tokens=torch.arange(b)[:, None], text_mask=torch.ones(b, 1, dtype=torch.bool),
                     tokens=tokens, frame_mask=torch.ones(b, T, dtype=torch.bool), pair_text=torch.arange(b),
                     pair_video=torch.arange(b), labels=torch.zeros(b, dtype=torch.long))
    head = _PairProbe()
    _, itm, match, labels = qformer_losses(head, batch, torch.Generator().manual_seed(0), itm_negatives=itm_negatives)
    text, video = head.pairs
    assert labels.tolist() == [1] * b + [0] * (itm_negatives * b)
    assert match.shape[0] == labels.shape[0] == text.shape[0] and torch.isfinite(itm)
    assert (text[:b] == video[:b]).all()  # the positives: each caption with its own video
    neg_text, neg_video = text[b:], video[b:]
    assert (neg_text != neg_video).all()  # every negative pairs a caption with another batch member's video
    changed_video = (neg_text == torch.arange(b).repeat(itm_negatives)).sum()
    changed_text = (neg_video == torch.arange(b).repeat(itm_negatives)).sum()
    # two negatives: each positive with another video and with another caption; one: half of each
    assert (int(changed_video), int(changed_text)) == ((b, b) if itm_negatives == 2 else (b // 2, b - b // 2))
    with pytest.raises(ValueError, match="itm_negatives must be 1 or 2"):
        qformer_losses(head, batch, torch.Generator().manual_seed(0), itm_negatives=3)


def test_frame_texts_rows_cut_to_the_longest_caption() -> None:
    ids = np.zeros((3, 2, 6), dtype=np.int32)
    mask = np.zeros((3, 2, 6), dtype=bool)
    mask[0, :, :2] = True
    mask[2, 1, :4] = True
    ft = FrameTexts(ids, mask)
    got_ids, got_mask = ft.rows(np.array([0, 2]))
    assert tuple(got_ids.shape) == (2, 2, 4) and got_mask[1, 1].sum() == 4
    assert ft.digest() != FrameTexts(ids, mask[:, ::-1].copy()).digest()


@pytest.mark.slow
def test_the_worlds_qformer_is_made_once_and_keyed_by_what_it_was_trained_on(tiny_world: dict) -> None:
    from heads.stage_two.blip2 import read_blip2
    from heads.stage_two.tokenizer import CaptionTokenizer
    from workflows.data import synthetic_qformer

    work, manifest, _ = staged_train(tiny_world)
    store = str(tiny_world["store"])
    first = synthetic_qformer(work, manifest, store, {**SMALL, "captions": "frame"}, progress=False)
    assert first.parent == work.encoders_dir and first.name.startswith("qformer-")
    record = json.loads((first / "pretrain.json").read_text())
    assert record["args"]["steps"] == 3 and "frame_texts" in record["args"]
    weights = sorted(p for p in first.iterdir() if p.suffix in (".safetensors", ".bin"))
    stamps = [p.stat().st_mtime_ns for p in weights]
    assert synthetic_qformer(work, manifest, store, {**SMALL, "captions": "frame"}, progress=False) == first
    assert [p.stat().st_mtime_ns for p in weights] == stamps  # reused, not trained again
    tok = CaptionTokenizer.from_dir(first)
    ids, _ = tok.encode(["a tiny red star appears at the top left"], 12)
    assert 1 not in ids[0].tolist()  # no [UNK]: frame and video caption words are in its vocabulary
    assert read_blip2(first).layout["vocab_size"] == tok.vocab_size
    video = synthetic_qformer(work, manifest, store, {**SMALL, "captions": "video"}, progress=False)
    assert video != first and "frame_texts" not in json.loads((video / "pretrain.json").read_text())["args"]
    assert synthetic_qformer(work, manifest, store, SMALL, progress=False) == video  # the default: video captions
    assert json.loads((video / "pretrain.json").read_text())["args"]["itm_negatives"] == 1  # and one ITM negative
    blip2 = synthetic_qformer(work, manifest, store, {**SMALL, "itm_negatives": 2}, progress=False)
    assert blip2 not in (first, video)  # BLIP-2's two negatives: another Q-Former, keyed as runs before the option
    assert "itm_negatives" not in json.loads((blip2 / "pretrain.json").read_text())["args"]
    assert synthetic_qformer(work, manifest, store, {**SMALL, "captions": "frame", "p_detail": 0.2},
                             progress=False) not in (first, video)


def test_the_demo_takes_the_qformer_settings_and_refuses_a_bad_one_before_any_work(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    import cli
    from workflows import experiments

    work = tmp_path / "work"
    result = CliRunner().invoke(cli.main, ["demo", "--work-dir", str(work), "--qformer-option", "stepz=10"])
    assert result.exit_code == 2 and "stepz" in result.output and len(result.output.strip().splitlines()) == 1
    assert not work.exists() or not any(work.iterdir())  # nothing rendered or trained
    seen = {}

    def fake_qformer(work, manifest, store, options, device="cpu"):
        seen.update(options or {})
        return tmp_path / "qformer"

    monkeypatch.setattr(experiments, "synthetic_qformer", fake_qformer)
    monkeypatch.setattr("manifests.Manifest.read", staticmethod(lambda path: None))
    config = experiments.demo_stage_two_config(WorkDir(work), "store.zarr",
                                               qformer_options={"batch_size": 32, "itm_negatives": 1})
    assert seen == {"batch_size": 32, "itm_negatives": 1} and config.init_from == str(tmp_path / "qformer")
