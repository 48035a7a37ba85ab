"""End to end through the command line: tiny synthetic world -> extract -> stage one -> eval, the
registry listing, run configs (``run.json``, ``--config``) and clear errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

import cli
from heads import list_heads
from helpers import run_cli

pytestmark = pytest.mark.integration


# every command, by name (a command added or removed is added or removed here), and the groups' subcommands
COMMANDS = {"ablation", "cache", "compare-stage-one", "datasets", "demo", "eval", "extract", "heads",
            "import-stage-one", "index", "make-manifest", "pretrain-encoder", "pretrain-qformer", "probe-encoder",
            "report", "rerank", "search", "serve", "train-head", "train-stage-one"}
SUBCOMMANDS = {"cache": {"export", "import", "info", "pull", "thumbnails", "verify"}, "index": {"add", "build"}}


def help_commands(out: str) -> list[str]:
    """The command names a click ``--help`` lists, in order: the first word of each row of its
    ``Commands:`` section (rows are indented two spaces; wrapped descriptions further)."""
    lines = out.splitlines()
    assert "Commands:" in lines, out
    names = []
    for line in lines[lines.index("Commands:") + 1:]:
        if not line.startswith("  "):  # a blank line or the next section ends it
            break
        if line[2] != " ":
            names.append(line.split()[0])
    return names


def test_help_lists_every_stage():
    listed = help_commands(run_cli(["--help"]))
    assert len(listed) == len(set(listed)) and set(listed) == COMMANDS
    assert set(cli.main.commands) == COMMANDS  # none hidden from --help either
    for group, expected in SUBCOMMANDS.items():
        assert set(help_commands(run_cli([group, "--help"]))) == expected, group


def test_heads_lists_the_registry():
    out = run_cli(["heads", "--options"])
    lines = out.splitlines()
    rows = {line.split()[0]: i for i, line in enumerate(lines) if not line.startswith((" ", "preset "))}
    assert list(rows) == list_heads() and {"meanP", "seqTransf", "clip2video", "crosstvr", "t2v2t"} <= set(rows)
    # each head's row: its stage and what it supports; with --options, the next line its options
    assert lines[rows["crosstvr"]].split()[1:4] == ["stage", "2", "blip2_init,contrastive,token_selector"]
    assert lines[rows["clip2video"]].split()[1:4] == ["stage", "1", "text_tokens"]
    assert lines[rows["meanP"]].split()[1:4] == ["stage", "1", "-"]
    assert {"num_selected=4", "width=128"} <= set(lines[rows["crosstvr"] + 1].strip().split(", "))
    assert "num_selected=" not in run_cli(["heads"])  # without --options: no options lines
    # the commands' choices come from the registry
    assert "[crosstvr|t2v2t]" in run_cli(["train-head", "--help"])
    assert "[meanP|seqTransf|clip2video]" in run_cli(["train-stage-one", "--help"])


def test_unknown_dataset_is_a_clear_error(tmp_path):
    from manifests import DATASETS

    result = CliRunner().invoke(cli.main, ["make-manifest", "--dataset", "nope", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output  # not a crash
    (line,) = result.output.splitlines()
    assert line.startswith("Error: unknown dataset 'nope'; known datasets: ")
    assert set(line.split("known datasets: ")[1].split(", ")) == set(DATASETS) and "msrvtt" in DATASETS


def test_extract_writes_a_plain_zarr_store(tiny_world):
    group = zarr.open_group(str(tiny_world["store"]), mode="r")
    tokens = group["videos/tokens"]
    assert tokens.ndim == 4 and tokens.shape[1] == 4          # (V, T, N, D)
    assert group["texts/emb"].shape[0] == group["texts/ids"].shape[0]
    assert group.attrs["encoder"]["name"] == "test-vit-micro"


def test_second_extract_does_no_work(tiny_world):
    group = zarr.open_group(str(tiny_world["store"]), mode="r")
    videos, captions = group["videos/ids"].shape[0], group["texts/ids"].shape[0]
    assert f"this run: videos {videos} ok " in tiny_world["extract_output"]  # the first run did the work
    out = run_cli(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tiny_world["work"],
                   "--encoder", "test-vit-micro", "--store", tiny_world["store"], "--frames", "4",
                   "--shard-size", "8", "--workers", "1"])
    # the second decodes, encodes and retries nothing: every video and caption is skipped as done
    (this_run,) = re.findall(r"this run: .*", out)  # (progress bars may share its line on stderr)
    assert this_run.startswith(f"this run: videos 0 ok (none decoded), 0 failed, {videos} skipped (done), "
                               f"0 retried, of {videos}; captions 0 encoded, {captions} skipped; "), this_run
    assert not any(line.startswith("encoders at ") for line in out.splitlines())  # no frame was encoded


def test_train_and_eval_from_the_cli(tiny_world, tmp_path):
    work, store = tiny_world["work"], tiny_world["store"]
    run_dir = tmp_path / "run"
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP",
             "--epochs", "2", "--batch-size", "8", "--out", run_dir])
    ckpt = run_dir / "stage_one.pt"
    assert ckpt.exists()
    out = run_cli(["eval", "--store", store, "--work-dir", work, "--stage-one", ckpt, "--out", tmp_path / "report"])
    (json_path,) = (tmp_path / "report").glob("*.json")
    assert f"report: {json_path}" in out.splitlines()
    report = json.loads(json_path.read_text())
    assert report.pop("split") == {"split": "test", "complete": True, "videos": "7/7", "captions": "7/7",
                                   "missing_video_ids": {}}
    (metrics,) = report.values()
    assert set(metrics) >= {"t2v", "v2t"} and metrics["t2v"]["n"] == metrics["v2t"]["n"] == 7
    # the printed table holds the report's numbers: a row per direction, R@1 to R@10 to one decimal
    lines = out.splitlines()
    header = next(line.split() for line in lines if line.split()[:2] == ["name", "R@1"])
    for direction in ("t2v", "v2t"):
        (row,) = [line.split() for line in lines if line.split()[1:2] == [direction]]
        cells = dict(zip(header[1:], row[2:]))
        assert [cells[k] for k in ("R@1", "R@5", "R@10")] == [f"{metrics[direction][k]:.1f}"
                                                              for k in ("R@1", "R@5", "R@10")], (row, metrics)


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
    assert a["state_dict"] and a["state_dict"].keys() == b["state_dict"].keys()
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
    # a handled error (click's SystemExit, not an exception escaping the command) of exactly one line
    result = CliRunner().invoke(cli.main, ["eval", "--store", str(tmp_path / "nothing.zarr"), "--work-dir", str(work)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == f"Error: {tmp_path / 'nothing.zarr'}: not a feature cache store (no zarr.json)\n"
    result = CliRunner().invoke(cli.main, ["train-stage-one", "--store", str(store), "--work-dir", str(work),
                                           "--head-option", "nonsense"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output == "Error: --head-option: expected key=value, got 'nonsense'\n"
