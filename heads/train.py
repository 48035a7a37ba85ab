"""Stage-one trainer: symmetric InfoNCE on cached embeddings, model selection on val only."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from heads import STAGE_ONE, build_stage_one
from heads.data import EpochSampler, iterate_batches, require_text_tokens, uses_text_tokens
from heads.evaluate import evaluate
from heads.losses import positive_mask, symmetric_infonce
from heads.metrics import rsum
from heads.stage_one import StageOneHead

CHECKPOINT_NAME = "stage_one.pt"
HISTORY_NAME = "history.json"
FORBIDDEN_SPLITS = frozenset({"test"})


class StoreMismatchError(ValueError):
    """A checkpoint or split comes from a store made by a different encoder / store."""


class ForbiddenSplitError(ValueError):
    """A test split was handed to the trainer (training and model selection never see test)."""


def check_not_test(split: Any, role: str) -> None:
    """Refuse a split whose name is a test split, for ``role`` ("train" / "val")."""
    name = str(getattr(split, "split", "")).lower()
    if name in FORBIDDEN_SPLITS or name.startswith("test"):
        raise ForbiddenSplitError(
            f"the {role} split is named {split.split!r}: the trainer never trains or selects models "
            f"on a test split; evaluate test with heads.evaluate after training"
        )


def identity_diff(expected: dict, found: dict) -> list[str]:
    """Human-readable differences between two encoder identity dicts ([] when equal)."""
    canon = lambda d: json.loads(json.dumps(d, sort_keys=True, default=str))  # noqa: E731
    a, b = canon(expected or {}), canon(found or {})
    return [f"{k}: expected {a.get(k)!r}, found {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(head: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms, position embeddings and the scale are exempt.

    (Position / type embeddings are the parameters named ``*_emb``; VLAD ``centers`` are exempt too.)
    The identity-initialised text projection decays towards the identity, not towards zero
    (see ``_decay_text_proj_to_identity``), so it is exempt here too.
    """
    decay, no_decay = [], []
    for name, p in head.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = (p.ndim >= 2 and not name.startswith("text_proj") and not name.endswith("_emb")
                     and name != "centers")
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _decay_text_proj_to_identity(head: StageOneHead, lr: float, weight_decay: float) -> None:
    if head.text_proj is None or weight_decay <= 0:
        return
    w = head.text_proj.weight
    eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
    w.sub_(lr * weight_decay * (w - eye))


def train_stage_one(
    train: Any,
    val: Any | None,
    head: str = "meanP",
    out_dir: str | Path = "stage_one",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    head_config: dict | None = None,
    num_threads: int | None = None,
    prefetch: int = 2,
    progress: bool = True,
    reuse: bool = True,
) -> Path:
    """Train a stage-one head on ``train``; keep the epoch with the best val rsum; return the checkpoint.

    ``warmup`` < 1 is a fraction of all steps, otherwise a number of steps. Without ``val`` the
    last epoch is kept. Neither split may be a test split (``ForbiddenSplitError``), and both must
    come from the same store (``StoreMismatchError``). Uses ``num_threads`` torch threads (default:
    all cores) and restores the previous setting on return. Writes ``out_dir/stage_one.pt`` and
    ``out_dir/history.json``. With ``reuse`` (default) an ``out_dir/stage_one.pt`` of a finished
    run with the same training arguments on the same store is returned as is, not trained again
    (its file, and so the identity stage-two heads record, stays the same); ``reuse=False``
    always trains.
    """
    check_not_test(train, "train")
    if val is not None:
        check_not_test(val, "val")
        if val.store_fingerprint != train.store_fingerprint:
            raise StoreMismatchError(
                f"train and val splits come from different stores "
                f"({train.store_fingerprint[:12]} vs {val.store_fingerprint[:12]})"
            )
    head_config = dict(head_config or {})
    words = uses_text_tokens(STAGE_ONE.get(head))
    if words:  # e.g. clip2video: word tokens in every batch and in evaluation
        require_text_tokens(train, head)
        if val is not None:
            require_text_tokens(val, head)
        head_config.setdefault("text_dim", int(train.text_tokens.shape[-1]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    embed_dim = int(train.frame_emb.shape[-1])
    train_args = {
        "head": head, "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
        "weight_decay": float(weight_decay), "warmup": float(warmup), "seed": int(seed),
        "device": str(device), "head_config": dict(head_config or {}),
        "train_split": str(train.split), "val_split": None if val is None else str(val.split),
    }
    path = out / CHECKPOINT_NAME
    if reuse and path.is_file():
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable or partial: train again
            old = None
        if (old is not None and old.get("train_args") == train_args
                and old.get("store_fingerprint") == str(train.store_fingerprint)):
            return path
    sampler = EpochSampler(train.caption_video, len(train.video_ids), batch_size, seed=seed)
    steps_per_epoch = len(sampler)
    total = max(1, epochs * steps_per_epoch)
    warmup_steps = int(round(warmup * total)) if warmup < 1 else int(warmup)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(num_threads or os.cpu_count() or 1))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_stage_one(head, embed_dim, **(head_config or {})).to(device)
            optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: cosine_with_warmup(s, total, warmup_steps))
            history: list[dict] = []
            best_score, best_state, best_epoch = -math.inf, None, None
            bar = tqdm(total=total, desc=f"stage one [{head}]", disable=not progress, leave=False)
            step = 0
            for epoch in range(epochs):
                model.train()
                t0, losses = time.perf_counter(), []
                for batch in iterate_batches(train, sampler.epoch(epoch), prefetch=prefetch, text_tokens=words):
                    batch = batch.to(device)
                    logits = model(batch.frame_emb, batch.frame_mask, batch.text_emb, **batch.text_kwargs())
                    mask = positive_mask(batch.video_index, batch.video_index, batch.text_emb)
                    loss = symmetric_infonce(logits, mask)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    _decay_text_proj_to_identity(model, scheduler.get_last_lr()[0], weight_decay)
                    scheduler.step()
                    step += 1
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
                record: dict[str, Any] = {
                    "epoch": epoch, "step": step, "loss": float(np.mean(losses)) if losses else None,
                    "lr": float(scheduler.get_last_lr()[0]), "logit_scale": model.scale().item(),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                if val is not None:
                    metrics = evaluate(model, val, device=device)
                    record["val"] = metrics
                    record["val_rsum"] = rsum(metrics)
                    score = record["val_rsum"]
                else:
                    score = float(epoch)  # no val split: keep the last epoch
                if score > best_score:
                    best_score, best_epoch = score, epoch
                    best_state = copy.deepcopy(model.state_dict())
                history.append(record)
            bar.close()
    finally:
        torch.set_num_threads(previous_threads)

    assert best_state is not None
    summary = {"best_epoch": best_epoch, "selected_on": None if val is None else f"{val.split} rsum",
               "best_score": None if val is None else best_score, "epochs": history}
    ckpt = {
        "config": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in best_state.items()},
        "store_fingerprint": str(train.store_fingerprint),
        "encoder_identity": json.loads(json.dumps(train.encoder_identity, default=str)),
        "train_args": train_args,
        "history": summary,
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    (out / HISTORY_NAME).write_text(json.dumps(summary, indent=2, allow_nan=False, default=str))
    return path


@dataclass
class StageOneCheckpoint:
    """A loaded stage-one checkpoint: the head (eval mode) and its metadata."""

    head: StageOneHead
    config: dict
    store_fingerprint: str
    encoder_identity: dict
    train_args: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)


def load_stage_one(
    path: str | Path,
    expect_encoder_identity: dict | None = None,
    expect_fingerprint: str | None = None,
    map_location: str = "cpu",
) -> StageOneCheckpoint:
    """Load ``stage_one.pt`` (a file or the directory holding it).

    Raises ``StoreMismatchError`` when ``expect_encoder_identity`` differs from the identity of the
    encoder that made the training store (or ``expect_fingerprint`` from its fingerprint).
    """
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no stage-one checkpoint at {p}")
    ckpt = torch.load(p, map_location=map_location, weights_only=True)
    missing = {"config", "state_dict", "store_fingerprint", "encoder_identity"} - set(ckpt)
    if missing:
        raise ValueError(f"{p} is not a stage-one checkpoint (missing {sorted(missing)})")
    if expect_encoder_identity is not None:
        diff = identity_diff(expect_encoder_identity, ckpt["encoder_identity"])
        if diff:
            raise StoreMismatchError(
                f"checkpoint {p} was trained on features of a different encoder than this store: "
                + "; ".join(diff)
            )
    if expect_fingerprint is not None and expect_fingerprint != ckpt["store_fingerprint"]:
        raise StoreMismatchError(
            f"checkpoint {p} was trained on store {ckpt['store_fingerprint'][:12]}, "
            f"expected {expect_fingerprint[:12]}"
        )
    config = dict(ckpt["config"])
    head = build_stage_one(**config)
    head.load_state_dict(ckpt["state_dict"])
    head.eval()
    return StageOneCheckpoint(head=head, config=config, store_fingerprint=ckpt["store_fingerprint"],
                              encoder_identity=ckpt["encoder_identity"],
                              train_args=ckpt.get("train_args", {}), history=ckpt.get("history", {}))
