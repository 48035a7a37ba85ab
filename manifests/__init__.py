"""Dataset manifests: one Parquet format for every dataset, plus a registry of builders.

Builders are named as ``"module:function"`` strings and imported only when used, so importing
this package touches no file and loads no dataset module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .schema import (
    CAPTION_COLUMNS,
    SCHEMA_VERSION,
    SPLITS,
    VIDEO_COLUMNS,
    VIDEO_EXTENSIONS,
    Manifest,
    ManifestError,
    paragraph,
)

__all__ = [
    "CAPTION_COLUMNS", "DATASETS", "DatasetSpec", "Manifest", "ManifestError", "SCHEMA_VERSION",
    "SPLITS", "UnknownDatasetError", "VIDEO_COLUMNS", "VIDEO_EXTENSIONS", "build_manifest",
    "get_dataset", "paragraph",
]


class UnknownDatasetError(ValueError):
    """The dataset name is not registered."""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``builder`` is ``"module:function"``, imported lazily.

    ``frames`` and ``text_tokens``: the papers' sampling for it (12 frames and 32 text tokens; 64
    and 64 for paragraph-to-video datasets). ``files``: the official annotation files a default
    build reads from ``<data root>/<name>/`` (docs/DATASETS.md has each dataset's layout), the
    videos going to ``<data root>/<name>/videos/``.
    """

    name: str
    builder: str
    description: str
    options: dict[str, str] = field(default_factory=dict)  # option name -> help text
    frames: int = 12
    text_tokens: int = 32
    files: tuple[str, ...] = ()

    def load(self) -> Callable[..., Manifest]:
        """Import and return the builder function."""
        module_name, _, func_name = self.builder.partition(":")
        module = importlib.import_module(module_name)
        try:
            return getattr(module, func_name)
        except AttributeError:
            raise ImportError(f"dataset {self.name!r}: {module_name} has no "
                              f"function {func_name!r}") from None

    def build(self, **options) -> Manifest:
        """Run the builder with the given options."""
        return self.load()(**options)


_REAL_COMMON = {
    "annotations_dir": "directory holding the official annotation files (default names)",
    "video_dir": "directory of the video files (absent files are recorded, not fatal)",
    "out_dir": "write the manifest there when given",
    "require_videos": "fail if any video file is missing (default False)",
}

DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        "synthetic", "synthetic.manifest:build",
        "Deterministic synthetic world (rendered mp4 videos + captions) from a seed.",
        {"out_dir": "output directory (videos + manifest)",
         "seed": "random seed", "sizes": "numbers of groups / videos per split (see module)"}),
    "msrvtt": DatasetSpec(
        "msrvtt", "manifests.msrvtt:build",
        "MSR-VTT: train 9k (or 7k) with all 20 captions per video, test 1k-A (JSFusion, one "
        "caption per video); or the official 'full' split.",
        {**_REAL_COMMON, "data_json": "MSRVTT_data.json", "train_csv": "MSRVTT_train.9k.csv",
         "test_csv": "MSRVTT_JSFUSION_test.csv",
         "train_list": "'9k' (default), '7k' or 'full' (official 6513/497/2990 split)",
         "splits": "'all' (default) or 'test' (the 1k-A test alone: needs only the JSFusion csv)"},
        files=("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv")),
    "msvd": DatasetSpec(
        "msvd", "manifests.msvd:build",
        "MSVD: 1200 / 100 / 670 videos, all captions per video.",
        {**_REAL_COMMON, "train_list": "train_list.txt", "val_list": "val_list.txt",
         "test_list": "test_list.txt",
         "captions": "captions JSON {id: [captions]} or raw-captions.pkl {id: [tokens]}"},
        files=("train_list.txt", "val_list.txt", "test_list.txt", "captions_msvd.json")),
    "vatex": DatasetSpec(
        "vatex", "manifests.vatex:build",
        "VATEX: 10 English captions per clip; clip times parsed from the videoID.",
        {**_REAL_COMMON, "train_json": "vatex_training_v1.0.json",
         "val_json": "vatex_validation_v1.0.json",
         "split_lists": "optional {split: id list file} (e.g. the HGR 25991/1500/1500 split)",
         "video_layout": "'auto', 'clip' (<videoID>.mp4) or 'full' (<ytid>.mp4 + start/end)"},
        files=("vatex_training_v1.0.json", "vatex_validation_v1.0.json")),
    "lsmdc": DatasetSpec(
        "lsmdc", "manifests.lsmdc:build",
        "LSMDC 2016: one sentence per clip; clips at <video_dir>/<movie>/<clip_id>.avi.",
        {**_REAL_COMMON, "train_csv": "LSMDC16_annos_training.csv",
         "val_csv": "LSMDC16_annos_val.csv",
         "test_csv": "LSMDC16_challenge_1000_publictect.csv"},
        files=("LSMDC16_annos_training.csv", "LSMDC16_annos_val.csv", "LSMDC16_challenge_1000_publictect.csv")),
    "didemo": DatasetSpec(
        "didemo", "manifests.didemo:build",
        "DiDeMo paragraph-to-video: all descriptions of a video joined into one caption.",
        {**_REAL_COMMON, "train_json": "train_data.json", "val_json": "val_data.json",
         "test_json": "test_data.json"},
        frames=64, text_tokens=64, files=("train_data.json", "val_data.json", "test_data.json")),
    "activitynet": DatasetSpec(
        "activitynet", "manifests.activitynet:build",
        "ActivityNet Captions paragraph-to-video; val_1 is the test split by convention.",
        {**_REAL_COMMON, "train_json": "train.json", "test_json": "val_1.json",
         "val_json": "optional extra file for a val split (default none)"},
        frames=64, text_tokens=64, files=("train.json", "val_1.json")),
}


def get_dataset(name: str) -> DatasetSpec:
    """The registered spec for ``name``."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: "
                                  f"{', '.join(sorted(DATASETS))}") from None


def build_manifest(name: str, **options) -> Manifest:
    """Build the manifest of dataset ``name`` (see ``DATASETS[name].options``)."""
    return get_dataset(name).build(**options)
