"""The ``cache`` commands: info, verify (--repair), pull, export / import HDF5, thumbnails."""

from __future__ import annotations

import sys

import click

from commands.options import device_option, manifest_source, work_dir_option
from core.errors import UsageError
from core.options import parse_key_values
from workflows.workdir import WorkDir, resolve_device


@click.group("cache")
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
@manifest_source(builder=False, purpose="--repair: the store's manifest")
@click.option("--encoder", help="--repair: the store's encoder spec (checked against the store's identity).")
@work_dir_option
@click.option("--workers", default=2, show_default=True, help="--repair: decoder worker processes.")
@device_option
@click.option("--expect", "expect", metavar="DIGEST", help="The store digest it must have (`cache info` prints it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def cache_verify_cmd(store, repair, source, encoder, work_dir, workers, device, expect, as_json) -> None:
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
        m = load_manifest(WorkDir(work_dir), source)
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
@manifest_source(files=False, builder=False, purpose="Another tool's features: the manifest of their videos")
@work_dir_option
@click.option("--frames", type=int, help="Another tool's features: frames kept per video (default: the most any has).")
@click.option("--shard-size", default=64, show_default=True, help="Another tool's features: videos per shard.")
@click.option("--compressor", help="Another tool's features: zstd, blosc-zstd or blosc-lz4 (default: none).")
@click.option("--limit", "limits", multiple=True, metavar="KEY=VALUE",
              help="Import limits (docs/STORE.md, 'Importing HDF5 safely'), e.g. frames=2048.")
def cache_import_cmd(h5, store, source, work_dir, frames, shard_size, compressor, limits) -> None:
    """Build a new STORE from an HDF5 file: one `cache export` wrote (the same store back), or
    per-frame features another tool wrote (one dataset per video; docs/SHARING.md)."""
    from workflows.data import load_manifest
    from workflows.share import import_h5

    m = load_manifest(WorkDir(work_dir), source) if source.given() else None
    click.echo(import_h5(h5, store, m, num_frames=frames, shard_size=shard_size, compressor=compressor,
                         limits=parse_key_values(limits, "--limit")))


@cache_group.command("thumbnails")
@click.option("--store", required=True, help="Token store path or s3:// URL (made by `extract`).")
@manifest_source(builder=False, purpose="The store's manifest (its videos at hand)")
@work_dir_option
@click.option("--workers", default=2, show_default=True, help="Decoder worker processes.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds before a video's decoding is abandoned.")
def cache_thumbnails_cmd(store, source, work_dir, workers, timeout) -> None:
    """Add the thumbnails a store made before they existed lacks: decodes its videos again (the same
    frames it sampled), encodes nothing; resumable, shards that have them are skipped."""
    from workflows.data import add_store_thumbnails, load_manifest

    m = load_manifest(WorkDir(work_dir), source)
    report = add_store_thumbnails(store, m, workers=workers, timeout=timeout)
    click.echo(report.summary())


COMMANDS = (cache_group,)
