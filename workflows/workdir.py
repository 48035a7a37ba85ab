"""Where work products go: one directory (``--work-dir``, ``WORK=``; ``work/`` by default) with

    <work>/synthetic/                  the synthetic benchmark (videos + manifest/)
    <work>/<dataset>/manifest/         a real dataset's manifest
    <work>/encoders/                   the synthetic world's pretrained encoder; qformer-<hash>/, Q-Formers
                                       pre-trained by `pretrain-qformer` (BLIP-2 checkpoint directories)
    <work>/stores/<dataset>-<encoder>.zarr   token stores
    <work>/staged/<fingerprint[:16]>/<split>/  local memory-mapped copies of store splits
    <work>/runs/stage1-<head>/, <work>/runs/stage2-<head>/   training runs (run.json, checkpoints)
    <work>/reports/<name>/             metric tables (JSON + text), ranked lists, probes.json
    <work>/external/<split>/           an imported external stage one (`import-stage-one`)
    <work>/indexes/<store>-<split>-<stage one>-<kind>/   FAISS indexes (`index build`)
    <work>/compare-stage-one/          `compare-stage-one`: its runs and table
    <work>/ablation/                   `ablation`: its runs (runs/), re-rankings and tables

Every path below the work dir comes from a ``WorkDir`` method.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import UsageError
from core.split import StagedSplit
from pipeline.store import CacheStore

DEFAULT_WORK = "work"
COPY_TOKENS_ENV = "CROSSTVR_COPY_TOKENS"  # "1": stage copies of the token arrays even where they can be read in place
STAGE_ONE_ARRAYS = ("frame_emb", "text")
STAGE_TWO_ARRAYS = ("frame_emb", "tokens", "text")


def slug(text: str) -> str:
    """``text`` made safe for a file name (at most 80 characters)."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return keep.strip("-")[:80]


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class WorkDir:
    """The conventions of one work directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike = DEFAULT_WORK, stage_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stage_root = Path(stage_dir) if stage_dir else self.root / "staged"

    # -- data ---------------------------------------------------------------------------------
    def manifest_dir(self, dataset: str) -> Path:
        return self.root / dataset / "manifest"

    @property
    def synthetic_dir(self) -> Path:
        return self.root / "synthetic"

    @property
    def encoders_dir(self) -> Path:
        return self.root / "encoders"

    def store_path(self, dataset: str, encoder_short_name: str) -> Path:
        return self.stores_dir() / f"{dataset}-{slug(encoder_short_name)}.zarr"

    def default_store(self) -> str:
        """The demo's store: the single ``<work>/stores/synthetic-*.zarr``."""
        found = self.synthetic_stores()
        if len(found) != 1:
            raise UsageError(
                f"give --store: found {len(found)} synthetic stores under {self.stores_dir()} "
                f"({', '.join(p.name for p in found) or 'none; run `python cli.py demo` first'})")
        return str(found[0])

    def synthetic_stores(self) -> list[Path]:
        return sorted(self.stores_dir().glob("synthetic-*.zarr"))

    # -- staging ------------------------------------------------------------------------------
    def stage(self, store_url: str, split: str, arrays: tuple[str, ...] = STAGE_ONE_ARRAYS) -> StagedSplit:
        """``split`` of the store at ``store_url`` staged under this work dir (idempotent): a local
        uncompressed store's token arrays read in place, unless ``--copy-tokens`` (``COPY_TOKENS_ENV``)."""
        store = CacheStore.open(store_url)
        return store.stage(split, self.stage_root / store.fingerprint[:16], arrays=arrays,
                           copy=os.environ.get(COPY_TOKENS_ENV) == "1")

    def stage_train_val(self, store_url: str, arrays: tuple[str, ...] = STAGE_ONE_ARRAYS
                        ) -> tuple[StagedSplit, StagedSplit | None]:
        """The train split and, when the store has one, the val split (model selection)."""
        train = self.stage(store_url, "train", arrays)
        val = self.stage(store_url, "val", arrays) if has_split(store_url, "val") else None
        return train, val

    # -- runs and reports ---------------------------------------------------------------------
    def run_dir(self, stage: int, head: str) -> Path:
        return self.runs_dir() / f"stage{stage}-{head}"

    def stage_one_runs(self) -> list[Path]:
        return sorted(self.runs_dir().glob("stage1-*/stage_one.pt"))

    def runs_dir(self) -> Path:
        return self.root / "runs"

    def reports_dir(self, name: str) -> Path:
        return self.root / "reports" / name

    def external_dir(self, split: str) -> Path:
        return self.root / "external" / split

    def index_dir(self, name: str) -> Path:
        return self.root / "indexes" / name

    def qformer_dir(self, key: str) -> Path:
        return self.encoders_dir / f"qformer-{key}"

    def stores_dir(self) -> Path:
        return self.root / "stores"

    def experiment_dir(self, name: str) -> Path:
        """``compare-stage-one`` or ``ablation``: an experiment's runs and tables."""
        return self.root / name


def has_split(store_url: str, split: str) -> bool:
    """Whether the store has videos of ``split``."""
    return split in CacheStore.open(store_url).splits()
