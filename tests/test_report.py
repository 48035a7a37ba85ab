"""The HTML retrieval report (``python cli.py report``) on the tiny synthetic world: its numbers are the JSON
report's, its thumbnails come from the store (or a note says how to add them), bad inputs are one line, and a
real browser (headless Chromium) shows every image with no console error."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import cli
from reports.analysis import positive_ranks, recall_curve
from reports.build import build_context
from reports.inputs import load_rerank_dir
from helpers import TINY_HEAD, chrome_driver, run_cli

pytestmark = pytest.mark.integration

K = 3


@pytest.fixture(scope="module")
def reranked(tiny_world, tmp_path_factory) -> dict:
    """The tiny world's store -> meanP stage one -> small CrossTVR head -> test split re-ranked (top 3)."""
    work, store = tiny_world["work"], tiny_world["store"]
    root = tmp_path_factory.mktemp("report_runs")
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP", "--epochs", "2",
             "--batch-size", "8", "--out", root / "stage1-meanP"])
    run_cli(["train-head", "--store", store, "--stage-one", root / "stage1-meanP", "--work-dir", work, "--epochs", "2",
             "--batch-size", "4", "--out", root / "stage2-crosstvr", "--itc-steps", "3", "--itc-batch", "4",
             "--device", "cpu", *TINY_HEAD])
    run_cli(["rerank", "--store", store, "--stage-one", root / "stage1-meanP", "--stage-two", root / "stage2-crosstvr",
             "--candidates", str(K), "--work-dir", work, "--out", root / "rerank", "--device", "cpu"])
    return {"work": work, "store": store, "manifest": tiny_world["manifest"], "root": root,
            "rerank": root / "rerank", "runs": [root / "stage1-meanP", root / "stage2-crosstvr"]}


def invoke(args: list) -> object:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_report_from_the_cli(reranked: dict, tmp_path: Path) -> None:
    out = run_cli(["report", "--rerank-dir", reranked["rerank"], "--run", reranked["runs"][0], "--run",
                   reranked["runs"][1], "-o", tmp_path / "r.html", "--improved", "2", "--hurt", "2", "--random", "2"])
    assert f"report: {tmp_path / 'r.html'}" in out and "note:" not in out  # nothing missing
    html = (tmp_path / "r.html").read_text()
    # self-contained: no script, no file or network reference; every image a data URI
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:)', html)
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert srcs and all(s.startswith(("data:image/svg+xml;base64,", "data:image/jpeg;base64,")) for s in srcs)
    assert sum(s.startswith("data:image/jpeg") for s in srcs) >= 3  # the thumbnails of the store
    assert "Within-group accuracy" in html and "stage2-crosstvr" in html and "stage1-meanP" in html


def test_report_context_holds_the_json_numbers(reranked: dict) -> None:
    ctx = build_context(reranked["rerank"], reranked["runs"])
    metrics = json.loads((reranked["rerank"] / "metrics.json").read_text())
    rows = {(r["direction"], r["ranking"]): {c["metric"]: c["text"] for c in r["cells"]} for r in ctx["metric_rows"]}
    for d in ("t2v", "v2t"):
        for name in ("stage one", "re-ranked"):
            for metric, value in metrics[name][d].items():
                want = str(int(value)) if metric == "n" else f"{value:.1f}"
                assert rows[(d, name)][metric] == want, (d, name, metric)
        assert rows[(d, "change")]["R@1"] == f"{metrics['re-ranked'][d]['R@1'] - metrics['stage one'][d]['R@1']:+.1f}"
    # the recall curve's points are the metrics (ranks over the whole split)
    rr = load_rerank_dir(reranked["rerank"])
    for d in ("t2v", "v2t"):
        _, before, after, complete = positive_ranks(rr, d)
        assert complete
        for k in (1, 5, 10, K):
            assert recall_curve(before)[k - 1] == pytest.approx(metrics["stage one"][d][f"R@{k}"])
            assert recall_curve(after)[k - 1] == pytest.approx(metrics["re-ranked"][d][f"R@{k}"])
    # samples: texts from the manifest, top lists in their orders, the truth marked where it is in the list
    ranked = pq.read_table(reranked["rerank"] / "ranked_t2v.parquet").to_pylist()
    texts = dict(zip(*(pq.read_table(reranked["manifest"] / "captions.parquet").column(c).to_pylist()
                       for c in ("caption_id", "text"))))
    assert ctx["samples"]
    for q in ctx["samples"]:
        assert q["text"] == texts[q["query_id"]]
        rows_q = [r for r in ranked if r["query_id"] == q["query_id"]]
        assert [c["video_id"] for c in q["after"]] == [r["candidate_id"] for r in sorted(rows_q, key=lambda r: r["rank"])]
        assert [c["video_id"] for c in q["before"]] == [r["candidate_id"] for r in
                                                         sorted(rows_q, key=lambda r: r["stage_one_rank"])]
        assert [c["positive"] for c in q["after"]] == [c["video_id"] == q["video_id"] for c in q["after"]]
        assert q["truth"] and all(c["thumb"] for c in q["after"])
    kinds = [q["kind"] for q in ctx["samples"]]
    improved = [q for q in ctx["samples"] if q["kind"] == "improved"]
    assert all(q["reranked_rank"] < q["stage_one_rank"] for q in improved)
    assert all(q["reranked_rank"] > q["stage_one_rank"] for q in ctx["samples"] if q["kind"] == "hurt")
    assert kinds == sorted(kinds, key=["improved", "hurt", "random"].index)
    # training curves of both runs from their logs; within-group accuracy on the synthetic groups
    assert [r["name"] for r in ctx["runs"]] == ["stage1-meanP", "stage2-crosstvr"]
    assert all(r["source"] == "training_log.jsonl" for r in ctx["runs"])
    assert ctx["groups"] and ctx["groups"][-1]["name"] == "all"


def test_a_store_without_thumbnails_gets_a_note_then_the_command_adds_them(reranked: dict, tmp_path: Path) -> None:
    bare = tmp_path / "bare.zarr"
    run_cli(["extract", "--manifest", reranked["manifest"], "--work-dir", tmp_path, "--encoder", "test-vit-micro",
             "--store", bare, "--frames", "4", "--shard-size", "8", "--workers", "1", "--thumbnails", "0"])
    out = run_cli(["report", "--rerank-dir", reranked["rerank"], "--store", bare, "--manifest", reranked["manifest"],
                   "-o", tmp_path / "a.html"])
    assert "holds no thumbnails" in out and f"python cli.py cache thumbnails --store {bare}" in out
    html = (tmp_path / "a.html").read_text()
    assert "holds no thumbnails" in html and "no thumbnail" in html and "data:image/jpeg" not in html
    out = run_cli(["cache", "thumbnails", "--store", bare, "--manifest", reranked["manifest"], "--workers", "1"])
    from pipeline.store import CacheStore

    n = CacheStore.open(bare).num_videos
    assert f"thumbnails: {n} videos in {-(-n // 8)} shards, 0 shards had them already; 0 failed" in out
    out = run_cli(["report", "--rerank-dir", reranked["rerank"], "--store", bare, "-o", tmp_path / "b.html"])
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == ["note: no manifest (give --manifest DIR): caption texts and within-group accuracy are not shown"]
    html = (tmp_path / "b.html").read_text()  # a store outside a work dir: its manifest is not found, but
    assert "data:image/jpeg" in html and "caption text unknown: give --manifest" in html  # its thumbnails are


def test_bad_inputs_are_one_line(reranked: dict, tmp_path: Path) -> None:
    result = invoke(["report", "--rerank-dir", tmp_path / "nothing"])
    assert result.exit_code == 2 and "--rerank-dir" in result.output and "is not a directory" in result.output
    partial = tmp_path / "partial"
    shutil.copytree(reranked["rerank"], partial)
    (partial / "ranked_t2v.parquet").unlink()
    result = invoke(["report", "--rerank-dir", partial])
    assert result.exit_code == 2 and f"{partial} has no ranked_t2v.parquet" in result.output
    assert "Traceback" not in result.output
    shutil.copy(reranked["rerank"] / "ranked_t2v.parquet", partial)
    (partial / "metrics.json").write_text("{not json")
    result = invoke(["report", "--rerank-dir", partial])
    assert result.exit_code == 2 and "metrics.json is not valid JSON" in result.output
    result = invoke(["report", "--rerank-dir", reranked["rerank"], "--run", tmp_path])
    assert result.exit_code == 2 and "--run" in result.output and "history.json" in result.output
    result = invoke(["report", "--rerank-dir", reranked["rerank"], "--hurt", "-1"])
    assert result.exit_code == 2 and "--hurt: must be >= 0" in result.output
    other = tmp_path / "other-manifest"
    shutil.copytree(reranked["manifest"], other)
    import pyarrow as pa

    caps = pq.read_table(other / "captions.parquet")
    pq.write_table(caps.set_column(caps.column_names.index("text"), "text",
                                   pa.array(["changed"] * caps.num_rows)), other / "captions.parquet")
    result = invoke(["report", "--rerank-dir", reranked["rerank"], "--manifest", other])
    assert result.exit_code == 2 and "is not the manifest of the re-ranked store" in result.output


def test_an_older_rerank_dir_and_runs_without_logs_still_make_a_report(reranked: dict, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(reranked["rerank"], old)
    (old / "positive_ranks.parquet").unlink()
    run = tmp_path / "stage1-meanP"
    shutil.copytree(reranked["runs"][0], run)
    (run / "training_log.jsonl").unlink()
    ctx = build_context(old, [run])
    assert any("no positive_ranks.parquet" in n for n in ctx["notes"])
    assert any("no training_log.jsonl" in n for n in ctx["notes"])
    assert ctx["runs"][0]["source"].startswith("history.json")
    # within the top K the ranks from the lists are the whole-split ones
    full = load_rerank_dir(reranked["rerank"])
    ids, before, after, _ = positive_ranks(full, "t2v")
    ids2, before2, after2, complete = positive_ranks(load_rerank_dir(old), "t2v")
    assert not complete
    at = {q: i for i, q in enumerate(ids2)}
    for q, b, a in zip(ids, before, after):
        j = at[q]
        assert (before2[j], after2[j]) == ((b, a) if b <= K else (K + 1, K + 1))


# ------------------------------------------------------------------------------------------ the browser
def test_report_in_headless_chromium(reranked: dict, chromium: dict, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    run_cli(["report", "--rerank-dir", reranked["rerank"], "--run", reranked["runs"][0], "--run", reranked["runs"][1],
             "-o", page])
    driver = chrome_driver(chromium, tmp_path / "profile")
    try:
        driver.get(page.as_uri())
        driver.execute_script("return document.readyState")
        state = driver.execute_script(
            "return Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)))"
            ".then(() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]))")
        assert len(state) >= 5
        broken = [alt for alt, complete, width in state if not complete or width <= 0]
        assert not broken, f"images that did not load: {broken}"
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('#metrics-table tbody tr')).map(tr => "
            "[tr.dataset.direction, tr.dataset.ranking, Object.fromEntries(Array.from(tr.querySelectorAll('td[data-metric]'))"
            ".map(td => [td.dataset.metric, td.textContent.trim()]))])")
        metrics = json.loads((reranked["rerank"] / "metrics.json").read_text())
        shown = {(d, r): c for d, r, c in cells}
        for d in ("t2v", "v2t"):
            for name in ("stage one", "re-ranked"):
                for metric, value in metrics[name][d].items():
                    assert shown[(d, name)][metric] == (str(int(value)) if metric == "n" else f"{value:.1f}")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(int(height) + 100, 12000))
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, f"console errors: {errors}"
    finally:
        driver.quit()
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "report.png").convert("L"))
    assert img.std() > 10  # a page was drawn, not a blank window


def test_the_demo_writes_its_report_next_to_the_reranking(reranked: dict, tmp_path: Path) -> None:
    """What the demo's last step calls: the report beside the re-ranking's outputs, with every run's curves."""
    from workflows.reports import demo_runs, retrieval_report
    from workflows.workdir import WorkDir

    work = WorkDir(tmp_path / "work")
    rerank = work.reports_dir("rerank-test")
    shutil.copytree(reranked["rerank"], rerank)
    for run in reranked["runs"]:
        shutil.copytree(run, work.root / "runs" / run.name)
    runs = demo_runs(work)
    assert [r.name for r in runs] == ["stage1-meanP", "stage2-crosstvr"]
    path, ctx = retrieval_report(rerank, runs)
    assert path == rerank / "report.html" and path.is_file()
    assert [r["name"] for r in ctx["runs"]] == ["stage1-meanP", "stage2-crosstvr"]
