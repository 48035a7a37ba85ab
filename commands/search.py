"""Looking at a collection: index build, search, report."""

from __future__ import annotations

import click

from commands.options import (device_option, renamed, seed_option, stage_dir_option, stage_one_option, stage_two_option,
                              store_option, work_dir_option)
from core.options import parse_key_values
from heads.evaluation.index import INDEX_KINDS
from workflows.workdir import WorkDir, resolve_device


def echo_recall(vi) -> None:
    """An approximate index's measured recall against exact search, when it has one."""
    rec = vi.meta.get("recall")
    if rec:
        click.echo(f"recall vs exact on {rec['queries']} captions: R@10 {100 * rec['recall@10']:.1f}%  "
                   f"R@100 {100 * rec['recall@100']:.1f}% (of the top {rec['k_max']})")


# -- index and search ------------------------------------------------------------------------------
@click.group("index")
def index_group() -> None:
    """A FAISS index of a split's stage-one video embeddings (for `search` and `rerank --index`), grown with
    its store by `index add`."""


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
    """Encode the split's videos with the stage one and index them (index.json and the index.faiss,
    video_ids.json it names)."""
    from workflows.search import build_video_index

    vi = build_video_index(WorkDir(work_dir, stage_dir), store, stage_one, split=split, kind=kind,
                           options=parse_key_values(options, "--option"), out=out, device=resolve_device(device),
                           threads=threads, seed=seed)
    click.echo(f"{vi.kind} index of {vi.size} videos ({vi.meta['dim']}-d, split {split!r}) built in "
               f"{vi.meta['build_seconds']:.1f}s: {vi.path}")
    echo_recall(vi)


@index_group.command("add")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The `index build` directory to grow.")
@click.option("--store", help="Token store path or URL (default: the store its index.json names).")
@stage_one_option("Stage-one checkpoint (default: the one its index.json names; must be that one).", required=False)
@click.option("--threads", type=int, help="FAISS threads (default: all cores).")
@work_dir_option
@stage_dir_option
@device_option
def index_add_cmd(index_dir, store, stage_one, threads, work_dir, stage_dir, device) -> None:
    """Add the videos the store gained in the index's split since the index was built (a grown store:
    `extract` of a later manifest): only they are encoded, with the same stage one. Refused, saying to
    run `index build`, when the store changed otherwise (a shard repaired or rewritten)."""
    from workflows.index_add import add_to_index

    done = add_to_index(WorkDir(work_dir, stage_dir), index_dir, store=store, stage_one=stage_one,
                        device=resolve_device(device), threads=threads)
    vi = done.index
    if not done.added:
        click.echo(f"nothing new: index {vi.path} covers all {vi.size:,} videos of split {vi.meta['split']!r} "
                   f"the store holds ({done.seconds:.1f}s)")
        return
    click.echo(f"added {done.added:,} vectors to the {vi.kind} index {vi.path} in {done.seconds:.1f}s: now "
               f"{vi.size:,} videos of split {vi.meta['split']!r}")
    echo_recall(vi)


@click.command("search")
@store_option
@stage_one_option("Stage-one checkpoint (stage_one.pt or its run dir).")
@stage_two_option("Stage-two checkpoint: re-rank each query's --candidates best by cosine + head score.")
@click.argument("queries", nargs=-1, required=True)
@click.option("--split", default="test", show_default=True, help="The split searched (the index's).")
@click.option("--top", default=10, show_default=True, help="Videos listed per query.")
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
@renamed("--head", "--stage-two", "stage_two", type=click.Path(exists=True))
@renamed("--k", "--top", "top", type=int)
def search_cmd(store, stage_one, stage_two, queries, split, top, candidates, index_dir, nprobe, ef_search, encoder,
               out, batch_size, work_dir, stage_dir, device) -> None:
    """Text-to-video search: each QUERY is encoded by the store's own text encoder and stage one, the
    index gives the top videos of the split (cosine), and with --stage-two they are re-ranked."""
    from workflows.search import format_results, search_videos, write_results

    table = search_videos(WorkDir(work_dir, stage_dir), store, stage_one, list(queries), stage_two=stage_two,
                          split=split, top=top, candidates=candidates, index=index_dir, encoder=encoder,
                          device=resolve_device(device), batch_size=batch_size, nprobe=nprobe, ef_search=ef_search,
                          echo=click.echo)
    click.echo(format_results(table))
    if out:
        click.echo(f"results: {write_results(table, out)}")


# -- reports ---------------------------------------------------------------------------------------
@click.command("report")
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


COMMANDS = (index_group, search_cmd, report_cmd)
