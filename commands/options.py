"""The options several commands share, and the helpers that build options from configs and record runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import click

from core.errors import UnknownHeadError, UsageError
from heads.registry import get_preset, list_presets
from workflows.workdir import DEFAULT_WORK

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


def dist_timeout_option(fn: Callable) -> Callable:
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


def config_option(fn: Callable) -> Callable:
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


def dataclass_options(cls: type, skip: tuple[str, ...] = (), unset: bool = False, **overrides: dict) -> Callable:
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


def run_record(ctx: click.Context, **resolved: Any) -> dict:
    """What ``--config`` reads back: the command and its options (``resolved`` replacing some)."""
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items()}
    options.update(resolved)
    return {"command": ctx.command.name, "options": options}


data_root_option = click.option("--data-root", envvar="DATA_ROOT", default="data", show_default=True,
                                help="Datasets as laid out in docs/DATASETS.md: <data-root>/<dataset>/ (env DATA_ROOT).")
annotations_option = click.option("--annotations", type=click.Path(), help="Official annotation files (real datasets).")
videos_option = click.option("--videos", type=click.Path(), help="Video directory (real datasets).")
manifest_text_option = click.option(
    "--manifest", type=click.Path(exists=True, file_okay=False),
    help="The manifest the store was built from, for a head that reads caption text (BLIP-2-initialised) "
         "[default: work-dir/<dataset>/manifest].")
STAGE_TWO_SKIP = ("head_config", "device", "progress", "eval_batch", "num_threads", "prefetch")


def preset_option(fn: Callable) -> Callable:
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
STAGE_ONE_SKIP = ("head_config", "device", "num_threads", "prefetch", "progress")
