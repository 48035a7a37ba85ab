"""Stage-one trainer: symmetric InfoNCE on cached embeddings, model selection on val only.

``train_stage_one(train, val, out_dir, config)`` trains the head ``config.head`` for
``config.epochs`` epochs of batches with one random caption per video (``EpochSampler``), keeps the
epoch with the best val rsum (R@1+5+10 of both directions; the last epoch without val) and writes
``out_dir/stage_one.pt``, ``out_dir/history.json`` and ``out_dir/training_log.jsonl`` (every step's loss
and learning rate, every validation's metrics: ``core.training_log``). A finished run with the same arguments on
the same store is reused as is (its file, and so the identity stage-two heads record, stays).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.fileio import jsonable, write_json
from core.metrics import rsum
from core.split import Split
from core.training_log import TrainingLog
from heads.evaluation.similarity import evaluate
from heads.registry import create_head
from heads.stage_one.checkpoint import CHECKPOINT_NAME, HISTORY_NAME
from heads.stage_one.config import RUN_ONLY, StageOneTrainConfig
from heads.stage_one.losses import positive_mask, symmetric_infonce
from heads.training.common import BestState, check_splits, make_optimizer, save, torch_threads, warmup_steps
from heads.training.data import EpochSampler, iterate_batches, require_text_tokens, uses_text_tokens
from heads.training.distributed import Dist, NullLog, context, drop_short_last, gather, gather_with_grad, wrap


class _Embeddings(torch.nn.Module):
    """The head's text and video embeddings as one forward (what DistributedDataParallel wraps)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, text_emb: torch.Tensor, frame_emb: torch.Tensor, frame_mask: torch.Tensor,
                **text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.encode_text(text_emb, **text), self.head.encode_video(frame_emb, frame_mask)


def batch_loss(model: Any, batch: Any) -> torch.Tensor:
    """The symmetric InfoNCE of one process's batch (on the model's device)."""
    logits = model(batch.text_emb, batch.frame_emb, batch.frame_mask, **batch.text_kwargs())
    return symmetric_infonce(logits, positive_mask(batch.video_index, batch.video_index, batch.text_emb))


def _global_loss(d: Dist, model: Any, ddp: torch.nn.Module, batch: Any, global_videos: np.ndarray) -> torch.Tensor:
    """The symmetric InfoNCE of the whole global batch, from this rank's rows and the others'
    embeddings gathered with their gradient (``heads.training.distributed``)."""
    sizes = d.sizes(len(global_videos))
    text, video = ddp(batch.text_emb, batch.frame_emb, batch.frame_mask, **batch.text_kwargs())
    text_all, video_all = gather_with_grad(d, text, sizes), gather_with_grad(d, video, sizes)
    raw_text = gather(d, batch.text_emb, sizes)
    vids = torch.from_numpy(np.asarray(global_videos, dtype=np.int64)).to(text.device)
    return symmetric_infonce(model.logits(text_all, video_all), positive_mask(vids, vids, raw_text))


def train_stage_one(train: Split, val: Split | None, out_dir: str | Path = "stage_one",
                    config: StageOneTrainConfig | None = None, reuse: bool = True, **options: Any) -> Path:
    """Train a stage-one head on ``train``; keep the epoch with the best val rsum; return the checkpoint.

    ``config`` (or its fields as keyword ``options``, which override it) decides the run. Neither
    split may be a test split (``ForbiddenSplitError``), and both must come from the same store
    (``StoreMismatchError``). With ``reuse`` (default) a finished run of the same arguments on the
    same store in ``out_dir`` is returned as is; ``reuse=False`` always trains.

    Under ``torchrun`` (``heads.training.distributed``) every rank takes its slice of each global
    batch of ``batch_size`` and the loss is that of the whole global batch (embeddings gathered with
    their gradient), in DistributedDataParallel; rank 0 validates and writes the checkpoint (the
    one-process format), every rank returns its path.
    """
    cfg = replace(config or StageOneTrainConfig(), **options)
    check_splits(train, val)
    head_config = dict(cfg.head_config or {})
    words = uses_text_tokens(cfg.head)
    if words:  # e.g. clip2video: word tokens in every batch and in evaluation
        require_text_tokens(train, cfg.head)
        if val is not None:
            require_text_tokens(val, cfg.head)
        head_config.setdefault("text_dim", int(train.text_tokens.shape[-1]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_args = {k: v for k, v in asdict(replace(cfg, head_config=head_config)).items() if k not in RUN_ONLY}
    train_args.update(epochs=int(cfg.epochs), batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                      weight_decay=float(cfg.weight_decay), warmup=float(cfg.warmup), seed=int(cfg.seed),
                      device=str(cfg.device), train_split=str(train.split),
                      val_split=None if val is None else str(val.split))
    path = out / CHECKPOINT_NAME
    if reuse and _finished_run(path, train_args, train.store_fingerprint):
        return path
    d = context(cfg.device)
    device = d.device(cfg.device)
    sampler = EpochSampler(train.caption_video, len(train.video_ids), cfg.batch_size, seed=cfg.seed)
    drop_short_last(sampler, d)
    total = max(1, cfg.epochs * len(sampler))
    with torch_threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_head(cfg.head, int(train.frame_emb.shape[-1]), stage=1, **head_config).to(device)
        ddp = wrap(_Embeddings(model), d, device)
        optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, total,
                                              warmup_steps(cfg.warmup, total))
        history: list[dict] = []
        best = BestState()
        bar = tqdm(total=total, desc=f"stage one [{cfg.head}]", disable=not cfg.progress or not d.is_main,
                   leave=False)
        log = TrainingLog(out, "stage_one") if d.is_main else NullLog()
        step = 0
        for epoch in range(cfg.epochs):
            model.train()
            t0, losses = time.perf_counter(), []
            batches = sampler.epoch(epoch)  # the global batches (every rank alike)
            local = [(c[d.part(c)], v[d.part(v)]) for c, v in batches] if d.enabled else batches
            for (_, global_videos), batch in zip(batches, iterate_batches(train, local, prefetch=cfg.prefetch,
                                                                           text_tokens=words, device=device)):
                batch = batch.to(device)
                if d.enabled:
                    loss = _global_loss(d, model, ddp, batch, global_videos)
                else:
                    loss = batch_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr = scheduler.get_last_lr()[0]
                model.decay_text_proj(lr, cfg.weight_decay)
                scheduler.step()
                step += 1
                losses.append(loss.item())
                log.step(step, losses[-1], lr, epoch=epoch)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
            record: dict[str, Any] = {
                "epoch": epoch, "step": step, "loss": float(np.mean(losses)) if losses else None,
                "lr": float(scheduler.get_last_lr()[0]), "logit_scale": model.scale().item(),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if val is not None and d.is_main:  # rank 0 alone selects and saves
                record["val"] = evaluate(model, val, device=device)
                record["val_rsum"] = score = rsum(record["val"])
                log.validation(step, record["val"], score, epoch)
            else:
                score = float(epoch)  # no val split: keep the last epoch
            best.update(score, epoch, model)
            history.append(record)
        bar.close()
        log.close()

    if d.is_main:
        summary = {"best_epoch": best.epoch, "selected_on": None if val is None else f"{val.split} rsum",
                   "best_score": None if val is None else best.score, "epochs": history}
        if d.enabled:
            summary["world_size"] = d.world_size
        save({"config": model.config(), "state_dict": best.state, "store_fingerprint": str(train.store_fingerprint),
              "encoder_identity": jsonable(train.encoder_identity), "train_args": jsonable(train_args),
              "history": summary},
             path)
        write_json(out / HISTORY_NAME, summary)
    d.barrier()
    return path


def _finished_run(path: Path, train_args: dict, store_fingerprint: str) -> bool:
    """Whether ``path`` holds a finished run of ``train_args`` on the store ``store_fingerprint``."""
    if not path.is_file():
        return False
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable or partial: train again
        return False
    return old.get("train_args") == jsonable(train_args) and old.get("store_fingerprint") == str(store_fingerprint)
