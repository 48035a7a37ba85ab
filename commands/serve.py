"""Looking at a collection in a browser: serve (a local web application over the search of `search`)."""

from __future__ import annotations

import ipaddress

import click

from commands.options import (device_option, renamed, stage_dir_option, stage_one_option, stage_two_option,
                              store_option, work_dir_option)
from core.errors import UsageError
from workflows.workdir import WorkDir, resolve_device

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command("serve")
@store_option
@stage_one_option("Stage-one checkpoint (stage_one.pt or its run dir).")
@stage_two_option("Stage-two checkpoint: re-rank each search's --candidates best by cosine + head score.")
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False),
              help="An `index build` directory (default: the exact index under work-dir/indexes, built if missing).")
@click.option("--split", default="test", show_default=True, help="The split searched (the index's).")
@click.option("--candidates", default=15, show_default=True, help="Stage-one candidates the head re-ranks.")
@click.option("--top", default=10, show_default=True, help="Videos shown per search (the page may ask for up to 100).")
@click.option("--encoder", help="The store's frozen encoder (spec or checkpoint) when its weights are local files "
                                "(default: found under work-dir/encoders, or beside the store, by its identity).")
@click.option("--manifest", type=click.Path(exists=True, file_okay=False),
              help="The manifest the store was built from: the captions' text, shown on the pages (and read by a "
                   "BLIP-2-initialised head) [default: work-dir/<dataset>/manifest, else the one beside a local store].")
@click.option("--port", default=8080, show_default=True, help="TCP port (0: any free one).")
@click.option("--host", default=LOOPBACK, show_default=True,
              help="Address to listen on. Anything but a loopback address opens the collection, without any "
                   "authentication, to whoever can reach this machine: it must be given here explicitly.")
@click.option("--batch-size", default=64, show_default=True, help="Pairs per head forward pass.")
@work_dir_option
@stage_dir_option
@device_option
@renamed("--head", "--stage-two", "stage_two", type=click.Path(exists=True))
@click.pass_context
def serve_cmd(ctx, store, stage_one, stage_two, index_dir, split, candidates, top, encoder, manifest, port, host,
              batch_size, work_dir, stage_dir, device) -> None:
    """A local web application to search the split of a store: a query box with the results' thumbnails
    (stage one, and with --stage-two its re-ranked order beside), each video's frames, captions and
    nearest videos, and the split's captions with their ranks before and after re-ranking. Pages and
    their JSON API (/api/search, /api/video/ID, /api/queries, /api/status) are served by Werkzeug's
    threaded server until Ctrl-C."""
    if not is_loopback(host) and ctx.get_parameter_source("host") != click.core.ParameterSource.COMMANDLINE:
        raise UsageError(f"--host {host}: a non-loopback address must be given on the command line itself")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {port}")
    from serve.app import create_app, make_app_server, server_url
    from serve.engine import load_engine

    engine = load_engine(WorkDir(work_dir, stage_dir), store, stage_one, stage_two=stage_two, split=split,
                         index=index_dir, candidates=candidates, top=top, encoder=encoder, manifest=manifest,
                         device=resolve_device(device), batch_size=batch_size, echo=click.echo)
    status = engine.status()
    for line in ([status["index_freshness"]] if status["index_freshness"] else []) + status["notes"]:
        click.echo(f"note: {line}")
    try:
        server = make_app_server(create_app(engine), host, port)
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from exc
    if not is_loopback(host):
        click.echo(f"note: listening on {host}: anyone who can reach this machine can search the collection", err=True)
    click.echo(f"serving split {split!r} ({status['videos']} videos) on {server_url(server)}  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


COMMANDS = (serve_cmd,)
