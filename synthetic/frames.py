"""Decoded frames of the synthetic world's videos, through the pipeline's decoder, cached on disk.

The pretraining (``synthetic.pretrain``) and the probes (``synthetic.probes``) look at a few fixed
frames of every video. They are decoded by the extraction job's own decoder,
:func:`pipeline.decode.decode_video` (decord, PyAV where decord cannot read a file), at their decoded
size (224 px, no resize), and kept as ``frames-<hash>.npy`` (uint8, N x 224 x 224 x 3, memory-mapped
on reuse) with ``frames-<hash>.json`` labels beside it.

The decoder takes a clip's frames by the pipeline's sampling rule (``pipeline.sampling``, uniform
midpoints). Frame indices that are that rule's sample of a whole video (the pretraining's default
``(2, 6, 10, 14, 18, 22)`` is its 6-frame sample of the world's 24-frame videos) are decoded as
such; any other indices (the probes' ``(4, 20)``) are picked from a sample of every frame of the
video. Either way the frames are the pixels decord gave the first version of this cache, which
called decord directly, so the caches' names and contents, and every checkpoint and figure computed
from them, are unchanged (docs/SYNTHETIC.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from core.fileio import atomic_write
from synthetic.world import NUM_FRAMES, frame_time, manifest_attrs


def content_hash(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (what the caches and checkpoints are keyed by)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sample_size(frame_indices: Sequence[int], num_video_frames: int = NUM_FRAMES) -> int:
    """How many frames :func:`pipeline.decode.decode_video` must sample from a video of
    ``num_video_frames`` frames for ``frame_indices`` to be among them: their own number where they
    are the pipeline's uniform-midpoint sample of the whole video, else every frame."""
    from pipeline.sampling import uniform_indices

    k = len(frame_indices)
    if 0 < k <= num_video_frames and \
            [int(i) for i in uniform_indices(0, num_video_frames, k)] == [int(i) for i in frame_indices]:
        return k
    return num_video_frames


def decode_video_frames(path: str | Path, frame_indices: Sequence[int]) -> np.ndarray:
    """Frames ``frame_indices`` of the world's video at ``path`` (len(idx), H, W, 3) uint8, decoded by
    the pipeline's decoder; a video that cannot be decoded, or lacks one of the frames, raises."""
    from pipeline.decode import decode_video

    idx = [int(i) for i in frame_indices]
    result = decode_video(Path(path).stem, path, sample_size(idx))
    if not result.ok:
        raise RuntimeError(f"{path}: {result.reason}")
    row = {int(i): r for r, i in enumerate(result.indices) if result.mask[r]}
    missing = [i for i in idx if i not in row]
    if missing:
        raise ValueError(f"{path}: frames {missing} are not among the {result.num_video_frames} frames of "
                         f"the video (the synthetic world's videos have {NUM_FRAMES})")
    return result.frames[[row[i] for i in idx]]


def decode_frames(paths: Sequence[str | Path], frame_indices: Sequence[int], workers: int = 2,
                  progress: bool = True, desc: str = "decode frames") -> np.ndarray:
    """Decode the same frame indices of every video: uint8 array (V, len(idx), H, W, 3)."""
    from tqdm import tqdm

    idx = tuple(int(i) for i in frame_indices)
    out: list[np.ndarray] = []
    with tqdm(total=len(paths), desc=desc, unit="video", disable=not progress) as bar:
        if workers <= 1 or len(paths) < 8:
            for p in paths:
                out.append(decode_video_frames(p, idx))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:   # the decoders release the GIL
                for arr in pool.map(lambda p: decode_video_frames(p, idx), paths):
                    out.append(arr)
                    bar.update()
    return np.stack(out)


def frame_cache(manifest, cache_dir: str | Path, frame_indices: Sequence[int], workers: int = 2,
                progress: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Decoded frames of every video of ``manifest`` at ``frame_indices``, cached as
    ``cache_dir/frames-<hash>.npy`` (memory-mapped on reuse) with ``frames-<hash>.json`` labels:
    one dict per frame with the video's attributes, ``video_id``, ``frame`` and ``t``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    attrs = manifest_attrs(manifest)
    vids = list(attrs)
    key = content_hash({"manifest": manifest.sha256(), "frames": list(frame_indices), "videos": vids})[:16]
    npy, meta = cache_dir / f"frames-{key}.npy", cache_dir / f"frames-{key}.json"
    if npy.is_file() and meta.is_file():
        return np.load(npy, mmap_mode="r"), json.loads(meta.read_text())["labels"]
    arr = decode_frames([manifest.video_path(v) for v in vids], frame_indices, workers, progress)
    v, f = arr.shape[:2]
    arr = arr.reshape(v * f, *arr.shape[2:])
    labels = [{**attrs[vid], "video_id": vid, "frame": int(i),
               "t": frame_time(int(i))} for vid in vids for i in frame_indices]
    atomic_write(npy, lambda tmp: np.save(tmp, arr))
    meta.write_text(json.dumps({"manifest_sha256": manifest.sha256(), "frames": list(frame_indices),
                                "shape": list(arr.shape), "labels": labels}))
    return np.load(npy, mmap_mode="r"), labels
