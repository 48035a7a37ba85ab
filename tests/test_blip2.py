"""A CrossTVR head initialised from BLIP-2 computes what BLIP-2 computes: equality against
``transformers``' ``Blip2ForImageTextRetrieval`` (the reference implementation) on a tiny randomly
initialised checkpoint the tests write; LAVIS naming, shape-mismatch reports, the tokenizer, the
paper-size preset, and ``train-head --init-from`` / ``rerank`` from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from blip2_world import TINY_BLIP2, load_reference, make_blip2_dir
from core.errors import CheckpointError
from heads.registry import create_head, get_preset, list_presets
from heads.stage_two.blip2 import (SHAPE_OPTIONS, lavis_to_hf, options_from_layout, load_blip2, read_blip2, save_blip2,
                                   weight_table)
from heads.stage_two.checkpoint import load_stage_two
from heads.stage_two.tokenizer import CaptionTokenizer
from helpers import run_cli

CAPTIONS = ["a red square moves left", "the big green circle spins", "blue star appears late",
            "a small yellow triangle stays still on the big purple thing"]


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_blip2_dir(tmp_path_factory.mktemp("blip2") / "blip2-tiny")


def _head(weights, **options):
    opts = {**options_from_layout(weights.layout), "mode": "spatial", "spatial_frames": None, **options}
    torch.manual_seed(0)
    return create_head("crosstvr", weights.layout["encoder_width"], 0, stage=2, **opts).eval()


def _inputs(directory: Path, n: int = 4):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(directory)(CAPTIONS[:n], padding=True, return_tensors="pt")
    torch.manual_seed(1)
    size = TINY_BLIP2["image_size"]
    return torch.randn(n, 3, size, size), enc.input_ids, enc.attention_mask


@torch.no_grad()
def test_itm_logits_equal_transformers(blip2_dir: Path) -> None:
    """(a) spatial mode on one frame: the same ITM logits as Blip2ForImageTextRetrieval's ITM head."""
    ref = load_reference(blip2_dir)
    w = read_blip2(blip2_dir)
    head = _head(w)
    report = load_blip2(head, w)
    assert not report.kept and not report.reinitialised  # spatial mode: every parameter comes from BLIP-2
    pixels, ids, mask = _inputs(blip2_dir)
    want = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    tokens = ref.vision_model(pixels).last_hidden_state[:, None]  # (videos, 1 frame, N, D)
    video = head.encode_video(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))
    rows = torch.arange(ids.shape[0])
    got = head.match(ids, mask.bool(), video, rows, rows)
    assert got.shape == want.logits_per_image.shape == (4, 2)
    assert torch.allclose(got, want.logits_per_image, atol=1e-5, rtol=0)
    # and the result is not trivially equal: another caption order changes it
    assert not torch.allclose(head.match(ids, mask.bool(), video, rows.flip(0), rows), got, atol=1e-3)


@torch.no_grad()
def test_itc_scores_equal_transformers(blip2_dir: Path) -> None:
    """(b) the contrastive score: max over queries of the cosine, as Blip2ForImageTextRetrieval computes it."""
    ref = load_reference(blip2_dir)
    w = read_blip2(blip2_dir)
    head = _head(w)
    load_blip2(head, w)
    pixels, ids, mask = _inputs(blip2_dir)
    want = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask,
               use_image_text_matching_head=False).logits_per_image  # (images, texts)
    tokens = ref.vision_model(pixels).last_hidden_state[:, None]
    video = head.encode_video(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))
    n = ids.shape[0]
    pair_video, pair_text = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    got = head.pair_itc(ids, mask.bool(), video, pair_text, pair_video) / head._itc_scale()
    assert torch.allclose(got.view(n, n), want, atol=1e-5, rtol=0)
    # the full re-ranking score is ITM log-odds + scale * ITC
    parts = head.pair_score(ids, mask.bool(), tokens, torch.ones(n, 1, dtype=torch.bool), pair_text, pair_video,
                            parts=True)
    assert torch.allclose(parts[:, 1], got * head._itc_scale(), atol=1e-5)


def _to_lavis(name: str) -> str:
    for pattern, repl in ((r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
                          (r"^embeddings\.", "Qformer.bert.embeddings."),
                          (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
                          (r"\.(attention|crossattention)\.attention\.", r".\1.self."),
                          (r"^vision_projection\.", "vision_proj."), (r"^text_projection\.", "text_proj.")):
        name = re.sub(pattern, repl, name)
    return name


def test_lavis_checkpoint_loads_the_same_weights(blip2_dir: Path, tmp_path: Path) -> None:
    hf = read_blip2(blip2_dir)
    lavis = {_to_lavis(k): v for k, v in hf.tensors.items()}
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis
    assert all(lavis_to_hf(k) == k2 for k, k2 in zip(lavis, hf.tensors))
    lavis["temp"] = torch.tensor(0.05)
    torch.save({"model": lavis}, tmp_path / "blip2.pth")
    w = read_blip2(tmp_path / "blip2.pth", heads=TINY_BLIP2["heads"])
    assert {k: w.layout[k] for k in ("width", "layers", "num_queries", "cross_every", "vocab_size")} == \
        {k: hf.layout[k] for k in ("width", "layers", "num_queries", "cross_every", "vocab_size")}
    a, b = _head(hf, mode="both"), _head(w, mode="both")
    load_blip2(a, hf)
    report = load_blip2(b, w)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "itc_logit_scale")
    assert abs(float(b._itc_scale().detach()) - 20.0) < 1e-4  # 1 / temp
    assert {n.split(".")[0] for n in report.kept} == {"selector", "frame_pos"}  # the temporal pass's own parts


def test_shape_mismatch_is_reported_per_tensor_and_reinit_visual_kv(blip2_dir: Path) -> None:
    w = read_blip2(blip2_dir)
    wide = 2 * w.layout["encoder_width"]  # tokens of another encoder than the Q-Former was trained on
    head = create_head("crosstvr", wide, 0, stage=2, **options_from_layout(w.layout))
    with pytest.raises(CheckpointError) as info:
        load_blip2(head, w)
    msg = str(info.value)
    assert "block.layers.0.cross_attn.k.weight (32, 48) vs qformer.encoder.layer.0.crossattention." \
           "attention.key.weight (32, 24)" in msg
    assert "2 tensors differ" in msg and "--reinit-visual-kv" in msg
    before = head.block.layers[0].cross_attn.k.weight.clone()
    report = load_blip2(head, w, reinit_visual_kv=True)
    assert report.reinitialised == ["block.layers.0.cross_attn.k.weight", "block.layers.0.cross_attn.v.weight"]
    assert torch.equal(head.block.layers[0].cross_attn.k.weight, before)
    assert torch.equal(head.block.layers[0].cross_attn.q.weight,
                       w.tensors["qformer.encoder.layer.0.crossattention.attention.query.weight"])
    # a width mismatch elsewhere is not re-initialised silently
    other = create_head("crosstvr", w.layout["encoder_width"], 0, stage=2, **{**options_from_layout(w.layout), "num_queries": 3})
    with pytest.raises(CheckpointError, match=r"queries \(3, 32\) vs query_tokens \(1, 4, 32\)"):
        load_blip2(other, w, reinit_visual_kv=True)


def test_save_blip2_round_trip(blip2_dir: Path, tmp_path: Path) -> None:
    w = read_blip2(blip2_dir)
    head = _head(w, mode="both")
    load_blip2(head, w)
    with torch.no_grad():
        head.itc_logit_scale.fill_(3.0)
    save_blip2(head, tmp_path / "saved")
    again = read_blip2(tmp_path / "saved")
    assert {k: again.layout[k] for k in SHAPE_OPTIONS if k in again.layout} == \
        {k: w.layout[k] for k in SHAPE_OPTIONS if k in w.layout}
    for name in weight_table(head).values():
        for n in (name if isinstance(name, tuple) else (name,)):
            assert torch.equal(again.tensors[n], w.tensors[n]), n
    fresh = _head(again, mode="both")
    load_blip2(fresh, again)
    assert abs(float(fresh.itc_logit_scale.detach()) - 3.0) < 1e-5


def test_missing_or_foreign_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such BLIP-2 checkpoint"):
        read_blip2(tmp_path / "nothing")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "d" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no qformer_config: not a BLIP-2 checkpoint"):
        read_blip2(tmp_path / "d")


def test_caption_tokenizer_equals_transformers(blip2_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours = CaptionTokenizer.from_dir(blip2_dir)
    ids, mask = ours.encode(CAPTIONS, length=8)
    ref = AutoTokenizer.from_pretrained(blip2_dir)(CAPTIONS, padding="max_length", truncation=True, max_length=8)
    assert ids.tolist() == ref["input_ids"] and mask.astype(int).tolist() == ref["attention_mask"]
    assert ids[3, -1] == 3  # truncated captions keep their [SEP]
    # it survives the checkpoint round trip (files carried as data)
    again = CaptionTokenizer.from_state(ours.state())
    assert again.encode(CAPTIONS, 8)[0].tolist() == ids.tolist()


def test_paper_size_preset_has_blip2_qformer_shapes() -> None:
    assert "crosstvr-blip2" in list_presets()
    preset = get_preset("crosstvr-blip2")
    with torch.device("meta"):
        head = create_head(preset["head"], 1408, 0, stage=2, **preset["head_config"])
    params = dict(head.named_parameters())
    layers = head.block.layers
    assert len(layers) == 12 and [i for i, layer in enumerate(layers) if layer.cross_attn is not None] == list(range(0, 12, 2))
    assert params["queries"].shape == (32, 768)
    assert params["block.layers.0.cross_attn.k.weight"].shape == (768, 1408)
    assert params["block.layers.0.self_attn.in_proj_weight"].shape == (3 * 768, 768)
    assert params["block.layers.0.ffn_query.fc1.weight"].shape == (3072, 768)
    assert params["word_embeddings.weight"].shape == (30523, 768) and params["itc_vision.weight"].shape == (256, 768)
    assert head.block.layers[0].norm_self.eps == 1e-12 and head.block.embed_norm is not None
    # every Q-Former parameter has a BLIP-2 tensor; only the temporal pass's own parts do not
    table = weight_table(head)
    assert {n.split(".")[0] for n in params if n not in table and n != "itc_logit_scale"} == {"selector", "frame_pos"}
    assert preset["train"]["lr"] == 1e-4 and preset["train"]["batch_size"] == 128 and preset["train"]["val_candidates"] == 15
    assert 185e6 < head.num_parameters() < 190e6


def test_train_head_init_from_and_rerank_from_the_cli(tiny_world: dict, tmp_path: Path) -> None:
    """``train-head --preset crosstvr-blip2 --init-from DIR`` on a store, then ``rerank``: the head
    starts from the checkpoint, reads captions through its tokenizer (from the manifest), and the
    checkpoint carries that tokenizer."""
    work, store = tiny_world["work"], tiny_world["store"]
    token_dim = json.loads((Path(store) / "zarr.json").read_text())["attributes"]["encoder"]["token_dim"]
    blip2 = make_blip2_dir(tmp_path / "blip2", vision_hidden=token_dim)
    s1 = tmp_path / "s1"
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP", "--epochs", "1",
             "--batch-size", "8", "--out", s1])
    out = run_cli(["train-head", "--preset", "crosstvr-blip2", "--init-from", blip2, "--store", store,
                   "--work-dir", work, "--stage-one", s1 / "stage_one.pt", "--epochs", "1", "--batch-size", "4",
                   "--val-queries", "4", "--text-len", "12", "--out", tmp_path / "head", "--device", "cpu"])
    assert f"checkpoint: {tmp_path / 'head' / 'stage_two.pt'}" in out
    ckpt = load_stage_two(tmp_path / "head")
    assert ckpt.config["text_input"] == "ids" and ckpt.config["width"] == TINY_BLIP2["qformer_hidden"]
    assert ckpt.config["spatial_frames"] is None and ckpt.train_args["lr"] == 1e-4  # the preset's recipe
    assert ckpt.train_args["hard_negatives"] == "hard" and ckpt.text_len == 12
    assert ckpt.init["kind"] == "hf" and ckpt.init["loaded"] > 0
    assert ckpt.caption_tokenizer().encode(["a red square"], 12)[0][0, :3].tolist() == [2, 5, 7]
    out = run_cli(["rerank", "--store", store, "--work-dir", work, "--stage-one", s1 / "stage_one.pt",
                   "--stage-two", tmp_path / "head", "--candidates", "3", "--out", tmp_path / "rr"])
    metrics = json.loads((tmp_path / "rr" / "metrics.json").read_text())
    assert "pairs scored" in out and metrics
    # without the manifest, the head cannot read the captions: one clear line, exit 2
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.main, [str(a) for a in (
        "rerank", "--store", store, "--work-dir", tmp_path / "elsewhere", "--stage-one", s1 / "stage_one.pt",
        "--stage-two", tmp_path / "head", "--candidates", "3", "--out", tmp_path / "rr2")])
    assert result.exit_code == 2 and "give --manifest DIR" in result.output


@pytest.mark.slow
def test_pretrain_qformer_writes_a_blip2_checkpoint_that_init_from_loads(tiny_world: dict, tmp_path: Path) -> None:
    """BLIP-2's first stage in miniature: ITC + ITM on single frames lowers both losses, the result is a
    BLIP-2 directory (weights, config, tokenizer) and ``train-head --init-from`` starts from it."""
    work, store = tiny_world["work"], tiny_world["store"]
    out = run_cli(["pretrain-qformer", "--store", store, "--work-dir", work, "--steps", "30", "--batch-size", "8",
                   "--lr", "1e-3", "--option", "width=32", "--option", "heads=2", "--option", "num_queries=4",
                   "--option", "itc_dim=16", "--itm-negatives", "1", "--out", tmp_path / "qformer"])
    assert f"BLIP-2 checkpoint: {tmp_path / 'qformer'}" in out
    record = json.loads((tmp_path / "qformer" / "pretrain.json").read_text())
    assert record["args"]["itm_negatives"] == 1
    hist = record["history"]
    assert hist[-1]["itc"] < hist[0]["itc"]
    w = read_blip2(tmp_path / "qformer")
    assert w.layout["width"] == 32 and w.layout["num_queries"] == 4 and w.layout["embed_dim"] == 16
    tok = CaptionTokenizer.from_dir(tmp_path / "qformer")
    assert tok.vocab_size == w.layout["vocab_size"]
    ids, mask = tok.encode(["zzz"], 4)
    assert ids[0].tolist() == [2, 1, 3, 0] and mask[0].tolist() == [True, True, True, False]  # [CLS] [UNK] [SEP]
    s1 = tmp_path / "s1"
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP", "--epochs", "1",
             "--batch-size", "8", "--out", s1])
    run_cli(["train-head", "--init-from", tmp_path / "qformer", "--store", store, "--work-dir", work,
             "--stage-one", s1 / "stage_one.pt", "--epochs", "1", "--batch-size", "4", "--itc-steps", "0",
             "--val-queries", "4", "--out", tmp_path / "head"])
    ckpt = load_stage_two(tmp_path / "head")
    assert ckpt.init["loaded"] > 0 and ckpt.config["width"] == 32
    assert ckpt.caption_tokenizer().vocab_size == tok.vocab_size
