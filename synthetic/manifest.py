"""The synthetic benchmark's dataset builder: renders the world's videos and writes its manifest.

:func:`build` is what the dataset registry names (``"synthetic.manifest:build"``): it plans the world
(``synthetic.world``), renders the videos that are not on disk yet in worker processes
(``synthetic.render``) and writes ``out_dir/manifest/``. Nothing happens at import time.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from manifests.schema import Manifest
from synthetic.render import RENDER_VERSION, render_key, render_video
from synthetic.world import GROUP_SIZE, plan_world, video_attrs

DATASET = "synthetic"


def _render_job(job: tuple[dict, str]) -> str:
    attrs, path = job
    render_video(attrs, path)
    return path


def build(out_dir: str | Path, seed: int = 0, train_groups: int = 200, train_random: int = 400,
          val_groups: int = 30, val_random: int = 40, test_groups: int = 60,
          test_random: int = 80, captions_per_train_video: int = 3, workers: int = 2,
          group_size: int = GROUP_SIZE, progress: bool = True) -> Manifest:
    """Render the world into ``out_dir/videos/*.mp4`` and write ``out_dir/manifest/``.

    Videos whose render key (attrs + render settings) matches ``videos/render_index.json`` and
    whose file exists are not re-rendered, so a re-run with the same options is near-instant.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    videos, captions = plan_world(seed, train_groups, train_random, val_groups, val_random,
                                  test_groups, test_random, captions_per_train_video, group_size)
    index_path = video_dir / "render_index.json"
    try:
        index: dict[str, str] = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    jobs: list[tuple[dict, str]] = []
    keys: dict[str, str] = {}
    for rec in videos:
        attrs = video_attrs(rec)
        key = render_key(attrs)
        keys[rec["video_id"]] = key
        path = video_dir / f"{rec['video_id']}.mp4"
        if index.get(rec["video_id"]) != key or not path.is_file():
            jobs.append((attrs, str(path)))
            index.pop(rec["video_id"], None)

    def _save_index() -> None:
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, sort_keys=True))
        os.replace(tmp, index_path)

    if jobs:
        vid_of = {p: Path(p).stem for _, p in jobs}
        bar = tqdm(total=len(jobs), desc="render synthetic videos", unit="video",
                   disable=not progress)
        try:
            if workers <= 1:
                for job in jobs:
                    _render_job(job)
                    index[vid_of[job[1]]] = keys[vid_of[job[1]]]
                    bar.update()
            else:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    for path in pool.map(_render_job, jobs, chunksize=16):
                        index[vid_of[path]] = keys[vid_of[path]]
                        bar.update()
        finally:
            bar.close()
            _save_index()
    source = {"generator": "synthetic.manifest", "render_version": RENDER_VERSION, "seed": seed,
              "sizes": {"train_groups": train_groups, "train_random": train_random,
                        "val_groups": val_groups, "val_random": val_random,
                        "test_groups": test_groups, "test_random": test_random,
                        "captions_per_train_video": captions_per_train_video,
                        "group_size": group_size},
              "video_dir": str(video_dir.resolve())}
    manifest_dir = out_dir / "manifest"
    m = Manifest.from_records(DATASET, videos, captions, manifest_dir, source)
    meta = manifest_dir / "meta.json"
    try:
        same = json.loads(meta.read_text()).get("sha256") == m.sha256()
    except (OSError, ValueError):
        same = False
    if not same:
        m.write(manifest_dir)
    return m
