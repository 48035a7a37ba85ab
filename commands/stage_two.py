"""The stage-two commands: train-head, pretrain-qformer, rerank, ablation."""

from __future__ import annotations

import click

from commands.options import (STAGE_TWO_SKIP, allow_incomplete_option, config_option, dataclass_options, device_option,
                              dist_timeout_option, head_option_option, manifest_text_option, preset_option, renamed,
                              run_record, seed_option, stage_dir_option, stage_one_option, stage_two_option,
                              store_option, threads_option, work_dir_option)
from core.options import format_key_values, parse_key_values
from core.torchrun import torchrun_ranks
from heads.registry import check_options, list_heads
from heads.stage_two.config import (ABLATION_VARIANTS, HARD_NEGATIVE_MODES, NEGATIVE_SOURCES, PRECISIONS,
                                    StageTwoTrainConfig, with_switches)
from workflows.workdir import WorkDir, resolve_device


@click.command("train-head")
@config_option
@preset_option
@store_option
@click.option("--stage-one", "stage_one", required=True, type=click.Path(exists=True),
              help="Stage-one checkpoint: its train similarities drive hard-negative mining.")
@click.option("--mode", type=click.Choice(["both", "spatial", "temporal"]),
              help="CrossTVR attention passes [default: both].")
@click.option("--shared/--no-shared", default=None,
              help="CrossTVR: one set of parameters for the spatial and temporal passes, or separate ones "
                   "[default: shared].")
@click.option("--num-selected", type=int, help="CrossTVR: tokens kept per frame by the selector (M) [default: 4].")
@head_option_option
@dataclass_options(StageTwoTrainConfig, skip=STAGE_TWO_SKIP,
                    head={"type": click.Choice(list_heads(stage=2))},
                    hard_negatives={"type": click.Choice(HARD_NEGATIVE_MODES)},
                    neg_source={"type": click.Choice(NEGATIVE_SOURCES)},
                    precision={"type": click.Choice(PRECISIONS)})
@click.option("--fresh", is_flag=True, help="Ignore an existing run in --out and start again.")
@work_dir_option
@stage_dir_option
@click.option("--out", help="Run directory (default work-dir/runs/stage2-<head>).")
@dist_timeout_option
@manifest_text_option
@device_option
@renamed("--unshared", "--no-shared", "shared", value=False, is_flag=True)
@renamed("--amp", "--precision", "precision", type=click.Choice(("auto", "bf16", "off")),
         values={"off": "fp32"})
@renamed("--val-k", "--val-candidates", "val_candidates", type=int)
@click.pass_context
def train_head_cmd(ctx, store, stage_one, mode, shared, num_selected, head_option, fresh, work_dir, stage_dir,
                   out, manifest, device, **config) -> None:
    """Train a stage-two re-ranking head (ITM with hard negatives) on cached patch and text tokens."""
    from workflows.runs import train_head

    given = {**ctx.meta.get("preset_head_config", {}), **parse_key_values(head_option, "--head-option")}
    head_config = with_switches(config["head"], given, mode=mode, shared=shared, num_selected=num_selected)
    check_options(config["head"], head_config, "--head-option")
    cfg = StageTwoTrainConfig(**config, head_config=head_config, device=resolve_device(device)).resolved()
    record = run_record(ctx, mode=None, shared=None, num_selected=None, head_option=format_key_values(head_config),
                     itc_steps=cfg.itc_steps, itc_weight=cfg.itc_weight, fresh=False)
    ckpt = train_head(WorkDir(work_dir, stage_dir), store, stage_one, cfg, out=out, resume=not fresh, record=record,
                      manifest=manifest)
    if torchrun_ranks()[0] == 0:  # under torchrun only rank 0 wrote it
        click.echo(f"checkpoint: {ckpt}")


@click.command("pretrain-qformer")
@store_option
@click.option("--steps", default=2000, show_default=True, help="Pre-training steps (ITC + ITM on single frames).")
@click.option("--batch-size", default=64, show_default=True, help="Frame-caption pairs per step.")
@click.option("--lr", default=5e-4, show_default=True, help="Peak learning rate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--text-len", default=32, show_default=True, help="Caption length in tokens.")
@click.option("--itm-negatives", type=click.IntRange(1, 2), default=2, show_default=True,
              help="ITM negatives per positive: 2 (BLIP-2's: another video and another caption) or 1 (half the "
                   "batch each; a third less ITM work per step).")
@threads_option
@click.option("--option", "options", multiple=True, help="Q-Former option key=value (width, layers, heads, ...).")
@work_dir_option
@stage_dir_option
@click.option("--out", help="Output directory (default work-dir/encoders/qformer-<hash>).")
@manifest_text_option
@device_option
@renamed("--num-threads", "--threads", "threads", type=int)
def pretrain_qformer_cmd(store, steps, batch_size, lr, seed, text_len, itm_negatives, threads, options, work_dir,
                         stage_dir, out, manifest, device) -> None:
    """Pre-train a Q-Former as BLIP-2's first stage does (ITC + ITM) on the store's train-split frames and
    captions; it is saved as a BLIP-2 checkpoint directory for `train-head --init-from`."""
    from workflows.runs import pretrain_qformer_run

    path = pretrain_qformer_run(WorkDir(work_dir, stage_dir), store, out=out, steps=steps, batch_size=batch_size,
                                lr=lr, seed=seed, text_len=text_len, itm_negatives=itm_negatives,
                                device=resolve_device(device),
                                manifest=manifest, options=parse_key_values(options, "--option"),
                                num_threads=threads)
    click.echo(f"BLIP-2 checkpoint: {path}")


@click.command("rerank")
@store_option
@stage_one_option("Stage-one checkpoint (stage_one.pt or its run dir) or an imported external similarity dir.")
@stage_two_option("Stage-two checkpoint (stage_two.pt or its run dir).  [required]")
@click.option("--split", default="test", show_default=True)
@click.option("--candidates", default=15, show_default=True, help="Stage-one candidates re-ranked per query (K).")
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
@renamed("--head", "--stage-two", "stage_two", type=click.Path(exists=True))
@renamed("--k", "--candidates", "candidates", type=int)
def rerank_cmd(store, stage_one, stage_two, split, candidates, dsl, dsl_temperature, batch_size, work_dir, stage_dir, out,
               manifest, device, allow_incomplete, index_dir, nprobe, ef_search) -> None:
    """Re-rank every query's stage-one top K with a stage-two head (final = cosine + head score).

    Writes ranked_t2v.parquet / ranked_v2t.parquet (each query's re-ranked top K), metrics.json
    (stage one vs re-ranked, T2V and V2T, with stage one's R@K) and prints the table.
    """
    from workflows.runs import rerank_split

    if not stage_two:
        raise click.UsageError("Missing option '--stage-two'.")
    paths, table, res = rerank_split(WorkDir(work_dir, stage_dir), store, stage_one, stage_two, split=split,
                                     candidates=candidates,
                                     dsl=dsl, dsl_temperature=dsl_temperature, out=out, device=resolve_device(device),
                                     batch_size=batch_size, allow_incomplete=allow_incomplete, manifest=manifest,
                                     index=index_dir, nprobe=nprobe, ef_search=ef_search)
    click.echo(table)
    click.echo(f"{res.num_pairs} pairs scored in {res.seconds['scoring']:.1f}s; outputs: {paths['metrics'].parent}")


@click.command("ablation")
@click.option("--store", help="Token store (default: the demo store under work-dir; built by the demo if missing).")
@click.option("--stage-one", "stage_one", type=click.Path(exists=True),
              help="Stage-one checkpoint (default: the demo's stage-one run with the best val score).")
@click.option("--variants", default=",".join(ABLATION_VARIANTS), show_default=True,
              help=f"Comma-separated subset of {', '.join(ABLATION_VARIANTS)}.")
@click.option("--candidates", default=15, show_default=True, help="Stage-one candidates re-ranked per query (K).")
@head_option_option
@dataclass_options(StageTwoTrainConfig, skip=STAGE_TWO_SKIP + ("head", "seed", "max_steps"), unset=True,
                    hard_negatives={"type": click.Choice(HARD_NEGATIVE_MODES)},
                    neg_source={"type": click.Choice(NEGATIVE_SOURCES)},
                    precision={"type": click.Choice(PRECISIONS)})
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
@renamed("--k", "--candidates", "candidates", type=int)
@renamed("--amp", "--precision", "precision", type=click.Choice(("auto", "bf16", "off")),
         values={"off": "fp32"})
@renamed("--val-k", "--val-candidates", "val_candidates", type=int)
@click.pass_context
def ablation_cmd(ctx, store, stage_one, variants, candidates, head_option, work_dir, stage_dir, out, seed, seeds, manifest,
                 device, allow_incomplete, **config) -> None:
    """Stage-two ablation: stage one / +spatial / +temporal / both (shared) / both (unshared) /
    both without the contrastive (ITC) training / T2V2T, in one table.

    Trains each head once per seed (epoch selected on val only), re-ranks the test split's stage-one
    top K and writes OUT/ablation.{json,txt} (means over seeds, R@1's standard deviation) and each
    run's outputs to OUT/<variant>/ (OUT/<variant>-seed<S>/ with --seeds); finished runs are
    reused. On a benchmark with near-duplicate groups (the synthetic one) it also writes the
    within-group accuracy per varied attribute of each variant, OUT/ablation-groups.{json,txt}.
    Without --store the demo's store is used (the demo runs first when it is missing), with the
    demo's recipe: CrossTVR heads start from the world's pre-trained Q-Former unless --init-from says
    otherwise.
    """
    from workflows.experiments import ablation

    work = WorkDir(work_dir, stage_dir)
    if store is None and not work.synthetic_stores():
        click.echo(f"no demo store under {work.stores_dir()}: running the demo first")
        from workflows.experiments import demo

        demo(work, seed=seed, device=resolve_device(device), echo=click.echo)
    given = {k: v for k, v in config.items() if v is not None}
    head_config = parse_key_values(head_option, "--head-option")
    demo_defaults = store is None and stage_one is None and out is None and not given
    if store is None and "init_from" not in given:  # the demo's recipe: heads start from the world's Q-Former
        from workflows.experiments import demo_stage_two_config

        cfg = demo_stage_two_config(work, work.default_store(), seed=seed, device=resolve_device(device),
                                    echo=click.echo, head_config=head_config, **given)
    else:
        cfg = StageTwoTrainConfig(**given, head_config=head_config, seed=seed, device=resolve_device(device))
    names = [v.strip() for v in variants.split(",") if v.strip()]
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds")
    json_path, table = ablation(work, names, cfg, store=store, stage_one=stage_one, candidates=candidates, out=out,
                                demo_defaults=demo_defaults, echo=click.echo, allow_incomplete=allow_incomplete,
                                seeds=seed_list, manifest=manifest)
    click.echo(f"test split, top {candidates} re-ranked (model selection on val)")
    click.echo(table)
    click.echo(f"report: {json_path}")


COMMANDS = (train_head_cmd, pretrain_qformer_cmd, rerank_cmd, ablation_cmd)
