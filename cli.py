"""Command line: options, messages and calls into ``workflows`` (which own the work) and the library.

Heavy imports happen inside the commands, so ``python cli.py --help`` is instant. Errors a user can
fix (the project's ``CrossTVRError`` hierarchy, manifest errors, missing files) end the command
with one line and a non-zero exit (2 for a wrong option or input, 1 otherwise).
"""
from __future__ import annotations

import sys
from typing import Any

import click

from commands.cache import COMMANDS as CACHE_COMMANDS
from commands.options import (FAILURE_BUDGET_TYPE, PART_TYPE, dataclass_options, device_option, dist_timeout_option,
                              manifest_source, seed_option, work_dir_option)
from commands.search import COMMANDS as SEARCH_COMMANDS
from commands.serve import COMMANDS as SERVE_COMMANDS
from commands.stage_one import COMMANDS as STAGE_ONE_COMMANDS
from commands.stage_two import COMMANDS as STAGE_TWO_COMMANDS
from core.errors import CrossTVRError, UnknownOptionError, UsageError
from core.options import parse_key_values
from heads.registry import HEADS, get_preset, head_defaults, list_presets
from pipeline.config import ExtractConfig
from workflows.sources import ManifestSource
from workflows.workdir import WorkDir, resolve_device


# -- errors and options ----------------------------------------------------------------------------
class Main(click.Group):
    """The command group: the project's errors become one clear line and a non-zero exit (2 for a
    wrong option, input file or annotation row, 1 for a job that did not fully succeed); with
    ``--debug`` they keep their traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from manifests import ManifestError, UnknownDatasetError

        try:
            return super().invoke(ctx)
        except (UsageError, UnknownOptionError, ManifestError, UnknownDatasetError) as exc:
            if ctx.params.get("debug"):
                raise
            raise click.UsageError(str(exc)) from exc
        except (CrossTVRError, FileNotFoundError) as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(exc)) from exc


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
            click.echo("            " + ", ".join(f"{k}={v!r}" for k, v in head_defaults(name).items()))
    for name in list_presets():
        preset = get_preset(name)
        click.echo(f"preset {name}: head {preset['head']}; {preset['description']}")
        if show_options:
            click.echo("            " + ", ".join(f"{k}={v!r}" for k, v in {**preset["head_config"],
                                                                             **preset.get("train", {})}.items()))


# -- data ------------------------------------------------------------------------------------------



@main.command("make-manifest")
@manifest_source(existing=False)
@work_dir_option
def make_manifest_cmd(source, work_dir) -> None:
    """Turn a dataset's official annotation files (or the generator) into a Parquet manifest."""
    from workflows.data import load_manifest, missing_videos

    m = load_manifest(WorkDir(work_dir), source)
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
    m = load_manifest(work, ManifestSource(dataset="synthetic", manifest=manifest))
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
    from synthetic.probes import format_probes
    from workflows.data import load_manifest, probe_synthetic_encoders

    work = WorkDir(work_dir)
    m = load_manifest(work, ManifestSource(dataset="synthetic", manifest=manifest))
    results, path = probe_synthetic_encoders(work, m, encoders, steps, out)
    click.echo(format_probes(results))
    click.echo(f"probes: {path}")


@main.command("extract")
@manifest_source()
@work_dir_option
@click.option("--encoder", "encoders", multiple=True,
              help="Preset (clip-b32, eva-g14), open_clip `model:tag` or `model:/path/ckpt.pt` (a suffix `@N`: "
                   "tokens from visual block N), or `blip2:/path/to/dir` (a Hugging Face BLIP-2 retrieval save); "
                   "repeatable. All encoders run on the same decoded frames.")
@click.option("--store", "stores", multiple=True, help="Store path/URL per --encoder (default under work-dir/stores).")
@dataclass_options(ExtractConfig, unset=True)
@click.option("--max-failed", type=FAILURE_BUDGET_TYPE,
              help="Failed videos tolerated in a store: a count (5), a percentage (1%) or a fraction (0.01) "
                   "[default: 0: any failure exits 1].")
@click.option("--part", type=PART_TYPE,
              help="K/N: write only the shards i with i % N == K, so N processes (on one or several machines "
                   "sharing the store on disk or S3) split one extraction; run K = 0..N-1.")
@dist_timeout_option
@device_option
def extract_cmd(source, work_dir, encoders, stores, max_failed, part, device, **config) -> None:
    """Decode each video once, run every encoder on the sampled frames, write the token stores.

    Frames and text tokens default to the dataset's (12 and 32; 64 and 64 for paragraph datasets).
    Exits 1 when a store holds more failed videos than --max-failed allows (the summary says where
    their reasons are listed); --retry-failed decodes them again once the files are fixed.
    """
    from core.torchrun import torchrun_ranks
    from workflows.data import check_failures, extract_config, extract_stores, load_manifest_once

    work = WorkDir(work_dir)
    m = load_manifest_once(work, resolve_device(device), source)
    report, paths = extract_stores(work, m, encoders, stores, extract_config(m, config), device=resolve_device(device),
                                   part=part)
    if torchrun_ranks()[0] == 0:  # under torchrun: the merged report, once
        click.echo(report.summary())
        for p in paths:
            click.echo(f"store: {p}")
    check_failures(report, max_failed)




# -- demo ------------------------------------------------------------------------------------------
@main.command("demo")
@work_dir_option
@seed_option
@device_option
@click.option("--qformer-option", "qformer_options", multiple=True,
              help="The world's Q-Former setting key=value, repeatable (steps, batch_size, lr, itm_negatives, "
                   "captions, ...); docs/benchmarks/qformer.md measures the choices.")
def demo_cmd(work_dir, seed, device, qformer_options) -> None:
    """The synthetic benchmark end to end: generate, pretrain encoder, extract, train stage one and
    stage two, evaluate stage one and the re-ranked top 15 on the test split; ends with the path of
    its HTML report."""
    from core.options import parse_key_values
    from workflows.experiments import demo

    demo(WorkDir(work_dir), seed=seed, device=resolve_device(device), echo=click.echo,
         qformer_options=parse_key_values(qformer_options, "--qformer-option"))


# -- the commands of each stage (commands/) ---------------------------------------------------------
for command in (*CACHE_COMMANDS, *STAGE_ONE_COMMANDS, *STAGE_TWO_COMMANDS, *SEARCH_COMMANDS,
                *SERVE_COMMANDS):
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
