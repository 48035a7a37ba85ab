"""Contrastive (ITC) pre-training of a Q-Former-style stage-two head, before its ITM training.

CrossTVR initialises its cross attention from BLIP-2's Q-Former, whose first training stage is
image-text contrastive learning: the learnable queries attend to the frozen visual tokens with no
text in sight, the text passes alone through the same layers (shared self-attention, its own
feed-forward), and the similarity of a pair is the best cosine between any query output and the
text feature (``max`` over queries), trained with a symmetric InfoNCE over the batch. A head that
starts ITM from scratch instead has to discover where in the patch tokens a caption's details
are from one positive and two negatives per step, and on the synthetic benchmark it did not
(one-attribute groups stayed near chance after hundreds of ITM steps, BENCHMARKS.md); with a
batch of ``B`` videos the contrastive loss gives every caption ``B - 1`` negatives per step.

:func:`pretrain_itc` runs that stage on the train split's cached tokens: ``steps`` steps of
``batch_size`` distinct videos with one random caption each. With ``cluster > 1`` a batch is made
of groups of ``cluster`` videos that stage one finds similar (a random caption's video and that
caption's most similar other videos under stage one): negatives that share the gist, so the
details decide. The projections and the temperature are the head's own (``itc_dim``), so the
trained head can add the ITC logit to its ITM score at re-ranking time. Resumable: the state is
saved every ``save_every`` steps, and the batches of a step depend only on ``(seed, step)``, so an
interrupted run continued gives the same weights as an uninterrupted one (CPU).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.errors import RunMismatchError
from core.split import Split
from core.training_log import TrainingLog
from heads.stage_two.pairs import ItmBatch, load_pairs
from heads.training.common import make_optimizer, save
from heads.training.distributed import Dist, NullLog, StepModule, gather_with_grad, wrap

__all__ = ["itc_loss", "itc_batch", "pretrain_itc", "supports_itc", "batch_itc_loss", "ITC_STATE_NAME"]

ITC_STATE_NAME = "itc_state.pt"


def supports_itc(head: nn.Module) -> bool:
    """Whether ``head`` has a text-free query pass, a text-only pass and a contrastive projection
    (CrossTVR built with ``itc_dim`` > 0)."""
    return hasattr(head, "video_queries") and int(getattr(head, "itc_dim", 0)) > 0


def batch_itc_loss(model: nn.Module, batch: ItmBatch, captions: torch.Tensor, videos: torch.Tensor,
                   video: dict[str, torch.Tensor] | None = None,
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC loss and (C, V) logits of aligned pairs ``(captions[i], videos[i])`` (rows of ``batch``'s
    distinct ``text_tokens`` / ``tokens``; videos distinct). ``video``: ``model.encode_video`` of
    the batch's tokens when the caller already has it (the ITM step). ``gather``: under torchrun,
    every rank's query outputs and text features (``heads.training.distributed.gather_with_grad``),
    so the loss contrasts the whole global batch."""
    if video is None:
        video = model.encode_video(batch.tokens, batch.frame_mask)
    queries = model.video_queries(video)[videos]
    text = model.text_features(batch.text_tokens, batch.text_mask)[captions]
    if gather is not None:
        queries, text = gather(queries), gather(text)
    logits = model.itc_logits(queries, text)
    return itc_loss(logits), logits


def itc_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of (C, V) logits where caption ``i`` belongs to video ``i``."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def itc_batch(caption_video: np.ndarray, num_videos: int, batch_size: int, rng: np.random.Generator,
              neighbours: np.ndarray | None = None, cluster: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One caption row each (B,) of distinct video rows (B,) for one contrastive step:
    ``(captions, videos)``.

    ``neighbours`` (C, K): for each caption row, other video rows in stage-one order. With
    ``cluster > 1`` the batch is built from clusters: a random caption's video, then up to
    ``cluster - 1`` of that caption's nearest videos not yet in the batch.
    """
    cv = np.asarray(caption_video, dtype=np.int64)
    b = min(int(batch_size), int(num_videos))
    if neighbours is None or cluster <= 1:
        videos = rng.choice(num_videos, size=b, replace=False)
    else:
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < b:
            seed_caption = int(rng.integers(cv.size))
            members = [int(cv[seed_caption])] + [int(v) for v in neighbours[seed_caption]]
            added = 0
            for v in members:
                if v not in taken:
                    taken.add(v)
                    chosen.append(v)
                    added += 1
                    if added == cluster or len(chosen) == b:
                        break
        videos = np.asarray(chosen, dtype=np.int64)
    captions = _one_caption_each(cv, videos, rng)
    return captions, videos


def _one_caption_each(cv: np.ndarray, videos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    order = np.argsort(cv, kind="stable")
    starts = np.searchsorted(cv[order], videos, side="left")
    ends = np.searchsorted(cv[order], videos, side="right")
    if np.any(ends <= starts):
        bad = videos[ends <= starts][:5].tolist()
        raise ValueError(f"video rows {bad} have no caption")
    pick = starts + (rng.random(videos.size) * (ends - starts)).astype(np.int64)
    return order[pick]


def pretrain_itc(model: nn.Module, train: Split, state_path: str | Path, steps: int, batch_size: int = 64,
                 lr: float = 5e-4, weight_decay: float = 0.05, warmup: int = 50, seed: int = 0,
                 neighbours: np.ndarray | None = None, cluster: int = 1, device: str = "cpu",
                 max_steps: int | None = None, save_every: int = 50, progress: bool = True,
                 args: dict | None = None, precision: Any = None, dist: Dist | None = None,
                 ddp: nn.Module | None = None) -> tuple[bool, list[dict]]:
    """Contrastive pre-training of ``model`` (in place) on ``train``; returns ``(finished, history)``.

    ``state_path`` holds the resumable state (model, optimizer, step); a state whose
    ``args`` differ from ``args`` raises ``RunMismatchError``. ``max_steps`` stops early (resumable).
    History: one record per ``save_every`` steps (mean loss, in-batch caption->video accuracy); every
    step's loss, learning rate and accuracy also go to ``training_log.jsonl`` beside ``state_path``
    (phase ``itc``, ``core.training_log``).
    ``precision``: a callable returning the forward pass's autocast context (default: none).
    ``dist`` (under torchrun): every rank takes its slice of each step's batch, the loss contrasts
    the gathered global batch, DistributedDataParallel averages the gradients (``ddp``: the run's
    ``wrap(StepModule(model))``, made here when not given); rank 0 saves and logs.
    """
    if not supports_itc(model):
        raise ValueError(f"contrastive pre-training needs a Q-Former-style head with a contrastive projection "
                         f"(crosstvr with itc_dim > 0); {getattr(model, 'name', type(model).__name__)} has none")
    if steps <= 0:
        return True, []
    state_path = Path(state_path)
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, steps, warmup)
    step, history = 0, []
    args = dict(args or {})
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = dict(state.get("args") or {})
        if "head_cfg" in saved:  # the name of head_config in runs saved by earlier versions
            saved["head_config"] = saved.pop("head_cfg")
        if saved != args:
            raise RunMismatchError(f"{state_path} belongs to a contrastive pre-training run with other arguments; "
                                   f"use another out_dir or resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
        if state["finished"]:
            return True, history

    d = dist or Dist()
    if d.enabled and ddp is None:
        ddp = wrap(StepModule(model), d, device, find_unused=True)

    def save_state(finished: bool) -> None:
        if not d.is_main:
            return
        save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "step": step, "history": history, "finished": finished, "args": args}, state_path)

    num_videos = len(train.video_ids)
    log = TrainingLog(state_path.parent, "itc", step) if d.is_main else NullLog()
    model.train()
    bar = tqdm(total=steps, initial=step, desc="stage two contrastive pre-training",
               disable=not progress or not d.is_main, dynamic_ncols=True)
    acc_loss = acc_hits = acc_n = 0.0
    t0 = time.perf_counter()
    while step < steps:
        if max_steps is not None and step >= max_steps:
            save_state(False)
            bar.close()
            log.close()
            return False, history
        rng = np.random.default_rng([int(seed), int(step), 0x17C])
        captions, videos = itc_batch(train.caption_video, num_videos, batch_size, rng, neighbours, cluster)
        if d.enabled:  # this rank's slice of the global batch; the loss sees all of it
            sizes, part = d.sizes(len(videos)), d.part(videos)
            captions, videos = captions[part], videos[part]
        batch = load_pairs(train, captions, videos).to(device)
        # load_pairs keeps distinct rows sorted: pair_text / pair_video map back to the batch order
        with precision() if precision is not None else nullcontext():
            if d.enabled:
                loss, logits = ddp(lambda m, b: batch_itc_loss(m, b, b.pair_text, b.pair_video,
                                                               gather=lambda x: gather_with_grad(d, x, sizes)), batch)
            else:
                loss, logits = batch_itc_loss(model, batch, batch.pair_text, batch.pair_video)
        loss, logits = loss.float(), logits.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        with torch.no_grad():
            hits = float((logits.argmax(dim=1) == torch.arange(logits.shape[0], device=logits.device)).sum())
        log.step(step, float(loss.detach()), lr, acc=hits / logits.shape[0])
        acc_loss += float(loss.detach()) * logits.shape[0]
        acc_hits += hits
        acc_n += logits.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{hits / logits.shape[0]:.2f}")
        if step % save_every == 0 or step == steps:
            history.append({"step": step, "loss": acc_loss / max(1.0, acc_n), "acc": acc_hits / max(1.0, acc_n),
                            "seconds": round(time.perf_counter() - t0, 3)})
            acc_loss = acc_hits = acc_n = 0.0
            t0 = time.perf_counter()
            save_state(step >= steps)
    bar.close()
    log.close()
    return True, history
