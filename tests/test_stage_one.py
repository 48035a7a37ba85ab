"""Stage-one heads, registry and loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.errors import UnknownHeadError
from heads import create_head, list_heads, supports
from heads.stage_one.losses import positive_mask, symmetric_infonce
from heads.stage_one.models import CLIP_LOGIT_SCALE, MeanP, SeqTransf

E, T = 32, 6


def _inputs(b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, T, E, generator=g)
    lengths = torch.tensor([T, 1, 3, T - 1, 2][:b])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    text = torch.randn(b, E, generator=g)
    return frames, mask, text


def test_registry_and_unknown_name() -> None:
    assert set(list_heads(stage=1)) == {"meanP", "seqTransf", "clip2video"}
    assert list_heads(stage=1, supports="text_tokens") == ["clip2video"] and supports("clip2video", "text_tokens")
    assert isinstance(create_head("meanP", E), MeanP)
    assert isinstance(create_head("seqTransf", E, num_layers=1, num_heads=4), SeqTransf)
    with pytest.raises(UnknownHeadError, match="known heads: clip2video, meanP, seqTransf"):
        create_head("xpool", E, stage=1)
    with pytest.raises(UnknownHeadError, match="stage-one head 'crosstvr'"):
        create_head("crosstvr", E, stage=1)
    with pytest.raises(TypeError, match="needs its dimension 'embed_dim'"):
        create_head("meanP")


@pytest.mark.parametrize("name", ["meanP", "seqTransf"])
def test_shapes_gradients_and_config(name: str) -> None:
    torch.manual_seed(0)
    head = create_head(name, E, num_heads=4) if name == "seqTransf" else create_head(name, E)
    frames, mask, text = _inputs()
    v, t = head.encode_video(frames, mask), head.encode_text(text)
    assert v.shape == (5, E) and t.shape == (5, E)
    assert torch.allclose(v.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert math.isclose(head.logit_scale.item(), CLIP_LOGIT_SCALE, rel_tol=1e-6)
    logits = head(text, frames, mask)
    assert logits.shape == (5, 5)
    loss = symmetric_infonce(logits, torch.eye(5, dtype=torch.bool))
    loss.backward()
    assert head.text_proj.weight.grad is not None and head.text_proj.weight.grad.abs().sum() > 0
    assert head.logit_scale.grad is not None and torch.isfinite(head.logit_scale.grad)
    for p in head.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    if name == "seqTransf":
        assert head.out.weight.grad.abs().sum() > 0  # the zero-initialised residual branch learns
    cfg = head.config()
    json.dumps(cfg)
    rebuilt = create_head(**cfg)
    rebuilt.load_state_dict(head.state_dict())
    assert rebuilt.config() == cfg


@pytest.mark.parametrize("name", ["meanP", "seqTransf"])
def test_masked_frames_do_not_change_output(name: str) -> None:
    torch.manual_seed(0)
    head = create_head(name, E, num_heads=4) if name == "seqTransf" else create_head(name, E)
    if name == "seqTransf":  # move away from the meanP initialisation so the transformer matters
        with torch.no_grad():
            head.out.weight.normal_(0, 0.2)
    head.eval()
    frames, mask, _ = _inputs()
    ref = head.encode_video(frames, mask)
    poisoned = frames.clone()
    poisoned[~mask] = torch.randn(int((~mask).sum()), E) * 100
    assert torch.allclose(head.encode_video(poisoned, mask), ref, atol=1e-5)
    poisoned[~mask] = float("nan")
    assert torch.allclose(head.encode_video(poisoned, mask), ref, atol=1e-5)
    # an unmasked frame does matter
    changed = frames.clone()
    changed[0, 0] += 5
    assert not torch.allclose(head.encode_video(changed, mask), ref, atol=1e-4)


def test_seqtransf_starts_at_meanp() -> None:
    torch.manual_seed(0)
    frames, mask, text = _inputs()
    seq = SeqTransf(E, num_heads=4).eval()
    mean = MeanP(E).eval()
    assert torch.allclose(seq.encode_video(frames, mask), mean.encode_video(frames, mask), atol=1e-6)
    assert torch.allclose(seq(text, frames, mask), mean(text, frames, mask), atol=1e-4)


def test_all_masked_video_is_finite() -> None:
    frames, mask, _ = _inputs()
    mask[1] = False
    for head in (MeanP(E), SeqTransf(E, num_heads=4)):
        assert torch.isfinite(head.encode_video(frames, mask)).all()


def test_identity_projection_is_zero_shot() -> None:
    frames, mask, text = _inputs()
    head = MeanP(E)
    assert torch.allclose(head.encode_text(text), torch.nn.functional.normalize(text, dim=-1), atol=1e-6)


def test_infonce_single_and_multi_positive() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    expected = -torch.log_softmax(logits, dim=1)[0, 0]
    assert torch.allclose(symmetric_infonce(logits, torch.eye(2, dtype=torch.bool)), expected)
    # two captions of video 0 and one of video 1 against columns (video 0, video 1)
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    pos = positive_mask(torch.tensor([0, 0, 1]), torch.tensor([0, 1]))
    assert pos.tolist() == [[True, False], [True, False], [False, True]]
    t2v = -torch.log_softmax(logits, dim=1)[[0, 1, 2], [0, 0, 1]].mean()
    col = torch.log_softmax(logits.t(), dim=1)
    v2t = -(torch.logsumexp(col[0, :2], 0) + col[1, 2]) / 2
    assert torch.allclose(symmetric_infonce(logits, pos), 0.5 * (t2v + v2t))


def test_identical_captions_are_mutual_positives() -> None:
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([7, 8, 9])
    pos = positive_mask(ids, ids, text)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
