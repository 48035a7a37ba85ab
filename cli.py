"""Command line: options, messages and calls into ``workflows`` (which own the work) and the library.

Heavy imports happen inside the commands, so ``python cli.py --help`` is instant. Errors a user can
fix (the project's ``CrossTVRError`` hierarchy, manifest errors, missing files) end the command
with one line and a non-zero exit (2 for a wrong option or input, 1 otherwise).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from core.errors import CrossTVRError, UnknownHeadError, UsageError
from core.options import format_key_values, parse_key_values
from core.world import world_from_env
from heads.registry import HEADS, get_preset, head_options, list_heads, list_presets
from heads.evaluation.index import INDEX_KINDS
from pipeline.config import ExtractConfig
from heads.stage_one.config import StageOneTrainConfig
from heads.stage_two.config import (ABLATION_VARIANTS, AMP_MODES, HARD_NEGATIVE_MODES, NEGATIVE_SOURCES,
                                    StageTwoTrainConfig, with_switches)
from workflows.workdir import DEFAULT_WORK, WorkDir, resolve_device


# -- errors and options ----------------------------------------------------------------------------
class Main(click.Group):
    """The command group: the project's errors become one clear line and a non-zero exit (2 for a
    wrong option, input file or annotation row, 1 for a job that did not fully succeed); with
    ``--debug`` they keep their traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from manifests import ManifestError, UnknownDatasetError

        try:
            return super().invoke(ctx)
        except (UsageError, ManifestError, UnknownDatasetError) as exc:
            if ctx.params.get("debug"):
                raise
            raise click.UsageError(str(exc)) from exc
        except (CrossTVRError, FileNotFoundError) as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(exc)) from exc


work_dir_option = click.option("--work-dir", default=DEFAULT_WORK, show_default=True,
                                help="Where manifests, stores, runs and reports go.")
stage_dir_option = click.option("--stage-dir", help="Local directory for the memory-mapped copy of the store "
                                                    "(default work-dir/staged).")
device_option = click.option("--device", default="auto", show_default=True, help="Torch device (auto: cuda if any).")
seed_option = click.option("--seed", default=0, show_default=True)
store_option = click.option("--store", required=True, help="Token store path or URL (file://, http(s)://, s3://).")
allow_incomplete_option = click.option(
    "--allow-incomplete", is_flag=True,
    help="Report metrics even when videos of the split are missing from the store (labelled incomplete).")
head_options_option = click.option("--head-option", "head_options", multiple=True,
                                   help="Head option key=value, repeatable (`python cli.py heads` lists them).")


def _dist_timeout_option(fn: Callable) -> Callable:
    """``--dist-timeout``: under torchrun, how long a rank waits in a collective of the work itself
    (``heads.training.distributed``), passed on as ``CROSSTVR_DIST_TIMEOUT``; not recorded in run.json."""
    def apply(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            import os

            from heads.training.distributed import TIMEOUT_ENV, parse_timeout

            try:
                parse_timeout(value)
            except UsageError as exc:
                raise click.BadParameter(str(exc)) from exc
            os.environ[TIMEOUT_ENV] = value
    return click.option("--dist-timeout", callback=apply, expose_value=False,
                        help="Under torchrun: how long a rank may wait in a collective of the training steps or "
                             "the extraction before the job is ended: 4h, 90m, 30s or minutes [default: "
                             "CROSSTVR_DIST_TIMEOUT, else 4h]. Waits for a rank working alone (building the "
                             "manifest, pretraining an encoder, staging, shards finishing apart) are not bound "
                             "by it.")(fn)


def _config_option(fn: Callable) -> Callable:
    """``--config run.json``: the options of an earlier run (its ``run.json``) as this command's
    defaults; options given on the command line still win."""
    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value:
            try:
                record = json.loads(Path(value).read_text())
            except (OSError, ValueError) as exc:
                raise click.BadParameter(f"cannot read {value}: {exc}") from exc
            if record.get("command") != ctx.command.name:
                raise click.BadParameter(f"{value} is a run of {record.get('command')!r}, not {ctx.command.name!r}")
            ctx.default_map = {**(ctx.default_map or {}), **record.get("options", {})}
        return value
    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), is_eager=True,
                        expose_value=False, callback=load,
                        help="A run.json written by an earlier run: reproduce it (given options still win).")(fn)


def _dataclass_options(cls: type, skip: tuple[str, ...] = (), unset: bool = False, **overrides: dict) -> Callable:
    """One option per field of the trainer config ``cls`` (help from its metadata); ``unset``: every
    default is None (the trainer's default applies); ``overrides`` replace an option's settings."""
    kinds = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def apply(fn: Callable) -> Callable:
        for f in reversed(fields):
            flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
            if f.type == "bool":
                kw: dict[str, Any] = {"is_flag": True, "default": None if unset else f.default}
            else:
                default = None if unset or f.default is dataclasses.MISSING else f.default
                kw = {"type": kinds[f.type], "default": default, "show_default": default is not None}
            hint = f" [default: {f.default}]" if unset and f.default not in (None, False) else ""
            fn = click.option(flag, f.name, help=f.metadata.get("help", "") + hint,
                              **{**kw, **overrides.get(f.name, {})})(fn)
        return fn
    return apply


def _record(ctx: click.Context, **resolved: Any) -> dict:
    """What ``--config`` reads back: the command and its options (``resolved`` replacing some)."""
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items()}
    options.update(resolved)
    return {"command": ctx.command.name, "options": options}


@click.group(cls=Main)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("--s3-endpoint", envvar="CROSSTVR_S3_ENDPOINT",
              help="Endpoint of s3:// stores (MinIO, a local server; default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, "
                   "else AWS). Credentials come from the usual AWS variables.")
def main(debug: bool, s3_endpoint: str | None) -> None:
    """Frozen-encoder text-video retrieval: feature cache, stage-one heads, re-ranking."""
    if s3_endpoint:
        import os

        os.environ["CROSSTVR_S3_ENDPOINT"] = s3_endpoint  # read by pipeline.remote when a store is opened


# -- registries ------------------------------------------------------------------------------------
@main.command("datasets")
def datasets_cmd() -> None:
    """List the registered datasets."""
    from manifests import DATASETS

    for name, spec in DATASETS.items():
        click.echo(f"{name:12s} {spec.description}")


@main.command("heads")
@click.option("--options", "show_options", is_flag=True, help="Also list each head's options and defaults.")
def heads_cmd(show_options: bool) -> None:
    """List the registered heads: stage, what each supports, description (and options)."""
    for name, spec in HEADS.items():
        click.echo(f"{name:11s} stage {spec.stage}  {','.join(sorted(spec.supports)) or '-':28s} {spec.description}")
        if show_options:
            click.echo("            " + ", ".join(f"{k}={v!r}" for k, v in head_options(name).items()))
    for name in list_presets():
        preset = get_preset(name)
        click.echo(f"preset {name}: head {preset['head']}; {preset['description']}")
        if show_options:
            click.echo("            " + ", ".join(f"{k}={v!r}" for k, v in {**preset["head_config"],
                                                                             **preset.get("train", {})}.items()))


# -- data ------------------------------------------------------------------------------------------
data_root_option = click.option("--data-root", envvar="DATA_ROOT", default="data", show_default=True,
                                help="Datasets as laid out in docs/DATASETS.md: <data-root>/<dataset>/ (env DATA_ROOT).")
annotations_option = click.option("--annotations", type=click.Path(), help="Official annotation files (real datasets).")
videos_option = click.option("--videos", type=click.Path(), help="Video directory (real datasets).")


@main.command("make-manifest")
@click.option("--dataset", required=True, help="Registered dataset name (see `datasets`).")
@work_dir_option
@click.option("--annotations", type=click.Path(), help="Directory with the official annotation files.")
@click.option("--videos", type=click.Path(), help="Directory with the video files.")
@data_root_option
@click.option("--option", "options", multiple=True, help="Builder option key=value (e.g. seed=1, test_groups=80).")
def make_manifest_cmd(dataset, work_dir, annotations, videos, data_root, options) -> None:
    """Turn a dataset's official annotation files (or the generator) into a Parquet manifest."""
    from workflows.data import make_manifest, missing_videos

    m = make_manifest(WorkDir(work_dir), dataset, annotations, videos, parse_key_values(options, "--option"),
                      data_root)
    click.echo(f"manifest: {m.root}  videos={m.videos.num_rows} captions={m.captions.num_rows}  "
               f"sha256={m.sha256()[:12]}")
    if missing_videos(m):
        click.echo(f"{missing_videos(m)} of {m.videos.num_rows} listed videos are missing on disk "
                   f"(under {m.source.get('video_dir')}); extraction records them as failed")


@main.command("pretrain-encoder")
@work_dir_option
@click.option("--manifest", type=click.Path(), help="Synthetic manifest dir (default: build it).")
@click.option("--option", "options", multiple=True, help="Pretraining option key=value (e.g. seed=1, steps=400).")
def pretrain_encoder_cmd(work_dir, manifest, options) -> None:
    """Pretrain the synthetic world's small CLIP on train-split frame captions (reused if present)."""
    from workflows.data import load_manifest, synthetic_encoder

    work = WorkDir(work_dir)
    m = load_manifest(work, "synthetic", manifest)
    click.echo(f"encoder: {synthetic_encoder(work, m, parse_key_values(options, '--option'))}")


@main.command("probe-encoder")
@work_dir_option
@click.option("--manifest", type=click.Path(), help="Synthetic manifest dir (default: build it under work-dir).")
@click.option("--encoder", "encoders", multiple=True,
              help="Encoder spec to probe; repeatable (default: the pretrained synthetic encoder and the same "
                   "config with random weights).")
@click.option("--steps", default=300, show_default=True, help="Optimisation steps of each linear probe.")
@click.option("--out", type=click.Path(), help="JSON output (default work-dir/reports/probes.json).")
def probe_encoder_cmd(work_dir, manifest, encoders, steps, out) -> None:
    """Calibration of the synthetic world: linear probes (train -> test) on the CLS embedding, the
    mean patch token and the detail's patch token, plus zero-shot retrieval, per encoder."""
    from pipeline.probes import format_probes
    from workflows.data import load_manifest, probe_synthetic_encoders

    work = WorkDir(work_dir)
    results, path = probe_synthetic_encoders(work, load_manifest(work, "synthetic", manifest), encoders, steps, out)
    click.echo(format_probes(results))
    click.echo(f"probes: {path}")


@main.command("extract")
@click.option("--dataset", help="Registered dataset name; its manifest is built under --work-dir.")
@click.option("--manifest", type=click.Path(), help="An existing manifest directory instead of --dataset.")
@work_dir_option
@annotations_option
@videos_option
@click.option("--encoder", "encoders", multiple=True,
              help="Preset (clip-b32, eva-g14), open_clip `model:tag` or `model:/path/ckpt.pt` (a suffix `@N`: "
                   "tokens from visual block N), or `blip2:/path/to/dir` (a Hugging Face BLIP-2 retrieval save); "
                   "repeatable. All encoders run on the same decoded frames.")
@click.option("--store", "stores", multiple=True, help="Store path/URL per --encoder (default under work-dir/stores).")
@data_root_option
@_dataclass_options(ExtractConfig, unset=True)
@click.option("--max-failed", help="Failed videos tolerated in a store: a count (5), a percentage (1%) or a "
                                   "fraction (0.01) [default: 0: any failure exits 1].")
@click.option("--part", help="K/N: write only the shards i with i % N == K, so N processes (on one or several "
                             "machines sharing the store on disk or S3) split one extraction; run K = 0..N-1.")
@_dist_timeout_option
@device_option
@click.option("--option", "options", multiple=True, help="Manifest builder option key=value.")
def extract_cmd(dataset, manifest, work_dir, annotations, videos, encoders, stores, data_root, max_failed, part,
                device, options, **config) -> None:
    """Decode each video once, run every encoder on the sampled frames, write the token stores.

    Frames and text tokens default to the dataset's (12 and 32; 64 and 64 for paragraph datasets).
    Exits 1 when a store holds more failed videos than --max-failed allows (the summary says where
    their reasons are listed); --retry-failed decodes them again once the files are fixed.
    """
    from workflows.data import (check_extraction, extract_config, extract_stores, failure_budget,
                                load_manifest_once)

    work = WorkDir(work_dir)
    m = load_manifest_once(work, resolve_device(device), dataset, manifest, annotations, videos,
                           parse_key_values(options, "--option"), data_root)
    from core.world import world_from_env
    from workflows.share import parse_part

    failure_budget(max_failed, m.videos.num_rows)  # a malformed --max-failed fails before the work
    report, paths = extract_stores(work, m, encoders, stores, extract_config(m, config), device=resolve_device(device),
                                   part=parse_part(part))
    if world_from_env()[0] == 0:  # under torchrun: the merged report, once
        click.echo(report.summary())
        for p in paths:
            click.echo(f"store: {p}")
    check_extraction(report, max_failed)


@main.group("cache")
def cache_group() -> None:
    """Work on an existing token store: info, verify (--repair), pull, export / import HDF5, thumbnails.

    STORE / URL: a path, file://, s3://bucket/key (endpoint and credentials: --s3-endpoint and the AWS
    variables) or http(s):// (read-only)."""


@cache_group.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def cache_info_cmd(store, as_json) -> None:
    """Dataset, encoder identity, sampling, counts per split, failed videos (and where the list is),
    shards done, checksums recorded, size on disk per array, compression ratio."""
    from pipeline.sharing import format_info
    from workflows.share import dumps, info

    result = info(store)
    click.echo(dumps(result) if as_json else format_info(result))


@cache_group.command("verify")
@click.argument("store")
@click.option("--repair", is_flag=True, help="Re-extract just the corrupt or missing shards (needs the store's "
                                             "manifest, its videos at hand, and --encoder).")
@click.option("--manifest", type=click.Path(), help="--repair: the store's manifest directory.")
@click.option("--dataset", help="--repair: or the registered dataset whose manifest is built under --work-dir.")
@click.option("--encoder", help="--repair: the store's encoder spec (checked against the store's identity).")
@work_dir_option
@annotations_option
@videos_option
@data_root_option
@click.option("--workers", default=2, show_default=True, help="--repair: decoder worker processes.")
@device_option
@click.option("--expect", "expect", metavar="DIGEST", help="The store digest it must have (`cache info` prints it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def cache_verify_cmd(store, repair, manifest, dataset, encoder, work_dir, annotations, videos, data_root, workers,
                     device, expect, as_json) -> None:
    """Recompute every shard's checksum, check each record covers its shard's objects, compute the store
    digest; name each corrupt or missing shard (exit 1 when any, when the store recorded no checksums to
    check, or when the digest is not --expect)."""
    from workflows.data import load_manifest
    from workflows.share import dumps, repair as repair_store, verify

    report = verify(store, progress=not as_json, expect=expect)
    click.echo(dumps(report.to_dict()) if as_json else report.summary())
    if repair and report.problems:
        if not encoder:
            raise UsageError("--repair needs --encoder (the store's encoder spec) and --manifest or --dataset")
        m = load_manifest(WorkDir(work_dir), dataset, manifest, annotations, videos, None, data_root)
        report = repair_store(store, report, m, encoder, device=resolve_device(device), workers=workers)
        click.echo("after repair:\n" + report.summary())
    if not report.ok:
        sys.exit(1)


@cache_group.command("pull")
@click.argument("url")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--expect", "expect", metavar="DIGEST", help="The store digest the source and the copy must have.")
def cache_pull_cmd(url, dest, expect) -> None:
    """Copy the store at URL to the local directory DEST (resumable: a re-run copies only what is not
    there yet with the recorded bytes), then verify the copy and its digest (exit 1 when anything does not
    match or could not be verified)."""
    from workflows.share import pull

    report, check = pull(url, dest, expect=expect)
    click.echo(report.summary())
    click.echo(check.summary())
    if not report.ok:
        sys.exit(1)


@cache_group.command("export")
@click.argument("store")
@click.argument("out", type=click.Path(dir_okay=False))
def cache_export_cmd(store, out) -> None:
    """Write every array of STORE and its identity into one HDF5 file OUT (layout: docs/SHARING.md)."""
    from workflows.share import export_h5

    click.echo(f"exported {store} -> {export_h5(store, out)}")


@cache_group.command("import")
@click.argument("h5", type=click.Path(exists=True, dir_okay=False))
@click.argument("store")
@click.option("--manifest", type=click.Path(), help="Another tool's features: the manifest of their videos and "
                                                    "captions (ids, splits).")
@click.option("--dataset", help="Or: the registered dataset whose manifest is built under --work-dir.")
@work_dir_option
@data_root_option
@click.option("--frames", type=int, help="Another tool's features: frames kept per video (default: the most any has).")
@click.option("--shard-size", default=64, show_default=True, help="Another tool's features: videos per shard.")
@click.option("--compressor", help="Another tool's features: zstd, blosc-zstd or blosc-lz4 (default: none).")
@click.option("--limit", "limits", multiple=True, metavar="KEY=VALUE",
              help="Import limits (docs/STORE.md, 'Importing HDF5 safely'), e.g. frames=2048.")
def cache_import_cmd(h5, store, manifest, dataset, work_dir, data_root, frames, shard_size, compressor,
                     limits) -> None:
    """Build a new STORE from an HDF5 file: one `cache export` wrote (the same store back), or
    per-frame features another tool wrote (one dataset per video; docs/SHARING.md)."""
    from workflows.data import load_manifest
    from workflows.share import import_h5

    m = load_manifest(WorkDir(work_dir), dataset, manifest, None, None, None, data_root) \
        if (manifest or dataset) else None
    click.echo(import_h5(h5, store, m, num_frames=frames, shard_size=shard_size, compressor=compressor,
                         limits=parse_key_values(limits, "--limit")))


@cache_group.command("thumbnails")
@click.option("--store", required=True, help="Token store path or s3:// URL (made by `extract`).")
@click.option("--manifest", type=click.Path(), help="The store's manifest directory (its videos must be at hand).")
@click.option("--dataset", help="Or: the registered dataset whose manifest is built under --work-dir.")
@work_dir_option
@annotations_option
@videos_option
@data_root_option
@click.option("--workers", default=2, show_default=True, help="Decoder worker processes.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds before a video's decoding is abandoned.")
def cache_thumbnails_cmd(store, manifest, dataset, work_dir, annotations, videos, data_root, workers, timeout) -> None:
    """Add the thumbnails a store made before they existed lacks: decodes its videos again (the same
    frames it sampled), encodes nothing; resumable, shards that have them are skipped."""
    from workflows.data import add_store_thumbnails, load_manifest

    m = load_manifest(WorkDir(work_dir), dataset, manifest, annotations, videos, None, data_root)
    report = add_store_thumbnails(store, m, workers=workers, timeout=timeout)
    click.echo(report.summary())


# -- stage one -------------------------------------------------------------------------------------
STAGE_ONE_SKIP = ("head_config", "device", "num_threads", "prefetch", "progress")


@main.command("train-stage-one")
@_config_option
@store_option
@head_options_option
@work_dir_option
@stage_dir_option
@click.option("--out", help="Run directory (default work-dir/runs/stage1-<head>).")
@_dataclass_options(StageOneTrainConfig, skip=STAGE_ONE_SKIP,
                    head={"type": click.Choice(list_heads(stage=1)), "default": "seqTransf"})
@_dist_timeout_option
@device_option
@click.option("--fresh", is_flag=True, help="Train again even if --out holds a finished run with the same arguments.")
@click.pass_context
def train_stage_one_cmd(ctx, store, head_options, work_dir, stage_dir, out, device, fresh, **config) -> None:
    """Train a stage-one (cosine) head from cached frame and text embeddings; model selection on val."""
    from workflows.runs import train_stage_one_run

    cfg = StageOneTrainConfig(**config, head_config=parse_key_values(head_options, "--head-option"),
                              device=resolve_device(device))
    ckpt = train_stage_one_run(WorkDir(work_dir, stage_dir), store, cfg, out=out, reuse=not fresh,
                               record=_record(ctx))
    if world_from_env()[0] == 0:  # under torchrun only rank 0 wrote it
        click.echo(f"checkpoint: {ckpt}")


@main.command("eval")
@store_option
@click.option("--stage-one", "stage_one", type=click.Path(exists=True),
              help="Stage-one checkpoint or an imported external stage-one dir (omit: the untrained meanP baseline).")
@click.option("--split", default="test", show_default=True)
@work_dir_option
@stage_dir_option
@click.option("--out", help="Report directory (default work-dir/reports/<split>).")
@click.option("--dsl", is_flag=True, help="Also report dual-softmax (DSL) post-processed scores.")
@click.option("--dsl-temperature", type=float, help="DSL temperature [default: 0.01].")
@click.option("--qb-norm", "qb_norm", is_flag=True, help="Also report QB-Norm (querybank = --qb-bank split).")
@click.option("--qb-bank", default="val", show_default=True, help="QB-Norm querybank split (never a test split).")
@click.option("--qb-k", default=1, show_default=True, help="QB-Norm activation set: top-k of each bank query.")
@click.option("--qb-beta", default=20.0, show_default=True, help="QB-Norm inverse temperature.")
@device_option
@allow_incomplete_option
def eval_cmd(store, stage_one, split, work_dir, stage_dir, out, dsl, dsl_temperature, qb_norm, qb_bank, qb_k,
             qb_beta, device, allow_incomplete) -> None:
    """Evaluate stage one (or the zero-shot meanP baseline): T2V/V2T R@1/5/10, MdR, MnR -> JSON + table."""
    from workflows.runs import evaluate_stage_one

    json_path, table = evaluate_stage_one(WorkDir(work_dir, stage_dir), store, stage_one, split, out, dsl,
                                          dsl_temperature, qb_norm, qb_bank, qb_k, qb_beta, resolve_device(device),
                                          allow_incomplete)
    click.echo(table)
    click.echo(f"report: {json_path}")


@main.command("import-stage-one")
@store_option
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
@work_dir_option
@allow_incomplete_option
def import_stage_one_cmd(store, split, video_emb, text_emb, similarity, no_normalize, name, out, work_dir,
                         allow_incomplete) -> None:
    """Import an external stage one (embeddings or a similarity matrix keyed by the manifest's ids).

    Validates ids, shapes and values, reorders to the split's order and writes
    external_stage_one.json + similarity.npy (+ report.json of its metrics); `rerank --stage-one DIR`
    and `eval --stage-one DIR` then use it like our own stage one.
    """
    from workflows.runs import import_external

    ext, _, table = import_external(WorkDir(work_dir), store, split, out, allow_incomplete, video_emb=video_emb,
                                    text_emb=text_emb, similarity=similarity, normalize=not no_normalize, name=name)
    click.echo(table)
    click.echo(f"imported {ext.summary()}\nexternal stage one: {ext.path}")


@main.command("compare-stage-one")
@click.option("--store", help="Token store path or URL (default: the demo store work-dir/stores/synthetic-*.zarr).")
@click.option("--heads", "head_list", default=",".join(list_heads(stage=1)), show_default=True,
              help="Comma-separated stage-one heads to train and compare.")
@click.option("--head-option", "head_options", multiple=True,
              help="HEAD:key=value, repeatable (e.g. clip2video:num_centers=5).")
@work_dir_option
@stage_dir_option
@click.option("--out", help="Directory for the runs and the report (default work-dir/compare-stage-one).")
@_dataclass_options(StageOneTrainConfig,
                    skip=STAGE_ONE_SKIP + ("head",))
@device_option
@click.option("--threads", type=int, help="Torch CPU threads while training (default: all cores).")
@allow_incomplete_option
def compare_stage_one_cmd(store, head_list, head_options, work_dir, stage_dir, out, device, threads, allow_incomplete,
                          **config) -> None:
    """Train each stage-one head (selection on val), evaluate all on test, print and write one table.

    The table starts with the untrained meanP baseline (zero-shot CLIP on the cached embeddings).
    Writes OUT/compare-stage-one.{json,txt} and OUT/compare-stage-one.runs.json (per head: checkpoint,
    selected epoch, val rsum, options, parameters, training seconds).
    """
    from workflows.experiments import compare_stage_one

    names = [h.strip() for h in head_list.split(",") if h.strip()]
    cfg = StageOneTrainConfig(**config, device=resolve_device(device), num_threads=threads)
    json_path, table = compare_stage_one(WorkDir(work_dir, stage_dir), store, names, head_options, cfg, out,
                                         echo=click.echo, allow_incomplete=allow_incomplete)
    click.echo(table)
    click.echo(f"report: {json_path}")


# -- stage two -------------------------------------------------------------------------------------
manifest_text_option = click.option(
    "--manifest", type=click.Path(exists=True, file_okay=False),
    help="The manifest the store was built from, for a head that reads caption text (BLIP-2-initialised) "
         "[default: work-dir/<dataset>/manifest].")
STAGE_TWO_SKIP = ("head_config", "device", "progress", "eval_batch", "num_threads", "prefetch")


def _preset_option(fn: Callable) -> Callable:
    """``--preset NAME``: a shipped head + recipe (``heads/presets``) as this command's defaults;
    options given on the command line, ``--head-option`` included, still win."""
    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value:
            try:
                preset = get_preset(value)
            except UnknownHeadError as exc:
                raise click.BadParameter(str(exc)) from exc
            ctx.default_map = {**(ctx.default_map or {}), "head": preset["head"], **preset.get("train", {})}
            ctx.meta["preset_head_config"] = dict(preset.get("head_config", {}))
        return value
    return click.option("--preset", is_eager=True, callback=load, expose_value=False,
                        help=f"A shipped head and training recipe ({', '.join(list_presets())}); "
                             f"see `python cli.py heads`.")(fn)


@main.command("train-head")
@_config_option
@_preset_option
@store_option
@click.option("--stage-one", "stage_one", required=True, type=click.Path(exists=True),
              help="Stage-one checkpoint: its train similarities drive hard-negative mining.")
@click.option("--mode", type=click.Choice(["both", "spatial", "temporal"]),
              help="CrossTVR attention passes [default: both].")
@click.option("--unshared", is_flag=True, help="CrossTVR: separate parameters for the temporal pass.")
@click.option("--num-selected", type=int, help="CrossTVR: tokens kept per frame by the selector (M) [default: 4].")
@head_options_option
@_dataclass_options(StageTwoTrainConfig, skip=STAGE_TWO_SKIP,
                    head={"type": click.Choice(list_heads(stage=2))},
                    hard_negatives={"type": click.Choice(HARD_NEGATIVE_MODES)},
                    neg_source={"type": click.Choice(NEGATIVE_SOURCES)},
                    amp={"type": click.Choice(AMP_MODES)})
@click.option("--fresh", is_flag=True, help="Ignore an existing run in --out and start again.")
@work_dir_option
@stage_dir_option
@click.option("--out", help="Run directory (default work-dir/runs/stage2-<head>).")
@_dist_timeout_option
@manifest_text_option
@device_option
@click.pass_context
def train_head_cmd(ctx, store, stage_one, mode, unshared, num_selected, head_options, fresh, work_dir, stage_dir,
                   out, manifest, device, **config) -> None:
    """Train a stage-two re-ranking head (ITM with hard negatives) on cached patch and text tokens."""
    from workflows.runs import train_head

    given = {**ctx.meta.get("preset_head_config", {}), **parse_key_values(head_options, "--head-option")}
    head_config = with_switches(config["head"], given, mode=mode, unshared=unshared, num_selected=num_selected)
    cfg = StageTwoTrainConfig(**config, head_config=head_config, device=resolve_device(device)).resolved()
    record = _record(ctx, mode=None, unshared=False, num_selected=None, head_options=format_key_values(head_config),
                     itc_steps=cfg.itc_steps, itc_weight=cfg.itc_weight, fresh=False)
    ckpt = train_head(WorkDir(work_dir, stage_dir), store, stage_one, cfg, out=out, resume=not fresh, record=record,
                      manifest=manifest)
    if world_from_env()[0] == 0:  # under torchrun only rank 0 wrote it
        click.echo(f"checkpoint: {ckpt}")


@main.command("pretrain-qformer")
@store_option
@click.option("--steps", default=2000, show_default=True, help="Pre-training steps (ITC + ITM on single frames).")
@click.option("--batch-size", default=64, show_default=True, help="Frame-caption pairs per step.")
@click.option("--lr", default=5e-4, show_default=True, help="Peak learning rate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--text-len", default=32, show_default=True, help="Caption length in tokens.")
@click.option("--num-threads", type=int, help="Torch CPU threads (default: all cores).")
@click.option("--option", "options", multiple=True, help="Q-Former option key=value (width, layers, heads, ...).")
@work_dir_option
@stage_dir_option
@click.option("--out", help="Output directory (default work-dir/encoders/qformer-<hash>).")
@manifest_text_option
@device_option
def pretrain_qformer_cmd(store, steps, batch_size, lr, seed, text_len, num_threads, options, work_dir, stage_dir, out,
                         manifest, device) -> None:
    """Pre-train a Q-Former as BLIP-2's first stage does (ITC + ITM) on the store's train-split frames and
    captions; it is saved as a BLIP-2 checkpoint directory for `train-head --init-from`."""
    from workflows.runs import pretrain_qformer_run

    path = pretrain_qformer_run(WorkDir(work_dir, stage_dir), store, out=out, steps=steps, batch_size=batch_size,
                                lr=lr, seed=seed, text_len=text_len, device=resolve_device(device),
                                manifest=manifest, options=parse_key_values(options, "--option"),
                                num_threads=num_threads)
    click.echo(f"BLIP-2 checkpoint: {path}")


@main.command("rerank")
@store_option
@click.option("--stage-one", "stage_one", required=True, type=click.Path(exists=True),
              help="Stage-one checkpoint (stage_one.pt or its run dir) or an imported external similarity dir.")
@click.option("--head", "head_ckpt", required=True, type=click.Path(exists=True),
              help="Stage-two checkpoint (stage_two.pt or its run dir).")
@click.option("--split", default="test", show_default=True)
@click.option("--k", "k", default=15, show_default=True, help="Candidates re-ranked per query.")
@click.option("--dsl", is_flag=True, help="Dual-softmax post-processing of stage one and the re-ranked scores.")
@click.option("--dsl-temperature", type=float, help="Dual-softmax temperature [default: 0.01].")
@click.option("--batch-size", default=64, show_default=True, help="Pairs per head forward pass.")
@work_dir_option
@stage_dir_option
@click.option("--out", help="Output directory (default work-dir/reports/rerank-<split>).")
@manifest_text_option
@device_option
@allow_incomplete_option
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False),
              help="An `index build` directory of this split and stage one: the T2V candidate lists come from "
                   "its search (exact or approximate) instead of the full similarity's top K.")
@click.option("--nprobe", type=int, help="IVF index: cells scanned per query [default: the index's].")
@click.option("--ef-search", type=int, help="HNSW index: candidates kept per query [default: the index's].")
def rerank_cmd(store, stage_one, head_ckpt, split, k, dsl, dsl_temperature, batch_size, work_dir, stage_dir, out,
               manifest, device, allow_incomplete, index_dir, nprobe, ef_search) -> None:
    """Re-rank every query's stage-one top K with a stage-two head (final = cosine + head score).

    Writes ranked_t2v.parquet / ranked_v2t.parquet (each query's re-ranked top K), metrics.json
    (stage one vs re-ranked, T2V and V2T, with stage one's R@K) and prints the table.
    """
    from workflows.runs import rerank_split

    paths, table, res = rerank_split(WorkDir(work_dir, stage_dir), store, stage_one, head_ckpt, split=split, k=k,
                                     dsl=dsl, dsl_temperature=dsl_temperature, out=out, device=resolve_device(device),
                                     batch_size=batch_size, allow_incomplete=allow_incomplete, manifest=manifest,
                                     index=index_dir, nprobe=nprobe, ef_search=ef_search)
    if index_dir:
        info = json.loads(paths["run"].read_text())["t2v_candidates_from_index"]
        click.echo(f"T2V candidates from the {info['kind']} index {index_dir}: "
                   f"{100 * info['recall@K vs exact']:.1f}% of the exact top {k}")
    click.echo(table)
    click.echo(f"{res.num_pairs} pairs scored in {res.seconds['scoring']:.1f}s; outputs: {paths['metrics'].parent}")


@main.command("ablation")
@click.option("--store", help="Token store (default: the demo store under work-dir; built by the demo if missing).")
@click.option("--stage-one", "stage_one", type=click.Path(exists=True),
              help="Stage-one checkpoint (default: the demo's stage-one run with the best val score).")
@click.option("--variants", default=",".join(ABLATION_VARIANTS), show_default=True,
              help=f"Comma-separated subset of {', '.join(ABLATION_VARIANTS)}.")
@click.option("--k", "k", default=15, show_default=True, help="Candidates re-ranked per query.")
@head_options_option
@_dataclass_options(StageTwoTrainConfig, skip=STAGE_TWO_SKIP + ("head", "seed", "max_steps"), unset=True,
                    hard_negatives={"type": click.Choice(HARD_NEGATIVE_MODES)},
                    neg_source={"type": click.Choice(NEGATIVE_SOURCES)},
                    amp={"type": click.Choice(AMP_MODES)})
@work_dir_option
@stage_dir_option
@click.option("--out", help="Directory for the runs and the table (default work-dir/ablation).")
@seed_option
@click.option("--seeds", help="Comma-separated seeds: every variant is trained once per seed and the table "
              "gives means and standard deviations [default: --seed alone].")
@click.option("--manifest", type=click.Path(exists=True, file_okay=False),
              help="The store's manifest, for the within-group accuracy of a benchmark with near-duplicate "
                   "groups [default: work-dir/<dataset>/manifest when it is the store's].")
@device_option
@allow_incomplete_option
@click.pass_context
def ablation_cmd(ctx, store, stage_one, variants, k, head_options, work_dir, stage_dir, out, seed, seeds, manifest,
                 device, allow_incomplete, **config) -> None:
    """Stage-two ablation: stage one / +spatial / +temporal / both (shared) / both (unshared) /
    both without the contrastive (ITC) training / T2V2T, in one table.

    Trains each head once per seed (epoch selected on val only), re-ranks the test split's stage-one
    top K and writes OUT/ablation.{json,txt} (means over seeds, R@1's standard deviation) and each
    run's outputs to OUT/<variant>/ (OUT/<variant>-seed<S>/ with --seeds); finished runs are
    reused. On a benchmark with near-duplicate groups (the synthetic one) it also writes the
    within-group accuracy per varied attribute of each variant, OUT/ablation-groups.{json,txt}.
    Without --store the demo's store is used (the demo runs first when it is missing).
    """
    from workflows.experiments import ablation

    work = WorkDir(work_dir, stage_dir)
    if store is None and not work.synthetic_stores():
        click.echo(f"no demo store under {work.root / 'stores'}: running the demo first")
        ctx.invoke(demo_cmd, work_dir=work_dir, seed=seed, device=device)
    given = {k_: v for k_, v in config.items() if v is not None}
    head_config = parse_key_values(head_options, "--head-option")
    demo_defaults = store is None and stage_one is None and out is None and not given
    cfg = StageTwoTrainConfig(**given, head_config=head_config, seed=seed, device=resolve_device(device))
    names = [v.strip() for v in variants.split(",") if v.strip()]
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds")
    json_path, table = ablation(work, names, cfg, store=store, stage_one=stage_one, k=k, out=out,
                                demo_defaults=demo_defaults, echo=click.echo, allow_incomplete=allow_incomplete,
                                seeds=seed_list, manifest=manifest)
    click.echo(f"test split, top {k} re-ranked (model selection on val)")
    click.echo(table)
    click.echo(f"report: {json_path}")


# -- index and search ------------------------------------------------------------------------------
@main.group("index")
def index_group() -> None:
    """A FAISS index of a split's stage-one video embeddings (for `search` and `rerank --index`)."""


@index_group.command("build")
@store_option
@click.option("--stage-one", "stage_one", required=True, type=click.Path(exists=True),
              help="Stage-one checkpoint (stage_one.pt or its run dir): its video embeddings are indexed.")
@click.option("--split", default="test", show_default=True, help="The split whose videos are indexed.")
@click.option("--kind", type=click.Choice(INDEX_KINDS), default="flat", show_default=True,
              help="flat: exact inner product; ivf / hnsw: approximate (recall vs exact measured and saved).")
@click.option("--option", "options", multiple=True,
              help="Index option key=value: ivf nlist, nprobe, train_size; hnsw m, ef_construction, ef_search.")
@click.option("--out", help="Index directory (default work-dir/indexes/<store>-<split>-<stage one>-<kind>).")
@click.option("--threads", type=int, help="FAISS threads (default: all cores).")
@work_dir_option
@stage_dir_option
@seed_option
@device_option
def index_build_cmd(store, stage_one, split, kind, options, out, threads, work_dir, stage_dir, seed, device) -> None:
    """Encode the split's videos with the stage one and index them (index.faiss, video_ids.json, index.json)."""
    from workflows.search import build_video_index

    vi = build_video_index(WorkDir(work_dir, stage_dir), store, stage_one, split=split, kind=kind,
                           options=parse_key_values(options, "--option"), out=out, device=resolve_device(device),
                           threads=threads, seed=seed)
    click.echo(f"{vi.kind} index of {vi.size} videos ({vi.meta['dim']}-d, split {split!r}) built in "
               f"{vi.meta['build_seconds']:.1f}s: {vi.path}")
    rec = vi.meta.get("recall")
    if rec:
        click.echo(f"recall vs exact on {rec['queries']} captions: R@10 {100 * rec['recall@10']:.1f}%  "
                   f"R@100 {100 * rec['recall@100']:.1f}% (of the top {rec['k_max']})")


@main.command("search")
@store_option
@click.option("--stage-one", "stage_one", required=True, type=click.Path(exists=True),
              help="Stage-one checkpoint (stage_one.pt or its run dir).")
@click.option("--head", "head_ckpt", type=click.Path(exists=True),
              help="Stage-two checkpoint: re-rank each query's --candidates best by cosine + head score.")
@click.argument("queries", nargs=-1, required=True)
@click.option("--split", default="test", show_default=True, help="The split searched (the index's).")
@click.option("--k", "k", default=10, show_default=True, help="Videos printed per query.")
@click.option("--candidates", default=15, show_default=True, help="Stage-one candidates the head re-ranks.")
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False),
              help="An `index build` directory (default: the exact index under work-dir/indexes, built if missing).")
@click.option("--nprobe", type=int, help="IVF index: cells scanned per query.")
@click.option("--ef-search", type=int, help="HNSW index: candidates kept per query.")
@click.option("--encoder", help="The store's frozen encoder (spec or checkpoint) when its weights are local files "
                                "(default: found under work-dir/encoders by the store's encoder identity).")
@click.option("--out", help="Also write the results to this .json or .parquet file.")
@click.option("--batch-size", default=64, show_default=True, help="Pairs per head forward pass.")
@work_dir_option
@stage_dir_option
@device_option
def search_cmd(store, stage_one, head_ckpt, queries, split, k, candidates, index_dir, nprobe, ef_search, encoder,
               out, batch_size, work_dir, stage_dir, device) -> None:
    """Text-to-video search: each QUERY is encoded by the store's own text encoder and stage one, the
    index gives the top videos of the split (cosine), and with --head they are re-ranked."""
    from workflows.search import format_results, search_videos, write_results

    table = search_videos(WorkDir(work_dir, stage_dir), store, stage_one, list(queries), head_ckpt=head_ckpt,
                          split=split, k=k, candidates=candidates, index=index_dir, encoder=encoder,
                          device=resolve_device(device), batch_size=batch_size, nprobe=nprobe, ef_search=ef_search,
                          echo=click.echo)
    click.echo(format_results(table))
    if out:
        click.echo(f"results: {write_results(table, out)}")


# -- reports ---------------------------------------------------------------------------------------
@main.command("report")
@click.option("--rerank-dir", required=True, help="Output directory of `rerank` (metrics.json, run.json, ranked lists).")
@click.option("--run", "runs", multiple=True, help="Training run directory whose curves to show; repeatable.")
@click.option("-o", "--out", help="HTML file to write (default RERANK_DIR/report.html).")
@click.option("--store", help="Token store with the thumbnails (default: the store the re-ranking used).")
@click.option("--manifest", type=click.Path(), help="The store's manifest directory, for caption texts and the "
                                                    "synthetic groups (default: found in the store's work dir).")
@click.option("--improved", default=5, show_default=True, help="Queries the re-ranker improved most to show.")
@click.option("--hurt", default=5, show_default=True, help="Queries the re-ranker hurt most to show.")
@click.option("--random", "random_", default=5, show_default=True, help="Random queries to show.")
@click.option("--max-k", default=50, show_default=True, help="The recall curve's last K.")
@seed_option
def report_cmd(rerank_dir, runs, out, store, manifest, improved, hurt, random_, max_k, seed) -> None:
    """One self-contained HTML page of a re-ranking: metrics, recall@K curves, rank changes, training
    curves of the given runs, within-group accuracy (synthetic benchmark) and sample queries with
    their top 5 before and after re-ranking (thumbnails from the store)."""
    from workflows.reports import ReportOptions, retrieval_report

    options = ReportOptions(improved=improved, hurt=hurt, random=random_, seed=seed, max_k=max_k)
    path, context = retrieval_report(rerank_dir, runs, out, store, manifest, options)
    for note in context["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"report: {path}")


# -- demo ------------------------------------------------------------------------------------------
@main.command("demo")
@work_dir_option
@seed_option
@device_option
def demo_cmd(work_dir, seed, device) -> None:
    """The synthetic benchmark end to end: generate, pretrain encoder, extract, train stage one and
    stage two, evaluate stage one and the re-ranked top 15 on the test split; ends with the path of
    its HTML report."""
    from workflows.experiments import demo

    demo(WorkDir(work_dir), seed=seed, device=resolve_device(device), echo=click.echo)


if __name__ == "__main__":
    sys.exit(main())
