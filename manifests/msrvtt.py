"""MSR-VTT manifest builder.

Official files: ``MSRVTT_data.json`` (``videos[]``: video_id, split, ...; ``sentences[]``:
video_id, caption, sen_id), ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (one column
``video_id``) and ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``: the 1k-A
test, one caption per video). Videos are ``<video_dir>/<video_id>.mp4``.

Protocols (``train_list``):
- ``"9k"`` / ``"7k"``: train = the csv's videos with all their json sentences; test = 1k-A;
  no val split.
- ``"full"``: the json's own split (train 6513 / validate 497 -> val / test 2990), all
  sentences of every video.

``splits="test"`` builds the 1k-A test split alone (zero-shot evaluation) from the JSFusion csv,
which holds every test caption: ``MSRVTT_data.json`` and the train list are not needed then.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .schema import (
    Manifest, ManifestError, RecordCollector, annotation_file, load_json,
)

TRAIN_LISTS = {"9k": "MSRVTT_train.9k.csv", "7k": "MSRVTT_train.7k.csv"}
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
DATA_JSON = "MSRVTT_data.json"
_JSON_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _read_csv(path: Path, columns: list[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(f"{path}: missing column(s) {missing}; header is "
                                    f"{reader.fieldnames}")
            return [row for row in reader if any((v or "").strip() for v in row.values())]
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None


def _sentences(data: dict, path: Path) -> dict[str, list[tuple[str, str]]]:
    """``{video_id: [(sen_id, caption), ...]}`` from the json's ``sentences``."""
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise ManifestError(f"{path}: expected an object with a 'sentences' list")
    out: dict[str, list[tuple[str, str]]] = {}
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or "video_id" not in s or "caption" not in s:
            raise ManifestError(f"{path}: sentences[{i}] lacks 'video_id' / 'caption'")
        vid = str(s["video_id"])
        sen = str(s.get("sen_id", len(out.get(vid, []))))
        out.setdefault(vid, []).append((sen, s["caption"]))
    return out


def build(annotations_dir: str | Path | None = None, video_dir: str | Path | None = None,
          out_dir: str | Path | None = None, *, data_json: str | Path | None = None,
          train_csv: str | Path | None = None, test_csv: str | Path | None = None,
          train_list: str = "9k", require_videos: bool = False, splits: str = "all") -> Manifest:
    """Build the MSR-VTT manifest (see the module docstring for the protocols)."""
    if train_list not in (*TRAIN_LISTS, "full"):
        raise ManifestError(f"msrvtt: train_list must be '9k', '7k' or 'full', not "
                            f"{train_list!r}")
    if splits not in ("all", "test"):
        raise ManifestError(f"msrvtt: splits must be 'all' or 'test', not {splits!r}")
    if splits == "test":
        if train_list == "full":
            raise ManifestError("msrvtt: splits='test' builds the 1k-A test from the JSFusion csv; "
                                "train_list='full' takes its test split from MSRVTT_data.json")
        test_path = annotation_file(test_csv, annotations_dir, [TEST_CSV], "MSR-VTT 1k-A test csv")
        rec = RecordCollector("msrvtt", video_dir, default_ext=".mp4")
        _add_test(rec, test_path, None)
        return rec.finish({"annotations": {"test_csv": str(test_path)}, "train_list": None, "splits": "test"},
                          out_dir, require_videos)
    try:
        json_path = annotation_file(data_json, annotations_dir, [DATA_JSON], "MSRVTT_data.json")
    except ManifestError as exc:
        raise ManifestError(f"{exc}: the training splits need it (the captions of the train videos); "
                            f"the 1k-A test split alone needs only {TEST_CSV} (option splits=test)") from None
    data = load_json(json_path)
    sentences = _sentences(data, json_path)
    rec = RecordCollector("msrvtt", video_dir, default_ext=".mp4")
    source: dict = {"annotations": {"data_json": str(json_path)}, "train_list": train_list}

    def add_with_sentences(vid: str, split: str, origin: str) -> None:
        if vid not in sentences:
            raise ManifestError(f"{origin}: video {vid!r} has no sentences in {json_path}")
        rec.add_video(vid, split, origin)
        for sen_id, text in sentences[vid]:
            rec.add_caption(vid, text, str(json_path), caption_id=f"{vid}#s{sen_id}")

    if train_list == "full":
        videos = data.get("videos")
        if not isinstance(videos, list):
            raise ManifestError(f"{json_path}: expected a 'videos' list for train_list='full'")
        for i, v in enumerate(videos):
            split = _JSON_SPLITS.get(str(v.get("split")) if isinstance(v, dict) else "")
            if split is None:
                raise ManifestError(f"{json_path}: videos[{i}] has no valid 'split' "
                                    f"(train/validate/test): {v!r}")
            add_with_sentences(str(v["video_id"]), split, f"{json_path} videos[{i}]")
        return rec.finish(source, out_dir, require_videos)

    train_path = annotation_file(train_csv, annotations_dir, [TRAIN_LISTS[train_list]],
                                 f"MSR-VTT train list ({train_list})")
    test_path = annotation_file(test_csv, annotations_dir, [TEST_CSV], "MSR-VTT 1k-A test csv")
    source["annotations"].update(train_csv=str(train_path), test_csv=str(test_path))

    for i, row in enumerate(_read_csv(train_path, ["video_id"])):
        vid = row["video_id"].strip()
        if not rec.has_video(vid):  # tolerate repeated ids in the list
            add_with_sentences(vid, "train", f"{train_path} line {i + 2}")

    _add_test(rec, test_path, train_path)
    return rec.finish(source, out_dir, require_videos)


def _add_test(rec: RecordCollector, test_path: Path, train_path: Path | None) -> None:
    """The 1k-A test videos and their captions from the JSFusion csv."""
    for i, row in enumerate(_read_csv(test_path, ["video_id", "sentence"])):
        vid = row["video_id"].strip()
        origin = f"{test_path} line {i + 2}"
        if rec.has_video(vid):
            problem = (f"is also in the train list {train_path}" if rec.split_of(vid) == "train"
                       else "appears twice in the test csv")
            raise ManifestError(f"{origin}: test video {vid!r} {problem}")
        rec.add_video(vid, "test", origin)
        key = (row.get("key") or "").strip() or "test"
        rec.add_caption(vid, row["sentence"], origin, caption_id=f"{vid}#{key}")

