"""What both trainers share: split guards, identity checks, optimiser and schedule, torch threads,
best-epoch tracking, eval-mode blocks and checkpoint files (atomic writes, typed loading).

The rules: training and model selection never see a test split (``check_splits``); a checkpoint
records the identity of the encoder whose features it was trained on and is refused on any other
(``check_identity``); AdamW over the head's own parameter groups (``Head.optim_groups``) with a
linear warm-up then cosine decay to zero (``make_optimizer``); the epoch with the best validation
score is kept (``BestState``); every checkpoint and resume state is written whole or not at all
(``save``).
"""

from __future__ import annotations


import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from core.errors import CheckpointError, ForbiddenSplitError, StoreMismatchError
from core.fileio import atomic_write, json_diff
from core.split import Split, check_same_store
from core.identity import without_extraction
from heads.registry import STAGE_NAMES, create_head

FORBIDDEN_SPLITS = frozenset({"test"})
ADAMW = {"betas": (0.9, 0.98), "eps": 1e-6}


def check_not_test(split: Split, role: str) -> None:
    """Refuse a split whose name is a test split, for ``role`` ("train" / "val")."""
    name = str(getattr(split, "split", "")).lower()
    if name in FORBIDDEN_SPLITS or name.startswith("test"):
        raise ForbiddenSplitError(
            f"the {role} split is named {split.split!r}: the trainer never trains or selects models "
            f"on a test split; evaluate test after training")


def check_splits(train: Split, val: Split | None) -> None:
    """Neither split is a test split, and both come from one store."""
    check_not_test(train, "train")
    if val is not None:
        check_not_test(val, "val")
        check_same_store(train, val)


def check_identity(expected: dict | None, found: dict, what: str) -> None:
    """Refuse ``what`` (a checkpoint, a head) whose encoder identity ``found`` differs from the
    ``expected`` identity of the store it is about to be used on, naming every difference (how a store
    computed its features, ``core.identity.EXTRACTION_KEY``, is not compared)."""
    if expected is None:
        return
    diff = json_diff(without_extraction(expected), without_extraction(found))
    if diff:
        raise StoreMismatchError(f"{what} was trained on features of a different encoder than this store: "
                                 + "; ".join(diff))


def warmup_steps(warmup: float, total: int) -> int:
    """``warmup`` < 1 is a fraction of the ``total`` steps, otherwise a number of steps."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Any, lr: float, weight_decay: float, total: int,
                   warmup: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``model.optim_groups(weight_decay)`` and its warm-up + cosine schedule."""
    optimizer = torch.optim.AdamW(model.optim_groups(weight_decay), lr=lr, **ADAMW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    return optimizer, scheduler


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use ``num_threads`` torch threads inside the block, then restore. Default: ``OMP_NUM_THREADS``
    when it is set (several jobs sharing a machine each ask for their share), else every core."""
    previous = torch.get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    default = int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(int(num_threads or default))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class BestState:
    """The epoch with the highest validation score so far and a copy of its weights."""

    def __init__(self, score: float = -math.inf, epoch: int | None = None, state: dict | None = None) -> None:
        self.score, self.epoch, self.state = float(score), epoch, state

    def update(self, score: float, epoch: int, model: torch.nn.Module) -> bool:
        """Keep ``model``'s weights if ``score`` beats the best so far; returns whether it did."""
        if score > self.score:
            self.score, self.epoch, self.state = float(score), epoch, cpu_state(model)
            return True
        return False


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode without gradients inside the block; its training flag restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def forward_precision(precision: str, device: str) -> Any:
    """The autocast context of a training forward pass: ``auto`` = bf16 on CUDA and fp32 elsewhere,
    ``bf16`` = bf16 autocast on any device, ``fp32`` (``off`` in runs saved before) = no autocast."""
    kind = torch.device(device).type
    if precision in ("fp32", "off") or (precision == "auto" and kind != "cuda"):
        return nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16)


def save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a torn file (written beside, then renamed)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


@dataclass(kw_only=True)
class Checkpoint:
    """A loaded checkpoint: the head (eval mode), its config, the store and encoder it was trained
    on, its training arguments and history, and the file it came from."""

    head: Any
    config: dict
    store_fingerprint: str
    encoder_identity: dict
    train_args: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    path: Path | None = None


def checkpoint_file(path: str | os.PathLike, name: str, what: str) -> Path:
    """``path`` itself or ``path/name`` for a run directory; ``FileNotFoundError`` naming it."""
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise FileNotFoundError(f"no {what} checkpoint at {p}")
    return p


def load_checkpoint(path: str | os.PathLike, name: str, what: str, required: set[str],
                    kind: str | None = None, map_location: str = "cpu") -> tuple[Path, dict]:
    """Read checkpoint ``path`` (or ``path/name``), refusing (``CheckpointError``) a file that lacks
    the ``required`` keys or, when ``kind`` is given, whose ``"kind"`` differs."""
    p = checkpoint_file(path, name, what)
    raw = torch.load(p, map_location=map_location, weights_only=True)
    missing = set(required) - set(raw) if isinstance(raw, dict) else set(required)
    if missing or (kind is not None and raw.get("kind") != kind):
        raise CheckpointError(f"{p} is not a {what} checkpoint (missing {sorted(missing) or ['kind']})")
    return p, raw


def load_head_checkpoint(path: str | os.PathLike, name: str, stage: int, cls: type,
                         expect_encoder_identity: dict | None = None, kind: str | None = None,
                         extra: tuple[str, ...] = (), optional: dict[str, Any] | None = None,
                         map_location: str = "cpu") -> Any:
    """Load a head checkpoint of ``stage`` into ``cls`` (a ``Checkpoint``): its head rebuilt from the
    saved config (``heads.registry``), in eval mode; ``extra`` names further required keys, kept as
    fields of ``cls``; ``optional`` maps further keys to their value when absent. Refused (``StoreMismatchError``) when trained on another encoder than
    ``expect_encoder_identity``."""
    what = STAGE_NAMES[stage]
    required = {"config", "state_dict", "store_fingerprint", "encoder_identity", *extra}
    p, ckpt = load_checkpoint(path, name, what, required, kind=kind, map_location=map_location)
    check_identity(expect_encoder_identity, ckpt["encoder_identity"],
                   f"checkpoint {p}" if stage == 1 else f"{what} head {p}")
    config = dict(ckpt["config"])
    head = create_head(**config, stage=stage)
    head.load_state_dict(ckpt["state_dict"])
    head.eval()
    return cls(head=head, config=config, store_fingerprint=ckpt["store_fingerprint"],
               encoder_identity=ckpt["encoder_identity"], train_args=ckpt.get("train_args", {}),
               history=ckpt.get("history", {}), path=p, **{k: ckpt[k] for k in extra},
               **{k: ckpt.get(k, v) for k, v in (optional or {}).items()})
