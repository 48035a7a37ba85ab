"""Re-ranking speed: 1,000 text queries x 1,000 videos, top K = 15 re-ranked by a CrossTVR head.

    python bench/rerank.py [--videos 1000] [--queries 1000] [--rerank-queries N] [--k 15]
                           [--threads 2] [--batch-size 64] [--head-option key=value ...]
                           [--preset crosstvr-blip2] [--device cuda] [--profile-batch N]

``--preset`` measures a shipped head (``heads/presets``) instead; for ``crosstvr-blip2`` (BLIP-2's
Q-Former at the paper's size) the cache defaults to EVA ViT-g/14's tokens (N=257, D=1408) and the
captions are random token ids of the head's vocabulary (it reads captions through its own word
embeddings); an 1,000-video cache of that shape is 8.1 GiB.

A synthetic ViT-B/32-shaped cache is written as ``.npy`` memmaps in a temporary directory
(random data): per video T=12 frames of N=50 CLS+patch tokens of width D=768 (fp16) and 512-d
frame embeddings; per caption L=32 text tokens of width 512 (fp16, random lengths) and a 512-d
embedding. The stage-two head is ``CrossTVR`` with its default config as the trainer builds it
(with the contrastive projection, ``itc_dim`` 128, so a pair's score is ITM + ITC and every
distinct video also gets a text-free query pass; ``--head-option itc_dim=0`` measures ITM alone)
and random weights (its standardiser fitted on the cache); the stage-one head is untrained meanP (cosine of the mean
frame embedding and the text embedding).

Measured, on ``--threads`` torch threads:

* stage one alone: similarity matrix (all queries x all videos) + T2V metrics, ms per query;
* re-ranking: top-K candidates, scoring of every (query, candidate) pair with the head read from
  the memmaps, full re-ranked matrix + metrics, ms per query (``--rerank-queries`` re-ranks only
  the first N queries, for a quicker run; then each video is a candidate of fewer queries and its
  text-independent work is shared by fewer pairs, so the per-query figure is pessimistic);
* a profile of one batch: ms per pair of ``head.score`` (the whole head for every pair), of
  ``encode_video`` (the text-independent part: standardising and projecting the visual tokens,
  picking frames, the token selector), and of ``pair_score`` with every video shared by K pairs,
  which is how re-ranking runs the head (each distinct video of a batch is encoded once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache import first_queries, write_cache  # noqa: E402
from core.options import parse_key_values  # noqa: E402
from core.split import StagedSplit  # noqa: E402
from dataclasses import replace  # noqa: E402

TARGET_MS = 20.0


def profile_batch(head, split: StagedSplit, batch: int, k: int, repeats: int = 2, device: str = "cpu") -> dict:
    """Seconds per pair on one batch of pairs: ``pair_score`` with every pair its own video (the
    whole head per pair), its per-video part ``encode_video``, and ``pair_score`` with each video
    shared by ``k`` pairs (re-ranking's case: a video is a candidate of about K queries)."""
    import torch

    from heads.training.data import gather_rows

    distinct = max(1, batch // k)
    v = np.arange(batch) % len(split.video_ids)
    c = np.arange(batch) % len(split.caption_ids)
    args = tuple(torch.from_numpy(gather_rows(a, r)).to(device) for a, r in (
        (split.tokens, v), (split.frame_mask, v), (split.text_tokens, c), (split.text_mask, c)))

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - t0) / repeats / batch

    out = {}
    pairs = torch.arange(batch, device=device)
    with torch.inference_mode():
        out["score"] = timed(lambda: head.pair_score(args[2], args[3], args[0], args[1], pairs, pairs))
        out["encode_video (once per video)"] = timed(lambda: head.encode_video(args[0], args[1]))
        out["pair_score (distinct videos once)"] = timed(
            lambda: head.pair_score(args[2], args[3], args[0][:distinct], args[1][:distinct], pairs,
                                    pairs % distinct))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=1000)
    p.add_argument("--queries", type=int, default=1000, help="text queries (captions); caption i -> video i mod V")
    p.add_argument("--rerank-queries", type=int, default=None,
                   help="re-rank only the first N queries (default: all); fewer shares less per-video work (pessimistic)")
    p.add_argument("--candidates", type=int, default=15)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--tokens", type=int, default=None, help="CLS + patches per frame [50; 257 with --preset]")
    p.add_argument("--width", type=int, default=None, help="visual token width [768; 1408 with --preset]")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--text-width", type=int, default=512)
    p.add_argument("--embed", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per head forward pass")
    p.add_argument("--head", default="crosstvr")
    p.add_argument("--preset", help="a shipped head preset (python cli.py heads); sets --head and its options")
    p.add_argument("--device", default="cpu", help="torch device of the head (cpu, cuda)")
    p.add_argument("--profile-batch", type=int, help="pairs of the profiled batch (default: --batch-size)")
    p.add_argument("--profile-repeats", type=int, default=2)
    p.add_argument("--head-option", action="append", default=[], help="key=value head option (JSON values)")
    p.add_argument("--dir", help="directory for the cache (default: a temporary directory, removed after)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    a = p.parse_args(argv)

    import torch

    from core.metrics import t2v_metrics
    from heads import create_head, supports
    from heads.evaluation.rerank import rerank
    from heads.evaluation.similarity import similarity, untrained_baseline
    from heads.stage_two.config import DEFAULT_ITC_DIM
    from heads.registry import get_preset
    from heads.stage_two.scoring import pair_scorer
    from heads.stage_two.tokenizer import text_view

    torch.set_num_threads(a.threads)
    cfg = parse_key_values(a.head_option, "--head-option")
    if a.preset:
        preset = get_preset(a.preset)
        a.head, cfg = preset["head"], {**preset["head_config"], **cfg}
    big = bool(a.preset)
    a.tokens = a.tokens or (257 if big else 50)
    a.width = a.width or (1408 if big else 768)
    if supports(a.head, "contrastive"):  # the trainer's default head scores ITM + ITC
        cfg.setdefault("itc_dim", DEFAULT_ITC_DIM)
    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="bench-rerank-")
    root = Path(a.dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        split = write_cache(root, a.videos, a.queries, a.frames, a.tokens, a.width, a.text_len, a.text_width,
                            a.embed)
        gib = split.tokens.nbytes / 2**30
        print(f"cache: {a.videos} videos x {a.frames} frames x {a.tokens} tokens x {a.width} (fp16, {gib:.2f} GiB), "
              f"{a.queries} captions x {a.text_len} x {a.text_width}; written in {time.perf_counter() - t0:.1f}s")
        torch.manual_seed(0)
        ids = cfg.get("text_input") == "ids"
        head = create_head(a.head, a.width, 0 if ids else a.text_width, stage=2, **cfg).eval()
        head.fit_standardizer(split)
        head.to(a.device)
        if ids:  # captions as token ids of the head's vocabulary, [CLS] first, with the cache's lengths
            rng = np.random.default_rng(0)
            words = rng.integers(1000, int(cfg["vocab_size"]), size=split.text_mask.shape).astype(np.int32)
            words[:, 0] = 101
            split = replace(split, text_ids=np.where(split.text_mask, words, 0), text_ids_mask=split.text_mask)
        print(f"head: {a.head} {json.dumps(head.config())} ({head.num_parameters():,} parameters), "
              f"torch threads {torch.get_num_threads()}, batch {a.batch_size} pairs, K={a.candidates}")

        # stage one alone
        t0 = time.perf_counter()
        sim = similarity(untrained_baseline(a.embed), split)
        t2v_metrics(sim, split.caption_video)
        s1 = time.perf_counter() - t0
        s1_ms = 1000 * s1 / a.queries

        # re-ranking (T2V) of the first N queries
        n = a.queries if a.rerank_queries is None else min(a.queries, a.rerank_queries)
        sub = first_queries(split, n)
        t0 = time.perf_counter()
        res = rerank(sim[:n], sub, pair_scorer(head, sub, batch_size=a.batch_size, device=a.device), k=a.candidates,
                     directions=("t2v",))
        res.metrics()
        rr = time.perf_counter() - t0
        rr_ms = 1000 * rr / n
        per_pair_ms = 1000 * res.seconds["scoring"] / max(1, res.num_pairs)
        prof = profile_batch(head, text_view(split, head.text_input), a.profile_batch or a.batch_size, a.candidates,
                             a.profile_repeats, a.device)

        print(f"stage one alone      : {s1:8.2f} s for {a.queries} queries = {s1_ms:8.2f} ms/query")
        print(f"re-ranking (top {a.candidates:2d})  : {rr:8.2f} s for {n} queries = {rr_ms:8.2f} ms/query "
              f"({res.num_pairs} pairs, {per_pair_ms:.2f} ms/pair; scoring {res.seconds['scoring']:.2f} s, "
              f"candidates {res.seconds['candidates']:.2f} s, matrices {res.seconds['matrices']:.2f} s)")
        print(f"stage one + re-rank  : {s1_ms + rr_ms:8.2f} ms/query   target <= {TARGET_MS:.0f} ms/query: "
              f"{'met' if s1_ms + rr_ms <= TARGET_MS else 'MISSED'}")
        total = prof["score"]
        print(f"profile of one batch of {a.profile_batch or a.batch_size} pairs (ms/pair): head.score "
              f"{1000 * total:.2f}")
        for name, sec in prof.items():
            if name != "score":
                print(f"    {name:34s} {1000 * sec:7.2f}  ({100 * sec / total:5.1f}% of head.score)")
        figures = {"videos": a.videos, "queries": a.queries, "rerank_queries": n, "k": a.candidates, "threads": a.threads,
                   "batch_size": a.batch_size, "head_config": head.config(), "stage_one_ms_per_query": s1_ms,
                   "rerank_ms_per_query": rr_ms, "total_ms_per_query": s1_ms + rr_ms, "pairs": res.num_pairs,
                   "ms_per_pair": per_pair_ms, "profile_ms_per_pair": {k: 1000 * v for k, v in prof.items()},
                   "cpu_count": os.cpu_count(), "device": a.device, "preset": a.preset,
                   "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None}
        if a.json:
            Path(a.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
