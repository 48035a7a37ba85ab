"""Store size per video for each codec, and staging throughput from local disk, S3 and HTTP.

    python bench/store_size.py [--videos 8] [--stage-videos 64] [--skip-staging]

Size: real stores (``pipeline.store.CacheStore``, the layout extraction writes) of ``--videos`` videos
with ViT-B/32 (50 x 768) and EVA-g/14 (257 x 1408) visual tokens at 12 frames, one per offered
compressor of the token arrays (none, zstd, blosc-zstd, blosc-lz4); the tokens are stored as float16.
bfloat16 storage is measured on the same values (their top 16 bits, through the same codecs) to show
what it would save; the store does not offer it. The token values are synthetic, shaped like
post-LayerNorm transformer tokens (per channel: a gain and a bias, a few outlier channels with
large gains, Gaussian values), so the ratios are indicative (float mantissas are noise to a byte
compressor, so real features should compress similarly; not measured here).

Staging: one store of ``--stage-videos`` ViT-B/32-shaped videos staged (train split, tokens and
embeddings) from a local path (page cache dropped first), from a moto S3 server on 127.0.0.1 and from
a Range-honouring HTTP server on 127.0.0.1; MB/s of staged bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store import COMPRESSORS, CacheStore, StoreLayout  # noqa: E402

SHAPES = {"ViT-B/32": (50, 768, 512), "EVA-g/14": (257, 1408, 1024)}  # tokens, width, embedding
T = 12


def tokens_like(rng: np.random.Generator, n: int, tokens: int, width: int) -> np.ndarray:
    """(n, T, tokens, width) float32 shaped like post-LayerNorm tokens."""
    gain = rng.lognormal(0.0, 0.4, size=width).astype(np.float32)
    gain[rng.choice(width, size=max(1, width // 200), replace=False)] *= 20.0  # outlier channels
    bias = rng.normal(0.0, 0.3, size=width).astype(np.float32)
    x = rng.standard_normal((n, T, tokens, width), dtype=np.float32)
    return x * gain + bias


def make_store(path: Path, n: int, tokens: int, width: int, embed: int, compressor: str | None,
               data: np.ndarray, shard: int = 8) -> CacheStore:
    layout = StoreLayout(dataset="bench", manifest_sha256="0" * 64, encoder={"name": "bench"}, num_frames=T,
                         num_tokens=tokens, token_dim=width, embed_dim=embed, text_dim=8, max_text_tokens=4,
                         shard_size=shard, text_shard_size=64, compressor=compressor)
    ids = [f"v{i:04d}" for i in range(n)]
    store = CacheStore.create(path, layout, ids, ["train"] * n, [f"c{i}" for i in range(n)], list(range(n)),
                              ["train"] * n)
    rng = np.random.default_rng(1)
    for i in range(store.num_shards):
        lo, hi = store.shard_range(i)
        m = hi - lo
        store.write_shard(i, status=np.ones(m, np.int8), error=[""] * m, tokens=data[lo:hi].astype(np.float16),
                          frame_emb=rng.standard_normal((m, T, embed), dtype=np.float32),
                          frame_mask=np.ones((m, T), bool), frame_index=np.tile(np.arange(T, dtype=np.int32), (m, 1)),
                          frame_time=np.tile(np.arange(T, dtype=np.float32), (m, 1)))
    for j in range(store.num_text_shards):
        lo, hi = store.text_shard_range(j)
        store.write_text_shard(j, tokens=np.zeros((hi - lo, 4, 8), np.float16), mask=np.ones((hi - lo, 4), bool),
                               emb=rng.standard_normal((hi - lo, embed), dtype=np.float32))
    store.consolidate()
    return store


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def bf16_bytes(values: np.ndarray, codec: str | None) -> int:
    """Stored bytes of ``values`` as bfloat16 (top 16 bits of float32) through ``codec``, one video per chunk."""
    from numcodecs import Blosc, Zstd

    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    enc = {None: None, "zstd": Zstd(level=3), "blosc-zstd": Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
           "blosc-lz4": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)}[codec]
    return sum(bits[i].nbytes if enc is None else len(enc.encode(np.ascontiguousarray(bits[i])))
               for i in range(bits.shape[0]))


def size_table(n: int, tmp: Path) -> list[str]:
    rng = np.random.default_rng(0)
    lines = ["| tokens | storage | codec | MB per video (tokens) | ratio vs fp16 uncompressed | ratio vs fp32 |",
             "|---|---|---|---|---|---|"]
    for name, (tokens, width, embed) in SHAPES.items():
        data = tokens_like(rng, n, tokens, width)
        raw16 = T * tokens * width * 2
        for codec in (None, *COMPRESSORS):
            path = tmp / f"{name.replace('/', '')}-{codec}.zarr"
            make_store(path, n, tokens, width, embed, codec, data)
            per_video = dir_bytes(path / "videos" / "tokens") / n
            lines.append(f"| {name} ({tokens}x{width}) | fp16 | {codec or 'none'} | {per_video / 1e6:.3f} | "
                         f"{raw16 / per_video:.3f} | {2 * raw16 / per_video:.3f} |")
            shutil.rmtree(path)
        for codec in (None, *COMPRESSORS):
            per_video = bf16_bytes(data, codec) / n
            lines.append(f"| {name} ({tokens}x{width}) | bf16 (not offered) | {codec or 'none'} | "
                         f"{per_video / 1e6:.3f} | {raw16 / per_video:.3f} | {2 * raw16 / per_video:.3f} |")
    return lines


def stage_rate(url: str, out: Path, staged_bytes: int, repeats: int = 2) -> float:
    best = 0.0
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        evict_tree(url)
        t0 = time.perf_counter()
        CacheStore.open(url).stage("train", out, arrays=("frame_emb", "tokens"))
        best = max(best, staged_bytes / 1e6 / (time.perf_counter() - t0))
    return best


def evict_tree(url: str) -> None:
    """Drop a local store's files from the page cache (best effort), so staging reads the disk."""
    if "://" in url or not hasattr(os, "posix_fadvise"):
        return
    for p in Path(url).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def staging_table(n: int, tmp: Path) -> list[str]:
    import logging
    from http.server import ThreadingHTTPServer

    tokens, width, embed = SHAPES["ViT-B/32"]
    local = tmp / "www" / "stage.zarr"
    local.parent.mkdir()
    make_store(local, n, tokens, width, embed, None, tokens_like(np.random.default_rng(0), n, tokens, width))
    staged = n * T * (tokens * width * 2 + embed * 4 + 1 + 4) + n * embed * 4
    rows = [("local disk (page cache dropped)", str(local))]
    # HTTP: a static server honouring Range (sys.path: the tests' handler)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import RangeHandler

    http = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(local.parent)))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    rows.append(("HTTP on 127.0.0.1 (python http.server, Range)", f"http://127.0.0.1:{http.server_address[1]}/stage.zarr"))
    try:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        host, port = s3.get_host_and_port()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          CROSSTVR_S3_ENDPOINT=f"http://{host}:{port}")
        from pipeline.remote import filesystem

        import boto3

        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="bench")
        fs, _ = filesystem("s3://bench/stage.zarr")
        fs.put(str(local), "bench/stage.zarr", recursive=True)
        rows.append(("S3 on 127.0.0.1 (moto server)", "s3://bench/stage.zarr"))
    except ImportError as exc:
        print(f"S3 skipped: {exc}")
    lines = [f"| source | staging MB/s ({n} videos, {staged / 1e6:.0f} MB staged) |", "|---|---|"]
    for label, url in rows:
        rate = stage_rate(url, tmp / "staged", staged)
        lines.append(f"| {label} | {rate:.1f} |")
        print(lines[-1], flush=True)
    http.shutdown()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--stage-videos", type=int, default=64)
    ap.add_argument("--skip-staging", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="store-size-") as d:
        tmp = Path(d)
        print("\n".join(size_table(args.videos, tmp)), flush=True)
        if not args.skip_staging:
            print()
            print("\n".join(staging_table(args.stage_videos, tmp)))


if __name__ == "__main__":
    main()
