"""torchrun on CPU (gloo, 2 processes) against one process: training with the same global batch
gives the same weights and validation metric, in the one-process checkpoint format."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from heads.training.distributed import Dist, part_slice

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_part_slices_cover_every_row_once():
    for n in (2, 5, 8, 9):
        for w in (1, 2, 3):
            rows = np.concatenate([np.arange(n)[part_slice(n, r, w)] for r in range(w)])
            np.testing.assert_array_equal(rows, np.arange(n))
            assert Dist(0, w).sizes(n) == [part_slice(n, r, w).stop - part_slice(n, r, w).start for r in range(w)]
            sizes = Dist(0, w).sizes(n)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1  # balanced: no rank waits on another


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list, nproc: int = 2, timeout: int = 240) -> str:
    """``cli.py args`` under torchrun with ``nproc`` CPU processes (gloo); its output, or a failure with it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(ROOT / "cli.py"),
           *[str(a) for a in args]]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _arrays(path: Path) -> dict:
    import zarr

    out = {}
    root = zarr.open_group(str(path), mode="r")
    for group in ("videos", "texts", "shards"):
        for name, arr in root[group].arrays():
            out[f"{group}/{name}"] = arr[...]
    return out


@pytest.mark.slow
def test_extraction_two_processes_equal_one(tiny_world, tmp_path):
    """`torchrun ... cli.py extract`: two ranks share one store, each its shards; the store equals
    the one-process store of the session's tiny world array by array, its attributes included, and
    the merged report is printed once."""
    import json

    store = tmp_path / "two.zarr"
    out = torchrun(["extract", "--manifest", tiny_world["manifest"], "--work-dir", tmp_path / "work", "--encoder",
                    "test-vit-micro", "--store", store, "--frames", "4", "--shard-size", "8", "--workers", "1"])
    assert out.count("this run: videos 28 ok") == 1 and "0 pending of 28" in out
    one, two = _arrays(tiny_world["store"]), _arrays(store)
    assert set(one) == set(two) and "videos/tokens" in one
    for name, arr in one.items():
        np.testing.assert_array_equal(two[name], arr, err_msg=name)
    attrs = lambda p: json.loads((p / "zarr.json").read_text())["attributes"]  # noqa: E731
    assert attrs(store) == attrs(Path(tiny_world["store"]))
    assert json.loads((store / "failures.json").read_text()) == json.loads(
        (Path(tiny_world["store"]) / "failures.json").read_text())


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_stage_one_two_processes_equal_one(tiny_world, tmp_path):
    """Without dropout the 2-process run is the 1-process run up to float summation order: every
    weight within 1e-4, the selected epoch and val rsum equal within 0.5 (of 600)."""
    from helpers import run_cli

    work, store = tiny_world["work"], tiny_world["store"]
    args = ["train-stage-one", "--store", store, "--work-dir", work, "--head", "seqTransf", "--head-option",
            "dropout=0", "--head-option", "width=32", "--head-option", "num_layers=1", "--epochs", "2",
            "--batch-size", "8"]
    run_cli(args + ["--out", tmp_path / "one"])
    torchrun(args + ["--out", tmp_path / "two"])
    one, two = _weights(tmp_path / "one" / "stage_one.pt"), _weights(tmp_path / "two" / "stage_one.pt")
    assert set(one) == set(two) and one["train_args"] == two["train_args"] and one["config"] == two["config"]
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, atol=1e-4, rtol=1e-4)
    assert two["history"]["world_size"] == 2
    assert one["history"]["best_epoch"] == two["history"]["best_epoch"]
    assert abs(one["history"]["best_score"] - two["history"]["best_score"]) <= 0.5
    # one training log, written by rank 0, with every step once
    steps = [line for line in (tmp_path / "two" / "training_log.jsonl").read_text().splitlines() if '"step"' in line
             and '"kind": "step"' in line]
    assert len(steps) == len([x for x in (tmp_path / "one" / "training_log.jsonl").read_text().splitlines()
                              if '"kind": "step"' in x])


@pytest.mark.slow
def test_stage_two_two_processes_resume_and_equal_one(tiny_world, tmp_path):
    """Contrastive phase + ITM with hard negatives under 2 processes, stopped by --max-steps and
    resumed: the same weights (within 1e-4) and val score as one uninterrupted process, in the
    one-process checkpoint format."""
    from helpers import run_cli

    work, store = tiny_world["work"], tiny_world["store"]
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP", "--epochs", "1",
             "--batch-size", "8", "--out", tmp_path / "s1"])
    args = ["train-head", "--store", store, "--stage-one", tmp_path / "s1" / "stage_one.pt", "--work-dir", work,
            "--epochs", "1", "--batch-size", "4", "--itc-steps", "2", "--itc-batch", "4", "--device", "cpu",
            "--head-option", "width=16", "--head-option", "layers=1", "--head-option", "heads=2",
            "--head-option", "num_queries=2", "--head-option", "spatial_frames=2"]
    run_cli(args + ["--out", tmp_path / "one"])
    torchrun(args + ["--out", tmp_path / "two", "--max-steps", "3"])
    assert not (tmp_path / "two" / "stage_two.pt").is_file() or not _weights(
        tmp_path / "two" / "stage_two.pt")["history"]["finished"]
    torchrun(args + ["--out", tmp_path / "two"])
    one, two = _weights(tmp_path / "one" / "stage_two.pt"), _weights(tmp_path / "two" / "stage_two.pt")
    assert set(one) == set(two) and one["train_args"] == two["train_args"]
    assert two["history"]["finished"] and two["history"]["steps"] == one["history"]["steps"]
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, atol=1e-4, rtol=1e-4)
    assert one["history"]["best_epoch"] == two["history"]["best_epoch"]
    assert abs(one["history"]["best_score"] - two["history"]["best_score"]) <= 0.5
