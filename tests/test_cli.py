"""End to end through the command line: tiny synthetic world -> extract -> stage one -> eval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

import cli

TINY_WORLD = ["train_groups=2", "train_random=6", "val_groups=1", "val_random=3",
              "test_groups=1", "test_random=3"]


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    opts = [x for o in TINY_WORLD for x in ("--option", o)]
    _run(["make-manifest", "--dataset", "synthetic", "--work-dir", str(work), *opts])
    manifest = work / "synthetic" / "manifest"
    store = work / "stores" / "tiny.zarr"
    out = _run(["extract", "--manifest", str(manifest), "--work-dir", str(work),
                "--encoder", "test-vit-micro", "--store", str(store), "--frames", "4",
                "--shard-size", "8", "--workers", "1"])
    return work, manifest, store, out


def test_help_lists_every_stage():
    out = _run(["--help"])
    for cmd in ("datasets", "make-manifest", "extract", "pretrain-encoder", "train-stage-one", "eval", "demo"):
        assert cmd in out


def test_unknown_dataset_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli.main, ["make-manifest", "--dataset", "nope", "--work-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "nope" in str(result.exception) + result.output
    assert "msrvtt" in str(result.exception) + result.output


def test_extract_writes_a_plain_zarr_store(pipeline_run):
    work, manifest, store, out = pipeline_run
    group = zarr.open_group(str(store), mode="r")
    tokens = group["videos/tokens"]
    assert tokens.ndim == 4 and tokens.shape[1] == 4          # (V, T, N, D)
    assert group["texts/emb"].shape[0] == group["texts/ids"].shape[0]
    assert group.attrs["encoder"]["name"] == "test-vit-micro"


def test_second_extract_does_no_work(pipeline_run):
    work, manifest, store, _ = pipeline_run
    out = _run(["extract", "--manifest", str(manifest), "--work-dir", str(work),
                "--encoder", "test-vit-micro", "--store", str(store), "--frames", "4",
                "--shard-size", "8", "--workers", "1"])
    assert "skipped" in out.lower()


def test_train_and_eval_from_the_cli(pipeline_run, tmp_path):
    work, _, store, _ = pipeline_run
    run_dir = tmp_path / "run"
    _run(["train-stage-one", "--store", str(store), "--work-dir", str(work), "--head", "meanP",
          "--epochs", "2", "--batch-size", "8", "--out", str(run_dir)])
    ckpt = run_dir / "stage_one.pt"
    assert ckpt.exists()
    out = _run(["eval", "--store", str(store), "--work-dir", str(work), "--stage-one", str(ckpt),
                "--out", str(tmp_path / "report")])
    assert "R@1" in out
    report = json.loads(next((tmp_path / "report").glob("*.json")).read_text())
    (metrics,) = report.values() if "t2v" not in report else (report,)
    assert set(metrics) >= {"t2v", "v2t"}
