"""Store write throughput, before and after a change: whole video shards committed, in MB/s.

    python bench/store_write.py [--shards 8] [--shard-size 64] [--frames 12] [--baseline DIR]

Writes ``--shards`` video shards of ViT-B/32-shaped tokens (50 tokens x 768, float16; 59 MB a shard of
64 videos at 12 frames) and their text shards into a fresh local store through ``CacheStore.write_shard``
(the commit protocol: data, status, checksum record, done flag; each object fsynced), then prints MB/s.
``--baseline DIR`` (another checkout of this project, e.g. ``git worktree add /tmp/base <commit>``) runs
the same writes with that checkout's store code in a subprocess, alternating with this one, and prints
both and their ratio (this / baseline) in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def one_run(tree: Path, shards: int, S: int, T: int, N: int, D: int, E: int) -> float:
    """Seconds to write ``shards`` shards with the store code of ``tree`` (run in this process)."""
    sys.path.insert(0, str(tree))
    from pipeline.store import CacheStore, StoreLayout

    V = shards * S
    ids = [f"video{i:07d}" for i in range(V)]
    layout = StoreLayout(dataset="bench", manifest_sha256="0" * 64, encoder={"name": "bench"}, num_frames=T,
                         num_tokens=N, token_dim=D, embed_dim=E, text_dim=512, max_text_tokens=32, shard_size=S,
                         text_shard_size=1024)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((S, T, N, D)).astype(np.float16)
    emb = rng.standard_normal((S, T, E)).astype(np.float32)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        store = CacheStore.create(Path(tmp) / "s.zarr", layout, ids, ["train"] * V, [], [], [])
        t0 = time.perf_counter()
        for i in range(shards):
            store.write_shard(i, status=np.ones(S, np.int8), error=[""] * S, tokens=tokens + i, frame_emb=emb,
                              frame_mask=np.ones((S, T), bool),
                              frame_index=np.tile(np.arange(T, dtype=np.int32), (S, 1)),
                              frame_time=np.tile(np.arange(T, dtype=np.float32), (S, 1)))
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each tree; the best is kept")
    p.add_argument("--baseline", type=Path, help="another checkout to compare with")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    dims = dict(shards=a.shards, S=a.shard_size, T=a.frames, N=50, D=768, E=512)
    if a.child:
        print(json.dumps({"seconds": one_run(a.child, **dims)}))
        return
    mb = a.shards * a.shard_size * a.frames * 50 * 768 * 2 / 1e6
    trees = {"this": ROOT} | ({"baseline": a.baseline.resolve()} if a.baseline else {})
    best = {k: float("inf") for k in trees}
    for _ in range(a.repeats):
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, __file__, "--child", str(tree), "--shards", str(a.shards),
                                  "--shard-size", str(a.shard_size), "--frames", str(a.frames)],
                                 check=True, capture_output=True, text=True).stdout
            best[name] = min(best[name], json.loads(out.strip().splitlines()[-1])["seconds"])
    for name in trees:
        print(f"{name:9s} {a.shards} shards x {a.shard_size} videos ({mb:.0f} MB of tokens): {best[name]:.2f}s, "
              f"{mb / best[name]:.0f} MB/s")
    if a.baseline:
        print(f"ratio this / baseline (throughput): {best['baseline'] / best['this']:.3f}")


if __name__ == "__main__":
    main()
