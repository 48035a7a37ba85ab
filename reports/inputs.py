"""What a report is made from, read from files: a re-ranking's output directory, training run
directories, the store's thumbnails and the manifest's captions and group labels.

Every missing or unreadable input that the report needs is a ``UsageError`` naming the file and the
option that pointed to it; inputs the report can do without (thumbnails, the manifest, a run's
training log) become notes in the report instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CrossTVRError, UsageError
from core.training_log import LOG_NAME, read_training_log
from core.urls import redact_url, redact_urls

__all__ = ["RerankOutputs", "RunCurves", "Thumbnails", "ManifestInfo", "load_rerank_dir", "load_run",
           "load_thumbnails", "load_manifest_info", "guess_manifest_dir"]

RANKED_COLUMNS = ("query_id", "rank", "candidate_id", "stage_one_rank", "stage_one_score", "head_score",
                  "final_score", "positive")
RANKS_COLUMNS = ("direction", "query_id", "stage_one_rank", "reranked_rank")


@dataclass
class RerankOutputs:
    """One re-ranking's outputs (``heads.evaluation.rerank.write_outputs``)."""

    path: Path
    metrics: dict                  # {"stage one": {"t2v": {...}, "v2t": {...}}, "re-ranked": {...}}
    coverage: dict | None          # the split's coverage ("split" entry of metrics.json)
    run: dict                      # run.json: split, k, store, identities, timings
    ranked: dict[str, dict[str, list]] = field(default_factory=dict)     # direction -> columns
    positive_ranks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # direction -> columns

    @property
    def k(self) -> int:
        return int(self.run.get("k") or max((max(c["rank"]) for c in self.ranked.values() if c["rank"]), default=0))

    @property
    def split(self) -> str:
        return str(self.run.get("split") or (self.coverage or {}).get("split") or "?")


def _json(path: Path, option: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise UsageError(f"{option}: {path} is not valid JSON ({exc})") from exc


def _parquet(path: Path, columns: tuple[str, ...], option: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        raise UsageError(f"{option}: cannot read {path} as Parquet ({exc})") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise UsageError(f"{option}: {path} lacks the columns {', '.join(missing)} (not written by `rerank`?)")
    return {c: table.column(c).to_pylist() for c in table.column_names}


def load_rerank_dir(path: str | os.PathLike, option: str = "--rerank-dir") -> RerankOutputs:
    """Read a re-ranking's output directory: ``metrics.json``, ``run.json`` and ``ranked_t2v.parquet``
    are needed, ``ranked_v2t.parquet`` and ``positive_ranks.parquet`` are used when present."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{option}: {root} is not a directory (give the output directory of `rerank`)")
    for name in ("metrics.json", "run.json", "ranked_t2v.parquet"):
        if not (root / name).is_file():
            raise UsageError(f"{option}: {root} has no {name} (not an output directory of `rerank`?)")
    metrics = _json(root / "metrics.json", option)
    if not isinstance(metrics, dict) or not {"stage one", "re-ranked"} <= set(metrics):
        raise UsageError(f"{option}: {root / 'metrics.json'} has no 'stage one' and 're-ranked' metrics")
    coverage = metrics.pop("split", None)
    run = _json(root / "run.json", option)
    out = RerankOutputs(path=root, metrics=metrics, coverage=coverage, run=run if isinstance(run, dict) else {})
    for d in ("t2v", "v2t"):
        f = root / f"ranked_{d}.parquet"
        if f.is_file():
            out.ranked[d] = _parquet(f, RANKED_COLUMNS, option)
    ranks = root / "positive_ranks.parquet"
    if ranks.is_file():
        cols = _parquet(ranks, RANKS_COLUMNS, option)
        direction = np.asarray(cols["direction"], dtype=object)
        for d in ("t2v", "v2t"):
            sel = direction == d
            if sel.any():
                out.positive_ranks[d] = {"query_id": np.asarray(cols["query_id"], dtype=object)[sel],
                                         "stage_one_rank": np.asarray(cols["stage_one_rank"], np.int64)[sel],
                                         "reranked_rank": np.asarray(cols["reranked_rank"], np.int64)[sel]}
    return out


# ------------------------------------------------------------------------------------------ training runs
@dataclass
class RunCurves:
    """A training run's curves: per phase, steps with loss and lr, and validations with their score."""

    name: str
    path: Path
    source: str                                   # "training_log.jsonl" or "history.json (per epoch)"
    # phase -> {"step", "loss", "lr", "val_step", "val_score", "val_metrics"}
    phases: dict[str, dict[str, list]] = field(default_factory=dict)
    selected: str | None = None                   # what the validation score is ("val rsum", ...)


def _empty() -> dict[str, list]:
    return {"step": [], "loss": [], "lr": [], "val_step": [], "val_score": [], "val_metrics": []}


def load_run(path: str | os.PathLike, option: str = "--run") -> RunCurves:
    """A run directory's curves (a checkpoint file stands for its directory): ``training_log.jsonl``,
    else the per-epoch ``history.json`` of runs trained before training logs existed."""
    p = Path(path)
    run_dir = p.parent if p.is_file() else p
    if not run_dir.is_dir():
        raise UsageError(f"{option}: {p} is not a run directory")
    name = run_dir.name
    phases: dict[str, dict[str, list]] = {}
    if (run_dir / LOG_NAME).is_file():
        for r in read_training_log(run_dir):
            ph = phases.setdefault(str(r.get("phase")), _empty())
            if r.get("kind") == "step":
                ph["step"].append(r.get("step"))
                ph["loss"].append(r.get("loss"))
                ph["lr"].append(r.get("lr"))
            elif r.get("kind") == "val":
                ph["val_step"].append(r.get("step"))
                ph["val_score"].append(r.get("score"))
                ph["val_metrics"].append(r.get("metrics"))
        selected = _selected(run_dir)
        return RunCurves(name, run_dir, LOG_NAME, phases, selected)
    hist = run_dir / "history.json"
    if not hist.is_file():
        raise UsageError(f"{option}: {run_dir} has neither {LOG_NAME} nor history.json (not a training run directory?)")
    h = _json(hist, option)
    stage_two = "itc" in h or "total_steps" in h
    if stage_two and h.get("itc"):
        ph = phases.setdefault("itc", _empty())
        for r in h["itc"]:
            ph["step"].append(r.get("step"))
            ph["loss"].append(r.get("loss"))
            ph["lr"].append(None)
    ph = phases.setdefault("itm" if stage_two else "stage_one", _empty())
    for r in h.get("epochs", []):
        ph["step"].append(r.get("step"))
        ph["loss"].append(r.get("loss"))
        ph["lr"].append(r.get("lr"))
        if r.get("val") is not None:
            ph["val_step"].append(r.get("step"))
            val = r["val"] or {}  # stage two: what the epoch was selected on (T2V alone in older runs)
            score = val.get("selection_R@1", val.get("reranked_R@1")) if stage_two else r.get("val_rsum")
            ph["val_score"].append(score)
            ph["val_metrics"].append(r.get("val"))
    return RunCurves(name, run_dir, "history.json (per epoch: trained before training logs existed)", phases,
                     h.get("selected_on"))


def _selected(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "history.json").read_text()).get("selected_on")
    except (OSError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------ thumbnails
@dataclass
class Thumbnails:
    """JPEGs of the videos a report shows, by video id; ``note`` says why there are none."""

    jpegs: dict[str, list[bytes]] = field(default_factory=dict)
    note: str | None = None


def load_thumbnails(store_url: str | None, video_ids: list[str], manifest_hint: str = "MANIFEST_DIR",
                    option: str = "--store") -> Thumbnails:
    """The thumbnails of ``video_ids`` from the store at ``store_url``; a store without them (made before
    thumbnails existed), or none at all, gives a note with the command that adds them. Notes name the store
    without credentials or signed query (``core.urls.redact_url``)."""
    from pipeline.store import CacheStore

    if not store_url:
        return Thumbnails(note="no store given (and the re-ranking's run.json names none): no thumbnails")
    shown = redact_url(store_url)
    try:
        store = CacheStore.open(store_url)
    except (CrossTVRError, OSError) as exc:
        reason = redact_urls(str(exc).replace(str(store_url), shown))
        return Thumbnails(note=f"the store {shown} cannot be opened ({reason}); give it with {option}: "
                               f"no thumbnails")
    add = f"python cli.py cache thumbnails --store {shown} --manifest {manifest_hint}"
    if not store.has_thumbnails:
        return Thumbnails(note=f"the store {shown} holds no thumbnails (it was made before thumbnails existed); "
                               f"where its videos are at hand, `{add}` adds them")
    row_of = {v: i for i, v in enumerate(store.video_ids)}
    rows = [row_of[v] for v in video_ids if v in row_of]
    found = dict(zip([v for v in video_ids if v in row_of], store.thumbnails(rows)))
    missing = len(store.thumbnail_shards()) < store.num_shards
    note = None
    if missing:
        note = (f"the store {shown} lacks the thumbnails of some shards; `{add}` adds them")
    return Thumbnails(jpegs={v: j for v, j in found.items() if j}, note=note)


# ------------------------------------------------------------------------------------------ manifest
@dataclass
class ManifestInfo:
    """What a report takes from the manifest: caption texts, each caption's video, video rows by id."""

    path: Path
    texts: dict[str, str]
    caption_video: dict[str, str]
    videos: dict[str, dict]

    @property
    def has_groups(self) -> bool:
        return any(r.get("group_id") not in (None, "") for r in self.videos.values())


def guess_manifest_dir(store_url: str | None) -> Path | None:
    """Where a work dir keeps the manifest of a local store ``<work>/stores/<name>.zarr``:
    ``<work>/<dataset>/manifest`` (the store's dataset), when it exists."""
    from pipeline.store import CacheStore, local_path

    local = local_path(store_url) if store_url else None
    if local is None or not local.is_dir():
        return None
    try:
        dataset = CacheStore.open(store_url).attrs.get("dataset")
    except (CrossTVRError, OSError):
        return None
    guess = local.parent.parent / str(dataset) / "manifest"
    return guess if (guess / "videos.parquet").is_file() else None


def load_manifest_info(path: str | os.PathLike, option: str = "--manifest",
                       store_sha256: str | None = None) -> ManifestInfo:
    """Read the manifest at ``path`` (``UsageError`` naming it when it is not one, or not the store's)."""
    from manifests import Manifest, ManifestError

    try:
        m = Manifest.read(path, verify=False)
    except ManifestError as exc:
        raise UsageError(f"{option}: {exc}") from exc
    if store_sha256 and m.sha256() != store_sha256:
        raise UsageError(f"{option}: {path} is not the manifest of the re-ranked store (sha256 {m.sha256()[:12]}, "
                         f"store: {store_sha256[:12]})")
    caps = m.captions
    videos = {r["video_id"]: r for r in m.videos.to_pylist()}
    return ManifestInfo(path=Path(path), texts=dict(zip(caps.column("caption_id").to_pylist(),
                                                       caps.column("text").to_pylist())),
                        caption_video=dict(zip(caps.column("caption_id").to_pylist(),
                                               caps.column("video_id").to_pylist())),
                        videos=videos)
