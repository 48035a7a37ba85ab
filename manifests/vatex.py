"""VATEX manifest builder.

Official files: ``vatex_training_v1.0.json`` and ``vatex_validation_v1.0.json``, each a list of
``{"videoID": "<youtube_id>_<start6>_<end6>", "enCap": [10 captions], "chCap": [...]}``. The
clip's start/end (whole seconds, six digits) are parsed from the id; only English captions are
used.

Splits: with ``split_lists`` (``{"train": path, "val": path, "test": path}``, one videoID per
line, e.g. the HGR 25,991 / 1,500 / 1,500 split) each video takes the split of the list naming
it and unlisted videos are dropped. Without lists, training -> ``train`` and validation ->
``test`` (no val split).

Video files (``video_layout``): ``"clip"``: ``<videoID>.<ext>``, already trimmed (start/end
null); ``"full"``: ``<youtube_id>.<ext>``, the whole YouTube video (start/end set from the id);
``"auto"`` (default): the clip file if present, else the full file, else the expected clip path.
The parsed times are always kept in the extra columns ``clip_start`` / ``clip_end``.
"""

from __future__ import annotations

from pathlib import Path

from .schema import (
    SPLITS, Manifest, ManifestError, RecordCollector, annotation_file, load_json, read_lines,
)

TRAIN_JSON = "vatex_training_v1.0.json"
VAL_JSON = "vatex_validation_v1.0.json"
LAYOUTS = ("auto", "clip", "full")


def parse_video_id(video_id: str) -> tuple[str, float, float]:
    """``"<ytid>_<start6>_<end6>"`` -> ``(ytid, start, end)`` in seconds."""
    parts = video_id.rsplit("_", 2)
    if len(parts) != 3 or not parts[0] or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"videoID {video_id!r} is not '<youtube_id>_<start>_<end>'")
    start, end = float(int(parts[1])), float(int(parts[2]))
    if end <= start:
        raise ValueError(f"videoID {video_id!r}: end {end} is not after start {start}")
    return parts[0], start, end


def _entries(path: Path) -> list[tuple[str, list[str]]]:
    data = load_json(path)
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a list of {{videoID, enCap}} objects")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "videoID" not in item or "enCap" not in item:
            raise ManifestError(f"{path}: entry {i} lacks 'videoID' / 'enCap'")
        if not isinstance(item["enCap"], list):
            raise ManifestError(f"{path}: entry {i} ({item['videoID']!r}): enCap is not a list")
        out.append((str(item["videoID"]), item["enCap"]))
    return out


def build(annotations_dir: str | Path | None = None, video_dir: str | Path | None = None,
          out_dir: str | Path | None = None, *, train_json: str | Path | None = None,
          val_json: str | Path | None = None,
          split_lists: dict[str, str | Path] | None = None, video_layout: str = "auto",
          require_videos: bool = False) -> Manifest:
    """Build the VATEX manifest (see the module docstring for splits and file layouts)."""
    if video_layout not in LAYOUTS:
        raise ManifestError(f"vatex: video_layout must be one of {LAYOUTS}, not "
                            f"{video_layout!r}")
    files = {
        "train_json": annotation_file(train_json, annotations_dir, [TRAIN_JSON],
                                      "VATEX training json"),
        "val_json": annotation_file(val_json, annotations_dir, [VAL_JSON],
                                    "VATEX validation json"),
    }
    listed: dict[str, tuple[str, str]] | None = None
    source: dict = {"annotations": {k: str(v) for k, v in files.items()},
                    "video_layout": video_layout}
    if split_lists:
        listed = {}
        for split, p in split_lists.items():
            if split not in SPLITS:
                raise ManifestError(f"vatex: split_lists key {split!r} is not one of "
                                    f"{list(SPLITS)}")
            path = annotation_file(p, None, [], f"VATEX {split} list")
            source["annotations"][f"{split}_list"] = str(path)
            for lineno, vid in read_lines(path):
                if vid in listed:
                    raise ManifestError(f"{path} line {lineno}: {vid!r} already listed in "
                                        f"{listed[vid][1]}")
                listed[vid] = (split, f"{path} line {lineno}")

    rec = RecordCollector("vatex", video_dir, default_ext=".mp4")
    dropped = 0
    for key, default_split in (("train_json", "train"), ("val_json", "test")):
        path = files[key]
        for i, (vid, caps) in enumerate(_entries(path)):
            origin = f"{path} entry {i}"
            if listed is not None:
                if vid not in listed:
                    dropped += 1
                    continue
                split = listed[vid][0]
            else:
                split = default_split
            try:
                ytid, start, end = parse_video_id(vid)
            except ValueError as exc:
                raise ManifestError(f"{origin}: {exc}") from None
            loc = rec.locator
            clip = loc.find(vid) if video_layout in ("auto", "clip") else None
            full = loc.find(ytid) if video_layout == "full" or (
                video_layout == "auto" and clip is None) else None
            if full is not None or (video_layout == "full"):
                path_, found = (full, True) if full is not None else (
                    loc.video_dir / (ytid + ".mp4"), False)
                rec.add_video(vid, split, origin, path=path_, found=found, start=start, end=end,
                              youtube_id=ytid, clip_start=start, clip_end=end)
            else:
                path_, found = (clip, True) if clip is not None else (
                    loc.video_dir / (vid + ".mp4"), False)
                rec.add_video(vid, split, origin, path=path_, found=found,
                              youtube_id=ytid, clip_start=start, clip_end=end)
            for text in caps:
                rec.add_caption(vid, text, origin)
    if listed is not None:
        unknown = [v for v in listed if not rec.has_video(v)]
        if unknown:
            raise ManifestError(f"{listed[unknown[0]][1]}: {len(unknown)} listed video(s) are "
                                f"in neither annotation json, e.g. {unknown[0]!r}")
        source["dropped_unlisted_videos"] = dropped
    return rec.finish(source, out_dir, require_videos)
