"""The synthetic world: determinism, groups, captions, real decodable mp4s, idempotent builds."""
from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import numpy as np
import pytest

from manifests import Manifest
from synthetic import manifest as M
from synthetic import render as R
from synthetic import world as W

TINY = dict(train_groups=4, train_random=3, val_groups=1, val_random=1, test_groups=4,
            test_random=2, captions_per_train_video=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Manifest, float]:
    out = tmp_path_factory.mktemp("synthetic")
    t0 = time.perf_counter()
    m = M.build(out, seed=3, workers=1, progress=False, **TINY)
    return out, m, time.perf_counter() - t0


def _rows(m: Manifest) -> list[dict]:
    cols = m.videos.to_pydict()
    return [dict(zip(cols, v)) for v in zip(*cols.values())]


def test_plan_is_deterministic_from_seed():
    a = W.plan_world(seed=5, **TINY)
    b = W.plan_world(seed=5, **TINY)
    c = W.plan_world(seed=6, **TINY)
    assert a == b
    assert a != c


def test_render_is_deterministic():
    attrs = W.random_attrs(np.random.default_rng(1))
    x = R.render_frame(attrs, 0.3)
    assert x.shape == (224, 224, 3) and x.dtype == np.uint8
    assert np.array_equal(x, R.render_frame(dict(attrs), 0.3))


def test_manifest_columns_and_split_sizes(world):
    _, m, _ = world
    for col in ("group_id", "varied", *W.ATTR_COLUMNS):
        assert col in m.videos.column_names
    counts = m.split_counts()
    assert counts["test"]["videos"] == counts["test"]["captions"]
    assert counts["val"]["videos"] == counts["val"]["captions"]
    assert counts["train"]["captions"] == 2 * counts["train"]["videos"]
    for r in _rows(m):
        for k in W.ATTR_COLUMNS:
            assert r[k] in W.ATTRIBUTES[k]


def test_group_members_differ_in_exactly_one_attribute(world):
    _, m, _ = world
    groups: dict[str, list[dict]] = {}
    for r in _rows(m):
        if r["group_id"]:
            groups.setdefault(r["group_id"], []).append(r)
    assert len(groups) == 4 + 1 + 4
    assert {g[0]["varied"] for g in groups.values()} == set(W.GROUP_ATTRIBUTES)
    for members in groups.values():
        assert len(members) >= 3
        varied = members[0]["varied"]
        assert {x["split"] for x in members} == {members[0]["split"]}
        for a, b in itertools.combinations(members, 2):
            diff = [k for k in W.ATTR_COLUMNS if a[k] != b[k]]
            assert diff == [varied]
            assert a["style_seed"] == b["style_seed"]


def test_group_members_render_differently_only_in_the_varied_attribute():
    base = W.random_attrs(np.random.default_rng(2))
    base["timing"] = "throughout"
    other = {**base, "detail_color": next(c for c in W.ATTRIBUTES["detail_color"]
                                          if c != base["detail_color"])}
    x, y = R.render_frame(base, 0.2), R.render_frame(other, 0.2)
    row, col = W.detail_cell(base)
    diff = np.argwhere(np.any(x != y, axis=-1))
    assert len(diff) > 0
    assert (diff // W.PATCH == [row, col]).all()   # only the detail's patch changes


def _mentions(text: str, phrases: list[str]) -> bool:
    return any(re.search(r"\b" + re.escape(p) + r"\b", text.lower()) for p in phrases)


def test_video_captions_mention_every_attribute():
    rng = np.random.default_rng(0)
    texts = set()
    for _ in range(200):
        a = W.random_attrs(rng)
        t = W.video_caption(a, rng)
        texts.add(t.split()[0])
        assert _mentions(t, [a["bg_color"]])
        assert _mentions(t, [a["main_color"]]) and _mentions(t, [a["detail_color"]])
        assert _mentions(t, W.SHAPE_WORDS[a["main_shape"]])
        assert _mentions(t, W.SHAPE_WORDS[a["detail_shape"]])
        assert _mentions(t, W.MOTION_PHRASES[a["motion"]])
        assert _mentions(t, W.TIMING_PHRASES[a["timing"]])
        assert _mentions(t, W.CORNER_PHRASES[a["corner"]])
    assert len(texts) >= 3   # varied clause order


def test_frame_captions_follow_visibility_and_p_detail():
    rng = np.random.default_rng(0)
    a = {**W.random_attrs(rng), "timing": "appears"}
    corner_words = W.CORNER_PHRASES[a["corner"]]
    assert not any(_mentions(W.frame_caption(a, 0.2, rng, 1.0), corner_words) for _ in range(20))
    assert all(_mentions(W.frame_caption(a, 0.7, rng, 1.0), corner_words) for _ in range(20))
    assert not any(_mentions(W.frame_caption(a, 0.7, rng, 0.0), corner_words) for _ in range(20))
    motion_words = [p for ps in W.MOTION_PHRASES.values() for p in ps]
    timing_words = [p for ps in W.TIMING_PHRASES.values() for p in ps]
    for _ in range(50):
        t = W.frame_caption(a, 0.7, rng, 0.5)
        assert _mentions(t, [a["main_color"]]) and _mentions(t, W.SHAPE_WORDS[a["main_shape"]])
        assert not _mentions(t, motion_words + timing_words)


def test_detail_visible_timing_semantics():
    for t in (0.0, 0.49, 0.5, 0.99):
        assert W.detail_visible({"timing": "throughout"}, t)
        assert W.detail_visible({"timing": "appears"}, t) == (t >= 0.5)
        assert W.detail_visible({"timing": "disappears"}, t) == (t < 0.5)
    a = {**W.random_attrs(np.random.default_rng(4)), "timing": "appears"}
    row, col = W.detail_cell(a)
    cell = (slice(row * 32, row * 32 + 32), slice(col * 32, col * 32 + 32))
    early, late = R.render_frame(a, 0.1)[cell], R.render_frame(a, 0.6)[cell]
    no_detail = R.render_frame({**a, "timing": "disappears"}, 0.6)[cell]
    assert np.array_equal(early, no_detail) and not np.array_equal(early, late)


def test_mp4s_decode_to_24_frames_and_match_renders(world):
    import decord

    _, m, _ = world
    rows = _rows(m)
    for r in rows[:3]:
        vr = decord.VideoReader(str(m.video_path(r["video_id"])))
        assert len(vr) == 24
        frames = vr.get_batch(list(range(24))).asnumpy()
        assert frames.shape == (24, 224, 224, 3)
        ref = R.render_frame(W.video_attrs(r), W.frame_time(10))
        assert np.abs(frames[10].astype(int) - ref).mean() < 4.0


def test_no_labels_in_file_names(world):
    out, m, _ = world
    words = {w for vals in W.ATTRIBUTES.values() for v in vals for w in v.split()}
    words |= set(W.GROUP_ATTRIBUTES) | {"group", "train", "test", "val"}
    for r in _rows(m):
        name = Path(r["path"]).name
        assert re.fullmatch(r"syn_\d{6}\.mp4", name)
        assert r["video_id"] == name[:-4]
        assert not any(w in name for w in words)
    for p in (out / "videos").glob("*.mp4"):
        assert re.fullmatch(r"syn_\d{6}\.mp4", p.name)


def test_rebuild_is_idempotent_and_fast(world):
    out, m, first = world
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "videos").glob("*.mp4")}
    t0 = time.perf_counter()
    m2 = M.build(out, seed=3, workers=1, progress=False, **TINY)
    again = time.perf_counter() - t0
    assert m2.sha256() == m.sha256()
    assert {p: p.stat().st_mtime_ns for p in (out / "videos").glob("*.mp4")} == mtimes
    assert again < max(0.5 * first, 0.5)
    r = Manifest.read(out / "manifest")
    assert r.sha256() == m.sha256()
    assert r.video_path(m.video_ids[0]).is_file()
