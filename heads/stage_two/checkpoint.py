"""Stage-two checkpoints: ``stage_two.pt`` = the head's config and weights, the store fingerprint,
the encoder identity, the identity of the stage one it was trained with, the training arguments and
history; and the identity of a stage-one checkpoint file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.fileio import jsonable, sha256_file
from heads.registry import create_head
from heads.stage_one.checkpoint import CHECKPOINT_NAME as STAGE_ONE_NAME
from heads.stage_two.models import StageTwoHead
from heads.training.common import check_identity, checkpoint_file, load_checkpoint

CHECKPOINT_NAME = "stage_two.pt"
KIND = "stage_two"
REQUIRED = {"config", "state_dict", "store_fingerprint", "encoder_identity", "stage_one_identity"}


@dataclass
class StageTwoCheckpoint:
    """A loaded stage-two checkpoint: the head (eval mode) and its metadata."""

    head: StageTwoHead
    config: dict
    store_fingerprint: str
    encoder_identity: dict
    stage_one_identity: dict
    train_args: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    path: Path | None = None


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
    p, ckpt = load_checkpoint(path, CHECKPOINT_NAME, "stage-two", REQUIRED, kind=KIND, map_location=map_location)
    check_identity(expect_encoder_identity, ckpt["encoder_identity"], f"stage-two head {p}")
    config = dict(ckpt["config"])
    head = create_head(**config, stage=2)
    head.load_state_dict(ckpt["state_dict"])
    head.eval()
    return StageTwoCheckpoint(head=head, config=config, store_fingerprint=ckpt["store_fingerprint"],
                              encoder_identity=ckpt["encoder_identity"],
                              stage_one_identity=ckpt["stage_one_identity"],
                              train_args=ckpt.get("train_args", {}), history=ckpt.get("history", {}), path=p)
