"""Encoder registry: parsing, token shapes and agreement with open_clip's own encoders."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.encoders import (PRESETS, EncoderError, EncoderSpec, load_encoder, parse_encoder)

TEXTS = ["a red square moves to the left", "a small blue circle appears in the corner", "hi"]


def test_parse_encoder():
    assert parse_encoder("clip-b32") == EncoderSpec("ViT-B-32", "openai")
    assert parse_encoder("eva-g14") == EncoderSpec("EVA01-g-14", "laion400m_s11b_b41k")
    assert parse_encoder("ViT-B-32") == EncoderSpec("ViT-B-32", None)
    assert parse_encoder("ViT-B-32:laion2b_s34b_b79k") == EncoderSpec("ViT-B-32", "laion2b_s34b_b79k")
    spec = parse_encoder("ViT-B-32:/tmp/x/ckpt.pt")
    assert spec == EncoderSpec("ViT-B-32", "/tmp/x/ckpt.pt") and spec.is_checkpoint
    assert parse_encoder("synth-b32-tiny:/w/enc.pt") == EncoderSpec("synth-vit-b32-tiny", "/w/enc.pt")
    assert not parse_encoder("clip-b32").is_checkpoint
    assert str(parse_encoder("ViT-B-32:openai")) == "ViT-B-32:openai"
    assert parse_encoder("clip-b32").short_name() == "ViT-B-32-openai"
    assert set(PRESETS) >= {"clip-b32", "eva-g14"}
    with pytest.raises(EncoderError):
        parse_encoder("ViT-B-32:")


def test_unknown_model_is_clear():
    with pytest.raises(EncoderError, match="unknown open_clip model"):
        load_encoder("no-such-model")


def test_micro_matches_open_clip(micro):
    frames = torch.randint(0, 256, (3, 48, 80, 3), dtype=torch.uint8)
    tokens, emb = micro.encode_frames(frames)
    assert tokens.shape == (3, micro.num_tokens, micro.token_dim) == (3, 17, 64)
    assert emb.shape == (3, micro.embed_dim) == (3, 32)
    x = micro.preprocess(frames)
    assert x.shape == (3, 3, 64, 64)
    ref = micro.model.encode_image(x)
    torch.testing.assert_close(emb, ref)
    # projected CLS token == embedding
    torch.testing.assert_close(tokens[:, 0] @ micro.model.visual.proj, emb)

    ttok, mask, temb = micro.encode_texts(TEXTS, max_tokens=8)
    assert ttok.shape == (3, 8, micro.text_dim) and mask.shape == (3, 8) and mask.dtype == torch.bool
    torch.testing.assert_close(temb, micro.model.encode_text(micro.tokenize(TEXTS)))
    assert mask[2].tolist() == [True, True, True] + [False] * 5  # <start> hi <end>
    assert mask[0].all()  # long caption truncated to 8 tokens
    # tokens are a prefix of the full-context tokens
    full, fmask, _ = micro.encode_texts(TEXTS, max_tokens=77)
    torch.testing.assert_close(full[:, :8], ttok)


def test_identity_is_json_and_stable(micro):
    ident = micro.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["name"] == "test-vit-micro" and ident["weights"] == {"kind": "random", "seed": 0}
    again = load_encoder("test-vit-micro")
    assert again.identity() == ident
    f = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    torch.testing.assert_close(again.encode_frames(f)[1], micro.encode_frames(f)[1])


def test_local_checkpoint_roundtrip(micro, tmp_path):
    import open_clip

    torch.manual_seed(123)  # weights that differ from the seeded random init
    model = open_clip.create_model("test-vit-micro", pretrained=None)
    ckpt = tmp_path / "micro.pt"
    torch.save(model.state_dict(), ckpt)
    enc = load_encoder(EncoderSpec("test-vit-micro", str(ckpt)))
    ident = enc.identity()
    assert ident["weights"]["kind"] == "checkpoint" and str(tmp_path) not in json.dumps(ident)
    assert len(ident["weights"]["sha256"]) == 64 and ident != micro.identity()
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = enc.preprocess(frames)
    model.eval()
    tok, emb = enc.encode_frames(frames)
    torch.testing.assert_close(emb, model.encode_image(x))
    _, _, temb = enc.encode_texts(TEXTS, max_tokens=32)
    torch.testing.assert_close(temb, model.encode_text(enc.tokenize(TEXTS)))
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(EncoderSpec("test-vit-micro", str(tmp_path / "missing.pt")))


def test_vit_b32_random_shapes():
    enc = load_encoder("ViT-B-32")
    assert (enc.num_tokens, enc.token_dim, enc.embed_dim, enc.text_dim) == (50, 768, 512, 512)
    frames = torch.randint(0, 256, (1, 240, 320, 3), dtype=torch.uint8)
    tokens, emb = enc.encode_frames(frames)
    assert tokens.shape == (1, 50, 768) and emb.shape == (1, 512)
    torch.testing.assert_close(emb, enc.model.encode_image(enc.preprocess(frames)), rtol=1e-4, atol=1e-4)
    ttok, mask, temb = enc.encode_texts(TEXTS[:1], max_tokens=32)
    assert ttok.shape == (1, 32, 512) and temb.shape == (1, 512)
