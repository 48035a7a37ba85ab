"""Shared fixtures: offline hub, few torch threads, tiny generated videos, the real fixture video."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
FIXTURE_VIDEO = FIXTURES / "videos" / "v_GGSY1Qvo990.mp4"


@pytest.fixture(autouse=True, scope="session")
def _offline_and_threads() -> None:
    """No downloads; two torch threads (the machine has two cores)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_video(path: str | Path, num_frames: int = 16, width: int = 96, height: int = 64,
                fps: int = 8, seed: int = 0) -> Path:
    """Write a small h264 mp4 with PyAV; frame ``i`` is a solid colour plus a moving square,
    and its mean red value encodes ``i`` (red = 10 * i mod 250) so tests can check ordering."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for i in range(num_frames):
            img = np.empty((height, width, 3), dtype=np.uint8)
            img[:] = base
            img[..., 0] = (10 * i) % 250
            s = min(width, height) // 4
            x = (i * 3) % max(1, width - s)
            img[:s, x:x + s] = 255 - img[:s, x:x + s]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_video(name, **write_video_kwargs)`` -> path under tmp_path."""

    def _make(name: str = "clip.mp4", **kwargs) -> Path:
        return write_video(tmp_path / name, **kwargs)

    return _make


@pytest.fixture
def fixture_video() -> Path:
    """The real ActivityNet clip shipped in shared/fixtures (skip when absent)."""
    if not FIXTURE_VIDEO.is_file():
        pytest.skip(f"fixture video {FIXTURE_VIDEO} not present")
    return FIXTURE_VIDEO
