"""Where a stage-two head loses an attribute: linear probes on its contrastive (text-free) outputs.

    python bench/probe_head.py --store STORE --manifest DIR --stage-two CKPT [--stage-two CKPT ...]
                               [--work-dir work] [--max-videos N] [--json OUT]

For each CrossTVR head with a contrastive projection, softmax regressions (``synthetic.probes.
linear_probe``: fitted on the train split, scored on ``--split``, val by default; fixed settings) predict each
synthetic attribute of a video from

* ``queries``: the head's text-free query outputs (what its ITC similarity reads), all queries
  concatenated;
* ``itc video``: the same after its contrastive projection, unit-normalised;
* ``itc text``: a caption's contrastive text embedding (the caption's video's attribute).

An attribute the tokens carry (``cli.py probe-encoder``) but ``queries`` does not has died in the
head's video side; one that ``queries`` carries but ``itc text`` does not, in its text side.
Detail attributes are probed over every video (the detail is visible in at least half the frames).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTRS = ("main_color", "main_shape", "motion", "detail_color", "detail_shape", "corner", "timing")


def head_features(head, split, videos: np.ndarray, captions: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """Text-free query outputs and contrastive embeddings of ``videos``, contrastive text embeddings
    of ``captions`` (rows of ``split``)."""
    import torch

    queries, vision, text = [], [], []
    with torch.no_grad():
        for start in range(0, videos.size, batch):
            idx = videos[start:start + batch]
            tok = torch.from_numpy(np.asarray(split.tokens[idx]))
            fm = torch.from_numpy(np.asarray(split.frame_mask[idx], dtype=bool))
            q = head.video_queries(head.encode_video(tok, fm))  # (b, Q, W)
            queries.append(q.flatten(1).numpy())
            vision.append(torch.nn.functional.normalize(head.itc_vision(q), dim=-1).flatten(1).numpy())
        for start in range(0, captions.size, batch * 8):
            idx = captions[start:start + batch * 8]
            tt = torch.from_numpy(np.asarray(split.text_tokens[idx]))
            tm = torch.from_numpy(np.asarray(split.text_mask[idx], dtype=bool))
            text.append(head.itc_text_embed(tt, tm).numpy())
    return {"queries": np.concatenate(queries), "itc video": np.concatenate(vision), "itc text": np.concatenate(text)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--manifest", required=True, help="synthetic manifest directory (videos.parquet)")
    ap.add_argument("--stage-two", action="append", required=True, help="stage-two checkpoint (repeatable)")
    ap.add_argument("--work-dir", default="work")
    ap.add_argument("--max-videos", type=int, default=600, help="train videos the probes are fitted on")
    ap.add_argument("--split", default="val", help="the split the probes are scored on (val: choosing a "
                    "setting on these figures does not touch test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args(argv)

    from heads.evaluation.sources import load_head
    from manifests import Manifest
    from synthetic import world as S
    from synthetic.probes import linear_probe
    from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

    work = WorkDir(args.work_dir)
    splits = {"train": work.stage(args.store, "train", STAGE_TWO_ARRAYS),
              "eval": work.stage(args.store, args.split, STAGE_TWO_ARRAYS)}
    attrs = S.manifest_attrs(Manifest.read(args.manifest, verify=False))
    rng = np.random.default_rng(args.seed)
    pick = {}
    for name, split in splits.items():
        n = len(split.video_ids)
        vids = np.arange(n) if name == "eval" or n <= args.max_videos else \
            np.sort(rng.choice(n, args.max_videos, replace=False))
        cv = np.asarray(split.caption_video)
        caps = np.flatnonzero(np.isin(cv, vids))
        pick[name] = (vids, caps)
    labels = {name: ({a: [str(attrs[split.video_ids[v]][a]) for v in pick[name][0]] for a in ATTRS},
                     {a: [str(attrs[split.video_ids[v]][a]) for v in np.asarray(split.caption_video)[pick[name][1]]]
                      for a in ATTRS})
              for name, split in splits.items()}
    result: dict[str, dict] = {"split": args.split}
    for path in args.stage_two:
        feats = {}
        for name, split in splits.items():
            head, _, head_split = load_head(path, split)
            head.eval()
            feats[name] = head_features(head, head_split, *pick[name])
        label = Path(path).parent.name if Path(path).is_file() else Path(path).name
        table = {}
        for kind in ("queries", "itc video", "itc text"):
            side = 1 if kind == "itc text" else 0
            table[kind] = {a: linear_probe(feats["train"][kind], labels["train"][side][a],
                                           feats["eval"][kind], labels["eval"][side][a]) for a in ATTRS}
        result[label] = table
        print(f"{label} (probe train -> {args.split}, accuracy %)")
        print("| features | " + " | ".join(ATTRS) + " |")
        print("|---|" + "---|" * len(ATTRS))
        for kind, accs in table.items():
            print(f"| {kind} | " + " | ".join(f"{accs[a]:.1f}" for a in ATTRS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
