"""The stage-one commands: train-stage-one, eval, import-stage-one, compare-stage-one."""

from __future__ import annotations

import click

from commands.options import (STAGE_ONE_SKIP, allow_incomplete_option, config_option, dataclass_options, device_option,
                              dist_timeout_option, head_option_option, run_record, stage_dir_option, store_option,
                              work_dir_option)
from core.options import parse_key_values
from core.torchrun import torchrun_ranks
from heads.registry import check_options, list_heads
from heads.stage_one.config import StageOneTrainConfig
from workflows.workdir import WorkDir, resolve_device


# -- stage one -------------------------------------------------------------------------------------



@click.command("train-stage-one")
@config_option
@store_option
@head_option_option
@work_dir_option
@stage_dir_option
@click.option("--out", help="Run directory (default work-dir/runs/stage1-<head>).")
@dataclass_options(StageOneTrainConfig, skip=STAGE_ONE_SKIP,
                    head={"type": click.Choice(list_heads(stage=1)), "default": "seqTransf"})
@dist_timeout_option
@device_option
@click.option("--fresh", is_flag=True, help="Train again even if --out holds a finished run with the same arguments.")
@click.pass_context
def train_stage_one_cmd(ctx, store, head_option, work_dir, stage_dir, out, device, fresh, **config) -> None:
    """Train a stage-one (cosine) head from cached frame and text embeddings; model selection on val."""
    from workflows.runs import train_stage_one_run

    cfg = StageOneTrainConfig(**config, head_config=parse_key_values(head_option, "--head-option"),
                              device=resolve_device(device))
    check_options(cfg.head, cfg.head_config, "--head-option")
    ckpt = train_stage_one_run(WorkDir(work_dir, stage_dir), store, cfg, out=out, reuse=not fresh,
                               record=run_record(ctx))
    if torchrun_ranks()[0] == 0:  # under torchrun only rank 0 wrote it
        click.echo(f"checkpoint: {ckpt}")


@click.command("eval")
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

    json_path, table = evaluate_stage_one(WorkDir(work_dir, stage_dir), store, stage_one, split=split, out=out,
                                          dsl=dsl, dsl_temperature=dsl_temperature, qb_norm=qb_norm, qb_bank=qb_bank,
                                          qb_k=qb_k, qb_beta=qb_beta, device=resolve_device(device),
                                          allow_incomplete=allow_incomplete)
    click.echo(table)
    click.echo(f"report: {json_path}")


@click.command("import-stage-one")
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


@click.command("compare-stage-one")
@click.option("--store", help="Token store path or URL (default: the demo store work-dir/stores/synthetic-*.zarr).")
@click.option("--heads", "head_list", default=",".join(list_heads(stage=1)), show_default=True,
              help="Comma-separated stage-one heads to train and compare.")
@click.option("--head-option", "head_option", multiple=True,
              help="HEAD:key=value, repeatable (e.g. clip2video:num_centers=5).")
@work_dir_option
@stage_dir_option
@click.option("--out", help="Directory for the runs and the report (default work-dir/compare-stage-one).")
@dataclass_options(StageOneTrainConfig,
                    skip=STAGE_ONE_SKIP + ("head",))
@device_option
@click.option("--threads", type=int, help="Torch CPU threads while training (default: all cores).")
@allow_incomplete_option
def compare_stage_one_cmd(store, head_list, head_option, work_dir, stage_dir, out, device, threads, allow_incomplete,
                          **config) -> None:
    """Train each stage-one head (selection on val), evaluate all on test, print and write one table.

    The table starts with the untrained meanP baseline (zero-shot CLIP on the cached embeddings).
    Writes OUT/compare-stage-one.{json,txt} and OUT/compare-stage-one.runs.json (per head: checkpoint,
    selected epoch, val rsum, options, parameters, training seconds).
    """
    from workflows.experiments import compare_stage_one

    names = [h.strip() for h in head_list.split(",") if h.strip()]
    cfg = StageOneTrainConfig(**config, device=resolve_device(device), num_threads=threads)
    json_path, table = compare_stage_one(WorkDir(work_dir, stage_dir), store, names, head_option, cfg, out,
                                         echo=click.echo, allow_incomplete=allow_incomplete)
    click.echo(table)
    click.echo(f"report: {json_path}")


COMMANDS = (train_stage_one_cmd, eval_cmd, import_stage_one_cmd, compare_stage_one_cmd)
