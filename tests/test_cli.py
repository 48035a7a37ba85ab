"""End to end through the command line: tiny synthetic world -> extract -> stage one -> eval, the
registry listing, run configs (``run.json``, ``--config``) and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import zarr
from click.testing import CliRunner

import cli
from heads import list_heads
from worlds import run_cli


def test_help_lists_every_stage():
    out = run_cli(["--help"])
    for cmd in ("datasets", "heads", "make-manifest", "extract", "pretrain-encoder", "train-stage-one", "eval",
                "train-head", "rerank", "report", "cache", "demo"):
        assert cmd in out


def test_heads_lists_the_registry():
    out = run_cli(["heads", "--options"])
    for name in list_heads():
        assert name in out
    assert "contrastive" in out and "text_tokens" in out and "num_selected=4" in out
    # the commands' choices come from the registry
    assert "[crosstvr|t2v2t]" in run_cli(["train-head", "--help"])
    assert "[meanP|seqTransf|clip2video]" in run_cli(["train-stage-one", "--help"])


def test_unknown_dataset_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli.main, ["make-manifest", "--dataset", "nope", "--work-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "nope" in str(result.exception) + result.output
    assert "msrvtt" in str(result.exception) + result.output


def test_extract_writes_a_plain_zarr_store(tiny_world):
    group = zarr.open_group(str(tiny_world["store"]), mode="r")
    tokens = group["videos/tokens"]
    assert tokens.ndim == 4 and tokens.shape[1] == 4          # (V, T, N, D)
    assert group["texts/emb"].shape[0] == group["texts/ids"].shape[0]
    assert group.attrs["encoder"]["name"] == "test-vit-micro"


def test_second_extract_does_no_work(tiny_world):
    out = run_cli(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tiny_world["work"],
                   "--encoder", "test-vit-micro", "--store", tiny_world["store"], "--frames", "4",
                   "--shard-size", "8", "--workers", "1"])
    assert "skipped" in out.lower()


def test_train_and_eval_from_the_cli(tiny_world, tmp_path):
    work, store = tiny_world["work"], tiny_world["store"]
    run_dir = tmp_path / "run"
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP",
             "--epochs", "2", "--batch-size", "8", "--out", run_dir])
    ckpt = run_dir / "stage_one.pt"
    assert ckpt.exists()
    out = run_cli(["eval", "--store", store, "--work-dir", work, "--stage-one", ckpt, "--out", tmp_path / "report"])
    assert "R@1" in out
    report = json.loads(next((tmp_path / "report").glob("*.json")).read_text())
    assert report.pop("split") == {"split": "test", "complete": True, "videos": "7/7", "captions": "7/7",
                                   "missing_video_ids": {}}
    (metrics,) = report.values()
    assert set(metrics) >= {"t2v", "v2t"}


def test_run_json_reproduces_a_run(tiny_world, tmp_path: Path):
    work, store = tiny_world["work"], tiny_world["store"]
    first = tmp_path / "first"
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "seqTransf", "--head-option",
             "num_layers=1", "--epochs", "2", "--batch-size", "8", "--lr", "0.003", "--seed", "4", "--out", first])
    record = json.loads((first / "run.json").read_text())
    assert record["command"] == "train-stage-one" and record["options"]["lr"] == 0.003
    assert record["config"]["head_config"] == {"num_layers": 1} and record["config"]["weight_decay"] == 0.05
    # the same run again from its run.json alone (only the output directory changed)
    second = tmp_path / "second"
    run_cli(["train-stage-one", "--config", first / "run.json", "--out", second])
    a = torch.load(first / "stage_one.pt", weights_only=True)
    b = torch.load(second / "stage_one.pt", weights_only=True)
    assert a["train_args"] == b["train_args"] and a["config"] == b["config"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # an option given on the command line wins over the file
    third = tmp_path / "third"
    run_cli(["train-stage-one", "--config", first / "run.json", "--out", third, "--epochs", "1"])
    assert torch.load(third / "stage_one.pt", weights_only=True)["train_args"]["epochs"] == 1
    # a run.json of another command is refused
    result = CliRunner().invoke(cli.main, ["train-head", "--config", str(first / "run.json")])
    assert result.exit_code == 2 and "is a run of 'train-stage-one', not 'train-head'" in result.output


def test_user_errors_are_one_line(tiny_world, tmp_path: Path):
    work, store = tiny_world["work"], tiny_world["store"]
    result = CliRunner().invoke(cli.main, ["eval", "--store", str(tmp_path / "nothing.zarr"), "--work-dir", str(work)])
    assert result.exit_code == 1 and "not a feature cache" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli.main, ["train-stage-one", "--store", str(store), "--work-dir", str(work),
                                           "--head-option", "nonsense"])
    assert result.exit_code == 2 and "key=value" in result.output
