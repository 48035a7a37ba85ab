"""How often the stage-two trainer's hard negatives are near-duplicates of the positive (synthetic benchmark).

    python bench/negatives.py --store STORE --manifest DIR --stage-one CKPT [--neg-source text video ...]
                              [--neg-pool 128] [--neg-video-pool 4] [--neg-temperature 0.05] [--json OUT]

For every train caption of a video in a near-duplicate group, draws one hard negative video with the
trainer's own sampler (``heads.stage_two.train.hard_negatives``, the given ``--neg-source`` and pool)
and reports the share that are members of the caption's group, per varied attribute; likewise for
the negative caption drawn for each grouped video. It also reports how far down stage one's
caption-to-video ranking the nearest group member sits. A head cannot learn to tell near-duplicates
apart from negatives that are seldom near-duplicates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--manifest", required=True, help="synthetic manifest directory (videos.parquet)")
    ap.add_argument("--stage-one", required=True)
    ap.add_argument("--neg-source", nargs="+", default=["text", "video"])
    ap.add_argument("--neg-pool", type=int, default=128)
    ap.add_argument("--neg-video-pool", type=int, default=4)
    ap.add_argument("--neg-temperature", type=float, default=0.05)
    ap.add_argument("--work-dir", default="work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args(argv)

    from heads.evaluation.similarity import similarity
    from heads.stage_one.checkpoint import load_stage_one
    from heads.stage_two.config import StageTwoTrainConfig
    from heads.stage_two.train import hard_negatives
    from bench.groups import manifest_videos
    from synthetic.groups import group_members
    from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

    train = WorkDir(args.work_dir).stage(args.store, "train", STAGE_TWO_ARRAYS)
    rows = manifest_videos(args.manifest)
    group, varied = group_members(list(train.video_ids), rows)
    cv = np.asarray(train.caption_video)
    caps = np.flatnonzero(group[cv] >= 0)
    vids = np.flatnonzero(group >= 0)
    if caps.size == 0:
        raise SystemExit(f"the train split of {args.store} has no near-duplicate groups")
    head = load_stage_one(args.stage_one, expect_encoder_identity=train.encoder_identity).head
    s = np.array(similarity(head, train)[caps], dtype=np.float64)
    s[np.arange(caps.size), cv[caps]] = -np.inf
    first = (group[np.argsort(-s, axis=1)] == group[cv[caps]][:, None]).argmax(axis=1)
    result: dict = {"captions": int(caps.size), "videos": int(vids.size),
                    "nearest_member_rank": {"median": float(np.median(first) + 1),
                                            "top1 %": float(100 * (first == 0).mean())},
                    "sources": {}}
    print(f"train: {caps.size} grouped captions of {vids.size} grouped videos; stage one ranks the nearest "
          f"other member of the caption's group at median {result['nearest_member_rank']['median']:.0f} "
          f"({result['nearest_member_rank']['top1 %']:.1f}% first)")
    attrs = sorted(set(varied[vids].tolist()))
    print("| --neg-source | negative videos in the group | " + " | ".join(attrs) + " | negative captions in the group |")
    print("|---|---|" + "---|" * len(attrs) + "---|")
    for source in args.neg_source:
        cfg = StageTwoTrainConfig(neg_source=source, neg_pool=args.neg_pool, neg_video_pool=args.neg_video_pool,
                                  neg_temperature=args.neg_temperature).resolved()
        sampler = hard_negatives(head, train, cfg)
        rng = np.random.default_rng(args.seed)
        same = group[sampler.negative_videos(caps, rng)] == group[cv[caps]]
        same_c = group[cv[sampler.negative_texts(vids, rng)]] == group[vids]
        per = {a: float(100 * same[varied[cv[caps]] == a].mean()) for a in attrs}
        result["sources"][source] = {"videos %": float(100 * same.mean()), "captions %": float(100 * same_c.mean()),
                                     "videos % by attribute": per}
        print(f"| {source} | {100 * same.mean():.1f} | " + " | ".join(f"{per[a]:.1f}" for a in attrs)
              + f" | {100 * same_c.mean():.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
