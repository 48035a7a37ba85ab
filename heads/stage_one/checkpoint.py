"""Stage-one checkpoints: ``stage_one.pt`` = the head's config and weights, the fingerprint of the
store and the identity of the encoder it was trained on, the training arguments and history."""

from __future__ import annotations

from pathlib import Path

from core.errors import StoreMismatchError
from heads.training.common import Checkpoint, load_head_checkpoint

CHECKPOINT_NAME = "stage_one.pt"
HISTORY_NAME = "history.json"


class StageOneCheckpoint(Checkpoint):
    """A loaded stage-one checkpoint: the head (eval mode) and its metadata."""


def is_stage_one_checkpoint(path: str | Path) -> bool:
    """True for a ``.pt`` file or a run directory holding ``stage_one.pt``."""
    p = Path(path)
    return (p.is_file() and p.suffix == ".pt") or (p.is_dir() and (p / CHECKPOINT_NAME).is_file())


def load_stage_one(path: str | Path, expect_encoder_identity: dict | None = None,
                   expect_fingerprint: str | None = None, map_location: str = "cpu") -> StageOneCheckpoint:
    """Load ``stage_one.pt`` (a file or the run directory holding it).

    Raises ``StoreMismatchError`` when ``expect_encoder_identity`` differs from the identity of the
    encoder that made the training store (or ``expect_fingerprint`` from its fingerprint).
    """
    ckpt = load_head_checkpoint(path, CHECKPOINT_NAME, 1, StageOneCheckpoint, expect_encoder_identity,
                                map_location=map_location)
    if expect_fingerprint is not None and expect_fingerprint != ckpt.store_fingerprint:
        raise StoreMismatchError(f"checkpoint {ckpt.path} was trained on store {ckpt.store_fingerprint[:12]}, "
                                 f"expected {expect_fingerprint[:12]}")
    return ckpt
