"""Stage-one checkpoints: ``stage_one.pt`` = the head's config and weights, the fingerprint of the
store and the identity of the encoder it was trained on, the training arguments and history."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import StoreMismatchError
from heads.registry import create_head
from heads.stage_one.models import StageOneHead
from heads.training.common import check_identity, load_checkpoint

CHECKPOINT_NAME = "stage_one.pt"
HISTORY_NAME = "history.json"
REQUIRED = {"config", "state_dict", "store_fingerprint", "encoder_identity"}


@dataclass
class StageOneCheckpoint:
    """A loaded stage-one checkpoint: the head (eval mode) and its metadata."""

    head: StageOneHead
    config: dict
    store_fingerprint: str
    encoder_identity: dict
    train_args: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    path: Path | None = None


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
    p, ckpt = load_checkpoint(path, CHECKPOINT_NAME, "stage-one", REQUIRED, map_location=map_location)
    check_identity(expect_encoder_identity, ckpt["encoder_identity"], f"checkpoint {p}")
    if expect_fingerprint is not None and expect_fingerprint != ckpt["store_fingerprint"]:
        raise StoreMismatchError(f"checkpoint {p} was trained on store {ckpt['store_fingerprint'][:12]}, "
                                 f"expected {expect_fingerprint[:12]}")
    config = dict(ckpt["config"])
    head = create_head(**config, stage=1)
    head.load_state_dict(ckpt["state_dict"])
    head.eval()
    return StageOneCheckpoint(head=head, config=config, store_fingerprint=ckpt["store_fingerprint"],
                              encoder_identity=ckpt["encoder_identity"], train_args=ckpt.get("train_args", {}),
                              history=ckpt.get("history", {}), path=p)
