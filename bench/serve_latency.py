"""Query latency of `python cli.py serve` through its HTTP API: p50 / p95 over the split's captions as queries.

    python bench/serve_latency.py --work-dir /tmp/serve-work --store STORE --stage-one RUN [--stage-two RUN2]
                                  [--split test] [--queries 200] [--k 10] [--candidates 15]
                                  [--synthetic-videos 1000000] [--threads 2] [--json out.json]

A real server (``serve.app``: Werkzeug's threaded server on 127.0.0.1, a free port) answers
``GET /api/search?q=...&k=...&mode=...`` for each of ``--queries`` captions of the split, one request at
a time from one client (a new connection each, as a browser's fetch may); the client's wall time of
each request gives p50 / p95 / mean, and the server's own timings (``timings_ms``) the median of each
stage. Configurations:

* the store's split through its exact (flat) index, stage one only (no head loaded);
* the same with ``--stage-two``: the top ``--candidates`` re-ranked by the head;
* ``--synthetic-videos`` (0: skip) synthetic video embeddings of stage one's dimension
  (``bench.search.latent_embeddings``, the data of ``bench/search.py``) in an exact (flat) index handed
  to the engine in place of the store's: the same text encoder and stage one, a search over a
  million vectors. Stage one only: those videos have no cached tokens, so no head can re-rank them.

Figures go to BENCHMARKS.md ("Serving").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fetch(url: str, query: str, k: int, mode: str) -> dict:
    params = urllib.parse.urlencode({"q": query, "k": k, "mode": mode})
    with urllib.request.urlopen(f"{url}/api/search?{params}", timeout=600) as resp:
        return json.loads(resp.read())


def measure(engine, queries: list[str], k: int, mode: str, warmup: int) -> dict:
    """Client-side latency of ``queries`` searched one after another through a real server on ``engine``."""
    from serve.app import BackgroundServer, create_app

    with BackgroundServer(create_app(engine)) as server:
        for q in queries[:warmup]:
            fetch(server.url, q, k, mode)
        wall, stages = [], []
        load0 = os.getloadavg()[0]
        for q in queries:
            t0 = time.perf_counter()
            answer = fetch(server.url, q, k, mode)
            wall.append(1000 * (time.perf_counter() - t0))
            stages.append(answer["timings_ms"])
        load1 = os.getloadavg()[0]
    ms = np.asarray(wall)
    return {"mode": mode, "queries": len(queries), "k": k, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
            "server_median_ms": {name: float(np.median([s[name] for s in stages])) for name in stages[0]},
            "load_average": [round(load0, 2), round(load1, 2)]}


COLUMNS = ("stage one", "re-ranking", "thumbnails")  # the server's own timings shown (medians)


def row(name: str, r: dict) -> str:
    server = r["server_median_ms"]
    stages = "".join(f" {server[c]:10.1f}" if c in server else f" {'-':>10s}" for c in COLUMNS)
    return (f"{name:44s} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['mean_ms']:8.1f} {stages}   "
            f"{r['load_average'][0]:.1f} to {r['load_average'][1]:.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", required=True, help="where staged arrays and the index go (written)")
    p.add_argument("--store", required=True)
    p.add_argument("--stage-one", required=True)
    p.add_argument("--stage-two", help="a stage-two run: also the re-ranked configuration")
    p.add_argument("--split", default="test")
    p.add_argument("--manifest", help="the store's manifest (default: found as serve finds it)")
    p.add_argument("--queries", type=int, default=200, help="captions of the split used as queries")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--k", type=int, default=10, help="results per search")
    p.add_argument("--candidates", type=int, default=15)
    p.add_argument("--synthetic-videos", type=int, default=1_000_000, help="0: skip the synthetic index")
    p.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    p.add_argument("--json", help="also write the figures to this JSON file")
    a = p.parse_args(argv)

    import torch

    from bench.search import latent_embeddings
    from heads.evaluation.index import build_index, set_threads
    from serve.engine import Engine, load_engine
    from workflows.workdir import WorkDir

    torch.set_num_threads(a.threads)
    set_threads(a.threads)
    work = WorkDir(a.work_dir)
    t0 = time.perf_counter()
    engine = load_engine(work, a.store, a.stage_one, stage_two=a.stage_two, split=a.split, candidates=a.candidates,
                         manifest=a.manifest, device="cpu", echo=print)
    print(f"engine loaded in {time.perf_counter() - t0:.1f}s: split {a.split!r}, {len(engine.data.video_ids)} videos, "
          f"{engine.index.kind} index, head: {a.stage_two or 'none'}")
    if engine.texts is None:
        raise SystemExit(f"the split's caption texts are needed as queries: {'; '.join(engine.notes)}")
    queries = list(engine.texts[:a.queries])
    # stage one alone: the same parts without the head
    plain = Engine(data=engine.data, store=engine.store, store_url=engine.store_url, stage_one=engine.stage_one,
                   encoder=engine.encoder, index=engine.index, texts=engine.texts, top=a.k, device="cpu")
    n, dim = len(engine.data.video_ids), int(engine.index.index.d)
    figures: dict = {"split": a.split, "videos": n, "queries": len(queries), "k": a.k, "threads": a.threads,
                     "os_cpu_count": os.cpu_count(), "results": []}
    runs = [(f"store, {n} videos, flat: stage one", plain, "stage-one")]
    if a.stage_two:
        runs.append((f"store, {n} videos, flat: re-ranked top {a.candidates}", engine, "reranked"))
    for name, eng, mode in runs:
        r = measure(eng, queries, a.k, mode, a.warmup)
        figures["results"].append({"config": name, **r})
        print(f"{name}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms")
    del engine, plain

    if a.synthetic_videos:
        t0 = time.perf_counter()
        vectors = latent_embeddings(a.synthetic_videos, dim, 16, 0.5, seed=0)
        ids = [f"synthetic-{i:07d}" for i in range(a.synthetic_videos)]
        big = build_index(vectors, ids, "flat", meta={"split": "synthetic"})
        del vectors
        print(f"{a.synthetic_videos:,} synthetic {dim}-d video embeddings in an exact index: "
              f"{time.perf_counter() - t0:.1f}s")
        synthetic = load_engine(work, a.store, a.stage_one, split=a.split, index=big, top=a.k, manifest=a.manifest,
                                device="cpu")
        name = f"{a.synthetic_videos:,} synthetic, flat: stage one"
        r = measure(synthetic, queries, a.k, "stage-one", a.warmup)
        figures["results"].append({"config": name, **r})
        figures["synthetic_rerank"] = ("not possible: the synthetic videos have no cached tokens for a stage-two head "
                                       "(bench/search.py times re-ranking on a token cache instead)")
        print(f"{name}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms")

    print(f"\nlatency over HTTP on 127.0.0.1, {len(queries)} queries (split {a.split!r} captions), k={a.k}, one client, "
          f"{a.threads} threads")
    print(f"{'configuration':44s} {'p50 ms':>8s} {'p95 ms':>8s} {'mean ms':>8s} "
          + "".join(f" {c:>10s}" for c in COLUMNS) + "   load average")
    print(f"{'':44s} {'(client, wall)':>26s}  {'(server medians, ms)':>32s}")
    for r in figures["results"]:
        print(row(r["config"], r))
    if a.synthetic_videos:
        print(f"{a.synthetic_videos:,} synthetic, re-ranked: {figures['synthetic_rerank']}")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
