"""ActivityNet Captions manifest builder (paragraph-to-video retrieval).

Official files: ``train.json`` and ``val_1.json`` (``val_2.json`` annotates the same videos
again), each ``{"v_<youtube_id>": {"duration": s, "timestamps": [[s, e], ...],
"sentences": [...]}}``. By convention ``train.json`` is the train split and ``val_1.json`` the
test split; an optional ``val_json`` fills a val split. The sentences of a video are joined in
order into one caption (``<id>#0``) covering the whole video (start/end null; ``duration`` is
kept as an extra column). Files are looked up as ``<video_dir>/v_<id>.<ext>``, then without the
``v_`` prefix.
"""

from __future__ import annotations

from pathlib import Path

from .schema import Manifest, ManifestError, RecordCollector, annotation_file, load_json, paragraph

FILES = {"train": "train.json", "test": "val_1.json"}


def build(annotations_dir: str | Path | None = None, video_dir: str | Path | None = None,
          out_dir: str | Path | None = None, *, train_json: str | Path | None = None,
          test_json: str | Path | None = None, val_json: str | Path | None = None,
          sep: str = " ", require_videos: bool = False) -> Manifest:
    """Build the ActivityNet Captions paragraph-to-video manifest."""
    rec = RecordCollector("activitynet", video_dir, default_ext=".mp4")
    files = {
        "train": annotation_file(train_json, annotations_dir, [FILES["train"]],
                                 "ActivityNet train json"),
        "test": annotation_file(test_json, annotations_dir, [FILES["test"]],
                                "ActivityNet val_1 (test) json"),
    }
    if val_json is not None:
        files["val"] = annotation_file(val_json, None, [], "ActivityNet val json")
    for split in ("train", "val", "test"):
        if split not in files:
            continue
        path = files[split]
        data = load_json(path)
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected an object {{video_id: {{sentences, ...}}}}")
        for vid, entry in data.items():
            origin = f"{path} video {vid!r}"
            if not isinstance(entry, dict) or not isinstance(entry.get("sentences"), list):
                raise ManifestError(f"{origin}: lacks a 'sentences' list")
            if not all(isinstance(s, str) for s in entry["sentences"]):
                raise ManifestError(f"{origin}: sentences must be strings")
            stems = [vid, vid[2:]] if vid.startswith("v_") and len(vid) > 2 else [vid, f"v_{vid}"]
            p, found = rec.locator.locate(stems, ".mp4")
            duration = entry.get("duration")
            rec.add_video(vid, split, origin, path=p, found=found,
                          duration=float(duration) if duration is not None else None)
            rec.add_caption(vid, paragraph(entry["sentences"], sep), origin)
    return rec.finish({"annotations": {k: str(v) for k, v in files.items()},
                       "paragraph_sep": sep}, out_dir, require_videos)
