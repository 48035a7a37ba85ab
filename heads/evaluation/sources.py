"""Where scores come from: a stage one (our checkpoint, an imported external similarity, or the
untrained meanP baseline) turned into a split's similarity matrix, and a stage-two checkpoint
turned into a head, each refused on a store made by another encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from core.errors import ConfigError
from core.split import Split
from heads.evaluation.external import is_external, load_external
from heads.evaluation.similarity import similarity, untrained_baseline
from heads.stage_one.checkpoint import is_stage_one_checkpoint, load_stage_one
from heads.stage_two.checkpoint import load_stage_two
from heads.stage_two.tokenizer import with_caption_ids


@dataclass
class StageOneScores:
    """A stage one's (C, V) similarity of a split, its name in reports, where it came from, and
    the head itself when it is one of ours (QB-Norm needs it to encode a querybank)."""

    sim: np.ndarray
    name: str
    info: dict = field(default_factory=dict)
    head: Any = None


def stage_one_scores(path: str | Path | None, split: Split, device: str = "cpu") -> StageOneScores:
    """Similarities of ``split`` under the stage one at ``path``: a stage-one checkpoint (its encoder
    identity must match the split's store, else ``StoreMismatchError``), an imported external
    similarity directory (``heads.evaluation.external``), or ``None`` for the untrained meanP
    baseline (zero-shot CLIP on the cached embeddings)."""
    if path is None:
        head = untrained_baseline(int(split.frame_emb.shape[-1]))
        return StageOneScores(similarity(head, split, device=device), "meanP (untrained)",
                              {"kind": "untrained meanP"}, head)
    if is_stage_one_checkpoint(path) and not is_external(path):
        ckpt = load_stage_one(path, expect_encoder_identity=split.encoder_identity)
        sim = similarity(ckpt.head, split, device=device)
        info = {"kind": "checkpoint", "path": str(path), "head": ckpt.config.get("name"),
                "store_fingerprint": ckpt.store_fingerprint}
        return _checked(StageOneScores(sim, Path(ckpt.path).parent.name, info, ckpt.head), path, split)
    if not Path(path).exists():
        raise FileNotFoundError(f"--stage-one {path}: no such checkpoint or external similarity directory")
    ext = load_external(path, split)
    info = {"kind": "external", "path": str(path), "identity": ext.identity}
    return _checked(StageOneScores(np.asarray(ext.similarity(), dtype=np.float32), f"external {ext.name}", info),
                    path, split)


def _checked(scores: StageOneScores, path: str | Path, split: Split) -> StageOneScores:
    expected = (len(split.caption_ids), len(split.video_ids))
    if scores.sim.shape != expected:
        raise ValueError(f"stage one {path} gives a {scores.sim.shape} similarity matrix, but split "
                         f"{split.split!r} has {expected[0]} captions x {expected[1]} videos")
    return scores


def stage_one_similarity(path: str | Path, split: Split, device: str = "cpu") -> tuple[np.ndarray, dict]:
    """(C, V) stage-one similarities of ``split`` and a description of where they came from."""
    scores = stage_one_scores(path, split, device)
    return scores.sim, scores.info


def load_head(path: str | Path, split: Split,
              captions: Sequence[str] | Callable[[], Sequence[str]] | None = None) -> tuple[Any, dict, Split]:
    """The stage-two head of checkpoint ``path``, a description of it and ``split`` as the head reads
    it; refused (``StoreMismatchError``) when it was trained on another encoder's tokens than
    ``split``'s store. A head reading caption ids (initialised from BLIP-2) needs ``captions``, the
    text of ``split``'s captions in row order (or a callable returning them, called only then): they
    go through the tokenizer its checkpoint carries."""
    ckpt = load_stage_two(path, expect_encoder_identity=split.encoder_identity)
    info = {"path": str(path), "config": ckpt.config, "store_fingerprint": ckpt.store_fingerprint,
            "stage_one_identity": ckpt.stage_one_identity}
    if ckpt.init:
        info["init"] = {k: v for k, v in ckpt.init.items() if k != "kept"}
    return ckpt.head, info, head_split(ckpt, split, captions)


def head_split(ckpt: Any, split: Split, captions: Sequence[str] | Callable[[], Sequence[str]] | None = None) -> Split:
    """``split`` as the head of the loaded stage-two checkpoint ``ckpt`` reads it: as it is, or for a
    head reading caption ids, with ``captions`` (texts in row order, or a callable returning them)
    through the tokenizer the checkpoint carries (``ConfigError`` without them)."""
    tokenizer = ckpt.caption_tokenizer()
    if tokenizer is None:
        return split
    if captions is None:
        raise ConfigError(f"the head {ckpt.path} reads caption text through its own tokenizer: the captions' text "
                          f"of split {split.split!r} is needed (from the manifest the store was built from)")
    texts = captions() if callable(captions) else captions
    return with_caption_ids(split, tokenizer, texts, ckpt.text_len)
