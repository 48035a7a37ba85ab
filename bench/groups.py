"""Within-group matching accuracy on the synthetic benchmark: can a scorer tell near-duplicates apart?

    python bench/groups.py --store STORE --manifest DIR --stage-one CKPT [--stage-two CKPT ...]
                           [--split val] [--max-captions N] [--json OUT]

For every caption of a video that belongs to a near-duplicate group (members differ in exactly one
attribute, the group's ``varied`` column), each scorer ranks the group's members; the caption is
right when its own video scores highest (ties count against it). Reported per varied attribute,
for stage one's cosine, for each head's score alone and for ``cosine + head score`` (the
re-ranking rule), with chance = 1 / group size. This is the offline check of a head before it is
wired into re-ranking: a head below chance on an attribute cannot help there.

For each CrossTVR head with a token selector it also reports how often the selector's M tokens of a
frame include the detail object's patch (frames where the detail is visible), against the rate of
M - 1 random patches (CLS is always kept): a selector that never picks the detail hides it from the
temporal pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic.head_groups import group_queries, head_group_accuracy  # noqa: E402  (the library's, shared with the ablation)


def manifest_videos(manifest_dir: str | Path) -> dict[str, dict]:
    """``{video_id: row}`` of a synthetic manifest's ``videos.parquet`` (read once, shared)."""
    import pyarrow.parquet as pq

    return {r["video_id"]: r for r in pq.read_table(Path(manifest_dir) / "videos.parquet").to_pylist()}


def selector_hit_rate(head, split, rows: dict[str, dict], max_videos: int = 256,
                      seed: int = 0) -> dict[str, float] | None:
    """Share (%) of frames with a visible detail whose selected tokens include the detail's patch;
    ``None`` for a head without a selector. ``rows``: ``manifest_videos(...)``."""
    import torch

    from synthetic import world as S

    if getattr(head, "selector", None) is None or not hasattr(head, "select_tokens"):
        return None
    rng = np.random.default_rng(seed)
    vids = np.sort(rng.choice(len(split.video_ids), size=min(max_videos, len(split.video_ids)), replace=False))
    n_tok = int(split.tokens.shape[2])
    grid = int(round(np.sqrt(n_tok - 1)))
    times = np.asarray(split.frame_time) if getattr(split, "frame_time", None) is not None else None
    hits = total = 0
    with torch.no_grad():
        for start in range(0, vids.size, 32):
            idx = vids[start:start + 32]
            tok = torch.from_numpy(np.asarray(split.tokens[idx]))
            fm = torch.from_numpy(np.asarray(split.frame_mask[idx], dtype=bool))
            vis, _ = head.visual(tok, fm)
            _, sel = head.select_tokens(vis)  # (b, T, M)
            sel = sel.numpy()
            for j, v in enumerate(idx):
                attrs = S.video_attrs(rows[split.video_ids[v]])
                r, c = S.detail_cell(attrs, size=S.SIZE, patch=S.SIZE // grid)
                cell = 1 + r * grid + c
                for t in np.flatnonzero(fm[j].numpy()):
                    tt = (float(times[v, t]) / (S.NUM_FRAMES / S.FPS) if times is not None
                          else t / fm.shape[1])
                    if S.detail_visible(attrs, tt):
                        total += 1
                        hits += int(cell in sel[j, t])
    m = int(head.num_selected)
    chance = (m - 1) / (n_tok - 1) if head.keep_cls else m / n_tok
    return {"hit_rate": 100.0 * hits / max(1, total), "random": 100.0 * chance, "frames": total}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--manifest", required=True, help="synthetic manifest directory (videos.parquet)")
    ap.add_argument("--stage-one", required=True)
    ap.add_argument("--stage-two", action="append", default=[], help="stage-two checkpoint (repeatable)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--work-dir", default="work")
    ap.add_argument("--max-captions", type=int, default=0, help="0 = every grouped caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args(argv)

    from heads.evaluation.sources import load_head, stage_one_similarity
    from workflows.data import caption_texts
    from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

    split = WorkDir(args.work_dir).stage(args.store, args.split, STAGE_TWO_ARRAYS)
    rows = manifest_videos(args.manifest)
    gq = group_queries(list(split.video_ids), split.caption_video, rows, args.max_captions, args.seed)
    if gq is None:
        raise SystemExit(f"split {args.split!r} of {args.store} has no grouped captions")
    caps, size = gq.captions, gq.group_size
    sim, _ = stage_one_similarity(args.stage_one, split)
    table = head_group_accuracy(gq, sim)
    selectors: dict[str, dict] = {}
    for path in args.stage_two:
        # each head reads its own view of the split (a BLIP-2-initialised one reads caption ids)
        head, info, head_split = load_head(path, split, captions=lambda: caption_texts(None, split, args.manifest))
        name = Path(path).parent.name if Path(path).is_file() else Path(path).name
        if f"{name} head" in table:  # a second checkpoint of one run directory
            name = f"{name}/{Path(path).stem}"
        table.update(head_group_accuracy(gq, sim, {name: head}, split=head_split))
        sel = selector_hit_rate(head, split, rows, seed=args.seed)
        if sel is not None:
            selectors[name] = sel
    counts = gq.counts()
    attrs = sorted(counts)
    print(f"split {args.split}: {caps.size} grouped captions, groups of up to {size} (chance {gq.chance()})")
    print("| scorer | " + " | ".join(f"{a} (n={counts[a]})" for a in attrs) + " | all |")
    print("|---|" + "---|" * (len(attrs) + 1))
    for name, res in table.items():
        print(f"| {name} | " + " | ".join(f"{res[a]:.1f}" for a in attrs) + f" | {res['all']:.1f} |")
    for name, sel in selectors.items():
        print(f"{name} selector: the detail's patch is among the selected tokens in {sel['hit_rate']:.1f}% "
              f"of {sel['frames']} frames showing it (random patches: {sel['random']:.1f}%)")
    result = {"split": args.split, "captions": int(caps.size), "group_size": size, "counts": counts,
              "accuracy": table, "selector": selectors}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
