"""Data preparation for the commands: manifests from annotation files (or the generator), the
synthetic world's frozen encoder, and extraction into token stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from core.errors import UsageError
from manifests import Manifest, build_manifest, get_dataset
from core.options import FailureBudget
from workflows.sources import ManifestSource
from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

DEFAULT_DATA_ROOT = "data"
# the method's two frozen encoders (CrossTVR Base and Large), extracted in one decoding pass
REAL_ENCODERS = ("clip-b32", "eva-g14")


def data_dirs(dataset: str, data_root: str | Path | None = None, annotations: str | None = None,
              videos: str | None = None) -> tuple[Path, Path]:
    """Where ``dataset``'s annotation files and videos are: the given directories, else
    ``<data_root>/<dataset>/`` and ``<data_root>/<dataset>/videos/`` (docs/DATASETS.md). A missing
    directory, or a default layout lacking every annotation file it should hold, is a
    ``UsageError`` naming what is missing."""
    spec = get_dataset(dataset)
    base = Path(data_root or DEFAULT_DATA_ROOT) / dataset
    ann = Path(annotations) if annotations else base
    vid = Path(videos) if videos else (base / "videos" if annotations is None else ann)
    if not ann.is_dir():
        raise UsageError(f"{ann}: no annotation directory for {dataset!r} (give --annotations, or put "
                         f"{', '.join(spec.files) or 'its annotation files'} there; docs/DATASETS.md)")
    if annotations is None and spec.files and not any((ann / f).is_file() for f in spec.files):
        raise UsageError(f"{ann}: none of {dataset!r}'s annotation files is there (expected "
                         f"{', '.join(spec.files)}; docs/DATASETS.md)")
    if not vid.is_dir():
        raise UsageError(f"{vid}: no video directory for {dataset!r} (give --videos, or put the videos "
                         f"there; docs/DATASETS.md)")
    return ann, vid


def make_manifest(work: WorkDir, dataset: str, annotations: str | None = None, videos: str | None = None,
                  options: dict | None = None, data_root: str | Path | None = None) -> Manifest:
    """Build ``dataset``'s manifest under the work dir: the synthetic benchmark from its generator
    (``options``: sizes, seed), a real dataset from its official annotation files (``annotations``
    / ``videos``, or the layout under ``data_root``)."""
    get_dataset(dataset)  # clear error for an unknown name
    kwargs = dict(options or {})
    if dataset == "synthetic":
        kwargs.setdefault("out_dir", work.synthetic_dir)
    else:
        ann, vid = data_dirs(dataset, data_root, annotations, videos)
        kwargs["annotations_dir"], kwargs["video_dir"] = str(ann), str(vid)
        kwargs["out_dir"] = work.manifest_dir(dataset)
    return build_manifest(dataset, **kwargs)


def missing_videos(manifest: Manifest) -> int:
    """How many of the manifest's videos were not found on disk when it was built."""
    return int(manifest.source.get("missing_videos", 0) or 0)


def load_manifest(work: WorkDir, source: ManifestSource) -> Manifest:
    """The manifest ``source`` names: an existing manifest directory, or its dataset's manifest built now."""
    if source.manifest:
        return Manifest.read(source.manifest)
    if source.dataset is None:
        raise UsageError("give --dataset NAME or --manifest DIR")
    return make_manifest(work, source.dataset, source.annotations, source.videos, source.options, source.data_root)


def synthetic_encoder(work: WorkDir, manifest: Manifest, options: dict | None = None) -> str:
    """Pretrain (once; reused afterwards) the synthetic world's frozen encoder; returns its spec."""
    from synthetic.pretrain import pretrained_spec

    return pretrained_spec(manifest, work.encoders_dir, options)


def synthetic_qformer(work: WorkDir, manifest: Manifest, store: str, options: dict | None = None,
                      device: str = "cpu", progress: bool = True, num_threads: int | None = None) -> Path:
    """Pre-train (once; reused afterwards) the synthetic world's Q-Former on ``store``'s train split,
    the stand-in for BLIP-2's (``synthetic.qformer``); returns its BLIP-2 checkpoint directory, the
    ``--init-from`` and ``--tokenizer`` of the demo's re-ranker. ``options``: ``QFormerSettings``
    fields."""
    from synthetic.qformer import QFormerSettings, world_qformer
    from synthetic.world import manifest_attrs

    train = work.stage(store, "train", STAGE_TWO_ARRAYS)
    return world_qformer(train, caption_texts(work, train), manifest_attrs(manifest), work.qformer_dir,
                         QFormerSettings.from_options(options), device=device, progress=progress,
                         num_threads=num_threads)


def default_encoders(work: WorkDir, manifest: Manifest, encoders: Sequence[str] = ()) -> list[str]:
    """The encoders to extract with: those given, else the synthetic world's own for the synthetic
    benchmark, else the method's two (CLIP ViT-B/32 and EVA-CLIP ViT-g/14) in one decoding pass."""
    if encoders:
        return list(encoders)
    if manifest.dataset == "synthetic":
        return [synthetic_encoder(work, manifest)]
    return list(REAL_ENCODERS)


def extract_config(manifest: Manifest, options: dict) -> Any:
    """The extraction config of ``options`` (unset ones: None), the sampling defaulting to the papers'
    choice for the dataset (12 frames and 32 text tokens; 64 and 64 for paragraph-to-video ones)."""
    from manifests import DATASETS
    from pipeline.config import ExtractConfig

    spec = DATASETS.get(manifest.dataset)
    given = {k: v for k, v in options.items() if v is not None}
    if spec is not None:
        given.setdefault("num_frames", spec.frames)
        given.setdefault("max_text_tokens", spec.text_tokens)
    return ExtractConfig(**given)


def extract_stores(work: WorkDir, manifest: Manifest, encoders: Sequence[str], stores: Sequence[str] = (),
                   config: Any = None, device: str = "cpu", **options: Any) -> tuple[Any, list[str]]:
    """Extract ``manifest`` with every encoder (decoded once) into one store each: ``stores``, or
    ``<work>/stores/<dataset>-<encoder>.zarr``. Returns (``ExtractReport``, store paths)."""
    from pipeline.encoders import parse_encoder, with_token_layer
    from pipeline.extraction.job import extract

    layer = options.get("token_layer", getattr(config, "token_layer", None))
    # under torchrun rank 0 alone prepares a default encoder (the synthetic world's pretraining)
    names = on_rank_zero(device, lambda: default_encoders(work, manifest, encoders))
    specs = [with_token_layer(parse_encoder(e), layer) for e in names]
    if stores and len(stores) != len(specs):
        raise UsageError(f"got {len(stores)} --store for {len(specs)} --encoder; give one per encoder or none")
    paths = list(stores) if stores else [str(work.store_path(manifest.dataset, s.short_name())) for s in specs]
    from core.torchrun import torchrun_ranks

    if torchrun_ranks()[1] > 1:
        return distributed_extract(manifest, specs, paths, config, device, **options), paths
    report = extract(manifest, specs, paths, config, device=device, **options)
    return report, paths


def on_rank_zero(device: str, fn: Any) -> Any:
    """``fn()``; under torchrun run by rank 0 alone (building a manifest, pretraining an encoder) and
    its (picklable) result given to every rank, the others waiting however long it takes
    (``heads.training.distributed.rank_zero_first``: not in an NCCL collective)."""
    from core.torchrun import torchrun_ranks

    if torchrun_ranks()[1] == 1:
        return fn()
    from heads.training.distributed import context, rank_zero_first

    return rank_zero_first(context(device), fn)


def load_manifest_once(work: WorkDir, device: str, source: ManifestSource) -> Manifest:
    """``load_manifest(work, source)``, built by rank 0 alone under torchrun and read by the others."""
    from core.torchrun import torchrun_ranks

    if torchrun_ranks()[1] == 1:
        return load_manifest(work, source)
    return Manifest.read(on_rank_zero(device, lambda: str(load_manifest(work, source).root)))


def distributed_extract(manifest: Manifest, specs: Sequence[Any], paths: Sequence[str], config: Any = None,
                        device: str = "cpu", **options: Any) -> Any:
    """``extract`` under ``torchrun``: rank ``r`` of ``W`` takes the shards ``i % W == r`` (the
    mechanism of ``extract(part=(r, W))``, a static split; with ``part=(K, N)`` (``--part K/N``) the
    shards ``i % (N W) == K + N r``, so the ranks share part K of N) on its own device (``cuda:LOCAL_RANK``);
    every rank writes its whole shards into the shared stores. Rank 0 creates the stores before the
    others open them; after a barrier rank 0 alone consolidates the metadata and writes the failure
    lists, and every rank returns the merged report. A rank that dies leaves its shards not done: a
    re-run (with any number of processes) does only them. Every wait here (for rank 0's stores, for
    the slowest rank's shards, for the consolidation) is on the control group, so ranks finishing
    hours apart are no NCCL timeout (``heads.training.distributed``)."""
    from heads.training.distributed import context, rank_zero_first
    from pipeline.encoders import load_encoder, with_token_layer
    from pipeline.extraction.job import extract
    from pipeline.extraction.report import ExtractReport, finalize_stores

    d = context(device)
    dev = d.device(device)
    layer = options.pop("token_layer", getattr(config, "token_layer", None))
    k, n = options.pop("part", None) or (0, 1)  # --part K/N too: the ranks split part K/N among them
    encs = [load_encoder(with_token_layer(s, layer), device=dev) for s in specs]
    none = max(manifest.videos.num_rows, manifest.captions.num_rows) + 1
    # rank 0 alone creates (or checks, or grows) the stores: a part that holds no shard
    created = rank_zero_first(d, lambda: extract(manifest, encs, paths, config, device=dev, part=(none - 1, none),
                                                 progress=False, finalize=False, **options))
    mine = extract(manifest, encs, paths, config, device=dev, part=(k + n * d.rank, n * d.world_size),
                   finalize=False, progress=d.is_main, **options)
    merged = ExtractReport.merged(d.gather_object(mine.to_dict()))
    merged.appended.update(created.appended)  # the stores rank 0 grew before the ranks started

    def finalize() -> dict:
        finalize_stores(paths, merged)
        return merged.totals

    merged.totals = rank_zero_first(d, finalize)
    d.barrier()
    return merged


def check_failures(report: Any, max_failed: FailureBudget | None = None) -> None:
    """Refuse (``ExtractionError``) an extraction whose stores hold more failed videos than
    ``max_failed`` (``--max-failed``; default none) allows, naming where the failure lists are."""
    from core.errors import ExtractionError

    allowed = (max_failed or FailureBudget()).allowed(report.videos)
    bad = {p: t for p, t in report.totals.items() if t["failed"] > allowed}
    if bad:
        lists = ", ".join(t["failure_list"] or p for p, t in bad.items())
        worst = max(t["failed"] for t in bad.values())
        raise ExtractionError(f"{worst} of {report.videos} videos failed (tolerated: {allowed}); reasons in "
                              f"{lists}. Fix or replace those files and run again with --retry-failed, or "
                              f"tolerate them with --max-failed")


def probe_synthetic_encoders(work: WorkDir, manifest: Manifest, encoders: Sequence[str], steps: int,
                             out: str | Path | None) -> tuple[dict, Path]:
    """Linear probes of the synthetic world's encoders (default: the pretrained one and the same config
    with random weights); returns the results and the JSON file written."""
    from synthetic.probes import probe_encoders, write_probes

    if manifest.dataset != "synthetic":
        raise UsageError(f"probe-encoder needs the synthetic benchmark's manifest, got {manifest.dataset!r}")
    specs = list(encoders)
    if not specs:
        pretrained = synthetic_encoder(work, manifest)
        specs = [pretrained, pretrained.split(":", 1)[0]]
    results = probe_encoders(manifest, specs, work.encoders_dir, steps=steps)
    return results, write_probes(results, out or work.reports_dir("probes.json"))


def caption_texts(work: WorkDir | None, split: Any, manifest: str | Path | None = None) -> list[str]:
    """The text of ``split``'s captions in row order, from the manifest its store was built from:
    ``manifest`` when given, else ``<work>/<dataset>/manifest``; refused (``UsageError``) when that
    manifest is not the store's (its hash differs, also after joining captions into paragraphs, as
    paragraph-to-video stores do) or lacks a caption."""
    attrs = getattr(split, "store_attrs", None) or {}
    want, dataset = attrs.get("manifest_sha256"), attrs.get("dataset")
    directory = Path(manifest) if manifest else (work.manifest_dir(dataset) if work and dataset else None)
    if directory is None or not (directory / "meta.json").is_file():
        raise UsageError(f"the head reads caption text: give --manifest DIR, the manifest store split "
                         f"{split.split!r} was built from (none at {directory})")
    found = Manifest.read(directory)
    if want and found.sha256() != want:
        joined = found.as_paragraphs()
        if joined.sha256() != want:
            raise UsageError(f"{directory}: not the manifest the store was built from (hash "
                             f"{found.sha256()[:12]} vs the store's {want[:12]}); give --manifest DIR")
        found = joined
    text = dict(zip(found.captions.column("caption_id").to_pylist(), found.captions.column("text").to_pylist()))
    missing = [c for c in split.caption_ids if c not in text]
    if missing:
        raise UsageError(f"{directory}: {len(missing)} captions of split {split.split!r} are not in the manifest "
                         f"(first: {missing[0]!r})")
    return [text[c] for c in split.caption_ids]


def add_store_thumbnails(store: str, manifest: Manifest, workers: int = 2, timeout: float = 60.0,
                         progress: bool = True) -> Any:
    """Give the store made from ``manifest`` the thumbnails it lacks
    (``pipeline.extraction.thumbnail_backfill.add_thumbnails``: decodes the videos again, encodes nothing).
    Returns the ``ThumbnailReport``."""
    from pipeline.extraction.thumbnail_backfill import add_thumbnails

    return add_thumbnails(store, manifest, workers=workers, timeout=timeout, progress=progress)
