"""Pretraining of the synthetic world's small frozen CLIP on frame-caption pairs (train split only).

The synthetic benchmark needs an encoder that knows its world the way a web-pretrained CLIP knows
real videos: the gist (main object, background) in its pooled embedding, the fine details present
in its patch tokens. :func:`pretrain_encoder` trains the open_clip config ``synth-vit-b32-tiny``
(ViT with 32-px patches at 224 px: 7x7 patches + CLS, the ViT-B/32 token layout) contrastively on
single decoded frames of TRAIN videos and frame captions from
:func:`synthetic.world.frame_caption` (main object always, detail with probability ``p_detail``).

``p_detail`` is the calibration knob of the benchmark (docs/SYNTHETIC.md: details present in the
patch tokens, clearly weaker in the pooled embedding); ``probe-encoder`` measures where each
attribute ends up, and BENCHMARKS.md records the calibration that chose the default. The settings
are :class:`PretrainSettings`; callers (``pretrain-encoder --option key=value``) give them by name.

``cluster_size`` > 0 builds batches of frames that share background and main colour
(:class:`BatchSampler`); it did not help in the measurements of BENCHMARKS.md, so the default stays
random batches.

Loss: symmetric multi-positive InfoNCE. Frame captions are short and repeat within a batch, so a
caption is a positive for every frame in the batch whose content it describes truly (same main
object and background; same visible detail if it names one). Targets are uniform over those
positives, which removes the floor that one-hot targets put on duplicate captions.

It runs on the pipeline's parts: the frames come from the extraction job's decoder
(``synthetic.frames``, through :func:`pipeline.decode.decode_video`), the open_clip configs of
``pipeline/model_configs/`` are registered by the encoder registry
(:func:`pipeline.encoders.register_model_configs`, once per process), and each batch of frames is
preprocessed and each caption tokenised by the registry's encoder for the config
(:func:`pipeline.encoders.load_encoder`: ``Encoder.preprocess`` and ``tokenize``), the very
preprocessing the extraction and the probes give this encoder's frames later.

Numbers kept from the first version, which decoded with decord and normalised frames itself (so
that a checkpoint's key still names the same weights and the demo's figures do not move):

* Decoding: the pipeline's decoder gives the very pixels decord gave (``synthetic.frames``), so
  the frame caches keep their names and contents.
* The world's frames are 224 px, the size of ``synth-vit-b32-tiny``: the registry's preprocessing
  only scales and normalises them (no resize, no crop), the same float operations in the same
  order as before. Its result is handed to the model in the memory layout the first version
  produced (channels last, as a permuted uint8 batch gives; the registry returns it contiguous):
  here both layouts train the same weights, but a convolution may pick another kernel for another
  layout on another CPU, and the demo's figures were made with this one.
* A config of another size (the tests' 64-px ``test-vit-micro``) needs a resize. The registry's is
  CLIP's (bicubic to the short side, then a centre crop); pretraining has always resized to the
  square with an antialiased bilinear filter on [0, 1] pixels before normalising, and keeps that
  (:func:`frame_batch`, with the registry's mean and std), rather than change those weights.

Outputs (beside each other in ``out_dir``): an ordinary open_clip state dict ``<name>.pt`` that
``open_clip.create_model_and_transforms(config, pretrained=<path>)`` loads, a sidecar
``<name>.json`` and the decoded frame cache ``frames-<datahash>.npy`` (uint8, N x 224 x 224 x 3)
with its labels. A second call with the same key (config, seed, settings, train data) returns the
existing checkpoint without training; the key is computed as it always was, so the checkpoints of
existing work directories (``<work>/encoders/<config>-<key>.pt``) are reused.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import UnknownOptionError
from core.fileio import atomic_write
from synthetic.frames import content_hash, frame_cache
from synthetic.world import CORNER_PHRASES, detail_visible, frame_caption

if TYPE_CHECKING:
    import torch

DEFAULT_CONFIG = "synth-vit-b32-tiny"
DEFAULT_FRAMES = (2, 6, 10, 14, 18, 22)    # 3 frames in each half of a 24-frame video
PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class PretrainSettings:
    """What a pretraining run does besides its config and seed (every field is in the checkpoint key)."""

    steps: int = 240
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 30
    p_detail: float = 0.1
    init_logit_scale: float = 30.0
    frame_indices: tuple[int, ...] = DEFAULT_FRAMES
    cluster_size: int = 0    # 0: random batches; k > 0: batches of k-frame gist clusters (BatchSampler)

    def __post_init__(self) -> None:
        for f in fields(self):   # options from the command line come as JSON values: bring each to its type
            value = getattr(self, f.name)
            kind = {"int": int, "float": float}.get(str(f.type))
            value = tuple(int(i) for i in value) if f.name == "frame_indices" else kind(value)
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None,
                     base: PretrainSettings | None = None) -> PretrainSettings:
        """``base`` (default: the defaults) with the named ``options`` (``pretrain-encoder --option
        key=value``) replaced; a key that is not a setting raises ``UnknownOptionError`` (a ``TypeError``)
        naming the settings."""
        values = asdict(base or cls())
        unknown = sorted(set(options or {}) - set(values))
        if unknown:
            raise UnknownOptionError(f"unknown pretraining option(s) {', '.join(unknown)} (the settings: "
                                     f"{', '.join(values)}; also config, seed, workers, progress, threads)")
        return cls(**{**values, **dict(options or {})})

    def key_options(self) -> dict[str, Any]:
        """The settings as the checkpoint key hashes them (``cluster_size`` only when set, so the keys
        of the random-batch runs made before it existed stay valid)."""
        out = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
               "weight_decay": self.weight_decay, "warmup": self.warmup, "p_detail": self.p_detail,
               "init_logit_scale": self.init_logit_scale, "frame_indices": list(self.frame_indices)}
        if self.cluster_size:
            out["cluster_size"] = self.cluster_size
        return out


# --------------------------------------------------------------------------- helpers


def model_config(config: str = DEFAULT_CONFIG) -> dict:
    """The open_clip config dict of ``config`` (ours in ``pipeline/model_configs/``, registered by the
    encoder registry, or one of open_clip's own)."""
    import open_clip

    from pipeline.encoders import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(config)
    if cfg is None:
        raise ValueError(f"unknown open_clip model config {config!r}")
    return cfg


def frame_batch(encoder, frames_uint8: np.ndarray) -> "torch.Tensor":
    """Cached frames (N, H, W, 3) uint8 -> the model's input (N, 3, S, S) for ``encoder`` (the
    registry's encoder of the config being trained): its own preprocessing when the frames already
    have its size, else the bilinear square resize pretraining always used (module docstring)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(frames_uint8))
    size = encoder.image_size
    if tuple(x.shape[1:3]) == (size, size):
        return encoder.preprocess(x).contiguous(memory_format=torch.channels_last)
    x = x.permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _frame_key(label: dict) -> tuple[tuple, tuple | None]:
    main = (label["main_color"], label["main_shape"], label["bg_color"])
    detail = ((label["detail_color"], label["detail_shape"], label["corner"])
              if detail_visible(label, label["t"]) else None)
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


def checkpoint_key(config: str, cfg: dict, seed: int, options: dict, data_sha: str) -> str:
    """Hash identifying one pretraining run (``options``: :meth:`PretrainSettings.key_options`)."""
    return content_hash({"v": PRETRAIN_VERSION, "config": config, "cfg": cfg, "seed": seed,
                         "options": options, "data": data_sha})[:12]


# --------------------------------------------------------------------------- pretraining


def pretrain_encoder(manifest, out_path: str | Path, config: str = DEFAULT_CONFIG, seed: int = 0,
                     settings: PretrainSettings | None = None, workers: int = 2, progress: bool = True,
                     threads: int | None = None, **options: Any) -> Path:
    """Train ``config`` contrastively on frame-caption pairs of the TRAIN split of a synthetic
    ``manifest``; return the path of the open_clip checkpoint (``.pt`` state dict).

    ``settings`` (default :class:`PretrainSettings`) with any setting given by name in ``options``
    (``steps=400``) replaced. ``out_path`` is a directory (the checkpoint is named after its key) or
    a ``.pt`` file path. A checkpoint with the same key (config, seed, settings, train data) is
    reused as is.
    """
    import torch

    run = PretrainSettings.from_options(options, settings)
    train = manifest.split("train")   # never look at val/test videos
    if train.videos.num_rows == 0:
        raise ValueError("pretrain_encoder needs a manifest with train videos")
    out_path = Path(out_path)
    out_dir = out_path.parent if out_path.suffix == ".pt" else out_path
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model_config(config)
    options = run.key_options()
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

    from pipeline.encoders import load_encoder

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    t_start = time.time()
    try:
        frames, labels = frame_cache(train, out_dir, run.frame_indices, workers, progress)
        t_data = time.time() - t_start
        # the registry's encoder of the config: its preprocessing and tokenizer (random weights of
        # its own, made under a forked RNG: the seeded initialisation below is not disturbed)
        encoder = load_encoder(config)
        torch.manual_seed(seed)
        model = open_clip.create_model(config, pretrained=None)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(run.init_logit_scale))
        model.train()
        lr, steps, warmup = run.lr, run.steps, run.warmup
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
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
        sampler = BatchSampler(labels, run.batch_size, run.cluster_size, rng)
        bar = tqdm(range(steps), desc=f"pretrain {config}", unit="step", disable=not progress)
        for step in bar:
            idx = sampler.next()
            texts, cap_keys = [], []
            for i in idx:
                lab = labels[i]
                text = frame_caption(lab, lab["t"], rng, run.p_detail)
                texts.append(text)
                fmain, fdet = keys[i]
                # did the caption name the detail? (its corner words appear only then)
                named = fdet is not None and any(w in text for w in CORNER_PHRASES[lab["corner"]])
                cap_keys.append((fmain, fdet if named else None))
            pos = torch.from_numpy(positives([keys[i] for i in idx], cap_keys))
            x = frame_batch(encoder, frames[idx])
            tok = encoder.tokenize(texts)
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
                "created_by": "synthetic.pretrain.pretrain_encoder"}
        sidecar.write_text(json.dumps(info, indent=2) + "\n")
        return ckpt
    finally:
        torch.set_num_threads(prev_threads)


def pretrained_spec(manifest, out_dir: str | Path, options: Mapping[str, Any] | None = None) -> str:
    """The encoder spec (``<config>:<checkpoint>``, what ``load_encoder`` and ``extract --encoder``
    take) of the world's encoder pretrained on ``manifest``'s train split with ``options`` (the
    keyword arguments of :func:`pretrain_encoder`), checkpoint in ``out_dir`` (reused when there)."""
    opts = dict(options or {})
    ckpt = pretrain_encoder(manifest.split("train"), out_dir, **opts)
    return f"{opts.get('config', DEFAULT_CONFIG)}:{ckpt}"
