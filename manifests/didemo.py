"""DiDeMo manifest builder (paragraph-to-video retrieval).

Official files: ``train_data.json``, ``val_data.json``, ``test_data.json``, each a list of
``{"video": <flickr file name>, "description": str, "times": [[s, e], ...], ...}`` with several
entries per video. All descriptions of a video are joined, in file order, into one caption
(``<video>#0``), the usual paragraph-to-video protocol. The ``video`` field is kept as the
video id. Its file is looked up as the exact name, then with its extension replaced or extended
by a common video extension (``x.mov`` -> ``x.mp4`` / ``x.mov.mp4``); start/end stay null.
"""

from __future__ import annotations

from pathlib import Path

from .schema import (
    VIDEO_EXTENSIONS, Manifest, ManifestError, RecordCollector, annotation_file, load_json,
    paragraph,
)

FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}


def locate(rec: RecordCollector, name: str) -> tuple[Path, bool]:
    """Find the file of DiDeMo video ``name`` (see the module docstring)."""
    hit = rec.locator.find(name, exact=True)
    if hit is not None:
        return hit, True
    stem, dot, ext = name.rpartition(".")
    has_ext = bool(dot and stem) and f".{ext.lower()}" in VIDEO_EXTENSIONS
    stems = [stem, name] if has_ext else [name]
    path, found = rec.locator.locate(stems, ".mp4")
    if not found and has_ext:
        path = rec.locator.video_dir / name
    return path, found


def build(annotations_dir: str | Path | None = None, video_dir: str | Path | None = None,
          out_dir: str | Path | None = None, *, train_json: str | Path | None = None,
          val_json: str | Path | None = None, test_json: str | Path | None = None,
          sep: str = " ", require_videos: bool = False) -> Manifest:
    """Build the DiDeMo paragraph-to-video manifest."""
    rec = RecordCollector("didemo", video_dir, default_ext=".mp4")
    annotations = {}
    for split, explicit in (("train", train_json), ("val", val_json), ("test", test_json)):
        path = annotation_file(explicit, annotations_dir, [FILES[split]], f"DiDeMo {split} json")
        annotations[f"{split}_json"] = str(path)
        data = load_json(path)
        if not isinstance(data, list):
            raise ManifestError(f"{path}: expected a list of {{video, description, times}}")
        texts: dict[str, list[str]] = {}
        first: dict[str, int] = {}
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "video" not in item or "description" not in item:
                raise ManifestError(f"{path}: entry {i} lacks 'video' / 'description'")
            if not isinstance(item["description"], str):
                raise ManifestError(f"{path}: entry {i}: description is not a string")
            vid = str(item["video"])
            first.setdefault(vid, i)
            texts.setdefault(vid, []).append(item["description"])
        for vid, descs in texts.items():
            origin = f"{path} entry {first[vid]}"
            p, found = locate(rec, vid)
            rec.add_video(vid, split, origin, path=p, found=found)
            rec.add_caption(vid, paragraph(descs, sep), origin)
    return rec.finish({"annotations": annotations, "paragraph_sep": sep}, out_dir,
                      require_videos)
