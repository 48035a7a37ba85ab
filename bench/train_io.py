"""Stage-two training I/O: streaming the token cache from disk vs the same cache preloaded in RAM.

    python bench/train_io.py [--videos 256] [--scale 10] [--steps 20] [--batch-size 32] [--threads 2]
                             [--head-option key=value ...] [--dir DIR] [--json FILE]

Writes two ViT-B/32-shaped caches of random data as ``.npy`` memmaps (``bench/cache.py``): a small
one of ``--videos`` videos and one ``--scale`` times larger (12 frames x 50 tokens x 768, fp16,
0.88 MiB per video; one 32-token caption per video). Then, each in a fresh subprocess so that its
peak memory is its own, it runs the real trainer (``heads.stage_two.train.train_stage_two``,
CrossTVR with its defaults, annealed hard negatives from an untrained meanP stage one). ``--phase
itm`` (default) times ITM steps (the contrastive pre-training phase skipped, the positives'
contrastive loss kept, as in the default ITM phase); ``--phase itc`` times steps of the contrastive
pre-training phase, which reads ``--itc-batch`` distinct videos per step:

* ``stream``: the small cache read through memmaps, its files evicted from the page cache first;
* ``ram``: the small cache copied into memory first;
* ``stream-large``: the large cache read through memmaps, evicted first.

Each run trains twice from scratch: once stopping before the first step (``max_steps=0``: start-up
= stage-one similarities for the negatives, the standardiser's statistics, the first prefetch) and
once for ``--steps`` steps; steps/s = steps / (difference of the two wall times). Printed: steps/s
of each run, the ratio stream / ram (target >= 0.9), and peak memory: ``VmHWM`` (peak resident
set, which counts the file pages mapped by memmaps) and the peak of ``RssAnon`` (the process's own
memory; file pages are page cache the kernel can drop). The large cache must not raise either
peak (flat).

``--store``: the same measurements on real Zarr stores (``bench.cache.write_store``, shard by shard
through the commit protocol) read the way the commands read them (``CacheStore.stage``), the page
cache dropped first:

* ``in-place``: the token arrays memory-mapped where they lie in the store's shard and chunk files
  (``pipeline.store.inplace``); only the small arrays staged;
* ``staged``: the token arrays copied into ``.npy`` memory maps first (``--copy-tokens``);
* ``ram``: the staged copy loaded into memory;
* ``in-place-large``: the ``--scale`` times larger store, in place.

Each also reports the time to the first step (staging + stage one + start-up) and the bytes staging
wrote. With ``--paper-videos N`` a store of N videos of EVA ViT-g/14's token shape (12 x 257 x 1408,
8.7 MB per video, random values) gives the time to the first step in place and staged at the paper's
token size (the copy grows with the split; in place only the shard indexes are read).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.cache import evict, in_ram, open_cache, write_cache  # noqa: E402
from core.options import parse_key_values  # noqa: E402

TARGET_RATIO = 0.9
SHAPE = dict(frames=12, tokens=50, width=768, text_len=32, text_width=512, embed=512)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """Samples ``RssAnon`` every 20 ms in a thread; ``peak`` in KiB."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(0.02)

    def __enter__(self) -> "PeakAnon":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))


def worker(a: argparse.Namespace) -> dict:
    """One measurement in this process: train from a cache directory, print figures as JSON."""
    import torch

    from heads.stage_one.train import train_stage_one
    from heads.stage_two.train import train_stage_two

    split = open_cache(Path(a.cache), split="train")  # the trainer refuses a test split
    mode = a.worker
    work = Path(tempfile.mkdtemp(prefix="train-io-", dir=a.cache))
    cfg = parse_key_values(a.head_option, "--head-option")
    torch.set_num_threads(a.threads)
    stage_one = train_stage_one(split, None, head="meanP", out_dir=work / "s1", epochs=1, batch_size=256,
                                progress=False, num_threads=a.threads)
    figures = {"mode": mode, "videos": len(split.video_ids), "cache_gib": split.tokens.nbytes / 2**30}

    def run(max_steps: int, name: str) -> float:
        data = split
        if mode == "ram":
            data = in_ram(split)
        else:
            evict(split)
        t0 = time.perf_counter()
        phase = {"itc_steps": 10**6, "itc_batch": a.itc_batch} if a.phase == "itc" else {"itc_steps": 0}
        train_stage_two(data, None, stage_one, work / name, head_config=cfg, epochs=1000,
                        batch_size=a.batch_size, max_steps=max_steps, progress=False, num_threads=a.threads,
                        resume=False, seed=0, **phase)
        return time.perf_counter() - t0

    with PeakAnon() as anon:
        start = run(0, "start")
        full = run(a.steps, "steps")
    figures.update(steps=a.steps, startup_s=start, steps_s=full - start,
                   steps_per_s=a.steps / max(1e-9, full - start), peak_rss_mib=_status_kib("VmHWM") / 1024,
                   peak_anon_mib=anon.peak / 1024)
    return figures


def finish(a: argparse.Namespace, runs: dict, ratio: float, what: str, small: dict, big: dict) -> None:
    """Print the peak memory of the ``--scale`` times larger cache against the small one (flat is the
    target) and write ``--json``."""
    print(f"{a.scale}x larger {what}: peak RSS {small['peak_rss_mib']:.0f} -> {big['peak_rss_mib']:.0f} MiB "
          f"(x{big['peak_rss_mib'] / small['peak_rss_mib']:.2f}), peak RssAnon {small['peak_anon_mib']:.0f} -> "
          f"{big['peak_anon_mib']:.0f} MiB (x{big['peak_anon_mib'] / small['peak_anon_mib']:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "ratio": ratio, "scale": a.scale}, indent=2) + "\n")


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _evict_tree(root: Path) -> None:
    for f in Path(root).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def store_worker(a: argparse.Namespace) -> dict:
    """One measurement on a store: stage its train split as the mode says, then train (as ``worker``)."""
    import torch

    from heads.stage_one.train import train_stage_one
    from heads.stage_two.train import train_stage_two
    from pipeline.store import CacheStore

    torch.set_num_threads(a.threads)
    mode = a.worker
    work = Path(tempfile.mkdtemp(prefix="train-io-", dir=Path(a.cache).parent))
    _evict_tree(Path(a.cache))
    t0 = time.perf_counter()
    split = CacheStore.open(a.cache).stage("train", work / "staged", arrays=("frame_emb", "tokens", "text"),
                                           copy=mode != "in-place")
    staging_s = time.perf_counter() - t0
    staged_bytes = _tree_bytes(work / "staged")
    if mode == "store-ram":
        split = in_ram(split)
    _evict_tree(Path(a.cache))
    _evict_tree(work / "staged")
    figures = {"mode": mode, "videos": len(split.video_ids), "access": split.access, "staging_s": staging_s,
               "staged_bytes": staged_bytes, "cache_gib": float(np.prod(split.tokens.shape)) * 2 / 2**30}
    t0 = time.perf_counter()
    stage_one = train_stage_one(split, None, head="meanP", out_dir=work / "s1", epochs=1, batch_size=256,
                                progress=False, num_threads=a.threads)
    stage_one_s = time.perf_counter() - t0
    cfg = parse_key_values(a.head_option, "--head-option")

    def run(max_steps: int, name: str) -> float:
        t0 = time.perf_counter()
        train_stage_two(split, None, stage_one, work / name, head_config=cfg, epochs=1000,
                        batch_size=a.batch_size, max_steps=max_steps, progress=False, num_threads=a.threads,
                        resume=False, seed=0, itc_steps=0)
        return time.perf_counter() - t0

    with PeakAnon() as anon:
        start = run(0, "start")
        figures.update(first_step_s=staging_s + stage_one_s + start)
        if a.steps > 0:
            full = run(a.steps, "steps")
            figures.update(steps=a.steps, steps_s=full - start, steps_per_s=a.steps / max(1e-9, full - start))
    figures.update(startup_s=start, peak_rss_mib=_status_kib("VmHWM") / 1024, peak_anon_mib=anon.peak / 1024)
    return figures


def store_main(a: argparse.Namespace) -> None:
    """``--store``: in place vs staged vs in RAM on Zarr stores (see the module docstring)."""
    from bench.cache import write_store

    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="bench-train-io-")
    root = Path(a.dir or tmp.name)
    shape = dict(SHAPE)
    try:
        stores = {}
        sizes = [("small", a.videos, shape), ("large", a.videos * a.scale, shape)]
        if a.paper_videos:
            sizes.append(("paper", a.paper_videos, dict(shape, tokens=257, width=1408, text_width=1024,
                                                         embed=1024)))
        for name, videos, dims in sizes:
            t0 = time.perf_counter()
            stores[name] = write_store(root / f"{name}.zarr", videos, **dims)
            print(f"{name} store: {videos} videos (written in {time.perf_counter() - t0:.0f}s)", flush=True)
        runs = {}
        plan = [("in-place", "in-place", "small"), ("staged", "staged", "small"), ("ram", "store-ram", "small"),
                ("in-place-large", "in-place", "large")]
        if a.paper_videos:
            plan += [("paper in-place", "in-place", "paper"), ("paper staged", "staged", "paper")]
        for label, mode, store in plan:
            steps = 0 if store == "paper" else a.steps
            cmd = [sys.executable, __file__, "--worker", mode, "--cache", str(stores[store]), "--steps", str(steps),
                   "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
            for opt in a.head_option:
                cmd += ["--head-option", opt]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[label] = r = json.loads(out.strip().splitlines()[-1])
            line = (f"{label:15s}: {r['videos']:5d} videos ({r['cache_gib']:.2f} GiB of tokens, {r['access']}), "
                    f"staging {r['staging_s']:.1f}s writing {r['staged_bytes'] / 2**20:.1f} MiB, first step after "
                    f"{r['first_step_s']:.1f}s")
            if "steps_per_s" in r:
                line += (f", {r['steps_per_s']:.3f} steps/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                         f"peak RssAnon {r['peak_anon_mib']:.0f} MiB")
            print(line, flush=True)
        ratio = runs["in-place"]["steps_per_s"] / runs["staged"]["steps_per_s"]
        print(f"in place / staged steps/s: {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'}); "
              f"in place / in RAM: {runs['in-place']['steps_per_s'] / runs['ram']['steps_per_s']:.3f}")
        finish(a, runs, ratio, "in place", runs["in-place"], runs["in-place-large"])
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=256, help="videos in the small cache")
    p.add_argument("--scale", type=int, default=10, help="the large cache has scale x videos")
    p.add_argument("--steps", type=int, default=20, help="training steps timed per run")
    p.add_argument("--batch-size", type=int, default=32, help="positive pairs per step (x3 with negatives)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--phase", choices=["itm", "itc"], default="itm",
                   help="time ITM steps or steps of the contrastive pre-training phase")
    p.add_argument("--itc-batch", type=int, default=64, help="videos per contrastive step (--phase itc)")
    p.add_argument("--head-option", action="append", default=[], help="key=value CrossTVR option (JSON values)")
    p.add_argument("--dir", help="directory for the caches (default: a temporary directory, removed after)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--store", action="store_true", help="measure Zarr stores read in place vs staged")
    p.add_argument("--paper-videos", type=int, default=0,
                   help="--store: also a store of this many EVA-g/14-shaped videos (time to the first step)")
    p.add_argument("--worker", choices=["stream", "ram", "in-place", "staged", "store-ram"], help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(store_worker(a) if a.worker in ("in-place", "staged", "store-ram") else worker(a)))
        return
    if a.store:
        store_main(a)
        return

    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="bench-train-io-")
    root = Path(a.dir or tmp.name)
    try:
        caches = {}
        for name, videos in (("small", a.videos), ("large", a.videos * a.scale)):
            t0 = time.perf_counter()
            caches[name] = root / name
            caches[name].mkdir(parents=True, exist_ok=True)
            split = write_cache(caches[name], videos, videos, **SHAPE)
            print(f"{name} cache: {videos} videos, {split.tokens.nbytes / 2**30:.2f} GiB of tokens "
                  f"(written in {time.perf_counter() - t0:.0f}s)", flush=True)
            del split
        runs = {}
        for label, mode, cache in (("stream", "stream", "small"), ("ram", "ram", "small"),
                                   ("stream-large", "stream", "large")):
            cmd = [sys.executable, __file__, "--worker", mode, "--cache", str(caches[cache]), "--steps",
                   str(a.steps), "--batch-size", str(a.batch_size), "--threads", str(a.threads),
                   "--phase", a.phase, "--itc-batch", str(a.itc_batch)]
            for opt in a.head_option:
                cmd += ["--head-option", opt]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[label] = json.loads(out.strip().splitlines()[-1])
            r = runs[label]
            print(f"{label:13s}: {r['videos']:5d} videos ({r['cache_gib']:.2f} GiB) {r['steps_per_s']:.3f} steps/s "
                  f"(start-up {r['startup_s']:.1f}s), peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"peak RssAnon {r['peak_anon_mib']:.0f} MiB", flush=True)
        ratio = runs["stream"]["steps_per_s"] / runs["ram"]["steps_per_s"]
        print(f"streaming / preloaded steps/s: {ratio:.3f}  (target >= {TARGET_RATIO}: "
              f"{'met' if ratio >= TARGET_RATIO else 'MISSED'})")
        finish(a, runs, ratio, "cache", runs["stream"], runs["stream-large"])
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
