"""Can the re-ranker fit its train split's near-duplicate groups at all, trained on them alone?

    python bench/group_fit.py --qformer DIR [--scratch] [--work-dir work] [--store STORE]
                              [--attribute all|detail_color|detail_shape|motion|timing]
                              [--steps 600] [--batch 16] [--lr 2e-4] [--eval-every 100]
                              [--threads 1] [--seed 0] [--json OUT]

A diagnostic for the synthetic benchmark, not a way to train a re-ranker. A CrossTVR head with the
layout of ``--qformer`` (a BLIP-2 checkpoint directory with its tokenizer, as ``pretrain-qformer``
writes it) is built and initialised from it exactly as ``train-head --init-from`` does
(``--scratch``: the same layout and tokenizer, random weights). It is then trained on nothing but
in-group pairs: each step draws ``--batch`` grouped train captions (of the groups varying
``--attribute``, or of all groups), scores each against every member of its group with
``pair_score`` (ITM log-odds + ITC logit, the re-ranking score) and minimises the cross-entropy of
the softmax over the group with the caption's own video as target (AdamW, warm-up + cosine; the
trainer's optimizer).

Measured, before the first step, every ``--eval-every`` steps and at the end: the within-group
accuracy of the head's score alone (its own video strictly above every other member; ties count
against it) per varied attribute, on a fixed sample of up to 400 train grouped captions (even
across attributes) and on every val grouped caption. Uneven groups (timing has 3 values, so its
groups have 3 members) are scored over their real members only; chance is 1 / members.

And, before and after training, the text side alone: for every grouped train caption, with the
head's contrastive text embedding (``itc_text_embed``) and its pooled text features
(``text_features``), the mean cosine to the other captions of its own video against the mean cosine
to the captions of its group siblings, and whether its nearest caption among all captions of the
group's members (itself excluded) is one of its own video's (chance: their share). A text side
that does not separate captions differing in one attribute word leaves the cross attention nothing
to match. A head that cannot fit the train groups under this, the most direct pressure, cannot
learn them from the re-ranking objective either.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTRIBUTES = ("detail_color", "detail_shape", "motion", "timing")
TRAIN_EVAL = 400


def group_accuracy(scores: np.ndarray, cand: np.ndarray, own: np.ndarray, attribute: np.ndarray) -> dict:
    """{attribute: {"acc": %, "n": captions, "chance": %}, ..., "all": ...}: the own video strictly
    above every other real member of its group (``synthetic.groups.within_group_accuracy``)."""
    from synthetic.groups import member_columns, within_group_accuracy

    acc = within_group_accuracy({"head": scores}, np.arange(len(own)), cand, own, attribute)["head"]
    chance = 100.0 / member_columns(cand).sum(axis=1)
    return {a: {"acc": v, "n": int(m.sum()), "chance": float(chance[m].mean())}
            for a, v in acc.items() for m in [np.ones(len(own), bool) if a == "all" else attribute == a]}


def text_side(emb: np.ndarray, caption_video: np.ndarray, caps: np.ndarray, cand: np.ndarray,
              valid: np.ndarray, attribute: np.ndarray) -> dict:
    """Per attribute: mean cosine of a caption to its own video's other captions and to its group
    siblings' captions, the share of captions closer to their own (mean own > mean siblings), and
    nearest-neighbour accuracy among the captions of the group's members (chance: own share)."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    by_video: dict[int, np.ndarray] = {}
    cv = np.asarray(caption_video)
    for v in np.unique(cand):
        by_video[int(v)] = np.flatnonzero(cv == v)
    rec = {k: [] for k in ("own", "sib", "closer", "nn", "chance", "attr")}
    for c, row, ok, a in zip(caps, cand, valid, attribute):
        v = int(cv[c])
        own = by_video[v][by_video[v] != c]
        sib = np.concatenate([by_video[int(m)] for m in row[ok] if int(m) != v])
        cos_own, cos_sib = e[own] @ e[c], e[sib] @ e[c]
        both = np.concatenate([cos_own, cos_sib])
        rec["own"].append(cos_own.mean() if own.size else np.nan)
        rec["sib"].append(cos_sib.mean())
        rec["closer"].append(float(cos_own.mean() > cos_sib.mean()) if own.size else np.nan)
        rec["nn"].append(float(own.size > 0 and int(both.argmax()) < own.size and both.max() > cos_sib.max()))
        rec["chance"].append(own.size / both.size)
        rec["attr"].append(a)
    arr = {k: np.asarray(v) for k, v in rec.items()}
    out = {}
    for a in [*sorted(set(attribute.tolist())), "all"]:
        m = np.ones(len(caps), bool) if a == "all" else arr["attr"] == a
        out[a] = {"n": int(m.sum()), "cos_own": float(np.nanmean(arr["own"][m])),
                  "cos_sibling": float(np.nanmean(arr["sib"][m])),
                  "own_closer": float(100.0 * np.nanmean(arr["closer"][m])),
                  "nn_acc": float(100.0 * arr["nn"][m].mean()), "nn_chance": float(100.0 * arr["chance"][m].mean())}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="work")
    ap.add_argument("--store", help="default: the work dir's synthetic store")
    ap.add_argument("--qformer", required=True, help="BLIP-2 checkpoint directory (layout, tokenizer, weights)")
    ap.add_argument("--scratch", action="store_true", help="the --qformer layout and tokenizer, random weights")
    ap.add_argument("--attribute", default="all", choices=("all", *ATTRIBUTES), help="groups to train on")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="grouped captions per step")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here as JSON")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from heads import create_head
    from heads.stage_two.blip2 import SHAPE_OPTIONS, blip2_init, options_from_layout, read_blip2
    from heads.stage_two.config import StageTwoTrainConfig
    from heads.stage_two.pairs import load_pairs, text_rows
    from heads.stage_two.scoring import score_pairs
    from heads.stage_two.tokenizer import caption_tokenizer, text_view, with_caption_ids
    from heads.training.common import evaluating, make_optimizer, warmup_steps
    from synthetic.groups import member_columns
    from synthetic.head_groups import group_queries
    from workflows.data import caption_texts
    from workflows.experiments import manifest_groups
    from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

    torch.set_num_threads(args.threads)
    t_start = time.time()
    work = WorkDir(args.work_dir)
    store = args.store or work.default_store()
    tok = caption_tokenizer(args.qformer)

    def load(name: str):
        split = work.stage(store, name, STAGE_TWO_ARRAYS)
        rows = manifest_groups(work, split)
        if rows is None:
            raise SystemExit(f"the store's manifest (under {work.root}) has no near-duplicate groups")
        gq = group_queries(list(split.video_ids), split.caption_video, rows)
        if gq is None:
            raise SystemExit(f"split {name!r} of {store} has no grouped captions")
        view = text_view(with_caption_ids(split, tok, caption_texts(work, split), 32), "ids")
        return view, gq

    train, gq_tr = load("train")
    val, gq_va = load("val")
    valid_tr = member_columns(gq_tr.candidates)  # a smaller group's padding is no class of the softmax

    # the head exactly as train-head --init-from builds it (train_stage_two)
    cfg = StageTwoTrainConfig(init_from=args.qformer).resolved()
    blip2 = read_blip2(args.qformer)
    layout = options_from_layout(blip2.layout)
    head_config = {**layout, **cfg.build_options(), **{k: layout[k] for k in SHAPE_OPTIONS}}
    torch.manual_seed(args.seed)
    head = create_head("crosstvr", int(train.tokens.shape[-1]), 0, stage=2, **head_config)
    init = None if args.scratch else blip2_init(head, blip2, cfg.reinit_visual_kv)
    head.fit_standardizer(train, seed=args.seed)
    if tok.vocab_size > int(head_config["vocab_size"]):
        raise SystemExit(f"the tokenizer has {tok.vocab_size} tokens, the head's vocab_size is {head_config['vocab_size']}")

    # the fixed train sample (even across attributes) and the training pool
    rng = np.random.default_rng(args.seed)
    present = sorted(set(gq_tr.attribute.tolist()))
    per = TRAIN_EVAL // len(present)
    sample = np.sort(np.concatenate([rng.choice(np.flatnonzero(gq_tr.attribute == a),
                                                min(per, int((gq_tr.attribute == a).sum())), replace=False)
                                     for a in present]))
    pool = np.flatnonzero(gq_tr.attribute == args.attribute) if args.attribute != "all" else np.arange(gq_tr.captions.size)
    if pool.size < args.batch:
        raise SystemExit(f"{pool.size} train captions of {args.attribute!r} groups, fewer than --batch {args.batch}")
    g = gq_tr.group_size

    def scores(view, gq, sel: np.ndarray) -> np.ndarray:
        caps, cand = gq.captions[sel], gq.candidates[sel]
        return score_pairs(head, view, np.repeat(caps, cand.shape[1]), cand.reshape(-1),
                           batch=256).reshape(cand.shape)

    def evaluate(step: int, loss: float | None) -> dict:
        all_va = np.arange(gq_va.captions.size)
        tr = group_accuracy(scores(train, gq_tr, sample), gq_tr.candidates[sample], gq_tr.own[sample], gq_tr.attribute[sample])
        va = group_accuracy(scores(val, gq_va, all_va), gq_va.candidates, gq_va.own, gq_va.attribute)
        rec = {"step": step, "seconds": round(time.time() - t_start, 1), "loss": loss, "train": tr, "val": va}
        fmt = lambda r: " ".join(f"{a} {r[a]['acc']:.1f}" for a in r)  # noqa: E731
        print(f"step {step} ({rec['seconds']:.0f}s) loss {'-' if loss is None else f'{loss:.3f}'} | "
              f"train {fmt(tr)} | val {fmt(va)}", flush=True)
        return rec

    def text_check() -> dict:
        rows = np.arange(len(train.caption_video))
        itc, feats = [], []
        with evaluating(head):
            for start in range(0, rows.size, 512):
                ids, mask = (torch.from_numpy(x) for x in text_rows(train, rows[start:start + 512]))
                feats.append(head.text_features(ids, mask).float().numpy())
                if head.itc_dim:
                    itc.append(head.itc_text_embed(ids, mask).float().numpy())
        out = {}
        for name, parts in (("itc_text_embed", itc), ("text_features", feats)):
            if parts:
                out[name] = text_side(np.concatenate(parts), train.caption_video, gq_tr.captions,
                                      gq_tr.candidates, valid_tr, gq_tr.attribute)
        return out

    print(f"head: {'scratch' if args.scratch else 'initialised from'} {args.qformer} "
          f"(width {head_config['width']}, layers {head_config['layers']}, itc_dim {head.itc_dim}); "
          f"train on {args.attribute} groups: {pool.size} captions; eval: {sample.size} train, "
          f"{gq_va.captions.size} val grouped captions", flush=True)
    text_before = text_check()
    history = [evaluate(0, None)]
    optimizer, scheduler = make_optimizer(head, args.lr, cfg.weight_decay, args.steps,
                                          warmup_steps(cfg.warmup, args.steps))
    head.train()
    run_loss, run_n = 0.0, 0
    for step in range(1, args.steps + 1):
        sel = np.sort(rng.choice(pool, args.batch, replace=False))
        caps, cand = gq_tr.captions[sel], gq_tr.candidates[sel]
        batch = load_pairs(train, np.repeat(caps, g), cand.reshape(-1))
        s = head.pair_score(*batch.pair_inputs()).reshape(len(sel), g)
        s = s.masked_fill(~torch.from_numpy(valid_tr[sel]), float("-inf"))
        loss = F.cross_entropy(s, torch.from_numpy(gq_tr.own[sel]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        run_loss, run_n = run_loss + float(loss.detach()), run_n + 1
        if step % args.eval_every == 0 or step == args.steps:
            history.append(evaluate(step, run_loss / run_n))
            run_loss, run_n = 0.0, 0
            head.train()
    text_after = text_check()
    wall = round(time.time() - t_start, 1)

    attrs = [*present, "all"]
    print(f"\nwithin-group accuracy of the head's score (%), trained on {args.attribute} groups"
          f"{' (scratch)' if args.scratch else ''}")
    print("| step | split | " + " | ".join(f"{a} (n={history[0]['train'][a]['n']}/{history[0]['val'][a]['n']})"
                                          for a in attrs) + " |")
    print("|---|---|" + "---|" * len(attrs))
    print("| chance | | " + " | ".join(f"{history[0]['val'][a]['chance']:.1f}" for a in attrs) + " |")
    for rec in history:
        for part in ("train", "val"):
            print(f"| {rec['step']} | {part} | " + " | ".join(f"{rec[part][a]['acc']:.1f}" for a in attrs) + " |")
    print("\ntext side on the train split's grouped captions: cos own / cos siblings / own closer % / "
          "nearest caption own % (chance)")
    print("| when | embedding | " + " | ".join(attrs) + " |")
    print("|---|---|" + "---|" * len(attrs))
    for when, res in (("before", text_before), ("after", text_after)):
        for name, r in res.items():
            print(f"| {when} | {name} | " + " | ".join(
                f"{r[a]['cos_own']:.3f} / {r[a]['cos_sibling']:.3f} / {r[a]['own_closer']:.0f} / "
                f"{r[a]['nn_acc']:.1f} ({r[a]['nn_chance']:.1f})" for a in attrs) + " |")
    print(f"\nwall time {wall:.0f}s")
    result = {"args": vars(args), "store": store, "head_config": head_config, "init": init,
              "train_pool": int(pool.size), "history": history, "text_before": text_before,
              "text_after": text_after, "wall_seconds": wall}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
