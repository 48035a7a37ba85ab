"""Stage-two checkpoints: ``stage_two.pt`` = the head's config and weights, the store fingerprint,
the encoder identity, the identity of the stage one it was trained with, the training arguments and
history; and the identity of a stage-one checkpoint file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.fileio import jsonable, sha256_file
from heads.stage_one.checkpoint import CHECKPOINT_NAME as STAGE_ONE_NAME
from heads.stage_two.tokenizer import CaptionTokenizer
from heads.training.common import Checkpoint, checkpoint_file, load_head_checkpoint

CHECKPOINT_NAME = "stage_two.pt"
KIND = "stage_two"


@dataclass(kw_only=True)
class StageTwoCheckpoint(Checkpoint):
    """A loaded stage-two checkpoint: the head (eval mode), its metadata and the identity of the
    stage one it was trained with."""

    stage_one_identity: dict = field(default_factory=dict)
    tokenizer: dict | None = None  # the caption tokenizer's files, for a head reading caption ids
    text_len: int = 32
    init: dict | None = None  # the BLIP-2 checkpoint it was initialised from: kind, sha256, what was loaded

    def caption_tokenizer(self) -> CaptionTokenizer | None:
        """The tokenizer of a head reading caption ids (``None`` for one reading the store's text tokens)."""
        return None if self.tokenizer is None else CaptionTokenizer.from_state(self.tokenizer)


def stage_one_identity(stage_one_ckpt_path: str | Path) -> dict:
    """``{"path_name", "sha256", "config", "store_fingerprint"}`` of a stage-one checkpoint file.

    ``path_name`` is ``<run dir>/<file>`` (no absolute path), ``sha256`` the hash of the file.
    """
    p = checkpoint_file(stage_one_ckpt_path, STAGE_ONE_NAME, "stage-one")
    raw = torch.load(p, map_location="cpu", weights_only=True)
    return {"path_name": f"{p.parent.name}/{p.name}", "sha256": sha256_file(p),
            "config": jsonable(raw.get("config", {})), "store_fingerprint": str(raw.get("store_fingerprint", ""))}


def load_stage_two(path: str | Path, expect_encoder_identity: dict | None = None,
                   map_location: str = "cpu") -> StageTwoCheckpoint:
    """Load ``stage_two.pt`` (a file or the run directory holding it).

    Raises ``StoreMismatchError`` naming the differences when ``expect_encoder_identity`` (the
    identity of the store the head is about to be used on) differs from the encoder identity of
    the store it was trained on: the head's input projections only make sense for that encoder.
    """
    return load_head_checkpoint(path, CHECKPOINT_NAME, 2, StageTwoCheckpoint, expect_encoder_identity, kind=KIND,
                                extra=("stage_one_identity",),
                                optional={"tokenizer": None, "text_len": 32, "init": None}, map_location=map_location)
