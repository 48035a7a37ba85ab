"""MSVD manifest builder.

Official files: ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` (one clip id per line,
1200 / 100 / 670) and the captions, either as JSON ``{clip_id: [caption, ...]}`` or as
``raw-captions.pkl`` ``{clip_id: [[token, ...], ...]}`` (tokens joined with spaces). Every
caption of a video is kept (the usual multi-caption protocol). Clips are pre-cut, so start/end
stay null; files are usually ``<video_dir>/<clip_id>.avi`` (YouTubeClips).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from .schema import (
    Manifest, ManifestError, RecordCollector, annotation_file, load_json, read_lines,
)

CAPTION_FILES = ("captions_msvd.json", "raw-captions.pkl")


class _PlainUnpickler(pickle.Unpickler):
    """Loads only plain containers and strings: refuses every class or function reference."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: raw-captions.pkl "
                                     f"should hold only dicts, lists and strings")


def load_captions(path: Path) -> dict[str, list[str]]:
    """``{clip_id: [caption, ...]}`` from the JSON or the pickle format."""
    if path.suffix.lower() in (".pkl", ".pickle"):
        try:
            with open(path, "rb") as fh:
                data = _PlainUnpickler(fh).load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ManifestError(f"{path}: cannot read pickle: {exc}") from None
    else:
        data = load_json(path)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping {{clip_id: [captions]}}")
    out: dict[str, list[str]] = {}
    for vid, caps in data.items():
        if not isinstance(caps, list):
            raise ManifestError(f"{path}: captions of {vid!r} are not a list")
        texts = []
        for j, c in enumerate(caps):
            if isinstance(c, (list, tuple)):
                c = " ".join(str(t) for t in c)
            if not isinstance(c, str):
                raise ManifestError(f"{path}: caption {j} of {vid!r} is neither a string nor "
                                    f"a token list: {c!r}")
            texts.append(c)
        out[str(vid)] = texts
    return out


def build(annotations_dir: str | Path | None = None, video_dir: str | Path | None = None,
          out_dir: str | Path | None = None, *, train_list: str | Path | None = None,
          val_list: str | Path | None = None, test_list: str | Path | None = None,
          captions: str | Path | None = None, require_videos: bool = False) -> Manifest:
    """Build the MSVD manifest from the split lists and a captions file."""
    cap_path = annotation_file(captions, annotations_dir, CAPTION_FILES, "MSVD captions")
    caps = load_captions(cap_path)
    rec = RecordCollector("msvd", video_dir, default_ext=".avi")
    annotations = {"captions": str(cap_path)}
    for split, explicit in (("train", train_list), ("val", val_list), ("test", test_list)):
        path = annotation_file(explicit, annotations_dir, [f"{split}_list.txt"],
                               f"MSVD {split} list")
        annotations[f"{split}_list"] = str(path)
        for lineno, vid in read_lines(path):
            origin = f"{path} line {lineno}"
            if vid not in caps:
                raise ManifestError(f"{origin}: video {vid!r} has no captions in {cap_path}")
            rec.add_video(vid, split, origin)
            for text in caps[vid]:
                rec.add_caption(vid, text, str(cap_path))
    return rec.finish({"annotations": annotations}, out_dir, require_videos)
