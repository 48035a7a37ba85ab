"""Stage-two trainer: video-text matching (ITM) with hard negatives mined from stage one.

For a head that supports it (CrossTVR) the run starts, by default, with ``itc_steps`` of
BLIP-2-style contrastive pre-training (``heads.stage_two.itc``), and every ITM step adds the
contrastive loss of its positives (``itc_weight``); the head then scores a pair by ITM log-odds +
ITC logit. On the synthetic benchmark ITM from scratch learnt none of the one-attribute
differences, while the contrastive phase taught the queries where a caption's details are in the
patch tokens (BENCHMARKS.md); without it (``itc_steps=0, itc_weight=0``) the trainer is the
paper's ITM recipe alone.

Each training step takes ``B`` positive (caption, video) pairs and builds ``3B`` pairs for the
2-way match classifier with hard or random negatives (``heads.stage_two.negatives``).
``hard_negatives="anneal"`` (default) uses random negatives only for the first ``anneal_start``
share of the steps, then raises the share of hard ones linearly to 1 over the next ``anneal``
share: a head that has not learnt basic text-video binding yet collapses to "no match" on hard
negatives (BENCHMARKS.md, stage-two diagnostics, also for the default learning rate).

The head's ``TokenStandardizer`` is fitted on the train split before the first step. AdamW with
a cosine schedule after a linear warm-up. Batches are read from the split's memory-mapped arrays
(only their rows) by a background thread. Every epoch ends with a model-selection pass on the val
split (never test, ``heads.stage_two.selection``). After every epoch ``train_state.pt`` holds the
model, optimizer, scheduler and RNG state, so an interrupted run (or one stopped by ``max_steps``)
continues where it stopped and ends with exactly the weights of an uninterrupted run on CPU.

Files in ``out_dir``: ``stage_two.pt`` (``heads.stage_two.checkpoint``), ``train_state.pt`` (resume
state), ``itc_state.pt`` (the contrastive phase's resume state), ``history.json`` and ``training_log.jsonl`` (every step's loss and learning rate, every
validation's metrics, for both phases: ``core.training_log``).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.errors import ConfigError, RunMismatchError
from core.fileio import json_diff, jsonable, write_json
from core.split import Split
from core.training_log import TrainingLog
from heads.evaluation.similarity import encode_texts, encode_videos, similarity
from heads.registry import create_head
from heads.stage_one.checkpoint import load_stage_one
from heads.stage_two.blip2 import SHAPE_OPTIONS, blip2_init, read_blip2
from heads.stage_two.blip2 import options_from_layout
from heads.stage_two.checkpoint import CHECKPOINT_NAME, KIND, stage_one_identity
from heads.stage_two.config import RESUME_FREE, StageTwoTrainConfig, check_directions, upgrade_args
from heads.stage_two.itc import ITC_STATE_NAME, batch_itc_loss, pretrain_itc
from heads.stage_two.negatives import HardNegativeSampler, MixedNegatives, PlanItem, epoch_plan, video_sampler
from heads.stage_two.pairs import load_pairs, require_tokens
from heads.stage_two.selection import ValSet, selection_score
from heads.stage_two.tokenizer import caption_tokenizer, text_view
from heads.training.common import (BestState, check_splits, cpu_state, evaluating, forward_precision, make_optimizer,
                                   save, torch_threads, warmup_steps)
from heads.training.data import EpochSampler, blocks, prefetched, uses_text_tokens
from heads.training.distributed import Dist, NullLog, StepModule, all_sum, context, drop_short_last, gather_with_grad, wrap

STATE_NAME = "train_state.pt"
HISTORY_NAME = "history.json"


def rank_loss(scores: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
    """Pairwise ranking loss on a batch laid out as ``PlanItem.pairs``: ``[positives (b);
    (caption, negative video) (b); (negative caption, video) (b)]``.

    With ``r = cosine + scores`` (the re-ranking score), the mean of ``softplus(r_neg - r_pos)``
    over both negatives of each positive. Unlike ITM cross-entropy it cannot be lowered by moving
    every score towards the class prior, only by ordering the positive above its negatives; and
    since the cosine is part of ``r``, pairs that stage one already orders by a wide margin give
    little gradient, so the head learns where stage one is wrong or unsure.
    """
    r = cosine.float() + scores
    b = r.shape[0] // 3
    pos, neg_v, neg_c = r[:b], r[b:2 * b], r[2 * b:3 * b]
    return 0.5 * (F.softplus(neg_v - pos).mean() + F.softplus(neg_c - pos).mean())


def _require_pair_free(head: Any, option: str, fix: str) -> None:
    """``ConfigError`` for a stage-one head whose embeddings depend on the pair (text-token alignment):
    ``option`` needs one video and one caption embedding per row."""
    if uses_text_tokens(head):
        raise ConfigError(f"{option} needs a stage-one head whose video and caption embeddings do not depend on "
                          f"each other; {getattr(head, 'name', type(head).__name__)} has text-token alignment: "
                          f"use {fix}")


class StageOneCosine:
    """Stage-one cosine of any (caption row, video row) pair of a split, from unit embeddings
    computed once (V + C rows of the head's output width, not a C x V matrix)."""

    def __init__(self, head: Any, split: Split, device: str = "cpu", batch: int = 1024) -> None:
        _require_pair_free(head, "rank_weight", "rank_weight=0")
        with evaluating(head):
            self.video = encode_videos(head, split, batch, device).float().cpu()
            texts = [encode_texts(head, split, sl, device).float().cpu()
                     for sl in blocks(int(split.text_emb.shape[0]), batch)]
            self.text = torch.cat(texts) if texts else torch.zeros(0, self.video.shape[1])

    def __call__(self, captions: np.ndarray, videos: np.ndarray) -> torch.Tensor:
        c = torch.as_tensor(np.asarray(captions, dtype=np.int64))
        v = torch.as_tensor(np.asarray(videos, dtype=np.int64))
        return (self.text[c] * self.video[v]).sum(-1)


def hard_negatives(head: Any, train: Split, cfg: StageTwoTrainConfig) -> HardNegativeSampler | MixedNegatives:
    """The hard-negative sampler of a run from stage one's train-split similarities
    (``cfg.neg_source``: caption to video, video to video, or both at even odds)."""
    text = video = None
    if cfg.neg_source in ("text", "mixed"):
        train_sim = similarity(head, train, device=cfg.device)
        text = HardNegativeSampler(train_sim, train.caption_video, cfg.neg_temperature, cfg.neg_pool)
        del train_sim
    if cfg.neg_source in ("video", "mixed"):
        _require_pair_free(head, f"neg_source={cfg.neg_source}", "neg_source=text")
        with evaluating(head):
            emb = encode_videos(head, train, 1024, cfg.device).float().cpu().numpy()
        video = video_sampler(emb, train.caption_video, cfg.neg_temperature, cfg.neg_video_pool)
    if text is not None and video is not None:
        return MixedNegatives(text, video)
    return text if video is None else video


def selected_on(split: str, cfg: StageTwoTrainConfig) -> str:
    """What a run's epoch was selected on, in words."""
    directions = check_directions(cfg.val_directions)
    what = " and ".join(d.upper() for d in directions) + (" R@1 (their mean)" if len(directions) > 1 else " R@1")
    return f"{split} re-ranked {what} of stage-one top-{cfg.val_candidates}"


def train_stage_two(train: Split, val: Split | None, stage_one: str | Path, out_dir: str | Path,
                    config: StageTwoTrainConfig | None = None, resume: bool = True, **options: Any) -> Path:
    """Train a stage-two head on ``train``; select the epoch on ``val``; return ``stage_two.pt``.

    ``stage_one`` is the stage-one checkpoint whose train-split similarities drive hard-negative
    mining (and whose val top-``val_candidates`` lists the head re-ranks for model selection). ``config``
    (or its fields as keyword ``options``, which override it) decides the run. With ``resume`` a
    matching ``train_state.pt`` in ``out_dir`` is continued (a finished run returns at once);
    other arguments than those in that state raise ``RunMismatchError``; ``resume=False`` starts
    afresh. ``max_steps`` stops after that many steps in all, contrastive ones included (call again
    to continue). Neither split may be a test split (``ForbiddenSplitError``); both must come from
    one store (``StoreMismatchError``).

    Under ``torchrun`` (``heads.training.distributed``): every rank plans the same steps (the same
    hard negatives, mined from stage one's similarities over the whole train split) and takes its
    slice of each step's positives with their negatives; the ITM and ranking losses are averaged
    over the global batch and the contrastive losses contrast the gathered global batch;
    DistributedDataParallel averages the gradients. Rank 0 validates and writes every file (the
    one-process formats); a run resumes under any number of processes.
    """
    cfg = replace(config or StageTwoTrainConfig(), **options)
    check_splits(train, val)
    require_tokens(train)
    if val is not None:
        require_tokens(val)
    cfg = cfg.resolved()
    s1_identity = stage_one_identity(stage_one)
    s1 = load_stage_one(stage_one, expect_encoder_identity=train.encoder_identity)
    blip2, head_config = None, cfg.build_options()
    if cfg.init_from:
        blip2 = read_blip2(cfg.init_from)
        layout = options_from_layout(blip2.layout)
        head_config = {**layout, **head_config, **{k: layout[k] for k in SHAPE_OPTIONS}}
    text_input = head_config.get("text_input", "tokens")
    tokenizer = caption_tokenizer(cfg.tokenizer or cfg.init_from) if text_input == "ids" else None
    if tokenizer is not None and tokenizer.vocab_size > int(head_config.get("vocab_size", 0)):
        raise ConfigError(f"the caption tokenizer has {tokenizer.vocab_size} tokens, more than the head's "
                          f"vocab_size {head_config.get('vocab_size')}")
    tr = text_view(train, text_input)
    init: dict | None = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_args = cfg.train_args(train, val, s1_identity["sha256"])
    state_path, ckpt_path = out / STATE_NAME, out / CHECKPOINT_NAME
    if not resume:
        (out / ITC_STATE_NAME).unlink(missing_ok=True)
    state = None
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        old = {k: v for k, v in upgrade_args(state["train_args"]).items() if k not in RESUME_FREE}
        new = {k: v for k, v in train_args.items() if k not in RESUME_FREE}
        diff = json_diff(old, new)
        if diff:
            raise RunMismatchError(f"{state_path} belongs to a run with other arguments ({'; '.join(diff)}); "
                                   f"use another out_dir or resume=False")
        if state["finished"] and ckpt_path.is_file():
            return ckpt_path

    d = context(cfg.device)
    device = d.device(cfg.device)
    cfg = replace(cfg, device=device)
    sampler = EpochSampler(train.caption_video, len(train.video_ids), cfg.batch_size, seed=cfg.seed)
    drop_short_last(sampler, d)
    steps_per_epoch = len(sampler)
    total = max(1, cfg.epochs * steps_per_epoch)
    with torch_threads(cfg.num_threads):
        negatives = None
        if cfg.hard_negatives != "random":
            negatives = hard_negatives(s1.head, train, cfg)
        cosine = StageOneCosine(s1.head, train, cfg.device) if cfg.rank_weight > 0 else None
        valset = None
        if val is not None:
            valset = ValSet(text_view(val, text_input), similarity(s1.head, val, device=cfg.device), cfg.val_candidates,
                            cfg.val_queries, cfg.seed, cfg.val_directions)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            text_dim = 0 if text_input == "ids" else int(train.text_tokens.shape[-1])
            model = create_head(cfg.head, int(train.tokens.shape[-1]), text_dim, stage=2, **head_config)
            if blip2 is not None:
                init = blip2_init(model, blip2, cfg.reinit_visual_kv)
            if state is None:
                model.fit_standardizer(train, seed=cfg.seed)
            model.to(cfg.device)
            if cfg.grad_checkpoint:
                for stack in (getattr(model, "block", None), getattr(model, "temporal_block", None)):
                    if stack is not None:
                        stack.checkpointing = True
            optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, total,
                                                  warmup_steps(cfg.warmup, total))
            step, history, best = 0, [], BestState()
            if state is not None:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["torch_rng"])
                step, history = int(state["step"]), list(json.loads(state["history"]))
                best = BestState(state["best_score"], state["best_epoch"], state["best_state"])
            ddp = wrap(StepModule(model), d, device, find_unused=True)
            stopped = False
            itc_history: list[dict] = []
            if state is None and cfg.itc_steps > 0:
                itc_args = {k: train_args[k] for k in ("itc_steps", "itc_batch", "itc_cluster", "itc_lr", "seed",
                                                        "weight_decay", "store_fingerprint", "stage_one_sha256",
                                                        "head", "head_config")}
                done, itc_history = pretrain_itc(
                    model, tr, out / ITC_STATE_NAME, int(cfg.itc_steps), batch_size=cfg.itc_batch, lr=cfg.itc_lr,
                    weight_decay=cfg.weight_decay, seed=cfg.seed,
                    neighbours=None if negatives is None else negatives.text_cand, cluster=cfg.itc_cluster,
                    device=cfg.device, max_steps=cfg.max_steps, progress=cfg.progress, args=itc_args,
                    precision=lambda: forward_precision(cfg.precision, cfg.device), dist=d, ddp=ddp)
                stopped = not done
            itm_max_steps = None if cfg.max_steps is None else max(0, cfg.max_steps - int(cfg.itc_steps))
            bar = tqdm(total=total, initial=step, desc=f"stage two [{cfg.head}]",
                       disable=not cfg.progress or stopped or not d.is_main, dynamic_ncols=True)
            log = (TrainingLog(out, "itm", step) if d.is_main else NullLog()) if not stopped and step < total else None
            while step < total and not stopped:
                epoch, offset = divmod(step, steps_per_epoch)
                plan = epoch_plan(sampler, negatives, epoch, cfg.seed, cfg.hard_negatives,
                                  epoch * steps_per_epoch, total, cfg.anneal, cfg.anneal_start)
                acc_loss, acc_hits, acc_n, t0 = 0.0, 0, 0, time.perf_counter()
                if state is not None and offset and state.get("partial"):
                    acc_loss, acc_hits, acc_n = (float(x) for x in state["partial"])
                model.train()
                load = lambda item: (item, load_pairs(tr, *_local(d, item).pairs(), device=device))  # noqa: E731
                batches = prefetched(plan[offset:], load, cfg.prefetch)
                for item, batch in batches:
                    if itm_max_steps is not None and step >= itm_max_steps:
                        stopped = True
                        break
                    batch = batch.to(cfg.device)
                    if d.enabled:
                        loss, logits = ddp(_global_itm_loss, batch, item, d, cfg, cosine)
                    else:
                        loss, logits = itm_step_loss(model, batch, item, cfg, cosine)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    lr = scheduler.get_last_lr()[0]
                    scheduler.step()
                    step += 1
                    # the global batch's loss and accuracy (one process: this batch's)
                    loss_value, hits, n = all_sum(d, loss.item(), int((logits.argmax(dim=1) == batch.labels).sum()),
                                                  batch.labels.numel())
                    loss_value /= d.world_size
                    hits, n = int(hits), int(n)
                    log.step(step, loss_value, lr, epoch=epoch, acc=hits / n, hard_share=float(item.hard_share))
                    acc_loss += loss_value * n
                    acc_hits += hits
                    acc_n += n
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", acc=f"{hits / n:.2f}",
                                    hard=f"{item.hard_share:.2f}")
                batches.close()
                if stopped:
                    _save_state(d, state_path, model, optimizer, scheduler, step, history, best, train_args,
                                finished=False, partial=(acc_loss, acc_hits, acc_n))
                    break
                record: dict[str, Any] = {
                    "epoch": epoch, "step": step, "loss": acc_loss / max(1, acc_n),
                    "itm_acc": acc_hits / max(1, acc_n), "hard_share": plan[-1].hard_share if plan else 0.0,
                    "lr": float(scheduler.get_last_lr()[0]), "seconds": round(time.perf_counter() - t0, 3),
                }
                if valset is not None and d.is_main:  # rank 0 alone selects and saves
                    record["val"] = valset.evaluate(model, cfg.eval_batch, cfg.device)
                    score = selection_score(record["val"])
                    log.validation(step, record["val"], score, epoch)
                else:
                    score = float(epoch)  # no val split: keep the last epoch
                best.update(score, epoch, model)
                history.append(jsonable(record))
                if cfg.progress and valset is not None and d.is_main:
                    v = record["val"]
                    v2t = (f", V2T {v['v2t_stage_one_R@1']:.1f} -> {v['v2t_reranked_R@1']:.1f}"
                           if "v2t_reranked_R@1" in v else "")
                    bar.write(f"epoch {epoch}: loss {record['loss']:.3f} acc {record['itm_acc']:.3f} | val R@1 "
                              f"stage one {v['stage_one_R@1']:.1f} -> re-ranked {v['reranked_R@1']:.1f}{v2t} "
                              f"(itm acc {v['itm_acc_balanced']:.3f})")
                state = None
                _save_state(d, state_path, model, optimizer, scheduler, step, history, best, train_args,
                            finished=step >= total, partial=None)
            bar.close()
            if log is not None:
                log.close()

    finished = step >= total
    best_state = best.state if best.state is not None else model.state_dict()
    if not itc_history and cfg.itc_steps > 0 and (out / ITC_STATE_NAME).is_file():
        itc_history = list(torch.load(out / ITC_STATE_NAME, map_location="cpu", weights_only=True)["history"])
    summary = {
        "best_epoch": best.epoch, "finished": finished, "steps": step, "total_steps": total,
        "itc_steps": int(cfg.itc_steps), "itc": itc_history,
        "selected_on": None if val is None else selected_on(val.split, cfg),
        "best_score": None if val is None or best.epoch is None else best.score, "epochs": history,
    }
    if d.is_main:
        save({"kind": KIND, "config": jsonable(model.config()),
              "state_dict": {k: v.detach().cpu() for k, v in best_state.items()},
              "store_fingerprint": str(train.store_fingerprint), "encoder_identity": jsonable(train.encoder_identity),
              "stage_one_identity": s1_identity, "train_args": train_args, "history": jsonable(summary),
              **({} if tokenizer is None else {"tokenizer": tokenizer.state(), "text_len": int(cfg.text_len)}),
              **({} if init is None else {"init": init})}, ckpt_path)
        write_json(out / HISTORY_NAME, summary)
    d.barrier()
    return ckpt_path


def itm_step_loss(model: Any, batch: Any, item: PlanItem, cfg: StageTwoTrainConfig,
                  cosine: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one planned step in one process, from its pairs' batch (on the model's device):
    ITM cross-entropy, plus the positives' contrastive loss (``itc_weight``) and, with ``cosine``
    (a ``StageOneCosine``), the ranking loss (``rank_weight``). Returns (loss, match logits)."""
    with forward_precision(cfg.precision, cfg.device):
        video = model.encode_video(batch.tokens, batch.frame_mask)
        logits = model.match(batch.text_tokens, batch.text_mask, video, batch.pair_text, batch.pair_video).float()
        loss = F.cross_entropy(logits, batch.labels)
        if cfg.itc_weight > 0:  # the positives' contrastive loss (their videos are distinct)
            b = item.video.size
            itc, _ = batch_itc_loss(model, batch, batch.pair_text[:b], batch.pair_video[:b], video)
            loss = loss + cfg.itc_weight * itc.float()
    if cosine is not None:
        pc, pv, _ = item.pairs()
        loss = loss + cfg.rank_weight * rank_loss(logits[:, 1] - logits[:, 0], cosine(pc, pv).to(logits.device))
    return loss, logits


def _local(d: Dist, item: PlanItem) -> PlanItem:
    """This rank's slice of a planned step: its positives and their negatives (one process: all)."""
    if not d.enabled:
        return item
    sl = d.part(item.video)
    return PlanItem(item.video[sl], item.caption[sl], item.neg_video[sl], item.neg_caption[sl], item.hard_share)


def _global_itm_loss(model: Any, batch: Any, item: PlanItem, d: Dist, cfg: StageTwoTrainConfig,
                     cosine: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's share of the global step's loss (run inside DistributedDataParallel): ITM
    cross-entropy and ranking loss of its pairs weighted so that the ranks' mean is the global
    batch's mean, plus the contrastive loss of the gathered global positives (the same on every
    rank). Returns (loss, this rank's logits)."""
    sizes = d.sizes(item.video.size)
    local = _local(d, item)
    b = local.video.size
    with forward_precision(cfg.precision, cfg.device):
        video = model.encode_video(batch.tokens, batch.frame_mask)
        logits = model.match(batch.text_tokens, batch.text_mask, video, batch.pair_text, batch.pair_video).float()
        share = d.world_size * b / item.video.size  # this rank's pairs / the global pairs, times the world
        loss = F.cross_entropy(logits, batch.labels) * share
        if cfg.itc_weight > 0:
            itc, _ = batch_itc_loss(model, batch, batch.pair_text[:b], batch.pair_video[:b], video,
                                    gather=lambda x: gather_with_grad(d, x, sizes))
            loss = loss + cfg.itc_weight * itc.float()
    if cosine is not None:
        pc, pv, _ = local.pairs()
        loss = loss + cfg.rank_weight * share * rank_loss(logits[:, 1] - logits[:, 0],
                                                          cosine(pc, pv).to(logits.device))
    return loss, logits


def _save_state(d: Dist, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                history: list, best: BestState, train_args: dict, finished: bool,
                partial: tuple[float, int, int] | None) -> None:
    if not d.is_main:
        return
    save({
        "model": cpu_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "step": int(step), "history": json.dumps(history),
        "best_score": float(best.score), "best_epoch": best.epoch, "best_state": best.state,
        "train_args": train_args, "finished": bool(finished),
        "partial": None if partial is None else [float(x) for x in partial],
    }, path)
