"""Does starting the re-ranker from a pre-trained Q-Former help on the synthetic benchmark?

    python bench/qformer_init.py --work-dir work --qformer DIR [--seeds 0 1 2]
                                 [--variants default scratch init] [--json out.json]

On the demo's store and stage one (``make demo`` first; ``--store`` / ``--stage-one`` override),
with the demo's training recipe, per seed:

* ``default``: the demo's head (standardised tokens projected to the width, CLIP text tokens, text
  cross attention), for reference;
* ``scratch``: a head with BLIP-2's layout (``heads.stage_two.qformer_pretrain.QFORMER_SHAPE``: tokens unprojected
  into the cross attention, captions through the Q-Former tokenizer's word embeddings, no text
  cross attention), randomly initialised;
* ``init``: the same head started from ``--qformer``, a BLIP-2 checkpoint directory written by
  ``python cli.py pretrain-qformer`` (ITC + ITM on the train split's single frames).

Each run is scored once on the test split: T2V / V2T R@1 of stage one's top 15 re-ranked, and the
within-group accuracy per attribute of cosine + head (``bench/groups.py``). Model selection is on
val only (the trainer's). Runs are reused when their directory holds a finished checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="work")
    ap.add_argument("--qformer", required=True, help="BLIP-2 checkpoint directory from pretrain-qformer")
    ap.add_argument("--store")
    ap.add_argument("--stage-one")
    ap.add_argument("--out", help="runs go here (default <work>/runs/qformer-init)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["default", "scratch", "init"])
    ap.add_argument("--candidates", type=int, default=15)
    ap.add_argument("--split", default="test", help="Scored split (val for choices such as the curve; test once)")
    ap.add_argument("--itc-steps", type=int, help="The head's contrastive phase (default: the trainer's)")
    ap.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                    help="Further StageTwoTrainConfig fields for every run (e.g. epochs=4)")
    ap.add_argument("--tag", default="", help="Suffix of the run directories (variants of one recipe)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from bench import groups
    from heads.stage_two.blip2 import read_blip2
    from heads.stage_two.config import StageTwoTrainConfig
    from heads.stage_two.qformer_pretrain import QFORMER_SHAPE
    from workflows.runs import best_stage_one, rerank_split, train_head
    from workflows.workdir import WorkDir

    work = WorkDir(a.work_dir)
    store = a.store or work.default_store()
    stage_one = a.stage_one or str(best_stage_one(work))
    manifest = work.manifest_dir("synthetic")
    root = Path(a.out) if a.out else work.root / "runs" / "qformer-init"
    vocab = read_blip2(a.qformer).layout["vocab_size"]
    shape = {**QFORMER_SHAPE, "vocab_size": vocab}
    results: dict[str, list[dict]] = {v: [] for v in a.variants}
    extra = {k: json.loads(v) if v[:1] in "0123456789-[{tfn" else v
             for k, v in (e.split("=", 1) for e in a.extra)}
    for seed in a.seeds:
        for variant in a.variants:
            opts: dict = {"seed": seed, "num_threads": a.threads, "progress": True, **extra}
            if a.itc_steps is not None:
                opts["itc_steps"] = a.itc_steps
            if variant in ("scratch", "init"):
                opts.update(head_config=dict(shape), tokenizer=a.qformer)
            if variant == "init":
                opts.update(init_from=a.qformer, head_config={})
            cfg = StageTwoTrainConfig(**opts).resolved()
            run = root / f"{variant}{a.tag}-seed{seed}"
            print(f"== {variant}, seed {seed}: {run}", flush=True)
            ckpt = train_head(work, store, stage_one, cfg, out=run)
            _, _, res = rerank_split(work, store, stage_one, ckpt, split=a.split, candidates=a.candidates,
                                     out=run / f"rerank-{a.split}", progress=False)
            metrics = res.metrics()
            grp = groups.main(["--store", store, "--manifest", str(manifest), "--stage-one", stage_one,
                               "--stage-two", str(ckpt), "--split", a.split, "--work-dir", str(work.root)])
            within = grp["accuracy"][f"{run.name} cosine+head"]
            row = {"seed": seed, "t2v_r1": metrics["re-ranked"]["t2v"]["R@1"],
                   "v2t_r1": metrics["re-ranked"]["v2t"]["R@1"],
                   "stage_one_t2v_r1": metrics["stage one"]["t2v"]["R@1"], "within_group": within}
            results[variant].append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for variant, rows in results.items():
        if not rows:
            continue
        keys = ["t2v_r1", "v2t_r1"] + [f"within_{k}" for k in rows[0]["within_group"]]
        flat = [{**{k: r[k] for k in ("t2v_r1", "v2t_r1")}, **{f"within_{k}": v for k, v in r["within_group"].items()}}
                for r in rows]
        summary[variant] = {k: {"mean": statistics.mean(f[k] for f in flat),
                                "spread": (min(f[k] for f in flat), max(f[k] for f in flat))} for k in keys}
    print("| variant | " + " | ".join(next(iter(summary.values())).keys()) + " |")
    for variant, figs in summary.items():
        print(f"| {variant} | " + " | ".join(f"{v['mean']:.1f} ({v['spread'][0]:.1f}-{v['spread'][1]:.1f})"
                                             for v in figs.values()) + " |")
    out = {"seeds": a.seeds, "runs": results, "summary": summary, "qformer": a.qformer}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
