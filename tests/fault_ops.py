"""The store operations the crash tests kill at every write, and the checks they make after each kill.

Each operation runs in a child of a fork server that has already imported torch and the pipeline (a
fresh interpreter per kill would cost seconds), armed through ``core.faults``'s environment variables.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

T = 4  # frames per video
SHARD, TEXT_SHARD = 2, 3
KW = dict(num_frames=T, batch_size=T, shard_size=SHARD, text_shard_size=TEXT_SHARD, workers=1, progress=False, timeout=30.0)

_ctx: Any = None


def context() -> Any:
    """The fork server context (started once per test run, modules preloaded)."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(["torch", "open_clip", "zarr", "h5py", "pipeline.extraction.job", "pipeline.sharing",
                                     "pipeline.hdf5io", "pipeline.hdf5_features", "workflows.share", "fault_ops"])
    return _ctx


def _child(fn: Callable, args: tuple, env: dict) -> None:
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    fn(*args)


def run(fn: Callable, *args: Any, at: int | None = None, log: Path | None = None, mode: str = "before",
        timeout: float = 300.0) -> int:
    """Run ``fn(*args)`` in a fresh child; ``at``: killed at that write; ``log``: every write listed there.
    Returns the child's exit code (``core.faults.FAULT_EXIT`` when the gate killed it)."""
    procs = start(fn, *args, at=at, log=log, mode=mode)
    return wait(procs, timeout)[0]


def start(fn: Callable, *args: Any, at: int | None = None, log: Path | None = None, mode: str = "before") -> list:
    from core import faults

    env = {faults.ENV_AT: str(at or ""), faults.ENV_MODE: mode, faults.ENV_LOG: str(log or "")}
    p = context().Process(target=_child, args=(fn, args, env))
    p.start()
    return [p]


def wait(procs: list, timeout: float = 300.0) -> list[int]:
    codes = []
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


def count_writes(log: Path) -> int:
    return sum(1 for _ in open(log)) if log.is_file() else 0


def kill_points(n: int, spread: int | None) -> list[int]:
    """Every write ``1..n`` (``spread`` None), or ``spread`` points spread over them, first and last among them."""
    if n <= 0:
        return []
    if spread is None or spread >= n:
        return list(range(1, n + 1))
    return sorted({int(round(x)) for x in np.linspace(1, n, spread)})


# ------------------------------------------------------------------------------------------------ world
@dataclass
class World:
    """Videos, two manifest versions (the second grows the first) and the files around them."""

    root: Path
    small: Any = None   # manifest: val/test videos only, short ids
    grown: Any = None   # the small one plus train videos with long ids (widens ids and split)
    extra: dict = field(default_factory=dict)


def make_world(root: Path) -> World:
    from manifests.schema import Manifest
    from helpers import write_video

    root.mkdir(parents=True, exist_ok=True)
    vids = []
    for i in range(5):
        split = "val" if i < 2 else "test"
        write_video(root / f"v{i}.mp4", num_frames=10 + 2 * i, seed=i)
        vids.append({"video_id": f"v{i}", "path": f"v{i}.mp4", "split": split})
    (root / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    vids.append({"video_id": "bad", "path": "bad.mp4", "split": "test"})
    grown = list(vids)
    for i in range(3):
        write_video(root / f"t{i}.mp4", num_frames=12, seed=10 + i)
        grown.append({"video_id": f"train-video-with-a-long-identifier-{i}", "path": f"t{i}.mp4", "split": "train"})

    def captions(videos: list) -> list:
        return [{"caption_id": f"{v['video_id']}#{j}", "video_id": v["video_id"], "split": v["split"],
                 "text": f"caption {j} of {v['video_id']}"} for v in videos for j in range(2)]

    return World(root=root, small=Manifest.from_records("toy", vids, captions(vids), root=root),
                 grown=Manifest.from_records("toy", grown, captions(grown), root=root))


def encoder() -> Any:
    from pipeline.encoders import load_encoder

    return load_encoder("test-vit-micro")


# ------------------------------------------------------------------------------------------------ operations
def op_extract(manifest: Any, store: str, part: tuple[int, int] | None = None, thumbnails: int = 2) -> None:
    """``extract`` (fresh, resume, append, or one ``--part`` writer), then its finalisation."""
    from pipeline.extraction.job import extract

    extract(manifest, [encoder()], [store], part=part, thumbnails=thumbnails, finalize=part is None, **KW)


def op_finalize(store: str) -> None:
    from pipeline.extraction.report import ExtractReport, finalize_stores

    finalize_stores([store], ExtractReport(stores=[store]))


def op_repair(manifest: Any, store: str) -> None:
    from pipeline.integrity import verify
    from pipeline.store import CacheStore
    from workflows.share import repair

    report = verify(CacheStore.open(store), progress=False)
    if report.problems:
        repair(store, report, manifest, "test-vit-micro", workers=1, progress=False, timeout=30.0)


def op_pull(source: str, dest: str) -> None:
    from pipeline.sharing import pull

    pull(source, dest, progress=False)


def op_import(h5: str, store: str) -> None:
    from pipeline.hdf5io import import_hdf5

    import_hdf5(h5, store, progress=False)


def op_thumbnails(manifest: Any, store: str) -> None:
    from pipeline.extraction.thumbnail_backfill import add_thumbnails

    add_thumbnails(store, manifest, workers=1, timeout=30.0, progress=False, count=2)


# ------------------------------------------------------------------------------------------------ checks
def arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a store as a plain zarr reader sees it, cut to the rows its attributes count."""
    from pipeline.integrity import array_names
    from pipeline.store import CacheStore

    s = CacheStore.open(path)
    out = {}
    for name in array_names(s):
        a = np.asarray(s.array(name)[...])
        if name.startswith("videos/"):
            a = a[:s.num_videos]
        elif name.startswith("texts/"):
            a = a[:s.num_captions]
        out[name] = a
    return out


def assert_same_store(path: str | Path, ref: str | Path) -> None:
    """(c): the store equals the reference array by array, with the same attributes and digest."""
    from pipeline.integrity import store_digest, verify
    from pipeline.store import CacheStore

    a, b = arrays(path), arrays(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        if x.ndim == 2 and x.dtype == np.uint8 and name.split("/")[1] in ("ids", "split"):
            from pipeline.store import decode_strings

            assert decode_strings(x) == decode_strings(y), name
        else:
            assert x.shape == y.shape and np.array_equal(x, y), name
    s, r = CacheStore.open(path), CacheStore.open(ref)
    assert s.attrs == r.attrs
    report = verify(s, progress=False)
    assert report.ok, report.summary()
    assert store_digest(s) == store_digest(r)


def assert_committed_only(path: str | Path, ref: str | Path) -> None:
    """(a) and (b): every committed row a reader gets equals the reference's; the rest read as pending;
    ``verify`` names only unfinished shards (or an unfinished append)."""
    from pipeline.integrity import verify
    from pipeline.store import STATUS_PENDING, CacheStore, StoreError

    try:
        s = CacheStore.open(path)
    except StoreError:
        return  # no store there yet (or one still being created): a reader is refused, sees nothing
    r = CacheStore.open(ref)
    V = s.num_videos
    assert s.video_ids == r.video_ids[:V]
    status, ref_status = s.status(), r.status()[:V]
    done = s.done_shards()
    for v in range(V):
        if v // s.shard_size in done:
            assert status[v] == ref_status[v], (v, status[v], ref_status[v])
        else:
            assert status[v] == STATUS_PENDING, (v, status[v])
    for i in sorted(done):
        lo, hi = s.shard_range(i)
        for name in ("videos/tokens", "videos/frame_emb", "videos/frame_mask", "videos/frame_index", "videos/error"):
            assert np.array_equal(np.asarray(s.array(name)[lo:hi]), np.asarray(r.array(name)[lo:hi])), (name, i)
    for j in sorted(s.done_text_shards()):
        lo, hi = s.text_shard_range(j)
        for name in ("texts/tokens", "texts/emb", "texts/mask"):
            assert np.array_equal(np.asarray(s.array(name)[lo:hi]), np.asarray(r.array(name)[lo:hi])), (name, j)
    if s.has_thumbnails and r.has_thumbnails:
        thumbs, ref_thumbs = s.thumbnails(range(V)), r.thumbnails(range(V))
        tdone = s.thumbnail_shards() & done
        for v in range(V):
            assert thumbs[v] == (ref_thumbs[v] if v // s.shard_size in tdone else []), v
    for split in s.splits():
        rows, crows, _ = s.split_rows(split)
        assert all(status[rows] == 1)
    report = verify(s, progress=False)
    for p in report.problems:
        assert p.state == "missing" and "not written" in p.detail, report.summary()
    for note in report.notes:
        assert "append is unfinished" in note, report.summary()


def tree(root: Path, skip: tuple[Path, ...]) -> set[str]:
    """Files under ``root`` outside the ``skip`` paths (and their ``<name>.*`` siblings)."""
    out = set()
    for p in root.rglob("*"):
        if any(p == s or s in p.parents or p.name.startswith(s.name + ".") or
               any(q.name.startswith(s.name + ".") for q in p.parents) for s in skip):
            continue
        if p.is_file():
            out.add(str(p.relative_to(root)))
    return out


def copy_store(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
