"""Data preparation for the commands: manifests from annotation files (or the generator), the
synthetic world's frozen encoder, and extraction into token stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from core.errors import UsageError
from manifests import Manifest, build_manifest, get_dataset
from workflows.workdir import WorkDir

SYNTH_CONFIG = "synth-vit-b32-tiny"


def make_manifest(work: WorkDir, dataset: str, annotations: str | None = None, videos: str | None = None,
                  options: dict | None = None) -> Manifest:
    """Build ``dataset``'s manifest under the work dir: the synthetic benchmark from its generator
    (``options``: sizes, seed), a real dataset from its official annotation files."""
    get_dataset(dataset)  # clear error for an unknown name
    kwargs = dict(options or {})
    if dataset == "synthetic":
        kwargs.setdefault("out_dir", work.synthetic_dir)
    else:
        if annotations is None:
            raise UsageError(f"dataset {dataset!r} needs --annotations DIR (the official annotation files)")
        kwargs["annotations_dir"] = annotations
        kwargs["video_dir"] = videos if videos is not None else annotations
        kwargs["out_dir"] = work.manifest_dir(dataset)
    return build_manifest(dataset, **kwargs)


def load_manifest(work: WorkDir, dataset: str | None, manifest: str | None, annotations: str | None = None,
                  videos: str | None = None, options: dict | None = None) -> Manifest:
    """An existing manifest directory, or ``dataset``'s manifest built now."""
    if manifest:
        return Manifest.read(manifest)
    if dataset is None:
        raise UsageError("give --dataset NAME or --manifest DIR")
    return make_manifest(work, dataset, annotations, videos, options)


def synthetic_encoder(work: WorkDir, manifest: Manifest, options: dict | None = None) -> str:
    """Pretrain (once; reused afterwards) the synthetic world's frozen encoder; returns its spec."""
    from pipeline.pretrain import pretrain_encoder

    ckpt = pretrain_encoder(manifest.split("train"), work.encoders_dir, **(options or {}))
    return f"{SYNTH_CONFIG}:{ckpt}"


def default_encoders(work: WorkDir, manifest: Manifest, encoders: Sequence[str] = ()) -> list[str]:
    """The encoders to extract with: those given, else the synthetic world's own for the synthetic
    benchmark, else CLIP ViT-B/32."""
    if encoders:
        return list(encoders)
    if manifest.dataset == "synthetic":
        return [synthetic_encoder(work, manifest)]
    return ["clip-b32"]


def extract_stores(work: WorkDir, manifest: Manifest, encoders: Sequence[str], stores: Sequence[str] = (),
                   device: str = "cpu", **options: Any) -> tuple[Any, list[str]]:
    """Extract ``manifest`` with every encoder (decoded once) into one store each: ``stores``, or
    ``<work>/stores/<dataset>-<encoder>.zarr``. Returns (``ExtractReport``, store paths)."""
    from pipeline.encoders import parse_encoder
    from pipeline.extract import extract

    specs = [parse_encoder(e) for e in default_encoders(work, manifest, encoders)]
    if stores and len(stores) != len(specs):
        raise UsageError(f"got {len(stores)} --store for {len(specs)} --encoder; give one per encoder or none")
    paths = list(stores) if stores else [str(work.store_path(manifest.dataset, s.short_name())) for s in specs]
    report = extract(manifest, specs, paths, device=device, **options)
    return report, paths


def probe_synthetic_encoders(work: WorkDir, manifest: Manifest, encoders: Sequence[str], steps: int,
                             out: str | Path | None) -> tuple[dict, Path]:
    """Linear probes of the synthetic world's encoders (default: the pretrained one and the same config
    with random weights); returns the results and the JSON file written."""
    from pipeline.probes import probe_encoder, write_probes

    if manifest.dataset != "synthetic":
        raise UsageError(f"probe-encoder needs the synthetic benchmark's manifest, got {manifest.dataset!r}")
    specs = list(encoders)
    if not specs:
        pretrained = synthetic_encoder(work, manifest)
        specs = [pretrained, pretrained.split(":", 1)[0]]
    names: dict[str, str] = {}
    for s in specs:
        label = "random" if ":" not in s else ("pretrained" if s.startswith(f"{SYNTH_CONFIG}:") else s)
        names[label if label not in names else s] = s
    results = {label: probe_encoder(manifest, s, work.encoders_dir, steps=steps) for label, s in names.items()}
    return results, write_probes(results, out or work.root / "reports" / "probes.json")
