"""Pretraining of the synthetic world's small frozen CLIP on frame-caption pairs (train split only).

The synthetic benchmark needs an encoder that knows its world the way a web-pretrained CLIP knows
real videos: the gist (main object, background) in its pooled embedding, the fine details present
in its patch tokens. :func:`pretrain_encoder` trains the open_clip config ``synth-vit-b32-tiny``
(ViT with 32-px patches at 224 px: 7x7 patches + CLS, the ViT-B/32 token layout) contrastively on
single decoded frames of TRAIN videos and frame captions from
:func:`manifests.synthetic.frame_caption` (main object always, detail with probability
``p_detail``).

``p_detail`` is the calibration knob of the benchmark (docs/SYNTHETIC.md: details present in the
patch tokens, clearly weaker in the pooled embedding); ``probe-encoder`` measures where each
attribute ends up, and BENCHMARKS.md records the calibration that chose the default.

``cluster_size`` > 0 builds batches of frames that share background and main colour
(:class:`BatchSampler`); it did not help in the measurements of BENCHMARKS.md, so the default stays
random batches.

Loss: symmetric multi-positive InfoNCE. Frame captions are short and repeat within a batch, so a
caption is a positive for every frame in the batch whose content it describes truly (same main
object and background; same visible detail if it names one). Targets are uniform over those
positives, which removes the floor that one-hot targets put on duplicate captions.

Outputs (beside each other in ``out_dir``): an ordinary open_clip state dict ``<name>.pt`` that
``open_clip.create_model_and_transforms(config, pretrained=<path>)`` loads, a sidecar
``<name>.json`` and the decoded frame cache ``frames-<datahash>.npy`` (uint8, N x 224 x 224 x 3)
with its labels. A second call with the same key (config, seed, options, train data) returns the
existing checkpoint without training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from core.fileio import atomic_write

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
DEFAULT_CONFIG = "synth-vit-b32-tiny"
DEFAULT_FRAMES = (2, 6, 10, 14, 18, 22)    # 3 frames in each half of a 24-frame video
PRETRAIN_VERSION = 1

DEFAULTS: dict[str, Any] = {
    "steps": 240,
    "batch_size": 128,
    "lr": 5e-4,
    "weight_decay": 0.1,
    "warmup": 30,
    "p_detail": 0.1,
    "init_logit_scale": 30.0,
    "frame_indices": DEFAULT_FRAMES,
    "cluster_size": 0,
}


# --------------------------------------------------------------------------- helpers


def register_config(config: str = DEFAULT_CONFIG) -> dict:
    """Register ``pipeline/model_configs/<config>.json`` with open_clip (if it is one of ours)
    and return the config dict."""
    import open_clip

    path = MODEL_CONFIG_DIR / f"{config}.json"
    if path.is_file():
        open_clip.add_model_config(path)
        return json.loads(path.read_text())
    cfg = open_clip.get_model_config(config)
    if cfg is None:
        raise ValueError(f"unknown open_clip model config {config!r}")
    return cfg


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _decode_job(job: tuple[str, tuple[int, ...]]) -> np.ndarray:
    import decord

    path, idx = job
    vr = decord.VideoReader(path, num_threads=1)
    return vr.get_batch(list(idx)).asnumpy()


def decode_frames(paths: Sequence[str | Path], frame_indices: Sequence[int], workers: int = 2,
                  progress: bool = True, desc: str = "decode frames") -> np.ndarray:
    """Decode the same frame indices of every video: uint8 array (V, len(idx), H, W, 3)."""
    from tqdm import tqdm

    jobs = [(str(p), tuple(int(i) for i in frame_indices)) for p in paths]
    out: list[np.ndarray] = []
    with tqdm(total=len(jobs), desc=desc, unit="video", disable=not progress) as bar:
        if workers <= 1 or len(jobs) < 8:
            for job in jobs:
                out.append(_decode_job(job))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:   # decord releases the GIL
                for arr in pool.map(_decode_job, jobs):
                    out.append(arr)
                    bar.update()
    return np.stack(out)


def frame_cache(manifest, cache_dir: str | Path, frame_indices: Sequence[int] = DEFAULT_FRAMES,
                workers: int = 2, progress: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Decoded frames of every video of ``manifest`` at ``frame_indices``, cached as
    ``cache_dir/frames-<hash>.npy`` (memory-mapped on reuse) with ``frames-<hash>.json`` labels:
    one dict per frame with the video's attributes, ``video_id``, ``frame`` and ``t``."""
    from manifests import synthetic as S

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    attrs = S.manifest_attrs(manifest)
    vids = list(attrs)
    key = _hash({"manifest": manifest.sha256(), "frames": list(frame_indices), "videos": vids})[:16]
    npy, meta = cache_dir / f"frames-{key}.npy", cache_dir / f"frames-{key}.json"
    if npy.is_file() and meta.is_file():
        return np.load(npy, mmap_mode="r"), json.loads(meta.read_text())["labels"]
    arr = decode_frames([manifest.video_path(v) for v in vids], frame_indices, workers, progress)
    v, f = arr.shape[:2]
    arr = arr.reshape(v * f, *arr.shape[2:])
    labels = [{**attrs[vid], "video_id": vid, "frame": int(i),
               "t": S.frame_time(int(i))} for vid in vids for i in frame_indices]
    atomic_write(npy, lambda tmp: np.save(tmp, arr))
    meta.write_text(json.dumps({"manifest_sha256": manifest.sha256(), "frames": list(frame_indices),
                                "shape": list(arr.shape), "labels": labels}))
    return np.load(npy, mmap_mode="r"), labels


def _frame_key(label: dict) -> tuple[tuple, tuple | None]:
    from manifests import synthetic as S

    main = (label["main_color"], label["main_shape"], label["bg_color"])
    detail = ((label["detail_color"], label["detail_shape"], label["corner"])
              if S.detail_visible(label, label["t"]) else None)
    return main, detail


def positives(frame_keys: Sequence[tuple], caption_keys: Sequence[tuple]) -> np.ndarray:
    """(B, B) bool: caption j describes frame i truly (same main object and background; and the
    same visible detail when caption j names one)."""
    b = len(frame_keys)
    m = np.zeros((b, len(caption_keys)), dtype=bool)
    for i, (fmain, fdet) in enumerate(frame_keys):
        for j, (cmain, cdet) in enumerate(caption_keys):
            m[i, j] = fmain == cmain and (cdet is None or cdet == fdet)
    return m


def gist_key(label: dict) -> tuple[str, str]:
    """What a frame's gist cluster is keyed by: its background and main-object colour."""
    return label["bg_color"], label["main_color"]


class BatchSampler:
    """Frame indices of pretraining batches.

    ``cluster_size == 0``: shuffled epochs of all frames (plain random batches).
    ``cluster_size == k > 0``: every batch is ``batch_size // k`` clusters of ``k`` frames that
    share background and main colour (:func:`gist_key`), from distinct videos where possible, so
    that the contrastive loss must tell them apart by what remains (main shape, the detail). In a
    random batch only a few of 127 negatives share a frame's background and colour, so those
    attributes alone bring the loss close to its floor and the main shape is learned slowly.
    """

    def __init__(self, labels: Sequence[dict], batch_size: int, cluster_size: int,
                 rng: np.random.Generator) -> None:
        self.n, self.batch_size, self.cluster_size, self.rng = len(labels), int(batch_size), int(cluster_size), rng
        if self.cluster_size < 0 or self.cluster_size > self.batch_size:
            raise ValueError(f"cluster_size must be in [0, batch_size={batch_size}], got {cluster_size}")
        self._order, self._cursor = rng.permutation(self.n), 0
        if self.cluster_size:
            clusters: dict[tuple, list[int]] = {}
            for i, lab in enumerate(labels):
                clusters.setdefault(gist_key(lab), []).append(i)
            self.clusters = [np.asarray(v) for v in clusters.values()]
            number: dict[str, int] = {}
            self.videos = np.asarray([number.setdefault(lab["video_id"], len(number)) for lab in labels])
            sizes = np.asarray([len(c) for c in self.clusters], dtype=np.float64)
            self.cluster_p = sizes / sizes.sum()

    def _cluster(self, members: np.ndarray) -> list[int]:
        """``cluster_size`` frames of one cluster, one per video while videos last."""
        perm = self.rng.permutation(members)
        _, first = np.unique(self.videos[perm], return_index=True)
        distinct = perm[np.sort(first)]
        rest = np.setdiff1d(perm, distinct, assume_unique=True)
        pick = np.concatenate([distinct, self.rng.permutation(rest)])
        if pick.size < self.cluster_size:
            pick = self.rng.choice(members, size=self.cluster_size, replace=True)
        return [int(i) for i in pick[:self.cluster_size]]

    def next(self) -> np.ndarray:
        """Sorted frame indices of the next batch."""
        if not self.cluster_size:
            if self._cursor + self.batch_size > self.n:
                self._order, self._cursor = self.rng.permutation(self.n), 0
            idx = self._order[self._cursor:self._cursor + self.batch_size]
            self._cursor += self.batch_size
            return np.sort(idx)
        k = self.batch_size // self.cluster_size
        chosen = self.rng.choice(len(self.clusters), size=k, replace=k > len(self.clusters), p=self.cluster_p)
        idx = [i for c in chosen for i in self._cluster(self.clusters[int(c)])]
        while len(idx) < self.batch_size:   # batch_size not a multiple of cluster_size
            idx.append(int(self.rng.integers(self.n)))
        return np.sort(np.asarray(idx))


def multi_positive_infonce(img: "torch.Tensor", txt: "torch.Tensor", scale: "torch.Tensor",
                           pos: "torch.Tensor") -> "torch.Tensor":
    """Symmetric InfoNCE with targets uniform over the positives of each row / column."""
    import torch.nn.functional as F

    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = scale * img @ txt.t()
    p = pos.float()
    i2t = -(F.log_softmax(logits, dim=1) * p / p.sum(1, keepdim=True)).sum(1).mean()
    t2i = -(F.log_softmax(logits, dim=0) * p / p.sum(0, keepdim=True)).sum(0).mean()
    return 0.5 * (i2t + t2i)


def _normalise(frames_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float],
               size: int | None = None) -> "torch.Tensor":
    """uint8 (N, H, W, 3) -> normalised float (N, 3, size, size) (bilinear resize if needed)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(frames_uint8)).permute(0, 3, 1, 2).float() / 255.0
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def checkpoint_key(config: str, cfg: dict, seed: int, options: dict, data_sha: str) -> str:
    """Hash identifying one pretraining run."""
    return _hash({"v": PRETRAIN_VERSION, "config": config, "cfg": cfg, "seed": seed,
                  "options": options, "data": data_sha})[:12]


# --------------------------------------------------------------------------- pretraining


def pretrain_encoder(manifest, out_path: str | Path, config: str = DEFAULT_CONFIG, seed: int = 0,
                     steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"],
                     lr: float = DEFAULTS["lr"], weight_decay: float = DEFAULTS["weight_decay"],
                     warmup: int = DEFAULTS["warmup"], p_detail: float = DEFAULTS["p_detail"],
                     init_logit_scale: float = DEFAULTS["init_logit_scale"],
                     frame_indices: Sequence[int] = DEFAULT_FRAMES,
                     cluster_size: int = DEFAULTS["cluster_size"], workers: int = 2,
                     progress: bool = True, threads: int | None = None) -> Path:
    """Train ``config`` contrastively on frame-caption pairs of the TRAIN split of a synthetic
    ``manifest``; return the path of the open_clip checkpoint (``.pt`` state dict).

    ``out_path`` is a directory (the checkpoint is named after its key) or a ``.pt`` file path.
    A checkpoint with the same key (config, seed, options, train data) is reused as is.
    """
    import torch

    from manifests import synthetic as S

    train = manifest.split("train")   # never look at val/test videos
    if train.videos.num_rows == 0:
        raise ValueError("pretrain_encoder needs a manifest with train videos")
    out_path = Path(out_path)
    out_dir = out_path.parent if out_path.suffix == ".pt" else out_path
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = register_config(config)
    options = {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
               "weight_decay": float(weight_decay), "warmup": int(warmup),
               "p_detail": float(p_detail), "init_logit_scale": float(init_logit_scale),
               "frame_indices": [int(i) for i in frame_indices]}
    if int(cluster_size):   # absent when 0, so keys of earlier (random-batch) runs stay valid
        options["cluster_size"] = int(cluster_size)
    data_sha = train.sha256()
    key = checkpoint_key(config, cfg, int(seed), options, data_sha)
    ckpt = out_path if out_path.suffix == ".pt" else out_dir / f"{config}-{key}.pt"
    sidecar = ckpt.with_suffix(".json")
    if ckpt.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()).get("key") == key:
                return ckpt
        except ValueError:
            pass

    import open_clip

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    t_start = time.time()
    try:
        frames, labels = frame_cache(train, out_dir, frame_indices, workers, progress)
        t_data = time.time() - t_start
        torch.manual_seed(seed)
        model, _, _ = open_clip.create_model_and_transforms(config, pretrained=None)
        tokenizer = open_clip.get_tokenizer(config)
        mean = model.visual.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN) \
            if hasattr(model.visual, "preprocess_cfg") else open_clip.OPENAI_DATASET_MEAN
        std = model.visual.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD) \
            if hasattr(model.visual, "preprocess_cfg") else open_clip.OPENAI_DATASET_STD
        with torch.no_grad():
            model.logit_scale.fill_(math.log(init_logit_scale))
        image_size = int(cfg["vision_cfg"]["image_size"])
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.98), eps=1e-6,
                                fused=True)   # foreach/for-loop AdamW is far slower on CPU

        def lr_at(step: int) -> float:
            if step < warmup:
                return lr * (step + 1) / warmup
            return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        rng = np.random.default_rng([seed, 7])
        keys = [_frame_key(lab) for lab in labels]
        n = len(labels)
        from tqdm import tqdm

        losses: list[float] = []
        sampler = BatchSampler(labels, batch_size, int(cluster_size), rng)
        bar = tqdm(range(steps), desc=f"pretrain {config}", unit="step", disable=not progress)
        for step in bar:
            idx = sampler.next()
            texts, cap_keys = [], []
            for i in idx:
                lab = labels[i]
                text = S.frame_caption(lab, lab["t"], rng, p_detail)
                texts.append(text)
                fmain, fdet = keys[i]
                # did the caption name the detail? (its corner words appear only then)
                named = fdet is not None and any(w in text for w in S.CORNER_PHRASES[lab["corner"]])
                cap_keys.append((fmain, fdet if named else None))
            pos = torch.from_numpy(positives([keys[i] for i in idx], cap_keys))
            x = _normalise(frames[idx], mean, std, image_size)
            tok = tokenizer(texts)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            img = model.encode_image(x)
            txt = model.encode_text(tok)
            loss = multi_positive_infonce(img, txt, model.logit_scale.exp(), pos)
            opt.zero_grad(set_to_none=False)   # reuse grad buffers (CPU allocator)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}",
                            scale=f"{model.logit_scale.exp().item():.1f}")
        bar.close()
        model.eval()
        atomic_write(ckpt, lambda tmp: torch.save(model.state_dict(), tmp))
        wall = time.time() - t_start
        info = {"key": key, "config": config, "model_cfg": cfg, "seed": int(seed), **options,
                "train_manifest_sha256": data_sha, "train_videos": train.videos.num_rows,
                "train_frames": n, "final_loss": float(np.mean(losses[-20:])) if losses else None,
                "loss_first": losses[0] if losses else None,
                "logit_scale": model.logit_scale.exp().item(), "wall_s": round(wall, 1),
                "data_s": round(t_data, 1), "threads": torch.get_num_threads(),
                "loss": "symmetric multi-positive InfoNCE over frame/frame-caption pairs",
                "created_by": "pipeline.pretrain.pretrain_encoder"}
        sidecar.write_text(json.dumps(info, indent=2) + "\n")
        return ckpt
    finally:
        torch.set_num_threads(prev_threads)
