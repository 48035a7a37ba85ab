"""The synthetic world's pictures: a scene's frames and its h264 mp4 (docs/SYNTHETIC.md).

A scene (an attrs dict of ``synthetic.world``) is drawn deterministically: the background's texture
and the objects' jitter come from its ``style_seed``, which the members of a group share, so they
differ only where their varied attribute shows. :func:`render_key` hashes everything that
determines the pixels, so a build re-renders only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synthetic.world import FPS, NUM_FRAMES, PATCH, SIZE, detail_cell, detail_visible, frame_time

RENDER_VERSION = 1          # bump when the picture of a given attrs dict changes
DETAIL_SIDE = 28            # detail object side (<= PATCH); a calibration knob
MAIN_SIDE = 84              # main object nominal side (jittered +-8 px per video)
MOTION_AMPLITUDE = 44       # px the main object travels from the centre in each direction
CRF = 18

RGB: dict[str, tuple[int, int, int]] = {
    # backgrounds (muted, so every detail colour contrasts with every background)
    "gray": (118, 118, 118), "black": (22, 22, 24), "beige": (196, 182, 146),
    "navy": (26, 34, 84),
    # objects
    "red": (226, 34, 30), "green": (34, 190, 62), "blue": (46, 110, 250),
    "yellow": (248, 222, 38), "white": (246, 246, 246), "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}


def _style(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Per-video nuisance parameters (jitter, size, texture) derived from ``style_seed``;
    group members share them."""
    rng = np.random.default_rng(int(attrs.get("style_seed", 0)))
    return {"dx": int(rng.integers(-8, 9)), "dy": int(rng.integers(-8, 9)),
            "side": int(rng.integers(MAIN_SIDE - 8, MAIN_SIDE + 9)),
            "ddx": int(rng.integers(-1, 2)), "ddy": int(rng.integers(-1, 2)),
            "grad": rng.uniform(-14, 14, size=2), "noise_seed": int(rng.integers(1 << 31))}


_BG_CACHE: dict[tuple, np.ndarray] = {}


def _background(color: str, style: Mapping[str, Any], size: int) -> np.ndarray:
    key = (color, float(style["grad"][0]), float(style["grad"][1]), style["noise_seed"], size)
    bg = _BG_CACHE.get(key)
    if bg is None:
        rng = np.random.default_rng(style["noise_seed"])
        lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        grad = style["grad"][0] * lin[None, :] + style["grad"][1] * lin[:, None]
        # low-frequency blotches: coarse noise upsampled (mild texture)
        coarse = rng.normal(0, 5.0, size=(size // 16 + 1, size // 16 + 1)).astype(np.float32)
        coarse = np.kron(coarse, np.ones((16, 16), np.float32))[:size, :size]
        fine = rng.normal(0, 2.0, size=(size, size)).astype(np.float32)
        bg = np.asarray(RGB[color], np.float32)[None, None, :] + (grad + coarse + fine)[..., None]
        bg = np.clip(bg, 0, 255).astype(np.uint8)
        if len(_BG_CACHE) > 64:
            _BG_CACHE.clear()
        _BG_CACHE[key] = bg
    return bg


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of half-size ``r`` given pixel offsets from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        q = 0.88 * r
        return (np.abs(dx) <= q) & (np.abs(dy) <= q)
    if shape == "triangle":   # apex up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5 * 1.1)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "star":
        ang = np.arctan2(dy, dx) + np.pi / 2
        rad = np.sqrt(dx * dx + dy * dy)
        return rad <= r * (0.55 + 0.45 * np.abs(np.cos(2.5 * ang)) ** 2)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "plus":
        w = 0.34 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _paint(img: np.ndarray, shape: str, cx: float, cy: float, side: float,
           color: tuple[int, int, int]) -> None:
    """Draw a filled shape into ``img`` (in place), touching only its bounding box."""
    h, w = img.shape[:2]
    r = side / 2.0
    x0, x1 = max(0, int(np.floor(cx - r - 1))), min(w, int(np.ceil(cx + r + 2)))
    y0, y1 = max(0, int(np.floor(cy - r - 1))), min(h, int(np.ceil(cy + r + 2)))
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    mask = _shape_mask(shape, xs + 0.5 - cx, ys + 0.5 - cy, r)
    img[y0:y1, x0:x1][mask] = color


def main_geometry(attrs: Mapping[str, Any], t: float, size: int = SIZE) -> tuple[float, float, float]:
    """Centre x, centre y and side of the main object at time ``t`` in [0, 1)."""
    st = _style(attrs)
    scale = size / SIZE
    cx, cy = size / 2 + st["dx"] * scale, size / 2 + st["dy"] * scale
    side = st["side"] * scale
    u = 2.0 * t - 1.0 + 1.0 / NUM_FRAMES     # -1 .. +1 over the clip
    a = MOTION_AMPLITUDE * scale
    motion = attrs["motion"]
    if motion == "left":
        cx -= a * u
    elif motion == "right":
        cx += a * u
    elif motion == "up":
        cy -= a * u
    elif motion == "down":
        cy += a * u
    elif motion == "grow":
        side *= 0.85 + 0.3 * u    # 0.55x .. 1.15x
    elif motion != "still":
        raise ValueError(f"unknown motion {motion!r}")
    return cx, cy, side


def render_frame(attrs: Mapping[str, Any], t: float, size: int = SIZE) -> np.ndarray:
    """The frame at time ``t`` in [0, 1) as an HxWx3 uint8 array."""
    st = _style(attrs)
    img = _background(attrs["bg_color"], st, size).copy()
    cx, cy, side = main_geometry(attrs, t, size)
    _paint(img, attrs["main_shape"], cx, cy, side, RGB[attrs["main_color"]])
    if detail_visible(attrs, t):
        scale = size / SIZE
        patch = PATCH * scale
        row, col = detail_cell(attrs)
        dcx = (col + 0.5) * patch + st["ddx"] * scale
        dcy = (row + 0.5) * patch + st["ddy"] * scale
        _paint(img, attrs["detail_shape"], dcx, dcy, DETAIL_SIDE * scale, RGB[attrs["detail_color"]])
    return img


def _write_mp4(path: Path, frames: Sequence[np.ndarray], fps: int = FPS, crf: int = CRF) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        stream.codec_context.thread_count = 1
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def render_video(attrs: Mapping[str, Any], path: str | Path) -> Path:
    """Render all frames of ``attrs`` and write them as an h264 mp4 at ``path``."""
    frames = [render_frame(attrs, frame_time(i)) for i in range(NUM_FRAMES)]
    _write_mp4(Path(path), frames)
    return Path(path)


def render_key(attrs: Mapping[str, Any]) -> str:
    """Hash of everything that determines a video's pixels (attrs + render settings)."""
    payload = {"v": RENDER_VERSION, "size": SIZE, "fps": FPS, "n": NUM_FRAMES, "crf": CRF,
               "patch": PATCH, "detail": DETAIL_SIDE, "main": MAIN_SIDE,
               "amp": MOTION_AMPLITUDE, "attrs": {k: attrs[k] for k in sorted(attrs)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
