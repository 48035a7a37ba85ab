"""bench/gpu_check.sh, the whole-CLI GPU smoke test, as its dry run on the CPU (``--device cpu --quick``):
every step of the command line runs through the same script and exits 0, and the results list them all
(JSON with each step's exit status and seconds, and a readable table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

# what the dry run must have run: both encoder kinds, every CLI step, the training under torchrun
EXPECTED = ["imports", "make-manifest", "blip2-dir", "extract-open_clip", "extract-blip2", "train-stage-one", "eval",
            "train-head", "rerank", "index-build", "search", "report", "torchrun-train-stage-one"]


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_cli_step(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "SKIP_INSTALL": "1"}
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), "--work", str(work)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert (out / "gpu_check.json").exists(), res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in r["steps"]}
    failed = {n: s.get("tail", s.get("note")) for n, s in steps.items() if s["status"] != 0 and n != "install-wheels"}
    assert not failed, json.dumps(failed, indent=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [n for n in steps if n in EXPECTED] == EXPECTED  # all of them, in this order
    assert r["device"] == "cpu" and r["quick"] is True and r["ok"] is True and r["failed"] == []
    for name in EXPECTED:
        s = steps[name]
        assert s["status"] == 0 and s["seconds"] > 0 and s["command"], s
    # every device step was told the device; torchrun ran the training command
    for name in ("extract-open_clip", "extract-blip2", "train-stage-one", "eval", "train-head", "rerank", "index-build",
                 "search", "torchrun-train-stage-one"):
        assert "--device cpu" in steps[name]["command"], steps[name]["command"]
    assert "--encoder blip2:" in steps["extract-blip2"]["command"]
    # the training under torchrun: two processes joined a gloo process group (the dry run's stand-in for NCCL)
    assert "torch.distributed.run --nnodes=1 --nproc_per_node=2" in (out / "gpu_check.log").read_text()
    ddp = torch.load(work / "runs" / "s1-ddp" / "stage_one.pt", map_location="cpu", weights_only=True)
    assert ddp["history"]["world_size"] == 2
    # with no wheels/ here nothing is installed, and that is not a failure
    assert steps["install-wheels"]["status"] is None and steps["install-wheels"]["note"].startswith("not needed")
    # the readable table names every step with its status and seconds; the log holds each step's output
    table = (out / "gpu_check.txt").read_text()
    assert f"{len(steps)} of {len(steps)} steps ok" in table  # install-wheels: not needed, not failed
    for name in EXPECTED:
        assert any(line.split()[:2] == [name, "0"] for line in table.splitlines()), (name, table)
    log = (out / "gpu_check.log").read_text()
    assert all(f"=== {name}: exit 0" in log for name in EXPECTED)
    assert (out / "report.html").stat().st_size > 1000
    assert json.loads((work / "search.json").read_text())  # the search wrote its results


def test_a_failing_step_is_recorded_and_the_script_goes_on(tmp_path: Path) -> None:
    """A broken Python: every step fails (recorded with its exit status, its dependants skipped), the
    script still writes the results and exits 1."""
    out = tmp_path / "out"
    fake = tmp_path / "python"
    # the script's own helpers (the results writer, the free port) still work
    fake.write_text(f"#!/bin/sh\ncase \"$1 $2\" in '- '*steps.tsv|'-c '*socket*) exec {sys.executable} \"$@\" ;; esac\n"
                    "echo broken >&2\nexit 3\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "SKIP_INSTALL": "1"}
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), "--work",
                          str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    r = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in r["steps"]}
    assert r["ok"] is False and "imports" in r["failed"] and "make-manifest" in r["failed"]
    assert steps["make-manifest"]["status"] == 3 and steps["make-manifest"]["tail"] == ["broken"]
    assert steps["extract-open_clip"]["status"] is None
    assert steps["extract-open_clip"]["note"] == "skipped: make-manifest did not pass"
    assert "torchrun-train-stage-one" in steps  # it went on to the end
