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
def train_stage_one_cmd(store, head, head_options, work_dir, stage_dir, out, epochs, batch_size, lr, seed,
                        device) -> None:
    """Train a stage-one (cosine) head from cached frame and text embeddings; model selection on val."""
    from heads.train import train_stage_one

    work = _work(work_dir)
    train = _stage(store, "train", stage_dir, work)
    val = _stage(store, "val", stage_dir, work) if _has_split(store, "val") else None
    out_dir = Path(out) if out else work / "runs" / f"stage1-{head}"
    ckpt = train_stage_one(train, val, head=head, out_dir=out_dir, epochs=epochs, batch_size=batch_size,
                           lr=lr, seed=seed, device=_device(device),
                           head_config=_parse_options(head_options) or None)
    click.echo(f"checkpoint: {ckpt}")


def _has_split(store_url: str, split: str) -> bool:
    from pipeline.store import CacheStore

    return split in CacheStore.open(store_url).splits()


@main.command("eval")
@click.option("--store", required=True, help="Token store path or URL.")
@click.option("--stage-one", "stage_one", type=click.Path(exists=True), help="Stage-one checkpoint (omit for the untrained meanP baseline).")
@click.option("--split", default="test", show_default=True)
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--stage-dir")
@click.option("--out", help="Report directory (default work-dir/reports/<split>).")
def eval_cmd(store, stage_one, split, work_dir, stage_dir, out) -> None:
    """Evaluate stage one (or the zero-shot meanP baseline): T2V/V2T R@1/5/10, MdR, MnR -> JSON + table."""
    from heads.evaluate import evaluate, untrained_baseline, write_report
    from heads.train import load_stage_one

    work = _work(work_dir)
    data = _stage(store, split, stage_dir, work)
    if stage_one:
        head, name = load_stage_one(stage_one, expect_encoder_identity=data.encoder_identity).head, Path(stage_one).parent.name
    else:
        head, name = untrained_baseline(data.frame_emb.shape[-1]), "meanP (untrained)"
    results = {name: evaluate(head, data)}
    json_path, table = write_report(results, Path(out) if out else work / "reports" / split)
    click.echo(table)
    click.echo(f"report: {json_path}")


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
def compare_stage_one_cmd(store, head_list, head_options, work_dir, stage_dir, out, epochs, batch_size, lr, seed,
                          device) -> None:
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
                               head_config=options[name] or None)
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
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "device": dev, "heads": runs}
    (out_dir / "compare-stage-one.runs.json").write_text(metrics_to_json(meta) + "\n")
    click.echo(table)
    click.echo(f"report: {json_path}")


# --------------------------------------------------------------------------- demo


@main.command("demo")
@click.option("--work-dir", default=DEFAULT_WORK, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def demo_cmd(work_dir, seed, device) -> None:
    """The synthetic benchmark end to end: generate, pretrain encoder, extract, train, evaluate."""
    from heads.evaluate import evaluate, untrained_baseline, write_report
    from heads.train import train_stage_one
    from pipeline.encoders import parse_encoder
    from pipeline.extract import extract

    t0 = time.time()
    work = _work(work_dir)
    dev = _device(device)
    click.echo("[1/5] synthetic benchmark")
    m = _build_manifest("synthetic", work, None, None, {"seed": seed})
    click.echo(f"      {m.videos.num_rows} videos, {m.captions.num_rows} captions  ({time.time() - t0:.0f}s)")
    click.echo("[2/5] frozen encoder (pretrained once on train-split frame captions)")
    spec = parse_encoder(_synthetic_encoder(work, m))
    click.echo(f"      {spec}  ({time.time() - t0:.0f}s)")
    click.echo("[3/5] extraction into the token cache")
    store = str(_store_path(work, m.dataset, spec))
    report = extract(m, [spec], [store], device=dev)
    click.echo(f"      {report.summary()}  ({time.time() - t0:.0f}s)")
    click.echo("[4/5] stage-one training")
    train, val, test = (_stage(store, s, None, work) for s in ("train", "val", "test"))
    results = {"meanP (untrained)": evaluate(untrained_baseline(test.frame_emb.shape[-1]), test)}
    for head in ("meanP", "seqTransf"):
        ckpt = train_stage_one(train, val, head=head, out_dir=work / "runs" / f"stage1-{head}", seed=seed, device=dev)
        from heads.train import load_stage_one

        results[f"{head} (trained)"] = evaluate(load_stage_one(ckpt, expect_encoder_identity=test.encoder_identity).head, test)
    click.echo(f"      ({time.time() - t0:.0f}s)")
    click.echo("[5/5] test split")
    json_path, table = write_report(results, work / "reports" / "demo")
    click.echo(table)
    click.echo(f"report: {json_path}   total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
