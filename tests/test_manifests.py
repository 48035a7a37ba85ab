"""Tests for the manifest format, the dataset registry and the real-dataset builders."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from manifests import (
    DATASETS, Manifest, ManifestError, UnknownDatasetError, build_manifest, get_dataset,
    paragraph,
)
from manifests import activitynet, didemo, lsmdc, msrvtt, msvd, vatex

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# -- helpers ------------------------------------------------------------------------------
def _records(n: int = 6):
    videos = [{"video_id": f"v{i}", "path": f"videos/v{i}.mp4",
               "split": ("train", "val", "test")[i % 3], "start": None if i % 2 else 1.5,
               "end": None, "group_id": i // 2} for i in range(n)]
    captions = []
    for v in videos:
        for j in range(2):
            captions.append({"caption_id": f"{v['video_id']}#{j}", "video_id": v["video_id"],
                             "text": f"caption {j} of {v['video_id']}", "split": v["split"]})
    return videos, captions


def _manifest(root: Path) -> Manifest:
    videos, captions = _records()
    return Manifest.from_records("toy", videos, captions, root, {"note": "test"})


def _write_tables(directory: Path, videos: pa.Table, captions: pa.Table) -> None:
    """Write tables bypassing validation (to craft invalid manifests on disk)."""
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(videos, directory / "videos.parquet")
    pq.write_table(captions, directory / "captions.parquet")
    (directory / "meta.json").write_text(json.dumps({"dataset": "toy", "schema": 1,
                                                     "source": {}, "sha256": None}))


def _tables():
    m = _manifest(Path("."))
    return m.videos, m.captions


def _set(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    idx = table.column_names.index(column)
    return table.set_column(idx, column, pa.array(values, table.schema.field(column).type))


# -- schema ---------------------------------------------------------------------------------
def test_round_trip(tmp_path):
    m = _manifest(tmp_path / "m")
    out = m.write(tmp_path / "m")
    assert out == tmp_path / "m"
    assert {p.name for p in out.iterdir()} == {"videos.parquet", "captions.parquet", "meta.json"}
    r = Manifest.read(out)
    assert r.dataset == "toy" and r.source == {"note": "test"}
    assert r.videos.to_pylist() == m.videos.to_pylist()
    assert r.captions.to_pylist() == m.captions.to_pylist()
    assert r.sha256() == m.sha256()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["schema"] == 1 and meta["sha256"] == m.sha256() and meta["dataset"] == "toy"
    assert r.videos.schema.field("start").type == pa.float64()
    assert r.videos.column("group_id").to_pylist() == [0, 0, 1, 1, 2, 2]


def test_video_path_and_split(tmp_path):
    m = _manifest(tmp_path)
    assert m.video_path("v1") == tmp_path / "videos" / "v1.mp4"
    videos, captions = _records(3)
    videos[0]["path"] = "/abs/clip.mp4"
    m2 = Manifest.from_records("toy", videos, captions, tmp_path)
    assert m2.video_path("v0") == Path("/abs/clip.mp4")
    with pytest.raises(KeyError, match="nope"):
        m.video_path("nope")
    test = m.split("test")
    assert test.video_ids == ["v2", "v5"]
    assert set(test.captions.column("video_id").to_pylist()) == {"v2", "v5"}
    assert set(test.captions.column("split").to_pylist()) == {"test"}
    assert m.split_counts()["train"] == {"videos": 2, "captions": 4}
    with pytest.raises(ManifestError, match="bad split"):
        m.split("dev")


def test_write_elsewhere_keeps_files(tmp_path):
    m = _manifest(tmp_path / "a")
    r = Manifest.read(m.write(tmp_path / "b"))
    assert r.video_path("v0") == (tmp_path / "a" / "videos" / "v0.mp4").resolve()


def test_sha256_order_independent_and_content_sensitive(tmp_path):
    videos, captions = _records()
    a = Manifest.from_records("toy", videos, captions, tmp_path)
    b = Manifest.from_records("toy", videos[::-1], captions[::-1], tmp_path / "elsewhere")
    assert a.sha256() == b.sha256()
    # column order of extras and table column order do not matter either
    vt = pa.Table.from_pylist(videos)
    c = Manifest(vt.select(vt.column_names[::-1]), pa.Table.from_pylist(captions), tmp_path, "toy")
    assert c.sha256() == a.sha256()
    edited = [dict(c) for c in captions]
    edited[3]["text"] = edited[3]["text"] + " (edited)"
    assert Manifest.from_records("toy", videos, edited, tmp_path).sha256() != a.sha256()
    moved = [dict(v) for v in videos]
    moved[0]["end"] = 9.0
    assert Manifest.from_records("toy", moved, captions, tmp_path).sha256() != a.sha256()


def test_read_detects_modified_content(tmp_path):
    out = _manifest(tmp_path).write(tmp_path / "m")
    caps = pq.read_table(out / "captions.parquet")
    pq.write_table(_set(caps, "text", 0, "something else"), out / "captions.parquet")
    with pytest.raises(ManifestError, match="meta.json.*does not match"):
        Manifest.read(out)
    assert Manifest.read(out, verify=False).captions.column("text")[0].as_py() == "something else"


@pytest.mark.parametrize("missing", ["videos.parquet", "captions.parquet", "meta.json"])
def test_missing_file(tmp_path, missing):
    out = _manifest(tmp_path).write(tmp_path / "m")
    (out / missing).unlink()
    with pytest.raises(ManifestError, match=f"{missing}: missing manifest file"):
        Manifest.read(out)


def test_missing_directory_and_bad_files(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.read(tmp_path / "nowhere")
    out = _manifest(tmp_path).write(tmp_path / "m")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(ManifestError, match="meta.json: invalid JSON"):
        Manifest.read(out)
    (out / "meta.json").write_text(json.dumps({"dataset": "toy", "schema": 99}))
    with pytest.raises(ManifestError, match="schema 99"):
        Manifest.read(out)
    out = _manifest(tmp_path).write(tmp_path / "m2")
    (out / "videos.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="videos.parquet: cannot read Parquet"):
        Manifest.read(out)


def _invalid_cases():
    v, c = _tables()
    return {
        "missing video column": (v.drop_columns(["path"]), c,
                                 r"videos\.parquet: missing required column\(s\) \['path'\]"),
        "missing caption column": (v, c.drop_columns(["text"]),
                                   r"captions\.parquet: missing required column\(s\) \['text'\]"),
        "duplicate video_id": (_set(v, "video_id", 3, "v1"), c,
                               r"videos\.parquet: row 3 \(video_id='v1'\): duplicate video_id"),
        "duplicate caption_id": (v, _set(c, "caption_id", 5, "v0#1"),
                                 r"captions\.parquet: row 5 \(caption_id='v0#1'\): "
                                 r"duplicate caption_id"),
        "unknown video": (v, _set(c, "video_id", 4, "ghost"),
                          r"captions\.parquet: row 4 \(caption_id='v2#0'\): unknown video_id "
                          r"'ghost'"),
        "bad video split": (_set(v, "split", 2, "dev"), c,
                            r"videos\.parquet: row 2 \(video_id='v2'\): bad split 'dev'"),
        "bad caption split": (v, _set(c, "split", 1, "training"),
                              r"captions\.parquet: row 1 \(caption_id='v0#1'\): bad split"),
        "split mismatch": (v, _set(c, "split", 0, "test"),
                           r"captions\.parquet: row 0 \(caption_id='v0#0'\): split 'test' "
                           r"differs from its video"),
        "null text": (v, _set(c, "text", 2, None),
                      r"captions\.parquet: row 2 \(caption_id='v1#0'\): null 'text'"),
        "empty text": (v, _set(c, "text", 2, "  "),
                       r"captions\.parquet: row 2 \(caption_id='v1#0'\): empty text"),
        "null path": (_set(v, "path", 1, None), c,
                      r"videos\.parquet: row 1 \(video_id='v1'\): null 'path'"),
        "bad times": (_set(v, "end", 0, 1.0), c,
                      r"videos\.parquet: row 0 \(video_id='v0'\): end 1\.0 must be greater"),
        "bad type": (_set(v, "start", 0, 1.5).set_column(3, "start", pa.array(["x"] * 6)), c,
                     r"videos\.parquet: column 'start' of type string cannot be read"),
    }


@pytest.mark.parametrize("case", list(_invalid_cases()))
def test_validation_errors_name_file_and_row(tmp_path, case):
    videos, captions, pattern = _invalid_cases()[case]
    _write_tables(tmp_path / "m", videos, captions)
    with pytest.raises(ManifestError, match=pattern) as info:
        Manifest.read(tmp_path / "m")
    assert str(tmp_path / "m") in str(info.value)  # the full file path is named


def test_from_records_errors_name_records(tmp_path):
    videos, captions = _records()
    videos.append(dict(videos[0]))
    with pytest.raises(ManifestError, match=r"videos records: row 6 \(video_id='v0'\): dup"):
        Manifest.from_records("toy", videos, captions, tmp_path)


def test_empty_manifest_and_paragraphs(tmp_path):
    m = Manifest.from_records("toy", [], [], tmp_path)
    assert len(m) == 0 and Manifest.read(m.write(tmp_path / "e")).video_ids == []
    assert paragraph([" a man runs. ", "", "he jumps"]) == "a man runs. he jumps"
    p = _manifest(tmp_path).as_paragraphs()
    assert p.captions.num_rows == 6
    assert p.captions.column("text")[0].as_py() == "caption 0 of v0 caption 1 of v0"


# -- registry -------------------------------------------------------------------------------
def test_registry():
    assert {"synthetic", "msrvtt", "msvd", "vatex", "lsmdc", "didemo",
            "activitynet"} <= set(DATASETS)
    assert DATASETS["synthetic"].builder == "synthetic.manifest:build"
    for name, spec in DATASETS.items():
        assert spec.name == name and ":" in spec.builder and spec.description
        if name != "synthetic":
            assert callable(spec.load())
    assert get_dataset("msvd") is DATASETS["msvd"]
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'nope'.*activitynet.*msrvtt"):
        get_dataset("nope")
    assert issubclass(UnknownDatasetError, ValueError)
    with pytest.raises(UnknownDatasetError):
        build_manifest("nope")


def test_import_is_lazy():
    code = ("import sys, manifests; "
            "assert not any(m.startswith('manifests.') and m != 'manifests.schema' "
            "for m in sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])


# -- MSR-VTT --------------------------------------------------------------------------------
def _msrvtt_files(tmp_path: Path) -> dict[str, Path]:
    train = FIXTURES / "msrvtt" / "MSRVTT_train.9k.head200.csv"
    test = FIXTURES / "msrvtt" / "MSRVTT_JSFUSION_test.head60.csv"
    with open(train, newline="") as fh:
        ids = [r["video_id"] for r in csv.DictReader(fh)]
    sentences = [{"video_id": vid, "caption": f"clip {vid} shows thing {k}", "sen_id": 20 * i + k}
                 for i, vid in enumerate(ids) for k in range(3)]
    data = {"videos": [{"video_id": v, "split": "train"} for v in ids], "sentences": sentences}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    return {"data_json": tmp_path / "MSRVTT_data.json", "train_csv": train, "test_csv": test}


def test_msrvtt_fixture(tmp_path):
    files = _msrvtt_files(tmp_path)
    vdir = tmp_path / "videos"
    vdir.mkdir()
    (vdir / "video0.mp4").write_bytes(b"")
    m = msrvtt.build(video_dir=vdir, out_dir=tmp_path / "out", **files)
    counts = m.split_counts()
    assert counts["train"] == {"videos": 200, "captions": 600}
    assert counts["test"] == {"videos": 60, "captions": 60}
    assert "val" not in counts
    assert m.video_path("video0") == vdir.resolve() / "video0.mp4"
    assert m.video_path("video9770") == vdir.resolve() / "video9770.mp4"  # expected, absent
    assert m.source["missing_videos"] == 259
    test = m.split("test").captions.to_pylist()
    assert test[0] == {"caption_id": "video9770#ret0", "video_id": "video9770",
                       "text": "a person is connecting something to system", "split": "test"}
    assert Manifest.read(tmp_path / "out").sha256() == m.sha256()
    with pytest.raises(ManifestError, match="259 of 260 video files not found"):
        msrvtt.build(video_dir=vdir, require_videos=True, **files)


def test_msrvtt_errors(tmp_path):
    files = _msrvtt_files(tmp_path)
    data = json.loads(files["data_json"].read_text())
    data["sentences"] = [s for s in data["sentences"] if s["video_id"] != "video7"]
    files["data_json"].write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"head200\.csv line 9: video 'video7' has no sent"):
        msrvtt.build(video_dir=tmp_path, **files)
    with pytest.raises(ManifestError, match="train_list must be"):
        msrvtt.build(video_dir=tmp_path, train_list="10k", **files)
    with pytest.raises(ManifestError, match="MSRVTT_data.json"):
        msrvtt.build(tmp_path / "empty", video_dir=tmp_path)


def test_msrvtt_full_split(tmp_path):
    data = {"videos": [{"video_id": "video0", "split": "train"},
                       {"video_id": "video1", "split": "validate"},
                       {"video_id": "video2", "split": "test"}],
            "sentences": [{"video_id": f"video{i}", "caption": f"c{i}", "sen_id": i}
                          for i in range(3)]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    m = build_manifest("msrvtt", annotations_dir=tmp_path, video_dir=tmp_path,
                       train_list="full")
    assert m.videos.column("split").to_pylist() == ["train", "val", "test"]


# -- MSVD -----------------------------------------------------------------------------------
def _msvd_files() -> dict[str, Path]:
    d = FIXTURES / "msvd"
    return {"train_list": d / "train_list.excerpt.txt", "val_list": d / "val_list.excerpt.txt",
            "test_list": d / "test_list.excerpt.txt",
            "captions": d / "captions_msvd.excerpt.json"}


def test_msvd_fixture(tmp_path):
    files = _msvd_files()
    caps = json.loads(files["captions"].read_text())
    m = msvd.build(video_dir=tmp_path, out_dir=tmp_path / "out", **files)
    counts = m.split_counts()
    assert {s: c["videos"] for s, c in counts.items()} == {"train": 20, "val": 5, "test": 15}
    n_caps = sum(1 for c in caps.values() for t in c if t.strip())
    assert sum(c["captions"] for c in counts.values()) == n_caps
    assert m.video_path("-4wsuPCjDBc_5_15").name == "-4wsuPCjDBc_5_15.avi"
    first = m.captions.to_pylist()[0]
    assert first["caption_id"] == "-4wsuPCjDBc_5_15#0"
    assert first["text"] == caps["-4wsuPCjDBc_5_15"][0].strip()


def test_msvd_pickle_and_default_names(tmp_path):
    files = _msvd_files()
    caps = json.loads(files["captions"].read_text())
    for split in ("train", "val", "test"):
        shutil.copy(files[f"{split}_list"], tmp_path / f"{split}_list.txt")
    tokens = {vid: [c.split() for c in texts] for vid, texts in caps.items()}
    with open(tmp_path / "raw-captions.pkl", "wb") as fh:
        pickle.dump(tokens, fh)
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "-7KMZQEsJW4_205_208.avi").write_bytes(b"")
    m = build_manifest("msvd", annotations_dir=tmp_path, video_dir=tmp_path / "vids")
    assert m.source["missing_videos"] == 39
    assert m.video_path("-7KMZQEsJW4_205_208").exists()
    text = m.captions.filter(pc.equal(m.captions.column("video_id"),
                                              "-4wsuPCjDBc_5_15")).column("text")[0].as_py()
    assert text == " ".join(caps["-4wsuPCjDBc_5_15"][0].split())
    # a pickle referring to a class is refused
    with open(tmp_path / "raw-captions.pkl", "wb") as fh:
        pickle.dump({"x": [Path("evil")]}, fh)
    with pytest.raises(ManifestError, match="refusing to load"):
        build_manifest("msvd", annotations_dir=tmp_path, video_dir=tmp_path)


def test_msvd_unknown_id(tmp_path):
    files = _msvd_files()
    bad = tmp_path / "test_list.txt"
    bad.write_text(files["test_list"].read_text() + "\nnot_a_clip_1_2\n")
    files["test_list"] = bad
    with pytest.raises(ManifestError, match=r"test_list\.txt line 17: video 'not_a_clip_1_2'"):
        msvd.build(video_dir=tmp_path, **files)


# -- VATEX ----------------------------------------------------------------------------------
def _vatex_files(tmp_path: Path) -> Path:
    def entry(vid):
        return {"videoID": vid, "enCap": [f"{vid} english {k}" for k in range(10)],
                "chCap": ["中文"] * 10}
    train = [entry("Ptf_2VRj-V0_000122_000132"), entry("abc_def_ghi_000005_000015")]
    val = [entry("zzz111aaa22_000000_000010"), entry("yyy222bbb33_000030_000040")]
    (tmp_path / "vatex_training_v1.0.json").write_text(json.dumps(train))
    (tmp_path / "vatex_validation_v1.0.json").write_text(json.dumps(val))
    return tmp_path


def test_vatex(tmp_path):
    ann = _vatex_files(tmp_path)
    vdir = tmp_path / "videos"
    vdir.mkdir()
    (vdir / "Ptf_2VRj-V0_000122_000132.mp4").write_bytes(b"")  # trimmed clip
    (vdir / "abc_def_ghi.webm").write_bytes(b"")                # full YouTube video
    m = vatex.build(ann, vdir, tmp_path / "out")
    rows = {r["video_id"]: r for r in m.videos.to_pylist()}
    clip = rows["Ptf_2VRj-V0_000122_000132"]
    assert (clip["start"], clip["end"], clip["split"]) == (None, None, "train")
    assert (clip["clip_start"], clip["clip_end"], clip["youtube_id"]) == (122.0, 132.0,
                                                                         "Ptf_2VRj-V0")
    full = rows["abc_def_ghi_000005_000015"]
    assert (full["start"], full["end"]) == (5.0, 15.0)
    assert full["path"].endswith("abc_def_ghi.webm")
    assert rows["zzz111aaa22_000000_000010"]["split"] == "test"
    assert rows["zzz111aaa22_000000_000010"]["path"].endswith("zzz111aaa22_000000_000010.mp4")
    assert m.captions.num_rows == 40 and m.source["missing_videos"] == 2
    assert vatex.parse_video_id("a_b_000001_000002") == ("a_b", 1.0, 2.0)


def test_vatex_split_lists_and_errors(tmp_path):
    ann = _vatex_files(tmp_path)
    (tmp_path / "val.txt").write_text("zzz111aaa22_000000_000010\n")
    (tmp_path / "test.txt").write_text("yyy222bbb33_000030_000040\n")
    (tmp_path / "train.txt").write_text("Ptf_2VRj-V0_000122_000132\n")
    lists = {s: tmp_path / f"{s}.txt" for s in ("train", "val", "test")}
    m = vatex.build(ann, tmp_path, split_lists=lists, video_layout="full")
    assert {r["video_id"]: r["split"] for r in m.videos.to_pylist()} == {
        "Ptf_2VRj-V0_000122_000132": "train", "zzz111aaa22_000000_000010": "val",
        "yyy222bbb33_000030_000040": "test"}
    assert m.source["dropped_unlisted_videos"] == 1
    assert m.video_path("Ptf_2VRj-V0_000122_000132").name == "Ptf_2VRj-V0.mp4"
    data = json.loads((ann / "vatex_training_v1.0.json").read_text())
    data.append({"videoID": "badid", "enCap": ["x"]})
    (ann / "vatex_training_v1.0.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"vatex_training_v1\.0\.json entry 2: videoID 'badid'"):
        vatex.build(ann, tmp_path)


# -- LSMDC ----------------------------------------------------------------------------------
def _lsmdc_line(clip: str, sentence: str) -> str:
    return "\t".join([clip, "00.00.51.926", "00.00.54.129", "00.00.51.000", "00.00.55.000",
                      sentence])


def test_lsmdc(tmp_path):
    files = {
        "LSMDC16_annos_training.csv": ["0001_American_Beauty_00.00.51.926-00.00.54.129",
                                       "0001_American_Beauty_00.00.56.000-00.00.58.000"],
        "LSMDC16_annos_val.csv": ["1004_Juno_00.00.32.849-00.00.35.458"],
        "LSMDC16_challenge_1000_publictect.csv": ["1010_TITANIC_00.00.41.000-00.00.45.000"],
    }
    for name, clips in files.items():
        (tmp_path / name).write_text("".join(_lsmdc_line(c, f"SOMEONE does {c[-5:]}.") + "\n"
                                             for c in clips))
    vdir = tmp_path / "avi"
    (vdir / "0001_American_Beauty").mkdir(parents=True)
    (vdir / "0001_American_Beauty" / "0001_American_Beauty_00.00.51.926-00.00.54.129.avi"
     ).write_bytes(b"")
    m = lsmdc.build(tmp_path, vdir, tmp_path / "out")
    assert m.split_counts() == {"train": {"videos": 2, "captions": 2},
                                "val": {"videos": 1, "captions": 1},
                                "test": {"videos": 1, "captions": 1}}
    assert m.video_path("1004_Juno_00.00.32.849-00.00.35.458") == (
        vdir.resolve() / "1004_Juno" / "1004_Juno_00.00.32.849-00.00.35.458.avi")
    assert m.videos.column("movie").to_pylist()[0] == "0001_American_Beauty"
    assert m.source["missing_videos"] == 3
    assert m.captions.column("text")[0].as_py() == "SOMEONE does 4.129."
    (tmp_path / "LSMDC16_annos_val.csv").write_text("clip_only\tx\n")
    with pytest.raises(ManifestError, match=r"LSMDC16_annos_val\.csv line 1: expected 6"):
        lsmdc.build(tmp_path, vdir)


# -- DiDeMo ---------------------------------------------------------------------------------
def test_didemo(tmp_path):
    def item(video, desc):
        return {"video": video, "description": desc, "times": [[0, 1], [0, 1]],
                "annotation_id": 1, "dl_link": "https://example.invalid"}
    data = {
        "train": [item("1234@N00_111_aaa.mov", "a dog runs"), item("222@N01_2_bb.avi", "x"),
                  item("1234@N00_111_aaa.mov", "the dog stops ")],
        "val": [item("333@N02_3_cc.mp4", "a car passes")],
        "test": [item("444@N03_4_dd.m4v", "people dance"), item("444@N03_4_dd.m4v", "music")],
    }
    for split, items in data.items():
        (tmp_path / f"{split}_data.json").write_text(json.dumps(items))
    vdir = tmp_path / "videos"
    vdir.mkdir()
    (vdir / "1234@N00_111_aaa.mp4").write_bytes(b"")      # converted to mp4
    (vdir / "333@N02_3_cc.mp4").write_bytes(b"")          # original name
    m = didemo.build(tmp_path, vdir)
    caps = {r["video_id"]: r for r in m.captions.to_pylist()}
    assert caps["1234@N00_111_aaa.mov"]["text"] == "a dog runs the dog stops"
    assert caps["444@N03_4_dd.m4v"] == {"caption_id": "444@N03_4_dd.m4v#0",
                                        "video_id": "444@N03_4_dd.m4v",
                                        "text": "people dance music", "split": "test"}
    assert m.video_path("1234@N00_111_aaa.mov").name == "1234@N00_111_aaa.mp4"
    assert m.video_path("222@N01_2_bb.avi").name == "222@N01_2_bb.avi"  # expected, absent
    assert m.source["missing_videos"] == 2
    (tmp_path / "val_data.json").write_text(json.dumps([item("222@N01_2_bb.avi", "again")]))
    with pytest.raises(ManifestError, match=r"val_data\.json entry 0: video '222@N01_2_bb\.avi' "
                                            r"already listed"):
        didemo.build(tmp_path, vdir)


# -- ActivityNet ----------------------------------------------------------------------------
def test_activitynet(tmp_path):
    train = {"v_GGSY1Qvo990": {"duration": 18.2, "timestamps": [[0, 5], [5, 18.2]],
                               "sentences": ["A man stands.", " He waves. "]},
             "v_abcdefghijk": {"duration": 30.0, "timestamps": [[0, 30]],
                               "sentences": ["Kids play."]}}
    val_1 = {"v_zyxwvutsrqp": {"duration": 12.0, "timestamps": [[0, 4], [4, 12]],
                               "sentences": ["A cat sits.", "It jumps."]}}
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val_1.json").write_text(json.dumps(val_1))
    m = activitynet.build(tmp_path, FIXTURES / "videos", tmp_path / "out")
    assert m.split_counts() == {"train": {"videos": 2, "captions": 2},
                                "test": {"videos": 1, "captions": 1}}
    assert m.video_path("v_GGSY1Qvo990") == (FIXTURES / "videos" / "v_GGSY1Qvo990.mp4").resolve()
    assert m.video_path("v_GGSY1Qvo990").is_file()
    texts = dict(zip(m.captions.column("video_id").to_pylist(),
                     m.captions.column("text").to_pylist()))
    assert texts["v_GGSY1Qvo990"] == "A man stands. He waves."
    assert m.videos.column("duration").to_pylist() == [18.2, 30.0, 12.0]
    assert m.source["missing_videos"] == 2
    assert m.videos.column("start").null_count == 3
    m2 = activitynet.build(tmp_path, FIXTURES / "videos", sep="\n")
    assert "A man stands.\nHe waves." in m2.captions.column("text").to_pylist()
    with pytest.raises(ManifestError, match="2 of 3 video files not found"):
        activitynet.build(tmp_path, FIXTURES / "videos", require_videos=True)
