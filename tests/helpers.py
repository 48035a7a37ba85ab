"""The helpers the tests share: small splits, each a ``core.split.StagedSplit`` (memory-mapped when a directory
is given, as staged stores are).

* ``make_split``: stage one's splits. Videos are noisy frames around a concept; captions are noisy
  *rotated* concepts, so zero-shot (identity projection) retrieval is near chance and a learned
  text projection solves it.
* ``make_token_split``: stage two's splits. Every video has ``ATTRS`` attributes shown by one patch
  each; a caption names them with one word token each; stage-one embeddings are noisy.
* ``run_cli``: the command line, in-process.
* ``write_video``: a small generated video (containers, codecs, sizes, frame rates, rotation).
* ``make_data_root``: a registered dataset's official annotation files (small, in its format) and
  generated videos, laid out as docs/DATASETS.md documents.
* ``row_split``: tokens that encode their own row (``tokens[v, 0, 0, 0] == v``, ``text_tokens[c, 0,
  0] == c``), so a fake head can look up a known score per pair.
* the store's toy data (``STORE``, ``VIDS`` ... ``CSPLIT``, ``layout``, ``video_data``, ``fill``) and
  ``RangeHandler`` (an http server honouring Range) for the store and sharing tests.
* ``hog_decode``: a decode function for the decode pool's tests (memory hogs, hanging workers).
"""

from __future__ import annotations

from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import NamedTuple

import numpy as np

from core.split import StagedSplit

# stage one's splits
E, T = 32, 6
IDENTITY = {"name": "toy-encoder", "pretrained": "none", "embed_dim": E}

# stage two's splits
D, T2, N, L = 16, 4, 5, 6
ATTRS, VALUES = 3, 5
TOKEN_IDENTITY = {"name": "toy-token-encoder", "pretrained": "none", "token_dim": D}
TINY = dict(width=32, layers=1, heads=2, num_queries=4, num_selected=2, spatial_frames=2, ff_mult=2.0)
ITM_ONLY = dict(itc_steps=0, itc_weight=0.0)  # the paper's ITM recipe alone (test_itc.py covers ITC)

# the synthetic benchmark at its smallest, for command-line tests
TINY_WORLD = ["train_groups=2", "train_random=6", "val_groups=1", "val_random=3", "test_groups=1", "test_random=3"]


def _rotation(seed: int = 123) -> np.ndarray:
    """A fixed random rotation of the embedding space (the same in every split)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(E, E)))
    return q


def make_split(name: str, num_videos: int, captions_per_video: int, seed: int,
               directory: Path | None = None) -> StagedSplit:
    """Videos = noisy frames around a concept; captions = noisy *rotated* concepts.

    Zero-shot (identity projection) retrieval is near chance; a learned text projection solves it.
    """
    rng = np.random.default_rng(seed)
    concept = rng.normal(size=(num_videos, E))
    frames = concept[:, None, :] + 0.5 * rng.normal(size=(num_videos, T, E))
    lengths = rng.integers(1, T + 1, size=num_videos)
    mask = np.arange(T)[None, :] < lengths[:, None]
    frames[~mask] = rng.normal(size=(int((~mask).sum()), E)) * 10  # garbage in padding
    caption_video = np.repeat(np.arange(num_videos), captions_per_video)
    text = concept[caption_video] @ _rotation().T + 0.3 * rng.normal(size=(caption_video.size, E))
    arrays = {"frame_emb": frames.astype(np.float32), "frame_mask": mask,
              "text_emb": text.astype(np.float32), "caption_video": caption_video.astype(np.int64)}
    if directory is not None:  # memory-mapped, as in real use
        directory.mkdir(parents=True, exist_ok=True)
        for key, arr in arrays.items():
            np.save(directory / f"{key}.npy", arr)
        arrays = {key: np.load(directory / f"{key}.npy", mmap_mode="r") for key in arrays}
    return StagedSplit(split=name, video_ids=[f"{name}{i}" for i in range(num_videos)],
                       caption_ids=[f"{name}c{i}" for i in range(caption_video.size)],
                       store_fingerprint="toy-store-0", encoder_identity=dict(IDENTITY), **arrays)


def make_token_split(name: str, num_videos: int, captions_per_video: int, seed: int,
                     directory: Path | None = None) -> StagedSplit:
    """Tiny attribute splits: every video has ``ATTRS`` attributes with ``VALUES`` values each,
    shown by one patch per attribute in every frame (a fixed visual vector per value, plus noise);
    a caption names them with one word token per attribute (a different fixed vector per value).
    The match is decidable from the tokens; stage-one embeddings are noisy so that stage one
    makes mistakes for the head to fix."""
    vocab_rng = np.random.default_rng(1234)  # the same vocabulary in every split
    visual_vocab = vocab_rng.normal(size=(ATTRS, VALUES, D))
    word_vocab = vocab_rng.normal(size=(ATTRS, VALUES, D))
    rng = np.random.default_rng(seed)
    attrs = rng.integers(0, VALUES, size=(num_videos, ATTRS))
    concept = sum(visual_vocab[a, attrs[:, a]] for a in range(ATTRS))
    tokens = 0.5 * rng.normal(size=(num_videos, T2, N, D))
    tokens[:, :, 0] += concept[:, None]
    for a in range(ATTRS):
        tokens[:, :, 1 + a] += visual_vocab[a, attrs[:, a]][:, None]
    lengths = rng.integers(2, T2 + 1, size=num_videos)
    frame_mask = np.arange(T2)[None, :] < lengths[:, None]
    cv = np.repeat(np.arange(num_videos), captions_per_video)
    text_tokens = 0.5 * rng.normal(size=(cv.size, L, D))
    for a in range(ATTRS):
        text_tokens[:, a] += word_vocab[a, attrs[cv, a]]
    tl = rng.integers(ATTRS, L + 1, size=cv.size)
    text_mask = np.arange(L)[None, :] < tl[:, None]
    arrays = {
        "caption_video": cv.astype(np.int64),
        "frame_emb": (concept[:, None] + 2.0 * rng.normal(size=(num_videos, T2, D))).astype(np.float32),
        "frame_mask": frame_mask,
        "text_emb": (concept[cv] + 2.0 * rng.normal(size=(cv.size, D))).astype(np.float32),
        "tokens": tokens.astype(np.float16),
        "text_tokens": text_tokens.astype(np.float16),
        "text_mask": text_mask,
    }
    if directory is not None:  # memory-mapped, as staged stores are
        directory.mkdir(parents=True, exist_ok=True)
        for key, arr in arrays.items():
            np.save(directory / f"{key}.npy", arr)
        arrays = {k: (np.load(directory / f"{k}.npy", mmap_mode="r") if k != "caption_video"
                      else np.load(directory / f"{k}.npy")) for k in arrays}
    return StagedSplit(split=name, video_ids=[f"{name}{i}" for i in range(num_videos)],
                       caption_ids=[f"{name}c{i}" for i in range(cv.size)],
                       store_fingerprint="toy-token-store", encoder_identity=dict(TOKEN_IDENTITY), **arrays)


def row_split(caption_video: np.ndarray, num_videos: int, split: str = "test") -> StagedSplit:
    """A split whose token rows encode their index (see the module docstring)."""
    c, v = len(caption_video), num_videos
    tokens = np.zeros((v, 2, 3, 4), np.float16)
    tokens[:, 0, 0, 0] = np.arange(v)
    text_tokens = np.zeros((c, 3, 4), np.float16)
    text_tokens[:, 0, 0] = np.arange(c)
    return StagedSplit(split=split, video_ids=[f"vid{i}" for i in range(v)], caption_ids=[f"cap{i}" for i in range(c)],
                       caption_video=np.asarray(caption_video), frame_emb=np.zeros((v, 2, 4), np.float32),
                       frame_mask=np.ones((v, 2), bool), text_emb=np.zeros((c, 4), np.float32), tokens=tokens,
                       text_tokens=text_tokens, text_mask=np.ones((c, 3), bool), store_fingerprint="toy-store",
                       encoder_identity={"name": "toy-encoder", "pretrained": "none"})


# a CrossTVR head small enough for the command-line tests
TINY_HEAD = ["--head-option", "width=16", "--head-option", "layers=1", "--head-option", "heads=2",
             "--head-option", "num_queries=2", "--head-option", "spatial_frames=2"]


def run_cli(args: list[str]) -> str:
    """Run the command line in-process; fail with its output unless it exits 0."""
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def random_pair_inputs(b: int, t: int, n: int, d: int, dt: int, seed: int = 0):
    """Random head inputs for ``b`` aligned pairs: tokens (b, t, n, d) with one padded frame, text
    tokens (b, L, dt) with one shorter caption, and their masks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, t, n, d, generator=g)
    fm = torch.ones(b, t, dtype=torch.bool)
    fm[0, -1] = False
    text = torch.randn(b, L, dt, generator=g)
    tm = torch.ones(b, L, dtype=torch.bool)
    tm[1, 3:] = False
    return tokens, fm, text, tm


def write_video(path: str | Path, num_frames: int = 16, width: int = 96, height: int = 64,
                fps: int = 8, seed: int = 0, container: str | None = None, codec: str = "libx264",
                pix_fmt: str = "yuv420p", frame_ms: list[int] | None = None, rotation: int = 0) -> Path:
    """Write a small video with PyAV (h264 mp4 by default); frame ``i`` is a solid colour plus a
    moving square, and its mean red value encodes ``i`` (red = 10 * i mod 250) so tests can check
    ordering. ``container`` / ``codec`` / ``pix_fmt`` for other formats (webm, matroska, avi; odd
    sizes need yuv444p), ``frame_ms``: each frame's duration in ms (a variable frame rate),
    ``rotation``: display rotation metadata in degrees."""
    import av
    from fractions import Fraction

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "ultrafast"}
        if frame_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        t = 0
        for i in range(num_frames):
            img = np.empty((height, width, 3), dtype=np.uint8)
            img[:] = base
            img[..., 0] = (10 * i) % 250
            s = min(width, height) // 4
            x = (i * 3) % max(1, width - s)
            img[:s, x:x + s] = 255 - img[:s, x:x + s]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if frame_ms is not None:
                frame.pts, frame.time_base = t, Fraction(1, 1000)
                t += frame_ms[i % len(frame_ms)]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_data_root(root: Path, dataset: str) -> dict:
    """``<root>/<dataset>/``: the dataset's official annotation files (a few videos, in their real
    format and names) and ``videos/`` with generated videos named as the dataset names them
    (docs/DATASETS.md). Returns ``{"videos": n, "captions": n, "splits": {...}}`` to expect."""
    import csv
    import json

    base = root / dataset
    vdir = base / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    made = {"videos": 0}

    def video(rel: str, seed: int) -> None:
        write_video(vdir / rel, num_frames=16, seed=seed)
        made["videos"] += 1

    if dataset == "msrvtt":
        train, test = [f"video{i}" for i in range(4)], ["video7010", "video7011"]
        (base / "MSRVTT_data.json").write_text(json.dumps({
            "videos": [{"video_id": v, "split": "train"} for v in train],
            "sentences": [{"video_id": v, "caption": f"clip {v} number {k}", "sen_id": 10 * i + k}
                          for i, v in enumerate(train) for k in range(2)]}))
        with open(base / "MSRVTT_train.9k.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["video_id"], *[[v] for v in train]])
        with open(base / "MSRVTT_JSFUSION_test.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["key", "vid_key", "video_id", "sentence"],
                                      *[[f"ret{i}", f"msr{i}", v, f"a test clip {v}"] for i, v in enumerate(test)]])
        for i, v in enumerate(train + test):
            video(f"{v}.mp4", i)
        return {**made, "splits": {"train": 4, "test": 2}}
    if dataset == "msvd":
        ids = {"train": ["aaa_1_5", "bbb_2_9"], "val": ["ccc_0_4"], "test": ["ddd_3_7", "eee_1_2"]}
        for split, vids in ids.items():
            (base / f"{split}_list.txt").write_text("\n".join(vids) + "\n")
        (base / "captions_msvd.json").write_text(json.dumps(
            {v: [f"{v} caption {k}" for k in range(3)] for vids in ids.values() for v in vids}))
        for i, v in enumerate(v for vids in ids.values() for v in vids):
            video(f"{v}.avi", i)
        return {**made, "splits": {"train": 2, "val": 1, "test": 2}}
    if dataset == "vatex":
        def entry(v: str) -> dict:
            return {"videoID": v, "enCap": [f"{v} english {k}" for k in range(10)], "chCap": ["中文"] * 10}
        train, val = ["aaaaaaaaaaa_000001_000003", "bbbbbbbbbbb_000000_000002"], ["ccccccccccc_000002_000004"]
        (base / "vatex_training_v1.0.json").write_text(json.dumps([entry(v) for v in train]))
        (base / "vatex_validation_v1.0.json").write_text(json.dumps([entry(v) for v in val]))
        for i, v in enumerate(train + val):
            video(f"{v}.mp4", i)  # the clips, already cut
        return {**made, "splits": {"train": 2, "test": 1}}
    if dataset == "lsmdc":
        clips = {"LSMDC16_annos_training.csv": ["0001_Movie_A_00.00.01.000-00.00.02.000",
                                                "0001_Movie_A_00.00.03.000-00.00.04.000"],
                 "LSMDC16_annos_val.csv": ["0002_Movie_B_00.00.05.000-00.00.06.000"],
                 "LSMDC16_challenge_1000_publictect.csv": ["0003_Movie_C_00.00.07.000-00.00.08.000"]}
        for name, ids in clips.items():
            (base / name).write_text("".join("\t".join([c, "0", "1", "0", "1", f"SOMEONE does {c[-6:]}."]) + "\n"
                                             for c in ids))
        for i, c in enumerate(c for ids in clips.values() for c in ids):
            video(f"{c.rsplit('_', 1)[0]}/{c}.avi", i)
        return {**made, "splits": {"train": 2, "val": 1, "test": 1}}
    if dataset == "didemo":
        def item(v: str, desc: str) -> dict:
            return {"video": v, "description": desc, "times": [[0, 1]], "annotation_id": 1}
        data = {"train": [item("1@N0_1_a.mov", "a dog runs"), item("1@N0_1_a.mov", "it stops"),
                          item("2@N0_2_b.mp4", "a car")],
                "val": [item("3@N0_3_c.m4v", "people talk")], "test": [item("4@N0_4_d.avi", "rain falls")]}
        for split, items in data.items():
            (base / f"{split}_data.json").write_text(json.dumps(items))
        for i, name in enumerate(["1@N0_1_a.mp4", "2@N0_2_b.mp4", "3@N0_3_c.mp4", "4@N0_4_d.avi"]):
            video(name, i)
        return {**made, "splits": {"train": 2, "val": 1, "test": 1}}
    if dataset == "activitynet":
        def clips(*ids: str) -> dict:
            return {v: {"duration": 2.0, "timestamps": [[0, 1], [1, 2]], "sentences": ["A thing.", "Another."]}
                    for v in ids}
        (base / "train.json").write_text(json.dumps(clips("v_aaaaaaaaaaa", "v_bbbbbbbbbbb")))
        (base / "val_1.json").write_text(json.dumps(clips("v_ccccccccccc")))
        for i, v in enumerate(["v_aaaaaaaaaaa", "v_bbbbbbbbbbb", "v_ccccccccccc"]):
            video(f"{v}.mp4", i)
        return {**made, "splits": {"train": 2, "test": 1}}
    raise ValueError(f"no data layout for {dataset!r}")


# -- the store's toy data (test_store.py, test_store_trust.py, test_sharing.py) -------------------
class StoreDims(NamedTuple):
    """Videos, captions, frames, tokens per frame, token dim, embedding dim, text tokens, text token
    dim, videos per shard, captions per text shard."""

    V: int
    C: int
    T: int
    N: int
    D: int
    E: int
    L: int
    DT: int
    S: int
    ST: int


STORE = StoreDims(V=5, C=7, T=3, N=4, D=8, E=6, L=5, DT=8, S=2, ST=3)
VIDS = ["a", "b", "c", "d", "e"]
VSPLIT = ["train", "train", "train", "test", "test"]
CIDS = [f"c{i}" for i in range(STORE.C)]
CVID = [0, 0, 1, 2, 3, 3, 4]
CSPLIT = [VSPLIT[v] for v in CVID]


def layout(**kw):
    """The toy store's ``StoreLayout`` (``kw`` overrides its fields)."""
    from pipeline.store import StoreLayout

    base = dict(dataset="toy", manifest_sha256="m" * 64, encoder={"name": "x", "weights": "r"},
                num_frames=STORE.T, num_tokens=STORE.N, token_dim=STORE.D, embed_dim=STORE.E, text_dim=STORE.DT,
                max_text_tokens=STORE.L, shard_size=STORE.S, text_shard_size=STORE.ST)
    base.update(kw)
    return StoreLayout(**base)


def video_data(lo: int, hi: int, failed: set[int] = frozenset()) -> dict:
    """Rows ``lo:hi`` of a video shard whose values encode their row (``tokens[i] == row``); rows in
    ``failed`` are failed ("timeout")."""
    T, N, D, E = STORE.T, STORE.N, STORE.D, STORE.E
    n = hi - lo
    rows = np.arange(lo, hi)
    tokens = np.broadcast_to(rows[:, None, None, None], (n, T, N, D)).astype(np.float16)
    emb = np.broadcast_to(rows[:, None, None], (n, T, E)).astype(np.float32)
    status = np.array([2 if r in failed else 1 for r in rows], np.int8)
    mask = np.ones((n, T), bool)
    mask[:, -1] = False
    return dict(status=status, error=["timeout" if r in failed else "" for r in rows],
                tokens=tokens, frame_emb=emb, frame_mask=mask,
                frame_index=np.tile(np.arange(T, dtype=np.int32), (n, 1)),
                frame_time=np.tile(np.arange(T, dtype=np.float32) / 2, (n, 1)))


def fill(store, failed: set[int] = frozenset()) -> None:
    """Write every video shard (``video_data``) and text shard of a toy ``CacheStore``, then consolidate."""
    L, DT, E = STORE.L, STORE.DT, STORE.E
    for i in range(store.num_shards):
        store.write_shard(i, **video_data(*store.shard_range(i), failed=failed))
    for j in range(store.num_text_shards):
        lo, hi = store.text_shard_range(j)
        r = np.arange(lo, hi)
        store.write_text_shard(j, tokens=np.broadcast_to(r[:, None, None], (hi - lo, L, DT)),
                               mask=np.ones((hi - lo, L), bool),
                               emb=np.broadcast_to(r[:, None], (hi - lo, E)).astype(np.float32))
    store.consolidate()


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single-range support (zarr's sharded reads need Range), for http:// stores."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        spec = rng.split("=", 1)[1]
        a, b = spec.split("-")
        if a == "":
            start, end = max(0, len(data) - int(b)), len(data) - 1
        else:
            start, end = int(a), (int(b) if b else len(data) - 1)
        end = min(end, len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)


# -- a decode function for the decode pool's tests (test_decode_bounds.py) ---------------------------
HOG_GIB = 4  # what hog_decode asks for, past the 2 GiB the memory test gives a worker


def hog_decode(video_id, path, num_frames, short_side, start, end, **kw):
    """Decode function for the pool tests (module-level so spawned workers import it): a file named
    ``hog*`` asks for HOG_GIB GiB at once; ``hang*`` marks that it started and sleeps; the others decode,
    their result saying which worker served them and its address-space limit."""
    import os
    import resource
    import time

    from pipeline.decode import decode_video

    name = Path(path).name
    if name.startswith("hog"):
        block = np.empty(HOG_GIB * 2**30, np.uint8)
        del block
    if name.startswith("hang"):
        Path(f"{path}.{os.getpid()}.started").touch()
        time.sleep(600)
    res = decode_video(video_id, path, num_frames, short_side, start, end, **kw)
    res.extra.update(pid=os.getpid(), address_space=resource.getrlimit(resource.RLIMIT_AS)[0])
    return res


def chrome_driver(chromium: dict, profile: str | Path):
    """A headless Chromium driven by selenium (``chromium``: the conftest fixture's paths), its profile
    in ``profile``, logging the page's console; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium["browser"]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromium["driver"]), options=opts)

