"""LSMDC (2016 challenge) manifest builder.

Official files: ``LSMDC16_annos_training.csv`` (train), ``LSMDC16_annos_val.csv`` (val) and
``LSMDC16_challenge_1000_publictect.csv`` (the 1,000-clip test). Each is tab-separated without a
header: ``CLIP_ID, START_ALIGNED, END_ALIGNED, START_EXTRACTED, END_EXTRACTED, SENTENCE``; one
sentence per clip (a clip id repeated within a file adds a caption to the same clip).

Path convention: the clip id is ``<movie>_<hh.mm.ss.mmm>-<hh.mm.ss.mmm>``, e.g.
``0001_American_Beauty_00.00.51.926-00.00.54.129``; the movie is everything before the last
``_``. Clips are looked up as ``<video_dir>/<movie>/<clip_id>.<ext>`` (the layout of the
distributed ``avi`` folders), then flat as ``<video_dir>/<clip_id>.<ext>``; the expected path
recorded for a missing clip is ``<video_dir>/<movie>/<clip_id>.avi``. Clips are pre-cut, so
start/end stay null; the extra column ``movie`` holds the movie name.
"""

from __future__ import annotations

from pathlib import Path

from .schema import Manifest, ManifestError, RecordCollector, annotation_file

FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
NUM_COLUMNS = 6


def movie_of(clip_id: str) -> str:
    """The movie folder of a clip id (everything before the last underscore)."""
    movie, sep, _ = clip_id.rpartition("_")
    return movie if sep and movie else clip_id


def read_annotations(path: Path) -> list[tuple[int, str, str]]:
    """``(line_number, clip_id, sentence)`` rows of one tab-separated file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < NUM_COLUMNS:
            raise ManifestError(f"{path} line {lineno}: expected {NUM_COLUMNS} tab-separated "
                                f"columns (CLIP_ID, START_ALIGNED, END_ALIGNED, "
                                f"START_EXTRACTED, END_EXTRACTED, SENTENCE), got {len(fields)}")
        # A sentence containing a tab would be split further: join the rest back.
        rows.append((lineno, fields[0].strip(), "\t".join(fields[NUM_COLUMNS - 1:])))
    return rows


def build(annotations_dir: str | Path | None = None, video_dir: str | Path | None = None,
          out_dir: str | Path | None = None, *, train_csv: str | Path | None = None,
          val_csv: str | Path | None = None, test_csv: str | Path | None = None,
          require_videos: bool = False) -> Manifest:
    """Build the LSMDC manifest from the three official tab-separated files."""
    rec = RecordCollector("lsmdc", video_dir, default_ext=".avi")
    annotations = {}
    for split, explicit in (("train", train_csv), ("val", val_csv), ("test", test_csv)):
        path = annotation_file(explicit, annotations_dir, [FILES[split]], f"LSMDC {split} csv")
        annotations[f"{split}_csv"] = str(path)
        for lineno, clip, sentence in read_annotations(path):
            origin = f"{path} line {lineno}"
            if not clip:
                raise ManifestError(f"{origin}: empty CLIP_ID")
            if rec.split_of(clip) != split:  # new clip (a clash across splits raises)
                movie = movie_of(clip)
                p, found = rec.locator.locate([f"{movie}/{clip}", clip], ".avi")
                rec.add_video(clip, split, origin, path=p, found=found, movie=movie)
            rec.add_caption(clip, sentence, origin)
    return rec.finish({"annotations": annotations}, out_dir, require_videos)
