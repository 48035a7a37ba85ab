"""The extraction job as users run it: every dataset from its documented data layout, failures that
cannot hide (exit status, store totals, incomplete splits refused), retries, clear user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from manifests import DATASETS, Manifest
from pipeline.store import CacheStore
from helpers import make_data_root, run_cli, write_video

pytestmark = pytest.mark.integration

REAL = [name for name in DATASETS if name != "synthetic"]


def invoke(args: list) -> object:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.mark.parametrize("dataset", REAL)
def test_every_dataset_extracts_from_its_data_layout(tmp_path: Path, dataset: str) -> None:
    expect = make_data_root(tmp_path / "data", dataset)
    out = run_cli(["extract", "--dataset", dataset, "--data-root", tmp_path / "data", "--work-dir", tmp_path / "work",
                   "--encoder", "test-vit-micro", "--workers", "1", "--shard-size", "4"])
    (path,) = (tmp_path / "work" / "stores").glob(f"{dataset}-test-vit-micro*.zarr")
    store = CacheStore.open(path)
    assert store.num_videos == expect["videos"] and store.failures() == {} and store.is_complete(), out
    assert {s: int((store.split_status(s) == 1).sum()) for s in store.splits()} == expect["splits"]
    # the papers' sampling for the dataset: 12 frames and 32 text tokens, 64 and 64 for paragraphs
    assert store.attrs["sampling"]["num_frames"] == DATASETS[dataset].frames
    assert store.attrs["max_text_tokens"] == DATASETS[dataset].text_tokens
    assert f"{expect['videos']} ok ({expect['videos']} by decord)" in out


def test_a_missing_layout_is_named(tmp_path: Path) -> None:
    result = invoke(["extract", "--dataset", "msrvtt", "--data-root", tmp_path / "data", "--work-dir", tmp_path])
    assert result.exit_code == 2 and "data/msrvtt" in result.output and "MSRVTT_data.json" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "data" / "msrvtt").mkdir(parents=True)
    result = invoke(["extract", "--dataset", "msrvtt", "--data-root", tmp_path / "data", "--work-dir", tmp_path])
    assert result.exit_code == 2 and "none of 'msrvtt''s annotation files" in result.output


def test_msrvtt_1k_a_needs_only_the_csv(tmp_path: Path) -> None:
    make_data_root(tmp_path / "data", "msrvtt")
    ann = tmp_path / "data" / "msrvtt"
    (ann / "MSRVTT_data.json").unlink()
    result = invoke(["make-manifest", "--dataset", "msrvtt", "--data-root", tmp_path / "data", "--work-dir", tmp_path])
    assert result.exit_code == 2 and "training splits need it" in result.output and "splits=test" in result.output
    out = run_cli(["make-manifest", "--dataset", "msrvtt", "--data-root", tmp_path / "data", "--work-dir", tmp_path,
                   "--option", "splits=test"])
    m = Manifest.read(tmp_path / "msrvtt" / "manifest")
    assert m.split_counts() == {"test": {"videos": 2, "captions": 2}} and "videos=2" in out


def test_user_errors_are_one_line_exit_2_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    make_data_root(tmp_path / "data", "msrvtt")
    (tmp_path / "data" / "msrvtt" / "MSRVTT_JSFUSION_test.csv").write_text("vid,text\nvideo1,a\n")
    args = ["make-manifest", "--dataset", "msrvtt", "--data-root", tmp_path / "data", "--work-dir", tmp_path]
    result = invoke(args)
    assert result.exit_code == 2 and "MSRVTT_JSFUSION_test.csv: missing column(s)" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    debug = invoke(["--debug", *args])
    assert debug.exit_code != 0 and type(debug.exception).__name__ == "ManifestError"


@pytest.fixture
def broken(tmp_path: Path) -> dict:
    """A manifest whose test split has one missing video: extraction leaves a failure behind."""
    videos = [{"video_id": f"v{i}", "path": str(write_video(tmp_path / f"v{i}.mp4", seed=i)),
               "split": "train" if i < 2 else "test"} for i in range(4)]
    videos.append({"video_id": "gone", "path": str(tmp_path / "gone.mp4"), "split": "test"})
    captions = [{"caption_id": f"{v['video_id']}-c", "video_id": v["video_id"], "text": f"clip {v['video_id']}",
                 "split": v["split"]} for v in videos]
    manifest = Manifest.from_records("toy", videos, captions, root=tmp_path).write(tmp_path / "manifest")
    return {"manifest": manifest, "store": tmp_path / "toy.zarr", "work": tmp_path / "work"}


def extract_args(b: dict, *extra) -> list:
    return ["extract", "--manifest", b["manifest"], "--work-dir", b["work"], "--encoder", "test-vit-micro",
            "--store", b["store"], "--frames", "4", "--workers", "1", "--shard-size", "2", *extra]


def test_extraction_with_failures_exits_1_and_says_where_they_are(broken: dict) -> None:
    result = invoke(extract_args(broken))
    assert result.exit_code == 1
    assert "1 of 5 videos failed (tolerated: 0)" in result.output and "failures.json" in result.output
    assert f"store {broken['store']}: 4 ok, 1 failed, 0 pending of 5 videos" in result.output
    # a re-run does no work, and still fails: the store holds the failure
    again = invoke(extract_args(broken))
    assert again.exit_code == 1 and "0 ok" in again.output and "4 ok, 1 failed" in again.output
    assert invoke(extract_args(broken, "--max-failed", "1")).exit_code == 0
    assert invoke(extract_args(broken, "--max-failed", "25%")).exit_code == 0
    fails = json.loads((broken["store"] / "failures.json").read_text())
    assert fails["gone"]["reason"].startswith("missing: no file at")
    # the file appears: --retry-failed decodes it, and the store is whole
    write_video(Path(broken["manifest"]).parent / "gone.mp4", seed=7)
    out = run_cli(extract_args(broken, "--retry-failed"))
    assert "1 retried" not in out and "2 retried" in out and "5 ok, 0 failed" in out


def test_metrics_on_an_incomplete_split_are_refused_or_labelled(broken: dict, tmp_path: Path) -> None:
    invoke(extract_args(broken))
    result = invoke(["eval", "--store", broken["store"], "--work-dir", broken["work"], "--out", tmp_path / "r"])
    assert result.exit_code == 1 and "test: 2 of 3 videos and 2 of 3 captions scored" in result.output
    assert "gone (missing: no file at" in result.output and "--allow-incomplete" in result.output
    out = run_cli(["eval", "--store", broken["store"], "--work-dir", broken["work"], "--out", tmp_path / "r",
                   "--allow-incomplete"])
    assert out.startswith("INCOMPLETE (1 videos missing") and "test split, 2/3 videos, 2/3 captions" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["split"]["complete"] is False and list(report["split"]["missing_video_ids"]) == ["gone"]
    # a whole split says how much was scored too
    whole = run_cli(["eval", "--store", broken["store"], "--work-dir", broken["work"], "--split", "train",
                     "--out", tmp_path / "t"])
    assert whole.startswith("train split, 2/2 videos, 2/2 captions")


def test_rerank_refuses_an_incomplete_split_before_any_work(broken: dict, tmp_path: Path) -> None:
    invoke(extract_args(broken))
    fake = tmp_path / "not-used.pt"
    fake.write_bytes(b"")
    result = invoke(["rerank", "--store", broken["store"], "--stage-one", fake, "--stage-two", fake,
                     "--work-dir", broken["work"]])
    assert result.exit_code == 1 and "test: 2 of 3 videos" in result.output and "--allow-incomplete" in result.output


def test_make_manifest_counts_missing_videos_and_fps_sampling_is_recorded(tmp_path: Path) -> None:
    make_data_root(tmp_path / "data", "msvd")
    (tmp_path / "data" / "msvd" / "videos" / "ccc_0_4.avi").unlink()
    out = run_cli(["make-manifest", "--dataset", "msvd", "--data-root", tmp_path / "data", "--work-dir", tmp_path])
    assert "1 of 5 listed videos are missing on disk" in out
    result = invoke(["extract", "--dataset", "msvd", "--data-root", tmp_path / "data", "--work-dir", tmp_path,
                     "--encoder", "test-vit-micro", "--workers", "1", "--fps", "4", "--max-failed", "1"])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "stores").glob("msvd-*.zarr")
    store = CacheStore.open(path)
    assert store.attrs["sampling"] == {"num_frames": 12, "strategy": "uniform-midpoint@4fps"}
    assert store.failures()["ccc_0_4"].startswith("missing: ")
    # 16 frames at 8 fps = 2 s: 8 frames at 4 per second, the other 4 slots padding
    assert store.array("videos/frame_mask")[...].sum(axis=1).tolist() == [8, 8, 0, 8, 8]


def test_real_datasets_default_to_both_encoders_of_the_method(tmp_path: Path) -> None:
    from workflows.data import default_encoders, extract_config
    from workflows.workdir import WorkDir

    make_data_root(tmp_path / "data", "didemo")
    m = run_and_read_manifest(tmp_path, "didemo")
    assert default_encoders(WorkDir(tmp_path), m) == ["clip-b32", "eva-g14"]
    cfg = extract_config(m, {"num_frames": None, "workers": 1})
    assert (cfg.num_frames, cfg.max_text_tokens, cfg.workers) == (64, 64, 1)


def run_and_read_manifest(tmp_path: Path, dataset: str) -> Manifest:
    run_cli(["make-manifest", "--dataset", dataset, "--data-root", tmp_path / "data", "--work-dir", tmp_path])
    return Manifest.read(tmp_path / dataset / "manifest")
