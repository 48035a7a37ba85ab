"""The synthetic world's plan: its attributes, caption grammar and scenes (docs/SYNTHETIC.md).

Every video is a real h264 mp4 (224x224, 3 s at 8 fps = 24 frames) showing a LARGE main object
(shape, colour, motion) on a coloured, mildly textured background, and a SMALL detail object
(shape, colour, corner, timing) that sits inside one corner patch of a 32-px patch grid. Captions
come from a small grammar that names every attribute with varied wording and order.

Hard cases are *groups* of near-duplicates: all members share everything (including the rendering
jitter) except ONE attribute (``detail_color``, ``detail_shape``, ``motion`` or ``timing``), which
takes a different value in each member, so every pair in a group differs in exactly that attribute.
Random scenes fill the rest of each split. Labels live only in manifest columns; file names are
opaque (``syn_000123.mp4``) and ids are shuffled so neighbouring ids do not reveal a group.

This module is the world as data (no pixels, no files): :func:`plan_world` gives every video and
caption record; ``synthetic.render`` draws a scene and ``synthetic.manifest`` builds the dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SIZE = 224                  # frame side in pixels
FPS = 8
NUM_FRAMES = 24             # 3 s at 8 fps
PATCH = 32                  # patch grid the detail is aligned to (ViT-B/32 layout: 7x7)

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


# --------------------------------------------------------------------------- when and where the detail is


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


def detail_cell(attrs: Mapping[str, Any], size: int = SIZE, patch: int = PATCH) -> tuple[int, int]:
    """(row, col) of the patch-grid cell that holds the detail object."""
    n = size // patch
    row = 0 if attrs["corner"].startswith("top") else n - 1
    col = 0 if attrs["corner"].endswith("left") else n - 1
    return row, col


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
    """The attrs dict (what ``synthetic.render.render_frame`` needs) of a manifest video row."""
    out = {k: record[k] for k in ATTR_COLUMNS}
    out["style_seed"] = int(record.get("style_seed") or 0)
    return out


def manifest_attrs(manifest: Any) -> dict[str, dict[str, Any]]:
    """``{video_id: attrs}`` for every video of a synthetic manifest."""
    cols = manifest.videos.to_pydict()
    rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    return {r["video_id"]: video_attrs(r) for r in rows}

