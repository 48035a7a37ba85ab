"""Command line: the one place that wires manifests -> pipeline -> heads together.

Every command only parses options, prints messages and calls a stage; the work lives in
`manifests/`, `pipeline/` and `heads/`. Heavy imports happen inside the commands so that
`python cli.py --help` is instant.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

DEFAULT_WORK = "work"
SYNTH_ENCODER = "synth-b32-tiny"


def _work(work_dir: str) -> Path:
    path = Path(work_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parse_options(pairs: tuple[str, ...]) -> dict:
    """`key=value` pairs -> kwargs; values parsed as JSON when possible (ints, floats, bools)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="--option")
        key, value = pair.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return keep.strip("-")[:80]


# --------------------------------------------------------------------------- manifests


def _manifest_dir(work: Path, dataset: str) -> Path:
    return work / dataset / "manifest"


def _build_manifest(dataset: str, work: Path, annotations: str | None, videos: str | None,
                    options: dict):
    from manifests import build_manifest, get_dataset

    get_dataset(dataset)  # clear error for an unknown name
    kwargs = dict(options)
    if dataset == "synthetic":
        kwargs.setdefault("out_dir", work / "synthetic")
    else:
        if annotations is None:
            raise click.UsageError(f"dataset {dataset!r} needs --annotations DIR (the official annotation files)")
        kwargs["annotations_dir"] = annotations
        kwargs["video_dir"] = videos if videos is not None else annotations
        kwargs["out_dir"] = _manifest_dir(work, dataset)
    return build_manifest(dataset, **kwargs)


def _load_or_build_manifest(dataset: str | None, manifest: str | None, work: Path,
                            annotations: str | None, videos: str | None, options: dict):
    from manifests import Manifest

    if manifest:
        return Manifest.read(manifest)
    if dataset is None:
        raise click.UsageError("give --dataset NAME or --manifest DIR")
    return _build_manifest(dataset, work, annotations, videos, options)


@click.group()
def main() -> None:
    """Frozen-encoder text-video retrieval: feature cache, stage-one heads, re-ranking."""


@main.command("datasets")
def datasets_cmd() -> None:
    """List the registered datasets."""
    from manifests import DATASETS

    for name, spec in DATASETS.items():
        click.echo(f"{name:12s} {spec.description}")


@main.command("make-manifest")
@click.option("--dataset", required=True, help="Registered dataset name (see `datasets`).")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--annotations", type=click.Path(), help="Directory with the official annotation files.")
@click.option("--videos", type=click.Path(), help="Directory with the video files.")
@click.option("--option", "options", multiple=True, help="Builder option key=value (e.g. seed=1, test_groups=80).")
def make_manifest_cmd(dataset, work_dir, annotations, videos, options) -> None:
    """Turn a dataset's official annotation files (or the generator) into a Parquet manifest."""
    m = _build_manifest(dataset, _work(work_dir), annotations, videos, _parse_options(options))
    click.echo(f"manifest: {m.root}  videos={m.videos.num_rows} captions={m.captions.num_rows}  sha256={m.sha256()[:12]}")


# --------------------------------------------------------------------------- encoders


def _synthetic_encoder(work: Path, manifest, options: dict | None = None) -> str:
    """Pretrain (once; reused afterwards) the synthetic world's frozen encoder; returns its spec."""
    from pipeline.pretrain import pretrain_encoder

    ckpt = pretrain_encoder(manifest.split("train"), work / "encoders", **(options or {}))
    return f"synth-vit-b32-tiny:{ckpt}"


def _resolve_encoders(encoders: tuple[str, ...], dataset: str | None, work: Path, manifest) -> list[str]:
    if encoders:
        return list(encoders)
    if dataset == "synthetic" or manifest.dataset == "synthetic":
        return [_synthetic_encoder(work, manifest)]
    return ["clip-b32"]


def _store_path(work: Path, dataset: str, spec) -> Path:
    return work / "stores" / f"{dataset}-{_slug(spec.short_name())}.zarr"


@main.command("pretrain-encoder")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--manifest", type=click.Path(), help="Synthetic manifest dir (default: build it).")
@click.option("--option", "options", multiple=True, help="Pretraining option key=value (e.g. seed=1, steps=400).")
def pretrain_encoder_cmd(work_dir, manifest, options) -> None:
    """Pretrain the synthetic world's small CLIP on train-split frame captions (reused if present)."""
    work = _work(work_dir)
    m = _load_or_build_manifest("synthetic", manifest, work, None, None, {})
    spec = _synthetic_encoder(work, m, _parse_options(options))
    click.echo(f"encoder: {spec}")


@main.command("probe-encoder")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--manifest", type=click.Path(), help="Synthetic manifest dir (default: build it under work-dir).")
@click.option("--encoder", "encoders", multiple=True,
              help="Encoder spec to probe; repeatable (default: the pretrained synthetic encoder and the same "
                   "config with random weights).")
@click.option("--steps", default=300, show_default=True, help="Optimisation steps of each linear probe.")
@click.option("--out", type=click.Path(), help="JSON output (default work-dir/reports/probes.json).")
def probe_encoder_cmd(work_dir, manifest, encoders, steps, out) -> None:
    """Calibration of the synthetic world: linear probes (train -> test) on the CLS embedding, the
    mean patch token and the detail's patch token, plus zero-shot retrieval, per encoder."""
    from pipeline.probes import format_probes, probe_encoder, write_probes

    work = _work(work_dir)
    m = _load_or_build_manifest("synthetic", manifest, work, None, None, {})
    if m.dataset != "synthetic":
        raise click.UsageError(f"probe-encoder needs the synthetic benchmark's manifest, got {m.dataset!r}")
    specs = list(encoders)
    if not specs:
        pretrained = _synthetic_encoder(work, m)
        specs = [pretrained, pretrained.split(":", 1)[0]]
    names = {}
    for s in specs:
        label = "random" if ":" not in s else ("pretrained" if s.startswith("synth-vit-b32-tiny:") else s)
        names[label if label not in names else s] = s
    results = {label: probe_encoder(m, s, work / "encoders", steps=steps) for label, s in names.items()}
    path = write_probes(results, out or work / "reports" / "probes.json")
    click.echo(format_probes(results))
    click.echo(f"probes: {path}")


# --------------------------------------------------------------------------- extraction


@main.command("extract")
@click.option("--dataset", help="Registered dataset name; its manifest is built under --work-dir.")
@click.option("--manifest", type=click.Path(), help="An existing manifest directory instead of --dataset.")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--annotations", type=click.Path(), help="Official annotation files (real datasets).")
@click.option("--videos", type=click.Path(), help="Video directory (real datasets).")
@click.option("--encoder", "encoders", multiple=True,
              help="Preset (clip-b32, eva-g14), open_clip `model:tag` or `model:/path/ckpt.pt`; repeatable. "
                   "All encoders run on the same decoded frames.")
@click.option("--store", "stores", multiple=True, help="Store path/URL per --encoder (default under work-dir/stores).")
@click.option("--frames", default=12, show_default=True, help="Frames sampled uniformly per video.")
@click.option("--shard-size", default=64, show_default=True, help="Videos per shard (the unit of work).")
@click.option("--workers", default=2, show_default=True, help="Decoder worker processes.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds before a video's decode is abandoned.")
@click.option("--max-text-tokens", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--option", "options", multiple=True, help="Manifest builder option key=value.")
def extract_cmd(dataset, manifest, work_dir, annotations, videos, encoders, stores, frames, shard_size,
                workers, timeout, max_text_tokens, device, options) -> None:
    """Decode each video once, run every encoder on the sampled frames, write the token stores."""
    from pipeline.encoders import parse_encoder
    from pipeline.extract import extract

    work = _work(work_dir)
    m = _load_or_build_manifest(dataset, manifest, work, annotations, videos, _parse_options(options))
    specs = [parse_encoder(e) for e in _resolve_encoders(encoders, dataset, work, m)]
    if stores and len(stores) != len(specs):
        raise click.UsageError(f"got {len(stores)} --store for {len(specs)} --encoder; give one per encoder or none")
    paths = list(stores) if stores else [str(_store_path(work, m.dataset, s)) for s in specs]
    report = extract(m, specs, paths, num_frames=frames, shard_size=shard_size, workers=workers,
                     timeout=timeout, max_text_tokens=max_text_tokens, device=_device(device))
    click.echo(report.summary())
    for p in paths:
        click.echo(f"store: {p}")


# --------------------------------------------------------------------------- training / eval


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stage(store_url: str, split: str, stage_dir: str | None, work: Path, arrays=("frame_emb", "text")):
    from pipeline.store import CacheStore

    store = CacheStore.open(store_url)
    root = Path(stage_dir) if stage_dir else work / "staged"
    return store.stage(split, root / store.fingerprint[:16], arrays=arrays)


@main.command("train-stage-one")
@click.option("--store", required=True, help="Token store path or URL (file://, http(s)://, s3://).")
@click.option("--head", default="seqTransf", show_default=True, help="Stage-one head (meanP, seqTransf, clip2video).")
@click.option("--head-option", "head_options", multiple=True,
              help="Head option key=value, repeatable (e.g. num_centers=5 weight=0.5 for clip2video, num_layers=1).")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--stage-dir", help="Local directory for the memory-mapped copy of the store (default work-dir/staged).")
@click.option("--out", help="Run directory (default work-dir/runs/stage1-<head>).")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--fresh", is_flag=True, help="Train again even if --out holds a finished run with the same arguments.")
def train_stage_one_cmd(store, head, head_options, work_dir, stage_dir, out, epochs, batch_size, lr, seed,
                        device, fresh) -> None:
    """Train a stage-one (cosine) head from cached frame and text embeddings; model selection on val."""
    from heads.train import train_stage_one

    work = _work(work_dir)
    train = _stage(store, "train", stage_dir, work)
    val = _stage(store, "val", stage_dir, work) if _has_split(store, "val") else None
    out_dir = Path(out) if out else work / "runs" / f"stage1-{head}"
    ckpt = train_stage_one(train, val, head=head, out_dir=out_dir, epochs=epochs, batch_size=batch_size,
                           lr=lr, seed=seed, device=_device(device),
                           head_config=_parse_options(head_options) or None, reuse=not fresh)
    click.echo(f"checkpoint: {ckpt}")


def _has_split(store_url: str, split: str) -> bool:
    from pipeline.store import CacheStore

    return split in CacheStore.open(store_url).splits()


@main.command("eval")
@click.option("--store", required=True, help="Token store path or URL.")
@click.option("--stage-one", "stage_one", type=click.Path(exists=True),
              help="Stage-one checkpoint or an imported external stage-one dir (omit for the untrained meanP baseline).")
@click.option("--split", default="test", show_default=True)
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--stage-dir")
@click.option("--out", help="Report directory (default work-dir/reports/<split>).")
@click.option("--dsl", is_flag=True, help="Also report dual-softmax (DSL) post-processed scores.")
@click.option("--dsl-temperature", type=float, help="DSL temperature [default: heads.postprocess's, 0.01].")
@click.option("--qb-norm", "qb_norm", is_flag=True, help="Also report QB-Norm (querybank = --qb-bank split).")
@click.option("--qb-bank", default="val", show_default=True, help="QB-Norm querybank split (never a test split).")
@click.option("--qb-k", default=1, show_default=True, help="QB-Norm activation set: top-k of each bank query.")
@click.option("--qb-beta", default=20.0, show_default=True, help="QB-Norm inverse temperature.")
def eval_cmd(store, stage_one, split, work_dir, stage_dir, out, dsl, dsl_temperature, qb_norm, qb_bank, qb_k,
             qb_beta) -> None:
    """Evaluate stage one (or the zero-shot meanP baseline): T2V/V2T R@1/5/10, MdR, MnR -> JSON + table."""
    import numpy as np

    from heads.evaluate import similarity, untrained_baseline, write_report
    from heads.external import is_external, load_external
    from heads.metrics import retrieval_metrics
    from heads.train import load_stage_one

    work = _work(work_dir)
    data = _stage(store, split, stage_dir, work)
    head = None
    if stage_one and is_external(stage_one):
        ext = load_external(stage_one, data)
        sim, name = ext.similarity(), f"external {ext.name}"
    else:
        if stage_one:
            head, name = load_stage_one(stage_one, expect_encoder_identity=data.encoder_identity).head, Path(stage_one).parent.name
        else:
            head, name = untrained_baseline(data.frame_emb.shape[-1]), "meanP (untrained)"
        sim = similarity(head, data)
    cv = np.asarray(data.caption_video)
    results = {name: retrieval_metrics(sim, cv)}
    if dsl:
        from heads.postprocess import DEFAULT_DSL_TEMPERATURE, dual_softmax_metrics

        t = DEFAULT_DSL_TEMPERATURE if dsl_temperature is None else dsl_temperature
        results[f"{name} +DSL(t={t:g})"] = dual_softmax_metrics(sim, cv, temperature=t)
    if qb_norm:
        from heads.postprocess import check_querybank_split, qb_norm_metrics, stage_one_querybanks

        if head is None:
            raise click.UsageError("--qb-norm needs our own stage-one head (its querybank is encoded from the "
                                   f"{qb_bank!r} split); an external stage one brings no querybank")
        try:
            check_querybank_split(qb_bank, split)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--qb-bank") from exc
        bank = _stage(store, qb_bank, stage_dir, work)
        text_bank, video_bank = stage_one_querybanks(head, data, bank)
        results[f"{name} +QB-Norm({qb_bank}, k={qb_k}, beta={qb_beta:g})"] = qb_norm_metrics(
            sim, cv, text_bank, video_bank, k=qb_k, beta=qb_beta)
    json_path, table = write_report(results, Path(out) if out else work / "reports" / split)
    click.echo(table)
    click.echo(f"report: {json_path}")


# --------------------------------------------------------------------------- external stage one


@main.command("import-stage-one")
@click.option("--store", required=True, help="Token store path or URL whose split the ids are checked against.")
@click.option("--split", default="test", show_default=True)
@click.option("--video-emb", type=click.Path(exists=True, dir_okay=False),
              help="Video embeddings: HDF5 (ids + emb), .npy + ids sidecar, .npz or Parquet (id + list column).")
@click.option("--text-emb", type=click.Path(exists=True, dir_okay=False), help="Caption embeddings, same formats.")
@click.option("--similarity", type=click.Path(exists=True, dir_okay=False),
              help="Instead of embeddings: a (captions x videos) matrix, HDF5 (sim, caption_ids, video_ids), "
                   ".npy + ids.json sidecar or .npz.")
@click.option("--no-normalize", is_flag=True, help="Raw dot products of the embeddings (default: cosine).")
@click.option("--name", help="Name in reports (default: the output directory's name).")
@click.option("--out", help="Output directory (default work-dir/external/<split>).")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
def import_stage_one_cmd(store, split, video_emb, text_emb, similarity, no_normalize, name, out, work_dir) -> None:
    """Import an external stage one (embeddings or a similarity matrix keyed by the manifest's ids).

    Validates ids, shapes and values, reorders to the split's order and writes
    external_stage_one.json + similarity.npy (+ report.json of its metrics); `rerank --stage-one DIR`
    and `eval --stage-one DIR` then use it like our own stage one.
    """
    from heads.evaluate import write_report
    from heads.external import ExternalFormatError, import_stage_one, split_ids_from_store
    from heads.metrics import retrieval_metrics
    from pipeline.store import StoreError

    if similarity is None and (video_emb is None or text_emb is None):
        raise click.UsageError("give --video-emb and --text-emb, or --similarity")
    if similarity is not None and (video_emb or text_emb):
        raise click.UsageError("give either embeddings (--video-emb/--text-emb) or --similarity, not both")
    out_dir = Path(out) if out else _work(work_dir) / "external" / split
    try:
        ids = split_ids_from_store(store, split)
        ext = import_stage_one(ids, out_dir, video_emb=video_emb, text_emb=text_emb, similarity=similarity,
                               normalize=not no_normalize, name=name)
    except (ExternalFormatError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc
    results = {f"external {ext.name}": retrieval_metrics(ext.similarity(), ids.caption_video)}
    _, table = write_report(results, out_dir, name="report")
    click.echo(table)
    click.echo(f"imported {ext.identity['num_captions']} captions x {ext.identity['num_videos']} videos of split "
               f"{split!r} ({ext.identity['similarity_from']}); dropped ids of other splits: "
               f"{ext.identity['dropped_other_ids']}")
    click.echo(f"external stage one: {out_dir}")


# --------------------------------------------------------------------------- stage-one comparison


def _default_store(work: Path) -> str:
    """The demo's store: the single ``work/stores/synthetic-*.zarr``."""
    found = sorted((work / "stores").glob("synthetic-*.zarr"))
    if len(found) != 1:
        raise click.UsageError(
            f"give --store: found {len(found)} synthetic stores under {work / 'stores'} "
            f"({', '.join(p.name for p in found) or 'none; run `python cli.py demo` first'})")
    return str(found[0])


def _per_head_options(pairs: tuple[str, ...], heads: list[str]) -> dict[str, dict]:
    """`HEAD:key=value` pairs -> {head: {key: value}} (values parsed as in `--option`)."""
    out: dict[str, dict] = {h: {} for h in heads}
    for pair in pairs:
        head, sep, rest = pair.partition(":")
        if not sep or head not in out:
            raise click.BadParameter(f"expected HEAD:key=value with HEAD one of {', '.join(heads)}, got {pair!r}",
                                     param_hint="--head-option")
        out[head].update(_parse_options((rest,)))
    return out


@main.command("compare-stage-one")
@click.option("--store", help="Token store path or URL (default: the demo store work-dir/stores/synthetic-*.zarr).")
@click.option("--heads", "head_list", default="meanP,seqTransf,clip2video", show_default=True,
              help="Comma-separated stage-one heads to train and compare.")
@click.option("--head-option", "head_options", multiple=True,
              help="HEAD:key=value, repeatable (e.g. clip2video:num_centers=5).")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--stage-dir", help="Local directory for the memory-mapped copy of the store (default work-dir/staged).")
@click.option("--out", help="Directory for the runs and the report (default work-dir/compare-stage-one).")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, help="Torch CPU threads while training (default: all cores).")
def compare_stage_one_cmd(store, head_list, head_options, work_dir, stage_dir, out, epochs, batch_size, lr, seed,
                          device, threads) -> None:
    """Train each stage-one head (selection on val), evaluate all on test, print and write one table.

    The table starts with the untrained meanP baseline (zero-shot CLIP on the cached embeddings).
    Writes OUT/compare-stage-one.{json,txt} and OUT/compare-stage-one.runs.json (per head: checkpoint,
    selected epoch, val rsum, options, parameters, training seconds).
    """
    from heads import STAGE_ONE
    from heads.evaluate import evaluate, untrained_baseline, write_report
    from heads.metrics import metrics_to_json
    from heads.train import load_stage_one, train_stage_one

    work = _work(work_dir)
    names = [h.strip() for h in head_list.split(",") if h.strip()]
    unknown = [h for h in names if h not in STAGE_ONE]
    if not names or unknown:
        raise click.BadParameter(f"unknown head(s) {unknown} (known: {', '.join(STAGE_ONE)})", param_hint="--heads")
    options = _per_head_options(head_options, names)
    store = store or _default_store(work)
    out_dir = Path(out) if out else work / "compare-stage-one"
    dev = _device(device)
    train = _stage(store, "train", stage_dir, work)
    val = _stage(store, "val", stage_dir, work) if _has_split(store, "val") else None
    if val is None:
        click.echo("no val split in the store: each head keeps its last epoch")
    test = _stage(store, "test", stage_dir, work)
    results = {"meanP (untrained)": evaluate(untrained_baseline(test.frame_emb.shape[-1]), test, device=dev)}
    runs: dict[str, dict] = {}
    for name in names:
        click.echo(f"[{name}] training {epochs} epochs on {train.split} ({len(train.video_ids)} videos)")
        t0 = time.time()
        ckpt = train_stage_one(train, val, head=name, out_dir=out_dir / "runs" / f"stage1-{name}", epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, device=dev,
                               head_config=options[name] or None, num_threads=threads)
        seconds = time.time() - t0
        loaded = load_stage_one(ckpt, expect_encoder_identity=test.encoder_identity)
        results[f"{name} (trained)"] = evaluate(loaded.head, test, device=dev)
        runs[name] = {"checkpoint": str(ckpt), "best_epoch": loaded.history.get("best_epoch"),
                      "val_rsum": loaded.history.get("best_score"), "config": loaded.config,
                      "parameters": sum(p.numel() for p in loaded.head.parameters()),
                      "train_seconds": round(seconds, 1)}
        click.echo(f"      best epoch {runs[name]['best_epoch']}, {seconds:.0f}s")
    json_path, table = write_report(results, out_dir, name="compare-stage-one")
    meta = {"store": store, "store_fingerprint": train.store_fingerprint, "test_split": test.split,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "device": dev, "threads": threads,
            "heads": runs}
    (out_dir / "compare-stage-one.runs.json").write_text(metrics_to_json(meta) + "\n")
    click.echo(table)
    click.echo(f"report: {json_path}")


# --------------------------------------------------------------------------- stage two: training

STAGE_TWO_ARRAYS = ("frame_emb", "tokens", "text")


def train_head(store: str, stage_one: str | Path, work: Path, out: str | Path | None = None,
               stage_dir: str | None = None, head: str = "crosstvr", head_cfg: dict | None = None,
               **train_kwargs) -> Path:
    """Stage the store's train (and val) split with tokens and train a stage-two head on them.

    ``train_kwargs`` go to ``heads.train_stage_two.train_stage_two`` (epochs, batch_size, lr,
    hard_negatives, seed, device, ...). Returns the checkpoint path (``out/stage_two.pt``; default
    ``out`` = work/runs/stage2-<head>). The demo and the ablation call this.
    """
    from heads.train_stage_two import train_stage_two

    train = _stage(store, "train", stage_dir, work, arrays=STAGE_TWO_ARRAYS)
    val = _stage(store, "val", stage_dir, work, arrays=STAGE_TWO_ARRAYS) if _has_split(store, "val") else None
    out_dir = Path(out) if out else work / "runs" / f"stage2-{head}"
    return train_stage_two(train, val, stage_one, out_dir, head=head, head_cfg=head_cfg, **train_kwargs)


@main.command("train-head")
@click.option("--store", required=True, help="Token store path or URL (file://, http(s)://, s3://).")
@click.option("--stage-one", "stage_one", required=True, type=click.Path(exists=True),
              help="Stage-one checkpoint: its train similarities drive hard-negative mining.")
@click.option("--head", default="crosstvr", show_default=True, type=click.Choice(["crosstvr", "t2v2t"]),
              help="Stage-two head.")
@click.option("--mode", type=click.Choice(["both", "spatial", "temporal"]),
              help="CrossTVR attention passes [default: both].")
@click.option("--unshared", is_flag=True, help="CrossTVR: separate parameters for the temporal pass.")
@click.option("--num-selected", type=int, help="CrossTVR: tokens kept per frame by the selector (M) [default: 4].")
@click.option("--head-option", "head_options", multiple=True,
              help="Other head option key=value, repeatable (e.g. width=128 layers=2 spatial_frames=4).")
@click.option("--epochs", default=6, show_default=True)
@click.option("--batch-size", default=32, show_default=True, help="Positive pairs per step (x3 with negatives).")
@click.option("--lr", default=5e-4, show_default=True,
              help="Peak learning rate (2e-3 left the head at the class-prior loss on the synthetic benchmark).")
@click.option("--hard-negatives", default="anneal", show_default=True,
              type=click.Choice(["anneal", "hard", "random"]),
              help="anneal: random in-batch negatives only for the first --anneal-start of the steps, then "
                   "a linear rise to hard ones (stage-one softmax) over the next --anneal share.")
@click.option("--anneal-start", default=0.4, show_default=True, help="Share of steps with random negatives only.")
@click.option("--anneal", default=0.3, show_default=True, help="Share of steps over which hard negatives rise to 100%.")
@click.option("--rank-weight", default=0.0, show_default=True,
              help="Weight of a pairwise ranking term added to ITM: each positive's cosine + head score must "
                   "beat its negatives' (0 = ITM only).")
@click.option("--itc-steps", type=int,
              help="CrossTVR: steps of contrastive (ITC, BLIP-2 stage one) pre-training of the head before ITM "
                   "[default: 1200 for crosstvr, 0 for t2v2t].")
@click.option("--itc-batch", default=64, show_default=True, help="Videos per contrastive step.")
@click.option("--itc-cluster", default=1, show_default=True,
              help="Contrastive batches built from clusters of this many stage-one neighbours (1 = random).")
@click.option("--itc-lr", default=5e-4, show_default=True, help="Peak learning rate of the contrastive phase.")
@click.option("--itc-weight", type=float,
              help="Weight of the positives' contrastive loss added to ITM, as BLIP-2 trains both together "
                   "[default: 1 for crosstvr, 0 for t2v2t]. With either, the head scores a pair by ITM + ITC.")
@click.option("--max-steps", type=int, help="Stop after this many steps (resumable: run again to continue).")
@click.option("--fresh", is_flag=True, help="Ignore an existing run in --out and start again.")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--stage-dir", help="Local directory for the memory-mapped copy of the store (default work-dir/staged).")
@click.option("--out", help="Run directory (default work-dir/runs/stage2-<head>).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def train_head_cmd(store, stage_one, head, mode, unshared, num_selected, head_options, epochs, batch_size, lr,
                   hard_negatives, anneal_start, anneal, rank_weight, itc_steps, itc_batch, itc_cluster, itc_lr,
                   itc_weight, max_steps, fresh, work_dir, stage_dir, out, seed, device) -> None:
    """Train a stage-two re-ranking head (ITM with hard negatives) on cached patch and text tokens."""
    cfg = _parse_options(head_options)
    if head == "crosstvr":
        if mode is not None:
            cfg["mode"] = mode
        if unshared:
            cfg["shared"] = False
        if num_selected is not None:
            cfg["num_selected"] = num_selected
    elif mode is not None or unshared or num_selected is not None:
        raise click.UsageError("--mode, --unshared and --num-selected apply to --head crosstvr only")
    ckpt = train_head(store, stage_one, _work(work_dir), out=out, stage_dir=stage_dir, head=head,
                      head_cfg=cfg or None, epochs=epochs, batch_size=batch_size, lr=lr,
                      hard_negatives=hard_negatives, anneal_start=anneal_start, anneal=anneal, rank_weight=rank_weight,
                      itc_steps=itc_steps, itc_batch=itc_batch, itc_cluster=itc_cluster, itc_lr=itc_lr,
                      itc_weight=itc_weight, max_steps=max_steps, resume=not fresh, seed=seed,
                      device=_device(device))
    click.echo(f"checkpoint: {ckpt}")


# --------------------------------------------------------------------------- stage two: re-ranking


def _best_stage_one(work: Path) -> Path:
    """The stage-one checkpoint under work/runs/stage1-* with the best val score (val only)."""
    import torch

    found = sorted((work / "runs").glob("stage1-*/stage_one.pt"))
    if not found:
        raise click.UsageError(f"give --stage-one: no stage-one checkpoint under {work / 'runs'} "
                               f"(run `python cli.py demo` or `train-stage-one` first)")

    def val_score(p: Path) -> float:
        hist = torch.load(p, map_location="cpu", weights_only=True).get("history", {}) or {}
        score = hist.get("best_score")
        return float("-inf") if score is None else float(score)

    return max(found, key=val_score)


def rerank_split(store: str, stage_one: str | Path, head_ckpt: str | Path, work: Path, split: str = "test",
                 k: int = 15, dsl: bool = False, dsl_temperature: float | None = None,
                 out: str | Path | None = None, stage_dir: str | None = None, device: str = "cpu",
                 batch_size: int = 64, sim=None, progress: bool = True):
    """Stage ``split`` with tokens, re-rank it and write the outputs; returns (paths, table, result).

    ``sim`` (optional) is a precomputed stage-one similarity of that split (the ablation reuses
    one). Encoder identities are checked: ``StoreMismatchError`` names the differences.
    """
    from heads.rerank import load_head, rerank, stage_one_similarity, write_outputs

    data = _stage(store, split, stage_dir, work, arrays=STAGE_TWO_ARRAYS)
    head, head_info = load_head(head_ckpt, data)
    s1_info: dict = {"path": str(stage_one)}
    if sim is None:
        sim, s1_info = stage_one_similarity(stage_one, data, device=device)
    res = rerank(sim, data, head, k=k, dsl=dsl, dsl_temperature=dsl_temperature, batch_size=batch_size,
                 device=device, progress=progress)
    out_dir = Path(out) if out else work / "reports" / f"rerank-{split}"
    meta = {"store": str(store), "store_fingerprint": data.store_fingerprint, "stage_one": s1_info,
            "head": head_info, "device": device, "batch_size": batch_size}
    title = f"{split}: stage one vs re-ranked top {k}" + (" (DSL)" if dsl else "")
    paths, table = write_outputs(res, data, out_dir, meta=meta, title=title)
    return paths, table, res


def _mismatch_to_click(fn):
    """Turn encoder / store mismatches and missing files into a clean CLI error."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from heads.train import StoreMismatchError

        try:
            return fn(*args, **kwargs)
        except (StoreMismatchError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


@main.command("rerank")
@click.option("--store", required=True, help="Token store path or URL (file://, http(s)://, s3://).")
@click.option("--stage-one", "stage_one", required=True, type=click.Path(exists=True),
              help="Stage-one checkpoint (stage_one.pt or its run dir) or an imported external similarity dir.")
@click.option("--head", "head_ckpt", required=True, type=click.Path(exists=True),
              help="Stage-two checkpoint (stage_two.pt or its run dir).")
@click.option("--split", default="test", show_default=True)
@click.option("--k", "k", default=15, show_default=True, help="Candidates re-ranked per query.")
@click.option("--dsl", is_flag=True, help="Dual-softmax post-processing of stage one and the re-ranked scores.")
@click.option("--dsl-temperature", type=float, help="Dual-softmax temperature [default: heads.postprocess's].")
@click.option("--batch-size", default=64, show_default=True, help="Pairs per head forward pass.")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--stage-dir", help="Local directory for the memory-mapped copy of the store (default work-dir/staged).")
@click.option("--out", help="Output directory (default work-dir/reports/rerank-<split>).")
@click.option("--device", default="auto", show_default=True)
@_mismatch_to_click
def rerank_cmd(store, stage_one, head_ckpt, split, k, dsl, dsl_temperature, batch_size, work_dir, stage_dir, out,
               device) -> None:
    """Re-rank every query's stage-one top K with a stage-two head (final = cosine + head score).

    Writes ranked_t2v.parquet / ranked_v2t.parquet (each query's re-ranked top K), metrics.json
    (stage one vs re-ranked, T2V and V2T, with stage one's R@K) and prints the table.
    """
    paths, table, res = rerank_split(store, stage_one, head_ckpt, _work(work_dir), split=split, k=k, dsl=dsl,
                                     dsl_temperature=dsl_temperature, out=out, stage_dir=stage_dir,
                                     device=_device(device), batch_size=batch_size)
    click.echo(table)
    click.echo(f"{res.num_pairs} pairs scored in {res.seconds['scoring']:.1f}s; "
               f"outputs: {paths['metrics'].parent}")


ABLATION_VARIANTS: dict[str, tuple[str, str, dict, dict]] = {
    # name: (table label, head, head_cfg, trainer arguments of this variant)
    "spatial": ("+spatial", "crosstvr", {"mode": "spatial"}, {}),
    "temporal": ("+temporal", "crosstvr", {"mode": "temporal"}, {}),
    "both": ("both (shared)", "crosstvr", {}, {}),
    "both-unshared": ("both (unshared)", "crosstvr", {"shared": False}, {}),
    "both-itm-only": ("both (shared), ITM only", "crosstvr", {}, {"itc_steps": 0, "itc_weight": 0.0}),
    "t2v2t": ("T2V2T", "t2v2t", {}, {}),
}


def ablation_table(stage_one: dict, variants: dict[str, dict], k: int) -> dict[str, dict[str, float]]:
    """One row per model: T2V and V2T R@1/5/10 and MnR, plus stage one's R@K per direction."""
    rows = {}
    for label, m in [("stage one", stage_one), *variants.items()]:
        row = {}
        for d in ("t2v", "v2t"):
            if d not in m:
                continue
            for key in ("R@1", "R@5", "R@10", "MnR"):
                row[f"{d.upper()} {key}"] = m[d][key]
        rows[label] = row
    for d in ("t2v", "v2t"):
        if d in stage_one:
            rows["stage one"][f"{d.upper()} R@{k} (stage one)"] = stage_one[d][f"R@{k}"]
    return rows


@main.command("ablation")
@click.option("--store", help="Token store (default: the demo store under work-dir; built by the demo if missing).")
@click.option("--stage-one", "stage_one", type=click.Path(exists=True),
              help="Stage-one checkpoint (default: the demo's stage-one run with the best val score).")
@click.option("--variants", default=",".join(ABLATION_VARIANTS), show_default=True,
              help=f"Comma-separated subset of {', '.join(ABLATION_VARIANTS)}.")
@click.option("--k", "k", default=15, show_default=True, help="Candidates re-ranked per query.")
@click.option("--epochs", type=int, help="Stage-two epochs [default: the trainer's].")
@click.option("--head-option", "head_options", multiple=True,
              help="Head option key=value applied to every variant (e.g. width=128).")
@click.option("--rank-weight", type=float, help="Ranking term weight for every variant [default: the trainer's].")
@click.option("--anneal-start", type=float, help="Share of random-negative steps [default: the trainer's].")
@click.option("--anneal", type=float, help="Share of steps over which hard negatives rise [default: the trainer's].")
@click.option("--itc-steps", type=int,
              help="Contrastive pre-training steps of the CrossTVR variants [default: the trainer's].")
@click.option("--itc-weight", type=float,
              help="Contrastive loss weight during ITM for the CrossTVR variants [default: the trainer's].")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--stage-dir", help="Local directory for the memory-mapped copy of the store (default work-dir/staged).")
@click.option("--out", help="Directory for the runs and the table (default work-dir/ablation).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.pass_context
@_mismatch_to_click
def ablation_cmd(ctx, store, stage_one, variants, k, epochs, head_options, rank_weight, anneal_start, anneal,
                 itc_steps, itc_weight, work_dir, stage_dir, out, seed, device) -> None:
    """Stage-two ablation: stage one / +spatial / +temporal / both (shared) / both (unshared) /
    both without the contrastive (ITC) training / T2V2T.

    Trains each head on train (epoch selected on val only), re-ranks the test split's stage-one
    top K with it and writes one table (T2V / V2T R@1/5/10, MnR, stage one's R@K) to
    OUT/ablation.{json,txt}; each variant's ranked lists and metrics go to OUT/<variant>/. Runs that
    already finished with the same arguments are reused. Without --store the demo's store is used,
    and the demo is run first when it is missing.
    """
    from heads.evaluate import write_report
    from heads.metrics import metrics_to_json
    from heads.rerank import stage_one_similarity
    from heads.train_stage_two import ITC_HEADS

    work = _work(work_dir)
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in ABLATION_VARIANTS]
    if not names or unknown:
        raise click.BadParameter(f"unknown variant(s) {unknown} (known: {', '.join(ABLATION_VARIANTS)})",
                                 param_hint="--variants")
    if store is None and not sorted((work / "stores").glob("synthetic-*.zarr")):
        click.echo(f"no demo store under {work / 'stores'}: running the demo first")
        ctx.invoke(demo_cmd, work_dir=work_dir, seed=seed, device=device)
    demo_defaults = (store is None and stage_one is None and out is None and epochs is None
                     and rank_weight is None and anneal_start is None and anneal is None
                     and itc_steps is None and itc_weight is None)
    store = store or _default_store(work)
    stage_one = stage_one or str(_best_stage_one(work))
    dev = _device(device)
    out_dir = Path(out) if out else work / "ablation"
    extra = _parse_options(head_options)
    train_kwargs = {"seed": seed, "device": dev}
    for key, value in (("epochs", epochs), ("rank_weight", rank_weight), ("anneal_start", anneal_start),
                       ("anneal", anneal)):
        if value is not None:
            train_kwargs[key] = value
    test = _stage(store, "test", stage_dir, work, arrays=STAGE_TWO_ARRAYS)
    sim, s1_info = stage_one_similarity(stage_one, test, device=dev)
    click.echo(f"stage one: {stage_one}")
    results: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    stage_one_metrics = None
    for name in names:
        label, head, cfg, variant_kwargs = ABLATION_VARIANTS[name]
        cfg = {**cfg, **extra}
        kwargs = dict(train_kwargs)
        if head in ITC_HEADS:   # the contrastive options concern heads with learnable queries only
            kwargs.update({k_: v for k_, v in (("itc_steps", itc_steps), ("itc_weight", itc_weight)) if v is not None})
        kwargs.update(variant_kwargs)
        click.echo(f"[{label}] training {head} {cfg or ''}")
        t0 = time.time()
        # the demo's head (crosstvr, trainer defaults) lives in work/runs/stage2-crosstvr: reuse it
        run_dir = (work / "runs" / "stage2-crosstvr" if name == "both" and not cfg and demo_defaults
                   else out_dir / "runs" / name)
        ckpt = train_head(store, stage_one, work, out=run_dir, stage_dir=stage_dir, head=head,
                          head_cfg=cfg or None, **kwargs)
        train_s = time.time() - t0
        paths, table, res = rerank_split(store, stage_one, ckpt, work, split="test", k=k, out=out_dir / name,
                                         stage_dir=stage_dir, device=dev, sim=sim)
        m = res.metrics()
        stage_one_metrics = m["stage one"]
        results[label] = m["re-ranked"]
        runs[name] = {"label": label, "head": head, "head_cfg": cfg, "train_kwargs": variant_kwargs,
                      "checkpoint": str(ckpt),
                      "train_seconds": round(train_s, 1), "rerank_seconds": round(res.seconds["total"], 1),
                      "pairs_scored": res.num_pairs}
        click.echo(f"      T2V R@1 {m['re-ranked']['t2v']['R@1']:.1f} (stage one "
                   f"{m['stage one']['t2v']['R@1']:.1f}), {train_s:.0f}s training, "
                   f"{res.seconds['total']:.0f}s re-ranking")
    rows = ablation_table(stage_one_metrics, results, k)
    json_path, table = write_report(rows, out_dir, name="ablation")
    meta = {"store": store, "stage_one": s1_info, "split": "test", "k": k, "seed": seed, "device": dev,
            "variants": runs}
    (out_dir / "ablation.runs.json").write_text(metrics_to_json(meta) + "\n")
    click.echo(f"test split, top {k} re-ranked (model selection on val)")
    click.echo(table)
    click.echo(f"report: {json_path}")


# --------------------------------------------------------------------------- demo


@main.command("demo")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def demo_cmd(work_dir, seed, device) -> None:
    """The synthetic benchmark end to end: generate, pretrain encoder, extract, train stage one and
    stage two, evaluate stage one and the re-ranked top 15 on the test split."""
    from heads.evaluate import evaluate, untrained_baseline, write_report
    from heads.train import train_stage_one
    from pipeline.encoders import parse_encoder
    from pipeline.extract import extract

    t0 = time.time()
    work = _work(work_dir)
    dev = _device(device)
    click.echo("[1/6] synthetic benchmark")
    m = _build_manifest("synthetic", work, None, None, {"seed": seed})
    click.echo(f"      {m.videos.num_rows} videos, {m.captions.num_rows} captions  ({time.time() - t0:.0f}s)")
    click.echo("[2/6] frozen encoder (pretrained once on train-split frame captions)")
    spec = parse_encoder(_synthetic_encoder(work, m))
    click.echo(f"      {spec}  ({time.time() - t0:.0f}s)")
    click.echo("[3/6] extraction into the token cache")
    store = str(_store_path(work, m.dataset, spec))
    report = extract(m, [spec], [store], device=dev)
    click.echo(f"      {report.summary()}  ({time.time() - t0:.0f}s)")
    click.echo("[4/6] stage-one training")
    train, val, test = (_stage(store, s, None, work) for s in ("train", "val", "test"))
    results = {"meanP (untrained)": evaluate(untrained_baseline(test.frame_emb.shape[-1]), test)}
    for head in ("meanP", "seqTransf"):
        ckpt = train_stage_one(train, val, head=head, out_dir=work / "runs" / f"stage1-{head}", seed=seed, device=dev)
        from heads.train import load_stage_one

        results[f"{head} (trained)"] = evaluate(load_stage_one(ckpt, expect_encoder_identity=test.encoder_identity).head, test)
    click.echo(f"      ({time.time() - t0:.0f}s)")
    json_path, table = write_report(results, work / "reports" / "demo")
    click.echo(table)
    click.echo(f"report: {json_path}")
    click.echo("[5/6] stage-two training (CrossTVR head on the cached tokens: contrastive pre-training, then ITM "
               "with hard negatives from stage one)")
    stage_one = _best_stage_one(work)
    from heads.train_stage_two import RunMismatchError

    try:
        head_ckpt = train_head(store, stage_one, work, seed=seed, device=dev)
    except RunMismatchError as exc:  # the demo owns its run directory: start it again
        click.echo(f"      {exc}: training the head again")
        head_ckpt = train_head(store, stage_one, work, seed=seed, device=dev, resume=False)
    click.echo(f"      stage one {stage_one.parent.name} (best val), head {head_ckpt}  ({time.time() - t0:.0f}s)")
    click.echo("[6/6] test split: stage one vs its top 15 re-ranked")
    paths, table, _ = rerank_split(store, stage_one, head_ckpt, work, split="test", k=15, device=dev)
    click.echo(table)
    click.echo(f"report: {paths['metrics']}   total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
