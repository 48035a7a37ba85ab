"""bf16 autocast keeps the tokens' outlier channels: the standardisation folded into a stage-two head's
input projections centres the tokens in float32 before the matmul rounds them to 16 bits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heads import create_head
from heads.stage_two.layers import standardised_linear
from helpers import TINY

BOUND = 0.006  # relative error of bf16 against float32; centring first measures 0.28%, folding the mean 2.3%
DIM, OUTLIERS = 768, 4  # ViT-B/32 width; a few channels with a large mean, as ViT tokens have


def outlier_stats(dim: int = DIM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std: ``OUTLIERS`` channels at mean 60, std 0.5, the rest moderate."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=g) * 0.5
    std = torch.rand(dim, generator=g) + 0.5
    mean[:OUTLIERS], std[:OUTLIERS] = 60.0, 0.5
    return mean, std


def tokens_like(mean: torch.Tensor, std: torch.Tensor, *shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, mean.numel(), generator=g) * std + mean


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def bf16(fn, *args):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args)


def test_bf16_projection_keeps_outlier_channels():
    mean, std = outlier_stats()
    x = tokens_like(mean, std, 4096)
    torch.manual_seed(0)
    linear = nn.Linear(DIM, 256)
    with torch.no_grad():
        want = linear((x - mean) / std)
        got = bf16(standardised_linear, x, linear, mean, std)
        w = linear.weight / std
        folded = bf16(F.linear, x, w, linear.bias - w @ mean)  # the mean folded into the bias: rounded raw
    assert relative_error(got, want) < BOUND
    assert relative_error(folded, want) > 3 * BOUND  # the bound tells the two apart


def test_float32_projection_is_the_folded_one_bit_for_bit():
    mean, std = outlier_stats(64)
    x = tokens_like(mean, std, 3, 5).half()  # stored tokens are 16-bit; the head widens them
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        w = linear.weight / std
        assert torch.equal(standardised_linear(x, linear, mean, std), F.linear(x.float(), w, linear.bias - w @ mean))


@pytest.mark.parametrize("path", ["visual", "text"])
def test_bf16_head_inputs_keep_outlier_channels(path):
    """A CrossTVR head's standardised visual and text projections under the trainers' bf16 autocast."""
    torch.manual_seed(0)
    head = create_head("crosstvr", DIM, DIM, **TINY).eval()
    mean, std = outlier_stats()
    s = head.standardizer
    for m, sd in ((s.visual_mean, s.visual_std), (s.text_mean, s.text_std)):
        m.copy_(mean)
        sd.copy_(std)
    if path == "visual":
        x, mask = tokens_like(mean, std, 2, 4, 50), torch.tensor([[True] * 4, [True] * 3 + [False]])
        run = lambda: head.visual(x, mask)[0]  # noqa: E731
    else:
        x, mask = tokens_like(mean, std, 8, 32), torch.arange(32)[None, :] < torch.arange(25, 33)[:, None]
        run = lambda: head._text(x, mask)[0]  # noqa: E731
    with torch.no_grad():
        want = run()
    assert relative_error(bf16(run), want) < BOUND
