"""torchrun on GPUs without a GPU: the collectives' tensors sit where NCCL needs them, ranks map to their
own GPU, the process group gets the configured timeout, and waits for a rank working alone live on a
gloo control group that outlasts that timeout (two real processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed.nn  # noqa: F401  (its all_gather is replaced below)
from click.testing import CliRunner
from torch._subclasses.fake_tensor import FakeTensorMode

from core.errors import UsageError
from heads.training import distributed
from heads.training.distributed import (CONTROL_TIMEOUT, DEFAULT_TIMEOUT, TIMEOUT_ENV, Dist, all_sum, context,
                                        gather_with_grad, parse_timeout, rank_zero_first)

ROOT = Path(__file__).resolve().parents[1]


class Reduced(Exception):
    """Raised by a fake all_reduce once it has seen its tensor (a fake tensor has no values to read back)."""


@pytest.fixture
def nccl(monkeypatch):
    """The default group reported as NCCL; every collective replaced by a fake that records its call."""
    calls: list[tuple] = []

    def all_reduce(t, *args, **kwargs):
        calls.append(("all_reduce", t.device, t.dtype))
        raise Reduced

    def all_gather(t, *args, **kwargs):
        calls.append(("all_gather", t.device, t.dtype))
        return [t.clone(), t.clone()]

    def barrier(*args, **kwargs):
        calls.append(("barrier", kwargs.get("group")))

    def broadcast_object_list(box, src=None, group=None, device=None, **kwargs):
        calls.append(("broadcast_object_list", group, device, box[0]))

    def all_gather_object(out, obj, group=None, **kwargs):
        calls.append(("all_gather_object", group))
        out[:] = [obj] * len(out)

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed.nn, "all_gather", all_gather)
    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    return calls


def test_all_sum_reduces_on_the_ranks_gpu_under_nccl(nccl):
    """stage two's per-step loss / accuracy sum: NCCL has no CPU transport, so its tensor must be on
    cuda:LOCAL_RANK (a fake CUDA tensor: no GPU needed)."""
    with FakeTensorMode(), pytest.raises(Reduced):
        all_sum(Dist(rank=1, world_size=2, local_rank=1), 0.5, 3, 8)
    assert nccl == [("all_reduce", torch.device("cuda", 1), torch.float64)]


def test_gather_with_grad_runs_on_the_ranks_gpu_under_nccl(nccl):
    """The contrastive gather hands NCCL tensors on the rank's GPU and gives the caller its rows back
    where it keeps them."""
    with FakeTensorMode():
        local = torch.zeros(2, 4)
        out = gather_with_grad(Dist(rank=1, world_size=2, local_rank=1), local, [3, 2])
        assert out.shape == (5, 4) and out.device == local.device
    assert nccl == [("all_gather", torch.device("cuda", 1), torch.float32)]


def test_collective_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "gloo")
    assert Dist(1, 2, 1).collective_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "nccl")
    assert Dist(1, 2, 1).collective_device() == torch.device("cuda", 1)
    assert Dist().collective_device() == torch.device("cpu")  # one process: no group at all


def test_control_waits_use_the_gloo_control_group(nccl, monkeypatch):
    """Barriers and object exchanges go to the control group (on the CPU), never to the NCCL default
    group whose watchdog would end a long wait."""
    control = object()
    monkeypatch.setattr(distributed, "_control_group", control)
    d = Dist(rank=0, world_size=2, local_rank=0)
    d.barrier()
    assert d.broadcast_object({"a": 1}) == {"a": 1}
    assert d.gather_object("r0") == ["r0", "r0"]
    assert rank_zero_first(d, lambda: "built") == "built"
    assert nccl == [("barrier", control), ("broadcast_object_list", control, torch.device("cpu"), {"a": 1}),
                    ("all_gather_object", control),
                    ("broadcast_object_list", control, torch.device("cpu"), (True, "built"))]


def test_rank_zero_failure_reaches_every_rank(nccl, monkeypatch):
    monkeypatch.setattr(distributed, "_control_group", object())

    def fail():
        raise UsageError("no annotation directory")

    with pytest.raises(UsageError, match="no annotation directory"):
        rank_zero_first(Dist(0, 2, 0), fail)
    sent = nccl[-1][3]
    assert sent[0] is False and isinstance(sent[1], UsageError)

    def relay(box, src=None, group=None, device=None, **kwargs):
        box[0] = sent  # what rank 0 broadcast

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", relay)
    called = []
    with pytest.raises(UsageError, match="no annotation directory"):
        rank_zero_first(Dist(1, 2, 1), lambda: called.append(1))
    assert not called  # only rank 0 runs it


def test_any_cuda_device_maps_to_the_local_rank():
    """``--device cuda:0`` (or any index) under torchrun puts rank r on its own GPU, not all on one."""
    d = Dist(rank=3, world_size=4, local_rank=1)
    assert [d.device(x) for x in ("cuda", "cuda:0", "cuda:3", "cuda:1", "cpu")] == \
        ["cuda:1", "cuda:1", "cuda:1", "cuda:1", "cpu"]
    assert d.device(d.device("cuda:0")) == "cuda:1"  # mapping twice changes nothing
    assert Dist().device("cuda:3") == "cuda:3"  # one process: as given


@pytest.fixture
def joins(monkeypatch):
    """``context`` with torchrun's environment (rank 1 of 2) in a fresh process; the process-group
    calls recorded in the returned list."""
    calls: list[tuple] = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(distributed, "_control_group", None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: any(c[0] == "init" for c in calls))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kw: calls.append(("control", kw)) or "control")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("cuda", i)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    return calls


def test_context_gives_the_group_its_timeout_and_a_control_group(joins, monkeypatch):
    d = context("cuda:0")
    assert (d.rank, d.world_size, d.local_rank) == (1, 2, 1)
    assert joins == [("cuda", 1), ("init", {"backend": "nccl", "timeout": DEFAULT_TIMEOUT}),
                     ("control", {"backend": "gloo", "timeout": CONTROL_TIMEOUT})]
    assert distributed._control_group == "control"
    context("cuda:0")  # joined once
    assert len(joins) == 3


def test_dist_timeout_reaches_the_process_group(joins, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "90m")  # what --dist-timeout 90m sets
    context("cpu")
    assert joins == [("init", {"backend": "gloo", "timeout": timedelta(minutes=90)}),
                     ("control", {"backend": "gloo", "timeout": CONTROL_TIMEOUT})]
    joins.clear()
    monkeypatch.setattr(distributed, "_control_group", None)  # another fresh process
    context("cpu", timeout=timedelta(days=9))
    assert joins[-1] == ("control", {"backend": "gloo", "timeout": timedelta(days=9)})  # never shorter


def test_context_refuses_more_ranks_than_gpus(joins, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="LOCAL_RANK=1 needs GPU 1 but this machine shows 1"):
        context("cuda")
    assert joins == []


def test_parse_timeout():
    assert parse_timeout("4h") == timedelta(hours=4)
    assert parse_timeout("90m") == parse_timeout("90") == timedelta(minutes=90)
    assert parse_timeout(" 2.5s ") == timedelta(seconds=2.5)
    assert parse_timeout("1.5H") == timedelta(minutes=90)
    for bad in ("0", "", "-1h", "4d", "h", "soon"):
        with pytest.raises(UsageError, match="--dist-timeout"):
            parse_timeout(bad)


def test_cli_dist_timeout_reaches_the_environment(monkeypatch, tmp_path):
    from cli import main

    monkeypatch.setenv(TIMEOUT_ENV, "unset")
    runner = CliRunner()
    bad = runner.invoke(main, ["extract", "--dist-timeout", "soon"])
    assert bad.exit_code == 2 and "--dist-timeout" in bad.output
    assert os.environ[TIMEOUT_ENV] == "unset"
    runner.invoke(main, ["extract", "--dist-timeout", "6h", "--manifest", str(tmp_path / "none"),
                         "--work-dir", str(tmp_path / "work")])
    assert os.environ[TIMEOUT_ENV] == "6h"
    for command in ("extract", "train-stage-one", "train-head"):
        assert "--dist-timeout" in runner.invoke(main, [command, "--help"]).output


# -- two real processes ------------------------------------------------------------------------------
WAITS = """
import os, sys, time
from pathlib import Path
import torch
from heads.training.distributed import context, rank_zero_first

slow, meet = float(sys.argv[1]), Path(sys.argv[2])
# both ranks join together: joining is bound by the tiny timeout too, and imports take unequal times
(meet / os.environ["RANK"]).touch()
while len(list(meet.iterdir())) < 2:
    time.sleep(0.05)
d = context("cpu")  # CROSSTVR_DIST_TIMEOUT: a tiny collective timeout
report = []

def build():
    time.sleep(slow)  # rank 0 alone works for longer than the collective timeout
    return "manifest"

if d.rank == 1:  # meanwhile the collective timeout is in force on the default group
    try:
        torch.distributed.barrier()
        report.append("default-group barrier returned")
    except RuntimeError:
        report.append("default-group barrier timed out")
report.append(rank_zero_first(d, build))
if d.rank == 1:
    time.sleep(slow)  # ranks finishing a static split far apart
report.append(d.gather_object(d.rank))
d.barrier()
try:
    rank_zero_first(d, lambda: 1 / 0)
except ZeroDivisionError:
    report.append("rank 0 failure relayed")
print(f"rank {d.rank}: {report}", flush=True)
os._exit(0)  # no teardown: the default group holds the barrier that timed out on purpose, and gloo may abort on it
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.slow
def test_waits_for_a_rank_working_alone_outlast_the_collective_timeout(tmp_path):
    """Two gloo processes with a 4 s collective timeout: rank 1 waits 10 s for rank 0's manifest
    and rank 0 10 s for rank 1's shards, and both carry on; a barrier on the default group over the
    same wait times out, so the short timeout was in force."""
    script, meet = tmp_path / "waits.py", tmp_path / "meet"
    script.write_text(textwrap.dedent(WAITS))
    meet.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), TIMEOUT_ENV: "4s"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(script), "10", str(meet)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "rank 0: ['manifest', [0, 1], 'rank 0 failure relayed']" in out, out[-4000:]
    assert ("rank 1: ['default-group barrier timed out', 'manifest', [0, 1], 'rank 0 failure relayed']"
            in out), out[-4000:]
