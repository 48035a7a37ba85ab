"""Can a head's architecture read an attribute at all? Train its video (or text) side on the labels.

    python bench/supervised_head.py --store STORE --manifest DIR [--work-dir work]
                                    [--option key=value ...] [--side video|text] [--steps 600] [--json OUT]

A diagnostic for the synthetic benchmark, not a way to train a re-ranker (real data has no attribute
labels). A fresh CrossTVR head (``--option``: its options, as ``train-head --head-option``) has its
text-free query outputs (``--side video``: the path of its contrastive similarity), averaged over the
queries, or its pooled text features (``--side text``) fed to one linear layer per synthetic
attribute, and everything is trained with the sum of the cross-entropies on the train split (AdamW,
batch 64, fixed settings); accuracy on the train split and on ``--split`` (val by default).

Read it next to ``bench/probe_head.py``: an attribute this reaches on val but the contrastively
trained head does not is lost to the training objective, not to the architecture; one that stays
near chance here even on train is beyond the architecture (or the frozen tokens, ``cli.py
probe-encoder``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTRS = ("motion", "timing", "detail_shape", "corner", "detail_color", "main_shape")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--manifest", required=True, help="synthetic manifest directory (videos.parquet)")
    ap.add_argument("--work-dir", default="work")
    ap.add_argument("--option", action="append", default=[], help="head option key=value (repeatable)")
    ap.add_argument("--side", choices=("video", "text"), default="video")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--split", default="val")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the result here as JSON")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from core.options import parse_key_values
    from heads import create_head
    from manifests import Manifest
    from synthetic import world as S
    from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = WorkDir(args.work_dir)
    train = work.stage(args.store, "train", STAGE_TWO_ARRAYS)
    held = work.stage(args.store, args.split, STAGE_TWO_ARRAYS)
    attrs = S.manifest_attrs(Manifest.read(args.manifest, verify=False))
    text_side = args.side == "text"

    def labels(split) -> dict[str, torch.Tensor]:
        videos = [split.video_ids[v] for v in np.asarray(split.caption_video)] if text_side else split.video_ids
        return {a: torch.tensor([S.ATTRIBUTES[a].index(attrs[v][a]) for v in videos]) for a in ATTRS}

    def rows_of(split) -> int:
        return len(split.caption_video) if text_side else len(split.video_ids)

    options = parse_key_values(tuple(args.option), "--option")
    head = create_head("crosstvr", train.tokens.shape[-1], train.text_tokens.shape[-1], **{"itc_dim": 128, **options})
    head.fit_standardizer(train, seed=args.seed)
    linear = torch.nn.ModuleDict({a: torch.nn.Linear(head.width, len(S.ATTRIBUTES[a])) for a in ATTRS})
    optimizer = torch.optim.AdamW([*head.parameters(), *linear.parameters()], lr=5e-4, weight_decay=0.05)

    def features(split, idx: np.ndarray) -> torch.Tensor:
        if text_side:
            tt = torch.from_numpy(np.asarray(split.text_tokens[idx]))
            tm = torch.from_numpy(np.asarray(split.text_mask[idx], dtype=bool))
            return head.text_features(tt, tm)
        tok = torch.from_numpy(np.asarray(split.tokens[idx]))
        fm = torch.from_numpy(np.asarray(split.frame_mask[idx], dtype=bool))
        return head.video_queries(head.encode_video(tok, fm)).mean(dim=1)

    def accuracy(split, y: dict[str, torch.Tensor]) -> dict[str, float]:
        head.eval()
        hits = dict.fromkeys(ATTRS, 0)
        n = rows_of(split)
        with torch.no_grad():
            for start in range(0, n, 64):
                idx = np.arange(start, min(n, start + 64))
                f = features(split, idx)
                for a in ATTRS:
                    hits[a] += int((linear[a](f).argmax(dim=1) == y[a][idx]).sum())
        head.train()
        return {a: round(100.0 * h / n, 1) for a, h in hits.items()}

    y_train, y_held = labels(train), labels(held)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = np.sort(rng.choice(rows_of(train), 64, replace=False))
        f = features(train, idx)
        loss = sum(F.cross_entropy(linear[a](f), y_train[a][idx]) for a in ATTRS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"step {step}: loss {float(loss.detach()):.3f} ({time.time() - t0:.0f}s), {args.split} "
                  f"{accuracy(held, y_held)}", flush=True)
    result = {"options": options, "side": args.side, "steps": args.steps, "train": accuracy(train, y_train),
              args.split: accuracy(held, y_held), "chance": {a: round(100.0 / len(S.ATTRIBUTES[a]), 1) for a in ATTRS}}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
