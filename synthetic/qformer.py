"""The synthetic world's own pre-trained Q-Former: BLIP-2's first stage on the world's train frames.

Users of the method start the re-ranker from BLIP-2's Q-Former (``train-head --init-from``), which
was pre-trained on images and their captions before it ever saw a video. The synthetic world has no
such checkpoint, so it makes one the same way, once, and reuses it like its CLIP: a Q-Former with
BLIP-2's layout (``QFORMER_SHAPE``, at the demo head's size) trained by image-text contrast and
matching (``heads.stage_two.qformer_pretrain``) on the frozen encoder's tokens of single train-split
frames. Each frame is paired with a caption of its whole video (``captions="video"``, the default,
as ``pretrain-qformer`` does for any store), or with a caption of what that frame shows
(``captions="frame"``: ``synthetic.world.frame_caption``, the detail named at ``p_detail``), as an
image caption describes its image. The defaults are the measured choice (docs/benchmarks/qformer.md):
video captions teach the words of motion and timing that a single frame's caption cannot name; the
head needs a start whose matching (ITM) half has begun to learn (~500 steps of 64 at lr 1e-3, ~1,000
at lr 5e-4); past that, the demo's time is worth more in the head's own contrastive phase on whole
videos than in more frames here (1,000 steps at lr 1e-3 then the head's 1,200 contrastive steps beat
2,000 steps at lr 5e-4 without them by 4.8 / 6.0 test R@1 points, at about the same cost); and one
ITM negative per positive instead of BLIP-2's two costs a sixth to a quarter less per step and gave
the head as much (fifth round), while fewer steps, or a higher learning rate to turn the ITM sooner,
did not.

The result is a BLIP-2 checkpoint directory (weights + the word tokenizer of the train captions),
keyed by everything it was trained on: the store's identity, the settings, the layout and the
captions' text. Settings live in :class:`QFormerSettings`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from core.errors import UnknownOptionError

DEFAULT_P_DETAIL = 0.5
CAPTION_KINDS = ("frame", "video")


@dataclass(frozen=True)
class QFormerSettings:
    """How the world's Q-Former is pre-trained (every field is part of its key)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    text_len: int = 32
    captions: str = "video"
    p_detail: float = DEFAULT_P_DETAIL
    itm_negatives: int = 1  # BLIP-2's is 2 (BLIP2_ITM_NEGATIVES); 1: docs/benchmarks/qformer.md, fifth round

    def __post_init__(self) -> None:
        for f in fields(self):  # options from the command line come as JSON values: bring each to its type
            kind = {"int": int, "float": float, "str": str}.get(str(f.type))
            object.__setattr__(self, f.name, kind(getattr(self, f.name)))
        if self.captions not in CAPTION_KINDS:
            raise ValueError(f"captions must be one of {', '.join(CAPTION_KINDS)}, got {self.captions!r}")
        from heads.stage_two.qformer_pretrain import check_itm_negatives

        check_itm_negatives(self.itm_negatives)  # a bad value fails with the settings, not at the first step

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> QFormerSettings:
        """The defaults with the named ``options`` replaced; an unknown key raises
        ``UnknownOptionError`` naming the settings."""
        values = asdict(cls())
        unknown = sorted(set(options or {}) - set(values))
        if unknown:
            raise UnknownOptionError(f"unknown Q-Former option(s) {', '.join(unknown)} (the settings: "
                                     f"{', '.join(values)})")
        return cls(**{**values, **dict(options or {})})


def frame_captions(split: Any, attrs: Mapping[str, Mapping[str, Any]], p_detail: float, seed: int = 0
                   ) -> list[list[str]]:
    """A caption of every frame of ``split``'s videos (``[video row][frame]``), from the manifest's
    attributes (``attrs``: ``{video_id: attrs}``) and each frame's time in the store: what the frame
    shows (``synthetic.world.frame_caption``). Deterministic in ``seed`` and the video's row."""
    from synthetic import world as W

    duration = W.NUM_FRAMES / W.FPS
    times = np.asarray(split.frame_time, dtype=np.float64)
    mask = np.asarray(split.frame_mask, dtype=bool)
    out: list[list[str]] = []
    for row, vid in enumerate(split.video_ids):
        a = attrs.get(vid)
        if a is None:
            raise KeyError(f"video {vid!r} of split {split.split!r} is not in the synthetic manifest")
        rng = np.random.default_rng([int(seed), row, 0xF7A])
        out.append([W.frame_caption(a, min(float(times[row, t]) / duration, 0.999), rng, p_detail)
                    if mask[row, t] else "" for t in range(times.shape[1])])
    return out


def caption_digest(texts: Sequence[str]) -> str:
    """What identifies a list of caption texts in a key."""
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:16]


def world_qformer(train: Any, video_captions: Sequence[str], attrs: Mapping[str, Mapping[str, Any]],
                  out_dir: Callable[[str], Path], settings: QFormerSettings = QFormerSettings(), device: str = "cpu",
                  num_threads: int | None = None, progress: bool = True) -> Path:
    """Pre-train (once; a finished run with the same key is reused) the world's Q-Former on ``train``
    (the store's staged train split with its tokens; ``video_captions`` aligned with its caption rows)
    and return its BLIP-2 checkpoint directory, ``out_dir(key)`` (``WorkDir.qformer_dir``)."""
    from heads.stage_two.qformer_pretrain import QFORMER_SHAPE, FrameTexts, itm_negatives_key, pretrain_qformer
    from heads.stage_two.tokenizer import build_word_tokenizer, with_caption_ids

    s = settings
    per_frame = frame_captions(train, attrs, s.p_detail, s.seed) if s.captions == "frame" else None
    flat = [c for frames in per_frame or [] for c in frames]
    tokenizer = build_word_tokenizer(list(video_captions) + [c for c in flat if c])
    train = with_caption_ids(train, tokenizer, list(video_captions), s.text_len)
    frame_texts = None
    if per_frame is not None:
        ids, mask = tokenizer.encode([c or "." for c in flat], s.text_len)
        shape = (len(per_frame), len(per_frame[0]), -1)
        frame_texts = FrameTexts(np.asarray(ids).reshape(shape), np.asarray(mask, dtype=bool).reshape(shape))
    opts = {**QFORMER_SHAPE, "vocab_size": tokenizer.vocab_size}
    settings_key = {k: v for k, v in asdict(s).items() if k != "itm_negatives"}  # keyed as the runs key it:
    settings_key.update(itm_negatives_key(s.itm_negatives))  # only when not BLIP-2's, so older keys stay valid
    key = json.dumps({"store": train.store_fingerprint, "layout": opts, "settings": settings_key,
                      "video_captions": caption_digest(video_captions), "frame_captions": caption_digest(flat)},
                     sort_keys=True)
    out = out_dir(hashlib.sha256(key.encode()).hexdigest()[:12])
    return pretrain_qformer(train, out, opts, tokenizer, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                            seed=s.seed, device=device, num_threads=num_threads, progress=progress,
                            frame_texts=frame_texts, itm_negatives=s.itm_negatives)
