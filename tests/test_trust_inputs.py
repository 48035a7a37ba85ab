"""Inputs that are not to be trusted and writes that must not tear: manifest ids and captions are
capped and ids hold no control character; URLs are persisted without credentials or signed queries;
``atomic_write`` and ``Manifest.write`` never leave a torn or foreign file."""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests.schema as schema
from core import fileio
from core.fileio import atomic_write, write_text
from manifests.schema import Manifest, ManifestError

# -- manifests: caps on ids and captions, no control characters in ids ---------------------------

MAX_ID = getattr(schema, "MAX_ID_BYTES", 256)
MAX_CAPTION = getattr(schema, "MAX_CAPTION_BYTES", 16 * 1024)


def _records(n: int = 4) -> tuple[list[dict], list[dict]]:
    videos = [{"video_id": f"v{i}", "path": f"videos/v{i}.mp4", "split": ("train", "val", "test")[i % 3],
               "start": 0.0, "end": 1.0} for i in range(n)]
    captions = [{"caption_id": f"v{i}#{j}", "video_id": f"v{i}", "text": f"caption {j} of v{i}",
                 "split": videos[i]["split"]} for i in range(n) for j in range(2)]
    return videos, captions


def _write_raw(directory: Path, videos: list[dict], captions: list[dict]) -> Path:
    """The three manifest files as they are, unvalidated (an edited or foreign manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(videos), directory / "videos.parquet")
    pq.write_table(pa.Table.from_pylist(captions), directory / "captions.parquet")
    (directory / "meta.json").write_text(json.dumps({"dataset": "toy", "schema": 1, "source": {}, "sha256": None}))
    return directory


def _refused(directory: Path, file: str, row: int, *words: str) -> str:
    """``Manifest.read`` refuses with one short line naming the file, the row and ``words``."""
    with pytest.raises(ManifestError) as info:
        Manifest.read(directory)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert str(directory / file) in msg and f"row {row}" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_limits_are_named_and_fit_real_datasets() -> None:
    assert schema.MAX_ID_BYTES == 256
    assert schema.MAX_CAPTION_BYTES >= 16 * 1024  # paragraph captions (ActivityNet, DiDeMo) are a few KiB


def test_an_overlong_video_id_is_refused_naming_file_row_and_limit(tmp_path: Path) -> None:
    videos, captions = _records()
    huge = "x" * (1 << 20)  # one 1 MB id would make every stored id 1 MB wide
    videos[2]["video_id"] = huge
    for c in captions:
        if c["video_id"] == "v2":
            c["video_id"] = huge
    _refused(_write_raw(tmp_path / "m", videos, captions), "videos.parquet", 2, str(MAX_ID), "bytes")


def test_ids_are_measured_in_utf8_bytes(tmp_path: Path) -> None:
    videos, captions = _records()
    captions[3]["caption_id"] = "é" * (MAX_ID // 2 + 1)  # fewer characters than the limit, more bytes
    _refused(_write_raw(tmp_path / "m", videos, captions), "captions.parquet", 3, str(MAX_ID))
    captions[3]["caption_id"] = "é" * (MAX_ID // 2)  # exactly the limit
    Manifest.read(_write_raw(tmp_path / "ok", videos, captions))


def test_an_overlong_caption_is_refused_and_a_paragraph_is_not(tmp_path: Path) -> None:
    videos, captions = _records()
    # an ActivityNet-like paragraph: 40 sentences of ~150 characters
    captions[0]["text"] = " ".join(f"sentence {i} " + "a person does something " * 6 for i in range(40))
    captions[1]["text"] = "w" * MAX_CAPTION
    m = Manifest.read(_write_raw(tmp_path / "ok", videos, captions))
    assert len(m.captions.column("text")[0].as_py()) > 4000
    captions[5]["text"] = "w" * (MAX_CAPTION + 1)
    _refused(_write_raw(tmp_path / "m", videos, captions), "captions.parquet", 5, str(MAX_CAPTION), "text")


@pytest.mark.parametrize("bad", ["v\x00", "v\n1", "v\t1", "v\x1b[31m", "v\x7f", "v\x85"])
def test_control_characters_in_ids_are_refused(tmp_path: Path, bad: str) -> None:
    videos, captions = _records()
    videos[1]["video_id"] = bad
    for c in captions:
        if c["video_id"] == "v1":
            c["video_id"] = bad
    _refused(_write_raw(tmp_path / "v", videos, captions), "videos.parquet", 1, "control character")
    videos, captions = _records()
    captions[4]["caption_id"] = bad
    _refused(_write_raw(tmp_path / "c", videos, captions), "captions.parquet", 4, "control character")


def test_builders_records_are_checked_too(tmp_path: Path) -> None:
    videos, captions = _records()
    videos[0]["video_id"] = "v0\x00"
    with pytest.raises(ManifestError, match=r"videos records: row 0 .*control character"):
        Manifest.from_records("toy", videos, captions, tmp_path)
    videos, captions = _records()
    captions[0]["text"] = "t" * (MAX_CAPTION + 1)
    with pytest.raises(ManifestError, match=rf"captions records: row 0 .*over the limit of {MAX_CAPTION}"):
        Manifest.from_records("toy", videos, captions, tmp_path)


# -- URLs persisted without credentials ----------------------------------------------------------------

SECRETS = ("alice", "hunter2-PASSWORD", "SIGNATURE-TOKEN", "SESSION-TOKEN")
STORE_URL = ("https://alice:hunter2-PASSWORD@cache.example.org:8443/stores/msrvtt.zarr"
             "?X-Amz-Signature=SIGNATURE-TOKEN&X-Amz-Security-Token=SESSION-TOKEN#frag")


def _no_secret(*files: Path) -> None:
    for f in files:
        text = f.read_text(errors="replace")
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, f"{f} holds {leaked}"


@pytest.mark.parametrize("url, redacted", [
    (STORE_URL, "https://cache.example.org:8443/stores/msrvtt.zarr"),
    ("s3://AKIAKEY:secretkey@bucket/stores/a.zarr", "s3://bucket/stores/a.zarr"),
    ("file://alice:pw@/data/a.zarr", "file:///data/a.zarr"),
    ("http://u:p@ss@host/a.zarr", "http://host/a.zarr"),  # user info runs to the last @
    ("http://[::1]:9000/a.zarr?sig=1", "http://[::1]:9000/a.zarr"),
    ("simplecache::s3://k:s@b/x?sig=1", "simplecache::s3://b/x"),
    ("HTTPS://host/a.zarr", "HTTPS://host/a.zarr"),
    ("/work/stores/a?b#c.zarr", "/work/stores/a?b#c.zarr"),  # a plain path is left as it is
    ("relative/a@b.zarr", "relative/a@b.zarr"),
])
def test_redact_url(url: str, redacted: str) -> None:
    from core.urls import redact_url

    assert redact_url(url) == redacted
    assert redact_url(Path("/data/x.zarr")) == "/data/x.zarr"


def test_redact_urls_walks_json_and_messages() -> None:
    from core.urls import redact_urls

    value = {"store": STORE_URL, "runs": [STORE_URL, 3, None], "n": 1.5,
             "note": f"the store {STORE_URL} cannot be opened (401, url='{STORE_URL}')"}
    out = redact_urls(value)
    assert out["store"] == "https://cache.example.org:8443/stores/msrvtt.zarr" and out["n"] == 1.5
    assert out["runs"][1:] == [3, None]
    assert not any(s in json.dumps(out) for s in SECRETS)


@dataclass
class _Config:
    head: str = "meanP"
    epochs: int = 1


def test_run_json_holds_no_credentials(tmp_path: Path) -> None:
    from workflows.runs import write_run_record

    record = {"command": "train-stage-one", "options": {"store": STORE_URL, "work_dir": "/work", "run": [STORE_URL]}}
    path = write_run_record(tmp_path / "run", _Config(), record)
    _no_secret(path)
    written = json.loads(path.read_text())
    assert written["options"]["store"] == "https://cache.example.org:8443/stores/msrvtt.zarr"
    assert written["options"]["work_dir"] == "/work" and written["config"] == {"head": "meanP", "epochs": 1}


def _reranked(out: Path, store: str) -> Path:
    """A re-ranking of a hand-built split (4 videos, 3 captions) written with ``store`` in its run.json."""
    from heads.evaluation.rerank import rerank, write_outputs
    from helpers import row_split

    sim = np.array([[0.9, 0.8, 0.1, 0.0], [0.5, 0.7, 0.6, 0.2], [0.3, 0.3, 0.9, 0.4]], np.float32)
    split = row_split(np.array([1, 3, 0]), 4)
    res = rerank(sim, split, lambda caps, vids: np.zeros(len(caps), np.float32), k=2)
    write_outputs(res, split, out, meta={"store": store, "head": {"path": "h"}})
    return out


def test_rerank_run_json_and_html_report_hold_no_credentials(tmp_path: Path) -> None:
    from reports import write_html_report

    # a store that exists nowhere, reached with credentials: its error message names the URL as well
    url = ("file://alice:hunter2-PASSWORD@" + str(tmp_path / "nowhere.zarr") +
           "?X-Amz-Signature=SIGNATURE-TOKEN&X-Amz-Security-Token=SESSION-TOKEN")
    rr = _reranked(tmp_path / "rerank", url)
    _no_secret(rr / "run.json")
    assert json.loads((rr / "run.json").read_text())["store"] == "file://" + str(tmp_path / "nowhere.zarr")
    for store in (None, url):  # from run.json, or given (--store)
        html, context = write_html_report(tmp_path / "r.html", rr, store=store)
        _no_secret(html)
        assert not any(s in json.dumps(context, default=str) for s in SECRETS)
        assert context["store"] == "file://" + str(tmp_path / "nowhere.zarr")
        assert any("cannot be opened" in n for n in context["notes"])  # its error message is shown, redacted


def test_index_metadata_holds_no_credentials(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from heads.evaluation.index import build_index, load_index, save_index

    emb = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    vi = build_index(emb, [f"v{i}" for i in range(6)], "flat", meta={"store": STORE_URL, "split": "test"})
    out = save_index(vi, tmp_path / "index")
    _no_secret(*[p for p in out.iterdir() if p.suffix == ".json"])
    assert load_index(out).meta["store"] == "https://cache.example.org:8443/stores/msrvtt.zarr"


# -- atomic writes ---------------------------------------------------------------------------------------

def _leftovers(directory: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_concurrent_writers_of_one_path_never_collide_or_tear(tmp_path: Path) -> None:
    target = tmp_path / "shared.json"
    payloads = [str(i) * (1 << 18) for i in range(4)]  # 256 KiB each, one digit per writer
    errors: list[BaseException] = []
    seen: set[str] = set()
    done = threading.Event()

    def writer(i: int) -> None:
        try:
            for _ in range(15):
                write_text(target, payloads[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        while not done.is_set():
            try:
                text = target.read_text()
            except FileNotFoundError:
                continue
            seen.add(text if text in payloads else f"torn ({len(text)} chars)")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert not errors, errors
    assert target.read_text() in payloads
    assert all(s in payloads for s in seen), [s for s in seen if s not in payloads]
    assert _leftovers(tmp_path, target.name) == []


def test_an_error_inside_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_text(tmp_path / "x.json", "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("new and incompl")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, target.name) == []
    with pytest.raises(KeyboardInterrupt):  # an interrupt too
        atomic_write(target, lambda tmp: (tmp.write_text("x"), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert target.read_text() == "old\n" and _leftovers(tmp_path, target.name) == []


def test_the_temporary_file_is_unique_beside_the_target_and_keeps_the_suffix(tmp_path: Path) -> None:
    names: list[Path] = []

    def save(tmp: Path) -> None:
        names.append(tmp)
        np.save(tmp, np.arange(3))  # np.save appends .npy unless the name ends with it

    atomic_write(tmp_path / "x.npy", save)
    atomic_write(tmp_path / "x.npy", save)
    assert names[0] != names[1]
    for tmp in names:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.") and tmp.suffix == ".npy"
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2] and _leftovers(tmp_path, "x.npy") == []
    mode = stat.S_IMODE((tmp_path / "x.npy").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the usual mode of a new file, not a private temporary's


def test_the_file_and_its_directory_are_fsynced_and_the_rename_is_gated(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    gated: list[tuple[str, str, list[str]]] = []

    def gate(what: str, torn=None) -> None:  # what the crash tests' gate sees just before the rename
        gated.append((what, (tmp_path / "g.json").read_text(), _leftovers(tmp_path, "g.json")))

    monkeypatch.setattr(os, "fsync", fsync)
    write_text(tmp_path / "g.json", "old")
    assert synced == ["file", "dir"]
    synced.clear()
    monkeypatch.setattr(fileio, "gate", gate)
    write_text(tmp_path / "g.json", "new")
    assert synced == ["file", "dir"]
    assert len(gated) == 1 and gated[0][0] == str(tmp_path / "g.json")
    assert gated[0][1] == "old" and len(gated[0][2]) == 1  # not yet renamed: the whole new file beside it
    assert (tmp_path / "g.json").read_text() == "new"


def _manifest(root: Path, tag: str, n: int = 4) -> Manifest:
    videos, captions = _records(n)
    for v in videos:
        v["path"] = f"videos/{tag}-{v['video_id']}.mp4"
    for c in captions:
        c["text"] = f"{tag}: {c['text']}"
    return Manifest.from_records("toy", videos, captions, root)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_manifest_write_killed_midway_leaves_the_previous_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   fail_at: int) -> None:
    out = tmp_path / "m"
    old = _manifest(out, "old")
    old.write(out)
    files = sorted(p.name for p in out.iterdir())
    new = _manifest(out, "new", n=5)
    calls = {"n": 0}
    real_write_table = pq.write_table

    def write_table(table, where, *args, **kwargs):  # the videos, the captions, then meta.json's text
        calls["n"] += 1
        if calls["n"] == fail_at:
            real_write_table(table.slice(0, 1), where, *args, **kwargs)  # half written, then killed
            raise OSError("killed midway")
        return real_write_table(table, where, *args, **kwargs)

    real_write_text = Path.write_text

    def write_text_(self: Path, text: str, *args, **kwargs):
        if self.parent == out and fail_at == 3:
            real_write_text(self, text[:10], *args, **kwargs)
            raise OSError("killed midway")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)
    monkeypatch.setattr(Path, "write_text", write_text_)
    with pytest.raises(OSError, match="killed midway"):
        new.write(out)
    monkeypatch.undo()
    back = Manifest.read(out)  # verifies the content hash
    assert back.sha256() == old.sha256() and len(back) == 4
    assert sorted(p.name for p in out.iterdir()) == files  # no temporary left


def test_manifest_write_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        count["n"] += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _manifest(tmp_path / "m", "a").write(tmp_path / "m")
    assert count["n"] >= 4  # three files and their directory
    assert Manifest.read(tmp_path / "m").sha256() == _manifest(tmp_path / "m", "a").sha256()
