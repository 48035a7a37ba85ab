"""The BLIP-2 backend against transformers' own BLIP-2 (a tiny random checkpoint written by
transformers, tests/blip2_world.py), and open_clip tokens from a chosen block (--token-layer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import cli
from blip2_world import TINY_BLIP2, blip2_config, load_reference, make_blip2_dir
from core.errors import EncoderError
from core.fileio import sha256_file
from manifests import Manifest
from pipeline.encoders import EncoderSpec, FrozenEncoder, load_encoder, parse_encoder, with_token_layer
from pipeline.store import CacheStore
from helpers import run_cli, write_video

TEXTS = ["a red square moves left", "the big blue star spins in the corner and appears early", "a"]
ATOL = dict(rtol=0.0, atol=1e-5)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> Path:
    return make_blip2_dir(tmp_path_factory.mktemp("blip2") / "blip2-tiny")


@pytest.fixture(scope="module")
def blip2(blip2_dir):
    return load_encoder(f"blip2:{blip2_dir}")


@pytest.fixture(scope="module")
def reference(blip2_dir):
    return load_reference(blip2_dir)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# -- the BLIP-2 backend --------------------------------------------------------------------------
def test_blip2_outputs_equal_the_reference(blip2, reference):
    frames = torch.randint(0, 256, (3, 40, 56, 3), dtype=torch.uint8)
    x = blip2.preprocess(frames)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    tokens, emb = blip2.encode_images(x)
    s = TINY_BLIP2
    assert blip2.num_tokens == 1 + (s["image_size"] // s["patch_size"]) ** 2 == tokens.shape[1]
    assert (blip2.token_dim, blip2.embed_dim, blip2.text_dim) == (s["vision_hidden"], s["embed_dim"],
                                                                 s["qformer_hidden"])
    ids = reference_ids(blip2, TEXTS)
    with torch.no_grad():
        vision = reference.vision_model(pixel_values=x).last_hidden_state
        out = reference(pixel_values=x, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                        use_image_text_matching_head=False)
    # tokens: Blip2VisionModel's last_hidden_state (after post_layernorm = ln_vision)
    torch.testing.assert_close(tokens, vision, **ATOL)
    torch.testing.assert_close(tokens, out.vision_model_output.last_hidden_state, **ATOL)
    # frame embedding: mean over queries of the reference's L2-normalised ITC query embeddings
    assert out.image_embeds.shape == (3, s["num_queries"], s["embed_dim"])
    torch.testing.assert_close(emb, out.image_embeds.mean(dim=1), **ATOL)
    torch.testing.assert_close(blip2.encode_frames(frames)[1], emb, **ATOL)
    # text: the ITC text side; the embedding is text_projection of [CLS], not normalised
    ttok, mask, temb = blip2.encode_texts(TEXTS, max_tokens=8)
    torch.testing.assert_close(F.normalize(temb, dim=-1), out.text_embeds, **ATOL)
    with torch.no_grad():
        hidden = reference.qformer(query_embeds=reference.embeddings(input_ids=ids["input_ids"]), query_length=0,
                                   attention_mask=ids["attention_mask"]).last_hidden_state
        torch.testing.assert_close(temb, reference.text_projection(hidden[:, 0]), **ATOL)
    assert not torch.allclose(temb.norm(dim=-1), torch.ones(3))
    # text tokens: the text-only pass's hidden states, cut to max_tokens, with a validity mask
    assert ttok.shape == (3, 8, s["qformer_hidden"]) and mask.dtype == torch.bool
    torch.testing.assert_close(ttok[mask], hidden[:, :8][mask], **ATOL)
    assert mask[2].tolist() == [True] * 3 + [False] * 5  # [CLS] a [SEP]
    assert mask[0].tolist() == [True] * 7 + [False] and mask[1].all()
    assert (ttok[2, 3:] == 0).all()
    # padding to more tokens than the longest text; a text's result does not depend on its batch
    wide, wmask, wemb = blip2.encode_texts(TEXTS, max_tokens=20)
    assert wide.shape == (3, 20, s["qformer_hidden"]) and not wmask[:, 14:].any()
    alone, amask, aemb = blip2.encode_texts(TEXTS[2:], max_tokens=8)
    torch.testing.assert_close(alone, ttok[2:], **ATOL)
    torch.testing.assert_close(aemb, temb[2:], **ATOL)
    assert blip2.encode_texts([], max_tokens=8)[0].shape == (0, 8, s["qformer_hidden"])


def reference_ids(enc, texts):
    """The Q-Former's tokenizer as transformers' processor calls it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(enc.directory)(texts, padding=True, return_tensors="pt")


def test_blip2_preprocessing_is_the_image_processors(blip2, blip2_dir):
    from transformers import BlipImageProcessor

    proc = BlipImageProcessor.from_pretrained(blip2_dir)
    assert blip2.image_size == 32 and blip2.resize == "square"
    assert blip2.mean == tuple(proc.image_mean) and blip2.std == tuple(proc.image_std)
    # at the model's size no resampling happens: the pixel values are the processor's
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ref = proc(images=list(frames), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(blip2.preprocess(torch.from_numpy(frames)), ref, **ATOL)
    # other sizes: squashed to size x size (no crop), like the processor, up to resampling detail
    smooth = np.repeat(np.repeat(np.random.default_rng(1).integers(0, 256, (1, 8, 12, 3)), 8, 1), 8, 2)
    smooth = smooth.astype(np.uint8)  # 64x96, blocky: a 2:3 frame squashed to 32x32
    ours = blip2.preprocess(torch.from_numpy(smooth))
    theirs = proc(images=list(smooth), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert float((ours - theirs).abs().mean()) < 0.05, float((ours - theirs).abs().mean())
    cropped = blip2.preprocess(torch.from_numpy(np.ascontiguousarray(smooth[:, :, 16:80])))
    assert float((cropped - theirs).abs().mean()) > 0.1  # a centre crop would be another image


def test_blip2_identity(blip2, blip2_dir, tmp_path):
    ident = blip2.identity()
    assert json.loads(json.dumps(ident)) == ident and str(blip2_dir.parent) not in json.dumps(ident)
    assert ident["kind"] == "blip2" and ident["weights"]["kind"] == "blip2"
    assert ident["weights"]["sha256"] == {"model.safetensors": sha256_file(blip2_dir / "model.safetensors")}
    assert ident["tokens"] == "vision_model last_hidden_state: second-last EVA block + ln_vision (post_layernorm)"
    assert (ident["image_size"], ident["num_tokens"], ident["token_dim"], ident["embed_dim"], ident["text_dim"]) \
        == (32, 17, 24, 16, 32)
    assert ident["mean"] == list(blip2.mean) and ident["std"] == list(blip2.std)
    assert "token_layer" not in ident
    other = load_encoder(f"blip2:{make_blip2_dir(tmp_path / 'other', seed=1)}")
    assert other.identity()["weights"] != ident["weights"]
    assert parse_encoder(f"blip2:{blip2_dir}") == EncoderSpec("blip2", str(blip2_dir))
    assert parse_encoder(f"blip2:{blip2_dir}").short_name() == "blip2-blip2-tiny"


@pytest.mark.parametrize("arch", ["Blip2ForConditionalGeneration", "Blip2Model"])
def test_a_vision_only_blip2_save_is_refused_by_name(tmp_path, arch):
    import transformers

    d = tmp_path / arch
    getattr(transformers, arch)(blip2_config()).save_pretrained(d)
    with pytest.raises(EncoderError) as exc:
        load_encoder(f"blip2:{d}")
    text = one_line(exc)
    assert str(d) in text and "text_projection" in text and "vision side only" in text
    assert "Blip2ForImageTextRetrieval" in text


def test_a_missing_or_foreign_directory_is_one_line(tmp_path, blip2_dir, toy_manifest):
    cases = {}
    cases["no such directory"] = tmp_path / "nowhere"
    (tmp_path / "empty").mkdir()
    cases["no config.json"] = tmp_path / "empty"
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    cases["'clip' model, not BLIP-2"] = tmp_path / "clip"
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((blip2_dir / "config.json").read_text())
    cases["no model.safetensors"] = noweights
    for expect, d in cases.items():
        with pytest.raises(EncoderError) as exc:
            load_encoder(f"blip2:{d}")
        text = one_line(exc)
        assert expect in text and f"blip2:{d}" in text, text
    with pytest.raises(EncoderError, match="give the BLIP-2 directory"):
        parse_encoder("blip2:")
    with pytest.raises(EncoderError, match="tokens are fixed"):
        parse_encoder(f"blip2:{tmp_path}/x@-2")
    result = CliRunner().invoke(cli.main, [str(a) for a in ["extract", "--manifest", toy_manifest, "--work-dir",
                                                            tmp_path / "w", "--encoder", f"blip2:{tmp_path / 'nowhere'}"]])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: blip2:{tmp_path / 'nowhere'}: no such directory" in result.output


def test_a_sharded_save_loads_and_every_shard_is_in_the_identity(tmp_path, blip2_dir, blip2, reference):
    import shutil

    d = tmp_path / "sharded"
    reference.save_pretrained(d, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(blip2_dir / name, d / name)
    assert not (d / "model.safetensors").exists() and (d / "model.safetensors.index.json").is_file()
    enc = load_encoder(f"blip2:{d}")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(enc.identity()["weights"]["sha256"]) == shards
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    for a, b in zip(enc.encode_frames(frames), blip2.encode_frames(frames)):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
    torch.testing.assert_close(enc.encode_texts(TEXTS)[2], blip2.encode_texts(TEXTS)[2], rtol=0.0, atol=0.0)
    (d / shards[-1]).unlink()
    with pytest.raises(EncoderError) as exc:
        load_encoder(f"blip2:{d}")
    assert shards[-1] in one_line(exc) and "missing" in str(exc.value)


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    videos = [{"video_id": f"v{i}", "path": str(write_video(root / f"v{i}.mp4", width=80, height=48, seed=i)),
               "split": "test"} for i in range(3)]
    captions = [{"caption_id": f"v{i}-c", "video_id": f"v{i}", "text": TEXTS[i], "split": "test"}
                for i in range(3)]
    Manifest.from_records("toy", videos, captions, root=root).write(root / "manifest")
    return root / "manifest"


@pytest.mark.integration
def test_cli_extracts_a_blip2_store(tmp_path, toy_manifest, blip2_dir, blip2):
    from pipeline.decode import decode_video

    out = run_cli(["extract", "--manifest", toy_manifest, "--work-dir", tmp_path / "work", "--encoder",
                   f"blip2:{blip2_dir}", "--frames", "3", "--workers", "1", "--shard-size", "2"])
    (path,) = (tmp_path / "work" / "stores").glob("toy-blip2-blip2-tiny*.zarr")
    assert f"store: {path}" in out
    store = CacheStore.open(path)
    assert store.is_complete() and store.failures() == {}
    ident = store.encoder_identity
    assert ident["kind"] == "blip2" and ident == blip2.store_identity("worker")
    tokens = store.array("videos/tokens")[:]
    assert tokens.shape == (3, 3, 17, 24)
    assert store.array("videos/frame_emb").shape == (3, 3, 16)
    assert store.array("texts/tokens").shape == (3, 32, 32) and store.array("texts/emb").shape == (3, 16)
    # what the store holds is what the encoder gives on the decoded frames
    res = decode_video("v1", Path(toy_manifest).parent / "v1.mp4", 3, blip2.image_size)
    tok, emb = blip2.encode_frames(torch.from_numpy(res.valid_frames))
    row = store.video_ids.index("v1")
    np.testing.assert_allclose(tokens[row], tok.numpy(), rtol=0, atol=2e-2)
    np.testing.assert_allclose(store.array("videos/frame_emb")[row], emb.numpy(), rtol=0, atol=1e-5)
    _, mask, temb = blip2.encode_texts(TEXTS, max_tokens=32)
    np.testing.assert_allclose(store.array("texts/emb")[:], temb.numpy(), rtol=0, atol=1e-5)
    assert (store.array("texts/mask")[:] == mask.numpy()).all()


# -- open_clip tokens from a chosen block ----------------------------------------------------------
def manual_blocks(model, x, upto):
    """The visual tower of open_clip's VisionTransformer run block by block, no final norm."""
    visual = model.visual
    h = visual._embeds(x)
    if not visual.transformer.batch_first:
        h = h.transpose(0, 1)
    for block in visual.transformer.resblocks[:upto + 1]:
        h = block(h)
    return h if visual.transformer.batch_first else h.transpose(0, 1)


def test_token_layer_on_open_clips_vision_transformer(micro):
    frames = torch.randint(0, 256, (2, 48, 80, 3), dtype=torch.uint8)
    x = micro.preprocess(frames)
    default_tokens, default_emb = micro.encode_frames(frames)
    last = load_encoder("test-vit-micro@-1")
    assert last.spec == EncoderSpec("test-vit-micro", None, -1) and last.token_layer == 1
    tokens, emb = last.encode_frames(frames)
    assert tokens.shape == default_tokens.shape == (2, 17, 64)
    assert not torch.allclose(tokens, default_tokens, atol=1e-3)  # no final norm
    torch.testing.assert_close(tokens, manual_blocks(micro.model, x, 1))
    torch.testing.assert_close(micro.model.visual.ln_post(tokens), default_tokens)
    torch.testing.assert_close(emb, default_emb)  # the frame embedding is still encode_image's
    torch.testing.assert_close(emb, micro.model.encode_image(x))
    first = load_encoder(with_token_layer(parse_encoder("test-vit-micro"), 0))
    torch.testing.assert_close(first.encode_frames(frames)[0], manual_blocks(micro.model, x, 0))
    # identities: token_layer only when set, the block counted from 0 (so @-2 == @0 on two blocks)
    assert "token_layer" not in micro.identity()
    assert last.identity()["token_layer"] == 1 and "no final norm" in last.identity()["tokens"]
    assert first.identity() == load_encoder("test-vit-micro@-2").identity() != last.identity()
    rest = {k: v for k, v in last.identity().items() if k not in ("token_layer", "tokens")}
    assert rest == {k: v for k, v in micro.identity().items() if k != "tokens"}


def test_token_layer_out_of_range_is_one_line():
    for layer in (2, -3):
        with pytest.raises(EncoderError) as exc:
            load_encoder(f"test-vit-micro@{layer}")
        text = one_line(exc)
        assert f"--token-layer {layer} is out of range" in text and "2 blocks" in text


def test_token_layer_specs():
    assert parse_encoder("eva-g14@-2") == EncoderSpec("EVA01-g-14", "laion400m_s11b_b41k", -2)
    spec = parse_encoder("ViT-B-32:openai@-2")
    assert str(spec) == "ViT-B-32:openai@-2" and parse_encoder(str(spec)) == spec
    assert spec.short_name() == "ViT-B-32-openai-layer-2"
    assert parse_encoder("ViT-B-32:openai") == EncoderSpec("ViT-B-32", "openai")  # unchanged without @N
    assert with_token_layer(spec, -2) == spec and with_token_layer(spec, None) == spec
    with pytest.raises(EncoderError, match="conflicts"):
        with_token_layer(spec, 3)
    with pytest.raises(EncoderError, match="open_clip encoders only"):
        with_token_layer(EncoderSpec("blip2", "/some/dir"), -2)


def test_token_layer_on_a_timm_trunk():
    """EVA trunks (timm, like EVA01-g-14): the output of trunk.blocks[N], before trunk.norm."""
    import open_clip

    from pipeline.encoders import register_model_configs

    register_model_configs()
    model = open_clip.create_model("test-eva-tiny")
    model.visual.trunk.blocks = model.visual.trunk.blocks[:3]  # 3 of eva02-tiny's 12 blocks: a quicker test
    tokenizer = open_clip.get_tokenizer("test-eva-tiny")
    enc = FrozenEncoder(parse_encoder("test-eva-tiny"), model, tokenizer)
    second_last = FrozenEncoder(parse_encoder("test-eva-tiny@-2"), model, tokenizer)  # same weights
    frames = torch.randint(0, 256, (1, 240, 320, 3), dtype=torch.uint8)
    x = enc.preprocess(frames)
    trunk = enc.model.visual.trunk
    with torch.no_grad():
        h = trunk.norm_pre(trunk.patch_embed(x))
        h, rope = trunk._pos_embed(h)
        for block in trunk.blocks[:-1]:
            h = block(h, rope=rope)
    tokens, emb = second_last.encode_frames(frames)
    assert second_last.identity()["token_layer"] == len(trunk.blocks) - 2 == 1
    torch.testing.assert_close(tokens, h)
    default_tokens, default_emb = enc.encode_frames(frames)
    torch.testing.assert_close(emb, default_emb)
    torch.testing.assert_close(emb, enc.model.encode_image(x))
    assert not torch.allclose(tokens, default_tokens, atol=1e-3)


@pytest.mark.integration
def test_cli_token_layer(tmp_path, toy_manifest, blip2_dir):
    args = ["extract", "--manifest", toy_manifest, "--work-dir", tmp_path / "work", "--encoder", "test-vit-micro",
            "--frames", "2", "--workers", "1"]
    run_cli([*args, "--token-layer", "-1"])
    (path,) = (tmp_path / "work" / "stores").glob("toy-test-vit-micro-random-layer-1*.zarr")
    ident = CacheStore.open(path).encoder_identity
    assert ident["token_layer"] == 1
    run_cli(args)
    (plain,) = (tmp_path / "work" / "stores").glob("toy-test-vit-micro-random.zarr")
    assert "token_layer" not in CacheStore.open(plain).encoder_identity
    bad = CliRunner().invoke(cli.main, [str(a) for a in [*args, "--token-layer", "7"]])
    assert bad.exit_code == 1 and "--token-layer 7 is out of range" in bad.output and "Traceback" not in bad.output
    blip = CliRunner().invoke(cli.main, [str(a) for a in ["extract", "--manifest", toy_manifest, "--work-dir",
                                                          tmp_path / "w2", "--encoder", f"blip2:{blip2_dir}",
                                                          "--token-layer", "-2"]])
    assert blip.exit_code == 1 and "open_clip encoders only" in blip.output
