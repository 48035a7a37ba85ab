"""Where stage one's and the re-ranker's top-1 errors come from, by query kind (synthetic benchmark).

    python bench/error_types.py --manifest work/synthetic/manifest --rerank-dir DIR [--rerank-dir DIR ...]

Reads the ``ranked_t2v.parquet`` that ``python cli.py rerank`` writes and, per kind of query (the
attribute its near-duplicate group varies, or "random scene"), prints stage one's and the re-ranked
R@1 and how many of the wrong top-1 videos are the query's own near-duplicates (the fine-grained
errors stage two is meant to fix) rather than other scenes (gist errors).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def error_types(manifest_dir: str | Path, rerank_dir: str | Path) -> dict[str, dict[str, float]]:
    """{kind: {"n", "stage_one_R@1", "reranked_R@1", "stage_one_errors", "stage_one_errors_in_group",
    "reranked_errors", "reranked_errors_in_group"}} from one re-ranking output directory."""
    import pyarrow.parquet as pq

    from bench.groups import manifest_videos

    man = manifest_videos(manifest_dir)
    rows = pq.read_table(Path(rerank_dir) / "ranked_t2v.parquet",
                         columns=["query_id", "rank", "stage_one_rank", "candidate_id", "positive"]).to_pylist()
    per_query = collections.defaultdict(list)
    for r in rows:
        per_query[r["query_id"]].append(r)
    agg: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for qid, cands in per_query.items():
        vid = qid.rsplit("#", 1)[0]
        if vid not in man:
            raise KeyError(f"query {qid!r} of {rerank_dir} names video {vid!r}, which is not in {manifest_dir}")
        kind = man[vid]["varied"] or "random scene"
        grouped = bool(man[vid]["varied"])
        s1 = next(r for r in cands if r["stage_one_rank"] == 1)
        rr = next(r for r in cands if r["rank"] == 1)
        a = agg[kind]
        a["n"] += 1
        for tag, top in (("stage_one", s1), ("reranked", rr)):
            if top["positive"]:
                a[f"{tag}_hits"] += 1
            else:
                a[f"{tag}_errors"] += 1
                a[f"{tag}_errors_in_group"] += int(grouped and man[top["candidate_id"]]["group_id"]
                                                   == man[vid]["group_id"])
    out = {}
    for kind, a in sorted(agg.items()):
        out[kind] = {"n": a["n"], "stage_one_R@1": 100.0 * a["stage_one_hits"] / a["n"],
                     "reranked_R@1": 100.0 * a["reranked_hits"] / a["n"],
                     **{k: a[k] for k in ("stage_one_errors", "stage_one_errors_in_group",
                                          "reranked_errors", "reranked_errors_in_group")}}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", required=True, help="synthetic manifest directory (videos.parquet)")
    ap.add_argument("--rerank-dir", action="append", required=True, help="a `cli.py rerank` --out directory")
    ap.add_argument("--json", help="write the tables here")
    args = ap.parse_args(argv)
    result = {}
    for d in args.rerank_dir:
        table = error_types(args.manifest, d)
        result[d] = table
        print(d)
        print("| query kind | n | stage-one R@1 | re-ranked R@1 | stage-one errors in own group | re-ranked errors in own group |")
        print("|---|---|---|---|---|---|")
        for kind, r in table.items():
            print(f"| {kind} | {r['n']} | {r['stage_one_R@1']:.1f} | {r['reranked_R@1']:.1f} | "
                  f"{r['stage_one_errors_in_group']} / {r['stage_one_errors']} | "
                  f"{r['reranked_errors_in_group']} / {r['reranked_errors']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
