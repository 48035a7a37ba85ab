"""The options several commands share, and the helpers that build options from configs and record runs."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from core.errors import UnknownHeadError, UsageError
from core.options import FailureBudget, parse_key_values, parse_part
from heads.registry import get_preset
from workflows.sources import ManifestSource
from workflows.workdir import DEFAULT_WORK

work_dir_option = click.option("--work-dir", default=DEFAULT_WORK, show_default=True,
                                help="Where manifests, stores, runs and reports go.")
def stage_dir_option(fn: Callable) -> Callable:
    """``--stage-dir`` (where staged copies go) and ``--copy-tokens`` (copy the token arrays there even
    from a local uncompressed store, whose tokens are otherwise read in place; passed on as
    ``CROSSTVR_COPY_TOKENS``, not recorded in run.json)."""
    def copy(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        import os

        from workflows.workdir import COPY_TOKENS_ENV

        if value:
            os.environ[COPY_TOKENS_ENV] = "1"
    fn = click.option("--copy-tokens", is_flag=True, callback=copy, expose_value=False,
                      help="Copy the split's token arrays into --stage-dir even when the store is local and "
                           "uncompressed (then they are read in place, where they lie), e.g. to move them from "
                           "NFS to a local disk.")(fn)
    return click.option("--stage-dir", help="Local directory for staged copies of the store's arrays "
                                            "(default work-dir/staged).")(fn)
device_option = click.option("--device", default="auto", show_default=True, help="Torch device (auto: cuda if any).")
seed_option = click.option("--seed", default=0, show_default=True)
store_option = click.option("--store", required=True, help="Token store path or URL (file://, http(s)://, s3://).")
allow_incomplete_option = click.option(
    "--allow-incomplete", is_flag=True,
    help="Report metrics even when videos of the split are missing from the store (labelled incomplete).")
head_option_option = click.option("--head-option", "head_option", multiple=True,
                                   help="Head option key=value, repeatable (`python cli.py heads` lists them).")
threads_option = click.option("--threads", type=int, help="Torch CPU threads (default: all cores).")
# command-line parameters renamed since run.json files were first written: old name -> today's (the
# trainer's renamed arguments and values are heads.stage_two.config.upgrade_names')
RENAMED_PARAMS = {"head_options": "head_option", "num_threads": "threads"}


def renamed(old: str, new: str, dest: str, value: Any = None, values: dict | None = None,
            **settings: Any) -> Callable:
    """``old``, the former spelling of option ``new`` (parameter ``dest``), kept as a hidden alias: its
    value (or ``value``, for a flag; a former value through ``values``) goes to ``dest``, with a
    one-line notice on stderr."""
    legacy = "renamed_" + dest

    def apply(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = kwargs.pop(legacy, None)
            if given not in (None, False, ()):
                click.echo(f"note: {old} is now {new}", err=True)
                kwargs[dest] = (values or {}).get(given, given) if value is None else value
            return fn(*args, **kwargs)
        return click.option(old, legacy, hidden=True, default=None, **settings)(command)
    return apply


class ParsedType(click.ParamType):
    """An option value read by a parser of ``core.options`` (its ``UsageError`` becomes click's one line)."""

    def __init__(self, name: str, parse: Callable[[str], Any], result: type) -> None:
        self.name, self.parse, self.result = name, parse, result

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, self.result):
            return value
        try:
            return self.parse(value)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


PART_TYPE = ParsedType("K/N", parse_part, tuple)  # --part K/N -> (K, N)
FAILURE_BUDGET_TYPE = ParsedType("N|P%|F", FailureBudget.parse, FailureBudget)  # --max-failed


def stage_one_option(help: str, required: bool = True) -> Callable:
    """``--stage-one``: a stage-one checkpoint (``stage_one.pt`` or its run directory)."""
    return click.option("--stage-one", "stage_one", required=required, type=click.Path(exists=True), help=help)


def stage_two_option(help: str) -> Callable:
    """``--stage-two``: a stage-two checkpoint (``stage_two.pt`` or its run directory)."""
    return click.option("--stage-two", "stage_two", type=click.Path(exists=True), help=help)


def manifest_source(files: bool = True, builder: bool = True, purpose: str = "", existing: bool = True) -> Callable:
    """The manifest-source options, one group for every command that reads a manifest: ``--manifest DIR``
    or ``--dataset NAME`` (built under --work-dir), with ``files``: ``--annotations`` / ``--videos``,
    ``--data-root`` and with ``builder`` the builder's ``--option key=value``; the command receives them
    as one ``source`` (``workflows.sources.ManifestSource``). ``purpose`` prefixes their help; without
    ``existing`` (a command that builds the manifest) there is no ``--manifest`` and ``--dataset`` is required."""
    names = ["manifest", "dataset", "data_root"] + (["annotations", "videos"] if files else []) + \
        (["builder_option"] if builder else [])
    lead = f"{purpose}: " if purpose else ""

    def apply(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n, None) for n in names}
            options = parse_key_values(given.pop("builder_option", None) or (), "--option")
            kwargs["source"] = ManifestSource(**given, options=options)
            return fn(*args, **kwargs)
        opts = [click.option("--manifest", type=click.Path(), help=f"{lead}an existing manifest directory.")] \
            if existing else []
        opts.append(click.option("--dataset", required=not existing,
                                 help=f"{lead}{'or ' if existing else ''}a registered dataset (`python cli.py "
                                      f"datasets`), its manifest built under --work-dir."))
        if files:
            opts += [click.option("--annotations", type=click.Path(), help=f"{lead}its official annotation files "
                                                                           "[default: data-root/<dataset>]."),
                     click.option("--videos", type=click.Path(), help=f"{lead}its video directory "
                                                                      "[default: data-root/<dataset>/videos]."),]
        opts.append(data_root_option)
        if builder:
            opts.append(click.option("--option", "builder_option", multiple=True,
                                     help="Manifest builder option key=value (e.g. seed=1, test_groups=80)."))
        for opt in reversed(opts):
            command = opt(command)
        return command
    return apply


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
            from heads.stage_two.config import upgrade_names

            options = upgrade_names({RENAMED_PARAMS.get(k, k): v
                                     for k, v in record.get("options", {}).items()})
            ctx.default_map = {**(ctx.default_map or {}), **options}
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
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items()
               if not k.startswith("renamed_")}
    options.update(resolved)
    return {"command": ctx.command.name, "options": options}


data_root_option = click.option("--data-root", envvar="DATA_ROOT", default="data", show_default=True,
                                help="Datasets as laid out in docs/DATASETS.md: <data-root>/<dataset>/ (env DATA_ROOT).")
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
                        help="A shipped head and training recipe (`python cli.py heads` lists them).")(fn)
STAGE_ONE_SKIP = ("head_config", "device", "num_threads", "prefetch", "progress")
