"""Training curves: the one writer every trainer uses for its machine-readable log, and its reader
(torch-free, so reports read it without the heads).

Every training run appends to ``<run dir>/training_log.jsonl`` (JSON lines, one object per line):

* ``{"phase", "kind": "step", "step", "loss", "lr", ...}`` after every optimisation step (``lr``: the
  learning rate that step used; further keys per phase, e.g. ``acc``, ``hard_share``);
* ``{"phase", "kind": "val", "step", "epoch", "metrics": {...}, "score": ...}`` after every
  validation (``score``: the number model selection compares).

``phase`` names the loop: ``stage_one``, ``itc`` (stage two's contrastive phase) or ``itm`` (stage
two's matching epochs); ``step`` counts that phase's steps from 1. A run that starts again from step
``s`` (a resumed stage two, a fresh stage one) first drops the records of its phase after ``s``, so
the file always describes the weights the run directory holds and never counts a step twice; the
records of other phases stay. The log only observes: it reads numbers the trainer has already
computed and never touches random state, so a run's weights are the same with or without it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from core.fileio import atomic_write, jsonable

__all__ = ["LOG_NAME", "PHASES", "TrainingLog", "read_training_log"]

LOG_NAME = "training_log.jsonl"
PHASES = ("stage_one", "itc", "itm")


def _finite(x: Any) -> Any:
    """JSON has no NaN / infinity: such values are written as ``null``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


class TrainingLog:
    """Appends one phase's records to ``run_dir/training_log.jsonl`` (see the module docstring).

    ``start_step``: the step the phase starts from (0: from scratch); records of this phase after it
    are dropped first. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, run_dir: str | os.PathLike, phase: str, start_step: int = 0) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        self.path = Path(run_dir) / LOG_NAME
        self.phase = phase
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            kept = [json.dumps(r, sort_keys=True) for r in read_training_log(self.path)
                    if r.get("phase") != phase or int(r.get("step") or 0) <= int(start_step)]
            text = "".join(line + "\n" for line in kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        self._fh = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self._fh.write(json.dumps(_finite(jsonable({"phase": self.phase, **record})), sort_keys=True) + "\n")
        self._fh.flush()

    def step(self, step: int, loss: float, lr: float, **extra: Any) -> None:
        """One optimisation step: its loss and the learning rate it used (``extra``: more numbers)."""
        self._write({"kind": "step", "step": int(step), "loss": float(loss), "lr": float(lr), **extra})

    def validation(self, step: int, metrics: dict, score: float | None = None, epoch: int | None = None) -> None:
        """One validation after ``step`` steps: its metrics and the model-selection score."""
        self._write({"kind": "val", "step": int(step), "epoch": epoch, "metrics": metrics,
                     "score": None if score is None else float(score)})

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a crash mid-write: the step is done again on resume
                continue
            if isinstance(record, dict):
                yield record


def read_training_log(path: str | os.PathLike) -> list[dict]:
    """The records of a training log (a ``training_log.jsonl`` file or the run directory holding it),
    in file order; ``FileNotFoundError`` naming the file when there is none."""
    p = Path(path)
    if p.is_dir():
        p = p / LOG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no training log at {p} (runs trained before training logs existed have none; "
                                f"train the run again to get its curves)")
    return list(_lines(p))
