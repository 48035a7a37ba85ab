"""Shared fixtures: offline hub, few torch threads, tiny generated videos, the real fixture video, and
the fixtures every test module shares (built once per test run)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import av  # noqa: F401  (before decord: decord's own FFmpeg libraries would shadow PyAV's encoders)
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_VIDEO = FIXTURES / "videos" / "v_GGSY1Qvo990.mp4"

# the session stores built through the command line (make-manifest, extract, train-stage-one, train-head)
CLI_WORLDS = {"tiny_world", "tiny_runs"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses a world built through the command line's extraction (``tiny_world``, ``tiny_runs``,
    directly or through another fixture) is an ``integration`` test, like the modules marked so
    (setup.cfg lists the markers)."""
    for item in items:
        if CLI_WORLDS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True, scope="session")
def _offline_and_threads() -> None:
    """No downloads; the machine's cores shared among pytest-xdist's workers (``-n``), at most two
    torch threads each."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="module")
def micro():
    """The micro open_clip test encoder (random weights under a fixed seed), one per test module."""
    from pipeline.encoders import load_encoder

    return load_encoder("test-vit-micro")


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_video(name, **write_video_kwargs)`` -> path under tmp_path."""

    from helpers import write_video

    def _make(name: str = "clip.mp4", **kwargs) -> Path:
        return write_video(tmp_path / name, **kwargs)

    return _make


@pytest.fixture
def fixture_video() -> Path:
    """The real ActivityNet clip in tests/fixtures (h264, 320x240, 19.62 fps, 355 frames, 18.2 s)."""
    return FIXTURE_VIDEO


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic benchmark at its smallest, extracted with the micro test encoder through the
    command line: ``{"work", "manifest", "store", "extract_output"}``. Shared by the whole run:
    tests write their runs and reports to their own directories."""
    from helpers import TINY_WORLD, run_cli

    work = tmp_path_factory.mktemp("tiny_world")
    run_cli(["make-manifest", "--dataset", "synthetic", "--work-dir", work,
             *[x for o in TINY_WORLD for x in ("--option", o)]])
    manifest = work / "synthetic" / "manifest"
    store = work / "stores" / "synthetic-tiny.zarr"  # found as the work dir's synthetic store
    out = run_cli(["extract", "--manifest", manifest, "--work-dir", work, "--encoder", "test-vit-micro",
                   "--store", store, "--frames", "4", "--shard-size", "8", "--workers", "1"])
    return {"work": work, "manifest": manifest, "store": store, "extract_output": out}


@pytest.fixture(scope="session")
def tiny_runs(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The tiny synthetic world's store -> a meanP stage one -> a small CrossTVR head:
    ``(work, store, stage_one.pt, stage_two.pt)`` (each in its run directory)."""
    from helpers import TINY_HEAD, run_cli

    work, store = tiny_world["work"], tiny_world["store"]
    runs = tmp_path_factory.mktemp("tiny_runs")
    run_cli(["train-stage-one", "--store", store, "--work-dir", work, "--head", "meanP",
             "--epochs", "1", "--batch-size", "8", "--out", runs / "s1"])
    run_cli(["train-head", "--store", store, "--stage-one", runs / "s1" / "stage_one.pt", "--work-dir", work,
             "--epochs", "1", "--batch-size", "4", "--out", runs / "s2", "--itc-steps", "3", "--itc-batch", "4",
             "--device", "cpu", *TINY_HEAD])
    return work, store, runs / "s1" / "stage_one.pt", runs / "s2" / "stage_two.pt"


@pytest.fixture(scope="session")
def token_splits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stage two's attribute world (``helpers.make_token_split``), memory-mapped, with a meanP stage
    one trained on it: ``{"root", "train", "val", "test", "stage_one"}``."""
    from heads.stage_one.train import train_stage_one
    from helpers import make_token_split

    root = tmp_path_factory.mktemp("token_splits")
    train = make_token_split("train", 96, 2, seed=1, directory=root / "train")
    val = make_token_split("val", 32, 1, seed=2, directory=root / "val")
    test = make_token_split("test", 32, 1, seed=3, directory=root / "test")
    s1 = train_stage_one(train, val, out_dir=root / "s1", head="meanP", epochs=2, batch_size=32, lr=1e-2, seed=0,
                         progress=False)
    return {"root": root, "train": train, "val": val, "test": test, "stage_one": s1}


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def chromium() -> dict:
    """Debian's headless Chromium and its driver for the browser tests: installed with apt-get where missing
    and this process may (root, apt-get present, CROSSTVR_NO_APT unset), else the test is skipped saying why."""
    import fcntl
    import shutil
    import subprocess
    import tempfile

    def found() -> bool:
        return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()

    if not found():
        if os.environ.get("CROSSTVR_NO_APT"):
            pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing and CROSSTVR_NO_APT is set: "
                        f"apt-get install chromium chromium-driver")
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing and cannot be installed here (needs root and apt-get): "
                        f"apt-get install chromium chromium-driver")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
        with open(Path(tempfile.gettempdir()) / "crosstvr-tests-apt.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # one pytest-xdist worker installs, the others wait for it
            said = ""
            if not found():
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:  # a clean machine may not have the package lists yet
                    subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                said = (done.stderr or done.stdout).strip()[-300:]
        if not found():
            pytest.skip(f"could not install chromium with apt-get: {said}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -r requirements.txt)")
    return {"browser": CHROMIUM, "driver": CHROMEDRIVER}
