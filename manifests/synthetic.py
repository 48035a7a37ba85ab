"""A deterministic synthetic fine-grained text-video benchmark (docs/SYNTHETIC.md).

Every video is a real h264 mp4 (224x224, 3 s at 8 fps = 24 frames) showing a LARGE main object
(shape, colour, motion) on a coloured, mildly textured background, and a SMALL detail object
(shape, colour, corner, timing) that sits inside one corner patch of a 32-px patch grid. Captions
come from a small grammar that names every attribute with varied wording and order.

Hard cases are *groups* of near-duplicates: all members share everything (including the rendering
jitter) except ONE attribute (``detail_color``, ``detail_shape``, ``motion`` or ``timing``), which
takes a different value in each member, so every pair in a group differs in exactly that attribute.
Random scenes fill the rest of each split. Labels live only in manifest columns; file names are
opaque (``syn_000123.mp4``) and ids are shuffled so neighbouring ids do not reveal a group.

Nothing happens at import time; :func:`build` renders (in worker processes) and writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .schema import Manifest

DATASET = "synthetic"
RENDER_VERSION = 1          # bump when the picture of a given attrs dict changes
SIZE = 224                  # frame side in pixels
FPS = 8
NUM_FRAMES = 24             # 3 s at 8 fps
PATCH = 32                  # patch grid the detail is aligned to (ViT-B/32 layout: 7x7)
DETAIL_SIDE = 28            # detail object side (<= PATCH); a calibration knob
MAIN_SIDE = 84              # main object nominal side (jittered +-8 px per video)
MOTION_AMPLITUDE = 44       # px the main object travels from the centre in each direction
CRF = 18

ATTRIBUTES: dict[str, list[str]] = {
    "bg_color": ["gray", "black", "beige", "navy"],
    "main_shape": ["circle", "square", "triangle", "diamond", "star"],
    "main_color": ["red", "green", "blue", "yellow", "white", "purple", "orange"],
    "motion": ["left", "right", "up", "down", "still", "grow"],
    "detail_shape": ["square", "ring", "plus", "triangle"],
    "detail_color": ["red", "green", "blue", "yellow", "white"],
    "corner": ["top left", "top right", "bottom left", "bottom right"],
    "timing": ["throughout", "appears", "disappears"],
}
# Attributes along which near-duplicate groups vary.
GROUP_ATTRIBUTES: tuple[str, ...] = ("detail_color", "detail_shape", "motion", "timing")
GROUP_SIZE = 4              # members per group (capped by the number of values)

RGB: dict[str, tuple[int, int, int]] = {
    # backgrounds (muted, so every detail colour contrasts with every background)
    "gray": (118, 118, 118), "black": (22, 22, 24), "beige": (196, 182, 146),
    "navy": (26, 34, 84),
    # objects
    "red": (226, 34, 30), "green": (34, 190, 62), "blue": (46, 110, 250),
    "yellow": (248, 222, 38), "white": (246, 246, 246), "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}

# Wording used by the caption grammar (also used by tests to check every attribute is named).
MOTION_PHRASES: dict[str, list[str]] = {
    "left": ["moves to the left", "slides left", "heads left", "travels to the left"],
    "right": ["moves to the right", "slides right", "heads right", "travels to the right"],
    "up": ["moves up", "rises", "drifts up", "travels upward"],
    "down": ["moves down", "sinks", "drifts down", "travels downward"],
    "still": ["stays still", "does not move", "remains in place", "stands still"],
    "grow": ["grows", "gets bigger", "expands", "grows larger"],
}
TIMING_PHRASES: dict[str, list[str]] = {
    "throughout": ["stays the whole time", "is visible throughout",
                   "stays the whole clip", "is present all along"],
    "appears": ["appears halfway through", "shows up midway", "appears midway",
                "only shows up halfway"],
    "disappears": ["disappears halfway through", "vanishes midway",
                   "is gone after halfway", "goes away halfway"],
}
CORNER_PHRASES: dict[str, list[str]] = {
    "top left": ["top left corner", "upper left corner"],
    "top right": ["top right corner", "upper right corner"],
    "bottom left": ["bottom left corner", "lower left corner"],
    "bottom right": ["bottom right corner", "lower right corner"],
}
SHAPE_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"],
    "diamond": ["diamond"], "star": ["star"], "ring": ["ring"], "plus": ["plus sign", "plus"],
}
_BIG = ["large", "big"]
_SMALL = ["small", "tiny", "little"]
_BG = ["on a {c} background", "against a {c} backdrop", "over a {c} background"]
_IN = ["in the", "at the"]

ATTR_COLUMNS: tuple[str, ...] = ("bg_color", "main_shape", "main_color", "motion",
                                 "detail_shape", "detail_color", "corner", "timing")


# --------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _main_np(attrs: Mapping[str, Any], rng: np.random.Generator) -> str:
    return f"a {_pick(rng, _BIG)} {attrs['main_color']} {_pick(rng, SHAPE_WORDS[attrs['main_shape']])}"


def _detail_np(attrs: Mapping[str, Any], rng: np.random.Generator) -> str:
    return (f"a {_pick(rng, _SMALL)} {attrs['detail_color']} "
            f"{_pick(rng, SHAPE_WORDS[attrs['detail_shape']])}")


def _corner_pp(attrs: Mapping[str, Any], rng: np.random.Generator) -> str:
    return f"{_pick(rng, _IN)} {_pick(rng, CORNER_PHRASES[attrs['corner']])}"


def video_caption(attrs: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A caption naming every attribute (background, main shape/colour/motion, detail
    shape/colour/corner/timing) with varied wording and clause order."""
    main = _main_np(attrs, rng)
    detail = _detail_np(attrs, rng)
    corner = _corner_pp(attrs, rng)
    motion = _pick(rng, MOTION_PHRASES[attrs["motion"]])
    timing = _pick(rng, TIMING_PHRASES[attrs["timing"]])
    bg = _pick(rng, _BG).format(c=attrs["bg_color"])
    k = int(rng.integers(5))
    if k == 0:
        text = f"{main} {motion} {bg}, while {detail} {corner} {timing}."
    elif k == 1:
        text = f"{bg}, {main} {motion}; {detail} {timing} {corner}."
    elif k == 2:
        text = f"{detail} {corner} {timing} as {main} {motion} {bg}."
    elif k == 3:
        text = f"{main} {bg} {motion}. {detail} {corner} {timing}."
    else:
        text = f"{corner}, {detail} {timing}; {main} {motion} {bg}."
    text = text.replace(". a ", ". A ")
    return text[0].upper() + text[1:]


def frame_caption(attrs: Mapping[str, Any], t: float, rng: np.random.Generator,
                  p_detail: float = 0.5) -> str:
    """What one frame at time ``t`` in [0, 1) shows: always the main object and background;
    the detail (shape, colour, corner) with probability ``p_detail`` and only if visible at ``t``.
    No motion or timing words."""
    main = _main_np(attrs, rng)
    bg = _pick(rng, _BG).format(c=attrs["bg_color"])
    mention = detail_visible(attrs, t) and float(rng.random()) < p_detail
    if not mention:
        return (f"{main} {bg}." if rng.random() < 0.5 else f"{bg}, {main}.").capitalize()
    detail = _detail_np(attrs, rng)
    corner = _corner_pp(attrs, rng)
    k = int(rng.integers(3))
    if k == 0:
        text = f"{main} {bg}, with {detail} {corner}."
    elif k == 1:
        text = f"{detail} {corner} and {main} {bg}."
    else:
        text = f"{bg}, {main} and {detail} {corner}."
    return text[0].upper() + text[1:]


def detail_visible(attrs: Mapping[str, Any], t: float) -> bool:
    """Whether the detail object is on screen at time ``t`` in [0, 1): ``throughout`` always,
    ``appears`` from the half-way point on, ``disappears`` only before it."""
    timing = attrs["timing"]
    if timing == "throughout":
        return True
    if timing == "appears":
        return t >= 0.5
    if timing == "disappears":
        return t < 0.5
    raise ValueError(f"unknown timing {timing!r}")


def frame_time(index: int, num_frames: int = NUM_FRAMES) -> float:
    """Normalised time in [0, 1) of frame ``index`` of a video of ``num_frames`` frames."""
    return index / num_frames


# --------------------------------------------------------------------------- rendering


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


def detail_cell(attrs: Mapping[str, Any], size: int = SIZE, patch: int = PATCH) -> tuple[int, int]:
    """(row, col) of the patch-grid cell that holds the detail object."""
    n = size // patch
    row = 0 if attrs["corner"].startswith("top") else n - 1
    col = 0 if attrs["corner"].endswith("left") else n - 1
    return row, col


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


def _render_job(job: tuple[dict, str]) -> str:
    attrs, path = job
    render_video(attrs, path)
    return path


def render_key(attrs: Mapping[str, Any]) -> str:
    """Hash of everything that determines a video's pixels (attrs + render settings)."""
    payload = {"v": RENDER_VERSION, "size": SIZE, "fps": FPS, "n": NUM_FRAMES, "crf": CRF,
               "patch": PATCH, "detail": DETAIL_SIDE, "main": MAIN_SIDE,
               "amp": MOTION_AMPLITUDE, "attrs": {k: attrs[k] for k in sorted(attrs)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- scene sampling


def random_attrs(rng: np.random.Generator) -> dict[str, Any]:
    """Uniformly random attributes plus a style seed."""
    attrs: dict[str, Any] = {k: _pick(rng, v) for k, v in ATTRIBUTES.items()}
    attrs["style_seed"] = int(rng.integers(1 << 31))
    return attrs


def make_group(rng: np.random.Generator, varied: str, size: int = GROUP_SIZE) -> list[dict[str, Any]]:
    """Near-duplicates that share every attribute and the style except ``varied``, which takes
    a distinct value in each member."""
    base = random_attrs(rng)
    values = list(ATTRIBUTES[varied])
    chosen = rng.choice(len(values), size=min(size, len(values)), replace=False)
    return [{**base, varied: values[int(i)]} for i in chosen]


def plan_split(rng: np.random.Generator, split: str, groups: int, random_scenes: int,
               group_size: int = GROUP_SIZE) -> list[dict[str, Any]]:
    """Scenes of one split: ``groups`` near-duplicate groups (varied attribute cycling through
    GROUP_ATTRIBUTES) followed by ``random_scenes`` random scenes."""
    scenes: list[dict[str, Any]] = []
    for g in range(groups):
        varied = GROUP_ATTRIBUTES[g % len(GROUP_ATTRIBUTES)]
        for member in make_group(rng, varied, group_size):
            scenes.append({**member, "split": split, "group_id": f"{split}-g{g:04d}",
                           "varied": varied})
    for _ in range(random_scenes):
        scenes.append({**random_attrs(rng), "split": split, "group_id": "", "varied": ""})
    return scenes


def plan_world(seed: int = 0, train_groups: int = 200, train_random: int = 400,
               val_groups: int = 30, val_random: int = 40, test_groups: int = 60,
               test_random: int = 80, captions_per_train_video: int = 3,
               group_size: int = GROUP_SIZE) -> tuple[list[dict], list[dict]]:
    """All video and caption records (no rendering). Video ids are assigned in a shuffled
    order so that ids carry no information about groups or splits."""
    rng = np.random.default_rng(seed)
    scenes = (plan_split(rng, "train", train_groups, train_random, group_size)
              + plan_split(rng, "val", val_groups, val_random, group_size)
              + plan_split(rng, "test", test_groups, test_random, group_size))
    order = rng.permutation(len(scenes))
    videos: list[dict] = []
    captions: list[dict] = []
    ids = [""] * len(scenes)
    for number, idx in enumerate(order):
        ids[int(idx)] = f"syn_{number:06d}"
    cap_rng = np.random.default_rng([seed, 1])
    for scene, vid in zip(scenes, ids):
        split = scene["split"]
        videos.append({"video_id": vid, "path": f"../videos/{vid}.mp4", "split": split,
                       "start": None, "end": None, "group_id": scene["group_id"],
                       "varied": scene["varied"],
                       **{k: scene[k] for k in ATTR_COLUMNS}, "style_seed": scene["style_seed"]})
        n = captions_per_train_video if split == "train" else 1
        for j in range(n):
            captions.append({"caption_id": f"{vid}#{j}", "video_id": vid,
                             "text": video_caption(scene, cap_rng), "split": split})
    videos.sort(key=lambda r: r["video_id"])
    captions.sort(key=lambda r: r["caption_id"])
    return videos, captions


def video_attrs(record: Mapping[str, Any]) -> dict[str, Any]:
    """The attrs dict (what :func:`render_frame` needs) of a manifest video row."""
    out = {k: record[k] for k in ATTR_COLUMNS}
    out["style_seed"] = int(record.get("style_seed") or 0)
    return out


def manifest_attrs(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """``{video_id: attrs}`` for every video of a synthetic manifest."""
    cols = manifest.videos.to_pydict()
    rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    return {r["video_id"]: video_attrs(r) for r in rows}


# --------------------------------------------------------------------------- build


def build(out_dir: str | Path, seed: int = 0, train_groups: int = 200, train_random: int = 400,
          val_groups: int = 30, val_random: int = 40, test_groups: int = 60,
          test_random: int = 80, captions_per_train_video: int = 3, workers: int = 2,
          group_size: int = GROUP_SIZE, progress: bool = True) -> Manifest:
    """Render the world into ``out_dir/videos/*.mp4`` and write ``out_dir/manifest/``.

    Videos whose render key (attrs + render settings) matches ``videos/render_index.json`` and
    whose file exists are not re-rendered, so a re-run with the same options is near-instant.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    videos, captions = plan_world(seed, train_groups, train_random, val_groups, val_random,
                                  test_groups, test_random, captions_per_train_video, group_size)
    index_path = video_dir / "render_index.json"
    try:
        index: dict[str, str] = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    jobs: list[tuple[dict, str]] = []
    keys: dict[str, str] = {}
    for rec in videos:
        attrs = video_attrs(rec)
        key = render_key(attrs)
        keys[rec["video_id"]] = key
        path = video_dir / f"{rec['video_id']}.mp4"
        if index.get(rec["video_id"]) != key or not path.is_file():
            jobs.append((attrs, str(path)))
            index.pop(rec["video_id"], None)

    def _save_index() -> None:
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, sort_keys=True))
        os.replace(tmp, index_path)

    if jobs:
        vid_of = {p: Path(p).stem for _, p in jobs}
        bar = tqdm(total=len(jobs), desc="render synthetic videos", unit="video",
                   disable=not progress)
        try:
            if workers <= 1:
                for job in jobs:
                    _render_job(job)
                    index[vid_of[job[1]]] = keys[vid_of[job[1]]]
                    bar.update()
            else:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    for path in pool.map(_render_job, jobs, chunksize=16):
                        index[vid_of[path]] = keys[vid_of[path]]
                        bar.update()
        finally:
            bar.close()
            _save_index()
    source = {"generator": "manifests.synthetic", "render_version": RENDER_VERSION, "seed": seed,
              "sizes": {"train_groups": train_groups, "train_random": train_random,
                        "val_groups": val_groups, "val_random": val_random,
                        "test_groups": test_groups, "test_random": test_random,
                        "captions_per_train_video": captions_per_train_video,
                        "group_size": group_size},
              "video_dir": str(video_dir.resolve())}
    manifest_dir = out_dir / "manifest"
    m = Manifest.from_records(DATASET, videos, captions, manifest_dir, source)
    meta = manifest_dir / "meta.json"
    try:
        same = json.loads(meta.read_text()).get("sha256") == m.sha256()
    except (OSError, ValueError):
        same = False
    if not same:
        m.write(manifest_dir)
    return m
