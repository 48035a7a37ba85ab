"""Pre-training a Q-Former the way BLIP-2's first stage does, on cached frame tokens: image-text
contrastive (ITC) and image-text matching (ITM, with hard negatives drawn from the batch's own ITC
similarities) on single frames, each paired with a caption of its video or, where the data has them,
with a caption of that frame (``FrameTexts``: what the frame shows, as BLIP-2's image captions do).
The result is saved as a
Hugging Face-format BLIP-2 checkpoint (``blip2.save_blip2`` + the tokenizer's files), so
``train-head --init-from`` loads it exactly as it loads a downloaded BLIP-2: the synthetic
benchmark's stand-in for BLIP-2's 129M-pair pre-training (docs/METHOD.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.fileio import jsonable, write_json
from core.split import Split
from heads.registry import create_head
from heads.stage_two.blip2 import save_blip2
from heads.stage_two.itc import itc_batch, itc_loss
from heads.stage_two.pairs import ItmBatch, load_pairs, require_tokens
from heads.stage_two.tokenizer import CaptionTokenizer, text_view
from heads.training.common import check_not_test, make_optimizer, torch_threads, warmup_steps

DONE_NAME = "pretrain.json"
BLIP2_ITM_NEGATIVES = 2  # BLIP-2's ITM: each positive with a negative video and a negative caption
ITM_NEGATIVES = (1, 2)


def check_itm_negatives(itm_negatives: int) -> int:
    """``itm_negatives`` if it is 1 or 2, else ``ValueError`` naming it."""
    if itm_negatives not in ITM_NEGATIVES:
        raise ValueError(f"itm_negatives must be 1 or 2, got {itm_negatives}")
    return int(itm_negatives)


def itm_negatives_key(itm_negatives: int) -> dict[str, int]:
    """What ``itm_negatives`` adds to a run's key or arguments: nothing for BLIP-2's two, so the runs
    finished before the setting existed keep their keys."""
    n = check_itm_negatives(itm_negatives)
    return {} if n == BLIP2_ITM_NEGATIVES else {"itm_negatives": n}

# A Q-Former with BLIP-2's layout at the synthetic benchmark's size (the demo head's width, depth and
# queries): the frozen tokens go unprojected into the cross attention, captions through its own words.
QFORMER_SHAPE = {"width": 128, "layers": 2, "heads": 4, "num_queries": 8, "cross_every": 1, "ff_mult": 4.0,
                 "ln_eps": 1e-12, "embed_norm": True, "prenorm": False, "dropout": 0.0, "text_input": "ids",
                 "max_positions": 64, "text_cross": False, "visual_proj": False, "standardize": False,
                 "itc_dim": 128, "itc_text_pool": "cls"}


@dataclass(frozen=True)
class FrameTexts:
    """A caption of every frame of a split's videos as token ids: ``ids`` (V, T, L) and ``mask``
    (V, T, L) bool, row ``v`` frame ``t`` the caption of that frame (masked frames: any valid ids)."""

    ids: np.ndarray
    mask: np.ndarray

    def digest(self) -> str:
        """What identifies these captions in a finished run's arguments."""
        h = hashlib.sha256()
        for a in (self.ids, self.mask):
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def rows(self, videos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame captions of video rows ``videos`` (ascending, as a batch holds them), cut to
        their longest caption: ``(ids, mask)`` of shape (Vb, T, L')."""
        mask = self.mask[videos]
        length = max(1, int(np.flatnonzero(mask.any(axis=(0, 1))).max(initial=-1)) + 1)
        return (torch.from_numpy(np.ascontiguousarray(self.ids[videos][..., :length])).long(),
                torch.from_numpy(np.ascontiguousarray(mask[..., :length])))


def in_batch_negatives(logits: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's ITM negatives: for each caption a video and for each video a caption of the batch,
    drawn with probability softmax(ITC logits) over the others (the pair itself excluded)."""
    with torch.no_grad():
        eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        masked = logits.float().masked_fill(eye, float("-inf"))
        neg_video = torch.multinomial(masked.softmax(dim=1), 1, generator=generator).squeeze(1)
        neg_text = torch.multinomial(masked.t().softmax(dim=1), 1, generator=generator).squeeze(1)
    return neg_video, neg_text


def qformer_losses(head: Any, batch: ItmBatch, generator: torch.Generator | None = None,
                   frame_text: tuple[torch.Tensor, torch.Tensor] | None = None,
                   itm_negatives: int = BLIP2_ITM_NEGATIVES
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-training step's losses on ``batch`` (aligned pairs of distinct videos, on the head's
    device): one random valid frame of each video makes image-text pairs; their ITC loss, and the
    ITM loss of the positives with in-batch negatives (``generator`` draws the frames and the
    negatives, on that device). ``frame_text`` ((Vb, T, L) ids and mask of the batch's video rows,
    ``FrameTexts.rows``): each frame is paired with its own caption instead of its video's.
    ``itm_negatives``: 2, BLIP-2's, gives every positive both a negative video and a negative caption
    (3 x b ITM pairs); 1 gives it one (2 x b pairs: the first half of the batch a negative video, the
    second half a negative caption), a third less ITM work per step. Returns (itc, itm, match
    logits, match labels)."""
    check_itm_negatives(itm_negatives)
    device = batch.tokens.device
    b = batch.pair_video.shape[0]
    valid = batch.frame_mask.float()
    frame = torch.multinomial(valid / valid.sum(dim=1, keepdim=True), 1, generator=generator).squeeze(1)
    tokens = batch.tokens[torch.arange(batch.tokens.shape[0], device=device), frame][:, None]
    fm = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
    video = head.encode_video(tokens, fm)
    text_tokens, text_mask, own_text = batch.text_tokens, batch.text_mask, batch.pair_text
    if frame_text is not None:  # the chosen frame's own caption, one per video row
        rows = torch.arange(tokens.shape[0], device=device)
        text_tokens, text_mask = frame_text[0][rows, frame], frame_text[1][rows, frame]
        own_text = batch.pair_video
    text = head.text_features(text_tokens, text_mask)[own_text]
    logits = head.itc_logits(head.video_queries(video)[batch.pair_video], text)  # (b, b)
    neg_video, neg_text = in_batch_negatives(logits, generator)
    if itm_negatives == BLIP2_ITM_NEGATIVES:
        neg_pair_text = torch.cat([own_text, own_text[neg_text]])
        neg_pair_video = torch.cat([batch.pair_video[neg_video], batch.pair_video])
    else:  # the first half's negatives change the video, the second half's the caption
        half = b // 2
        neg_pair_text = torch.cat([own_text[:half], own_text[neg_text][half:]])
        neg_pair_video = torch.cat([batch.pair_video[neg_video][:half], batch.pair_video[half:]])
    pair_text = torch.cat([own_text, neg_pair_text])
    pair_video = torch.cat([batch.pair_video, neg_pair_video])
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=device),
                        torch.zeros(neg_pair_text.shape[0], dtype=torch.long, device=device)])
    match = head.match(text_tokens, text_mask, video, pair_text, pair_video)
    return itc_loss(logits), F.cross_entropy(match, labels), match, labels


def _upgraded(args: Any) -> Any:
    """Finished-run arguments as today's names (``head_options`` was ``head_config``'s name)."""
    if isinstance(args, dict) and "head_options" in args:
        args = {("head_config" if k == "head_options" else k): v for k, v in args.items()}
    return args


def pretrain_qformer(train: Split, out_dir: str | Path, head_config: dict[str, Any], tokenizer: CaptionTokenizer,
                     steps: int = 2000, batch_size: int = 64, lr: float = 5e-4, weight_decay: float = 0.05,
                     seed: int = 0, device: str = "cpu", num_threads: int | None = None,
                     progress: bool = True, frame_texts: FrameTexts | None = None,
                     itm_negatives: int = BLIP2_ITM_NEGATIVES) -> Path:
    """Pre-train a CrossTVR head with BLIP-2's layout on ``train``'s single frames (ITC + ITM) and
    save it to ``out_dir`` as a BLIP-2 checkpoint; returns ``out_dir``. ``train`` must carry the
    captions' ids (``tokenizer.with_caption_ids``). A finished run with the same arguments in
    ``out_dir`` is reused. ``frame_texts`` (aligned with ``train``'s video rows): pair each frame
    with its own caption rather than one of its video's. ``itm_negatives``: ITM negatives per
    positive (``qformer_losses``)."""
    check_not_test(train, "pre-training")
    require_tokens(train)
    out = Path(out_dir)
    args = jsonable({"head_config": head_config, "steps": steps, "batch_size": batch_size, "lr": lr,
                     "weight_decay": weight_decay, "seed": seed, "store_fingerprint": train.store_fingerprint,
                     "vocab_size": tokenizer.vocab_size})
    if frame_texts is not None:
        args["frame_texts"] = frame_texts.digest()
    args.update(itm_negatives_key(itm_negatives))
    done = out / DONE_NAME
    if done.is_file() and _upgraded(json.loads(done.read_text()).get("args")) == args:
        return out
    view = text_view(train, "ids")
    cv = np.asarray(view.caption_video)
    num_videos = len(view.video_ids)
    with torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opts = {**head_config, "mode": "spatial", "spatial_frames": None}
        head = create_head("crosstvr", int(view.tokens.shape[-1]), 0, stage=2, **opts).to(device)
        head.train()
        optimizer, scheduler = make_optimizer(head, lr, weight_decay, steps, warmup_steps(0.05, steps))
        gen = torch.Generator(device=device).manual_seed(seed)
        history: list[dict] = []
        acc = {"itc": 0.0, "itm": 0.0, "itm_acc": 0.0, "n": 0}
        t0 = time.perf_counter()
        log_every = min(100, max(1, steps // 10))
        bar = tqdm(range(steps), desc="Q-Former pre-training (ITC + ITM)", disable=not progress, dynamic_ncols=True)
        for step in bar:
            rng = np.random.default_rng([int(seed), int(step), 0xB12])
            captions, videos = itc_batch(cv, num_videos, batch_size, rng)
            batch = load_pairs(view, captions, videos).to(device)
            b = videos.size
            frame_text = None
            if frame_texts is not None:
                frame_text = tuple(t.to(device) for t in frame_texts.rows(np.unique(videos)))
            itc, itm, match, labels = qformer_losses(head, batch, gen, frame_text, itm_negatives)
            loss = itc + itm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            acc["itc"] += float(itc.detach()) * b
            acc["itm"] += float(itm.detach()) * b
            acc["itm_acc"] += float((match.argmax(dim=1) == labels).float().mean()) * b
            acc["n"] += b
            bar.set_postfix(itc=f"{float(itc.detach()):.3f}", itm=f"{float(itm.detach()):.3f}")
            if (step + 1) % log_every == 0 or step + 1 == steps:
                n = max(1, acc.pop("n"))
                history.append({"step": step + 1, **{k: v / n for k, v in acc.items()},
                                "seconds": round(time.perf_counter() - t0, 2)})
                acc = {"itc": 0.0, "itm": 0.0, "itm_acc": 0.0, "n": 0}
        bar.close()
    head.eval()
    save_blip2(head.cpu(), out)
    for name, data in tokenizer.files.items():
        (out / name).write_bytes(data)
    write_json(done, {"args": args, "history": history, "frames": int(steps * min(batch_size, num_videos)),
                      "encoder_identity": jsonable(train.encoder_identity)})
    return out
