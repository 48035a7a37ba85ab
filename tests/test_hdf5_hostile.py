"""HDF5 imports of hostile files: declared shapes, what is read, foreign attributes, failures and kills."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from core.errors import ExternalFormatError, StoreError
from manifests.schema import Manifest
from pipeline.hdf5_features import import_features
from pipeline.hdf5io import export_hdf5, import_hdf5
from pipeline.store import CacheStore, StoreLayout

REPO = Path(__file__).resolve().parents[1]
T, N, D, E, L, DT = 3, 4, 8, 6, 5, 8
VIDS, VSPLIT = ["a", "b", "c", "d", "e"], ["train", "train", "train", "test", "test"]
CIDS, CVID = [f"c{i}" for i in range(7)], [0, 0, 1, 2, 3, 3, 4]
HUGE = 10 ** 13  # declared sizes no machine could hold (so that the old code fails fast, never swapping)


def make_store(path: Path) -> CacheStore:
    """A small complete store, through the store's public API only."""
    layout = StoreLayout(dataset="toy", manifest_sha256="m" * 64, encoder={"name": "x"}, num_frames=T,
                         num_tokens=N, token_dim=D, embed_dim=E, text_dim=DT, max_text_tokens=L, shard_size=2,
                         text_shard_size=3)
    store = CacheStore.create(path, layout, VIDS, VSPLIT, CIDS, CVID, [VSPLIT[v] for v in CVID])
    for i in range(store.num_shards):
        lo, hi = store.shard_range(i)
        n, r = hi - lo, np.arange(lo, hi)
        store.write_shard(i, status=np.ones(n, np.int8), error=[""] * n,
                          tokens=np.broadcast_to(r[:, None, None, None], (n, T, N, D)).astype(np.float16),
                          frame_emb=np.broadcast_to(r[:, None, None], (n, T, E)).astype(np.float32),
                          frame_mask=np.ones((n, T), bool), frame_index=np.tile(np.arange(T, dtype=np.int32), (n, 1)),
                          frame_time=np.tile(np.arange(T, dtype=np.float32), (n, 1)))
    for j in range(store.num_text_shards):
        lo, hi = store.text_shard_range(j)
        r = np.arange(lo, hi)
        store.write_text_shard(j, tokens=np.broadcast_to(r[:, None, None], (hi - lo, L, DT)).astype(np.float16),
                               mask=np.ones((hi - lo, L), bool),
                               emb=np.broadcast_to(r[:, None], (hi - lo, E)).astype(np.float32))
    store.consolidate()
    return store


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A store exported by ``cache export``; tests change copies of it."""
    root = tmp_path_factory.mktemp("hdf5_hostile")
    return export_hdf5(make_store(root / "source.zarr"), root / "source.h5", progress=False)


def changed(export: Path, tmp_path: Path, change) -> Path:
    """A copy of the export with ``change(h5py.File)`` applied."""
    out = tmp_path / "changed.h5"
    shutil.copyfile(export, out)
    with h5py.File(out, "r+") as f:
        change(f)
    return out


def manifest(root: Path, videos: int = 6) -> Manifest:
    vs = [{"video_id": f"v{i}", "path": f"v{i}.mp4", "split": "train" if i < 4 else "test"} for i in range(videos)]
    cs = [{"caption_id": f"v{i}-{j}", "video_id": f"v{i}", "text": f"caption {j}", "split": v["split"]}
          for i, v in enumerate(vs) for j in range(2)]
    return Manifest.from_records("toy", vs, cs, root=root)


def features(path: Path, videos: dict, texts: dict | None = None, attrs: dict | None = None) -> Path:
    """Another tool's file: ``videos`` / ``texts`` map an id to an array or to ``h5py`` dataset arguments."""
    with h5py.File(path, "w") as f:
        for group, entries in (("videos", videos), ("texts", texts or {})):
            for name, value in entries.items():
                if isinstance(value, dict):
                    f.create_dataset(f"{group}/{name}", **value)
                else:
                    f.create_dataset(f"{group}/{name}", data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def nothing_at(dest: Path) -> bool:
    """Nothing at the destination and nothing left beside it."""
    return not dest.exists() and not list(dest.parent.glob(dest.name + ".importing-*"))


def same_store(a: Path, b: Path) -> None:
    sa, sb = CacheStore.open(a), CacheStore.open(b)
    for name in ("videos/ids", "videos/status", "videos/tokens", "videos/frame_emb", "texts/tokens", "texts/emb",
                 "shards/done", "shards/text_done"):
        assert np.array_equal(np.asarray(sa.array(name)[...]), np.asarray(sb.array(name)[...])), name
    assert sa.attrs == sb.attrs


def test_huge_declared_shapes_are_refused_before_anything_is_read(export, tmp_path):
    rng = np.random.default_rng(0)
    small = {f"v{i}": rng.normal(size=(3, 2, 4)).astype(np.float32) for i in range(3)}
    cases = {  # file -> (what the refusal names, the limit)
        features(tmp_path / "frames.h5", {**small, "v1": dict(shape=(HUGE, 2, 4), dtype="f2", chunks=(1, 2, 4),
                                                               maxshape=(None, 2, 4))}):
            ("/videos/v1", "source_frames"),
        features(tmp_path / "dims.h5", {"v0": dict(shape=(3, 2, HUGE), dtype="f2", chunks=(1, 1, 1 << 16))}):
            ("feature dim", "width"),
        features(tmp_path / "tokens.h5", small, {"v0-0": dict(shape=(HUGE, 4), dtype="f4", chunks=(1 << 10, 4))}):
            ("/texts/v0-0", "tokens"),
        changed(export, tmp_path, lambda f: f.attrs.__setitem__(
            "store:sampling", json.dumps({"num_frames": HUGE, "strategy": "uniform-midpoint"}))):
            ("sampling.num_frames", "frames"),
    }
    m = manifest(tmp_path)
    for path, (what, limit) in cases.items():
        dest = tmp_path / f"{path.stem}.zarr"
        tracemalloc.start()
        try:
            with pytest.raises(ExternalFormatError) as err:
                if path.name == "changed.h5":
                    import_hdf5(path, dest, progress=False)
                else:
                    import_features(path, dest, m, progress=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        line = str(err.value)
        assert "\n" not in line and line.startswith(str(path)) and what in line and f"limit {limit}=" in line, line
        assert peak < 32 << 20, (path.name, peak)
        assert nothing_at(dest), path.name

    # a dataset whose declared shape disagrees with the store attributes: refused before it is read
    def bigger_tokens(f):
        del f["videos/tokens"]
        f.create_dataset("videos/tokens", shape=(len(VIDS), T, N, HUGE), dtype="f2", chunks=(1, 1, 1, 1 << 16))

    with pytest.raises(ExternalFormatError, match="/videos/tokens is .* the store attributes give it"):
        import_hdf5(changed(export, tmp_path, bigger_tokens), tmp_path / "bigger.zarr", progress=False)
    assert nothing_at(tmp_path / "bigger.zarr")

    # data kept in another file (here: a "secret" beside it) is never imported
    (tmp_path / "secret").write_bytes(os.urandom(3 * 2 * 4 * 4))
    outside = features(tmp_path / "outside.h5", {**small, "v2": dict(
        shape=(3, 2, 4), dtype="f4", external=[(str(tmp_path / "secret"), 0, 3 * 2 * 4 * 4)])})
    with pytest.raises(ExternalFormatError, match="/videos/v2 keeps its data in other files"):
        import_features(outside, tmp_path / "outside.zarr", m, progress=False)
    assert nothing_at(tmp_path / "outside.zarr")


def test_only_the_rows_the_store_keeps_are_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    vids = {f"v{i}": rng.normal(size=(200 if i < 3 else 2, 2, 4)).astype(np.float32) for i in range(5)}
    texts = {f"v{i}-{j}": rng.normal(size=(5 if (i, j) == (0, 0) else 50, 4)).astype(np.float32)
             for i in range(5) for j in range(2)}
    path = features(tmp_path / "long.h5", vids, texts)
    rows_read: dict[str, int] = {}
    real = h5py.Dataset.__getitem__

    def counting(self, sel):
        out = real(self, sel)
        rows_read[self.name] = rows_read.get(self.name, 0) + (out.shape[0] if getattr(out, "ndim", 0) > 1 else 1)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    report = import_features(path, tmp_path / "long.zarr", manifest(tmp_path, 5), num_frames=4, shard_size=2,
                             progress=False)
    monkeypatch.undo()
    assert report.videos == 5 and report.truncated == 3 and report.captions == 10
    assert {k: v for k, v in rows_read.items() if k.startswith("/videos/")} == {
        f"/videos/v{i}": 4 if i < 3 else 2 for i in range(5)}  # the 4 frames kept, never all 200
    assert {k: v for k, v in rows_read.items() if k.startswith("/texts/")} == {k: 5 for k in
                                                                              [f"/texts/{c}" for c in texts]}
    s = CacheStore.open(tmp_path / "long.zarr")
    row = s.video_ids.index("v1")
    pick = np.linspace(0, 199, 4).round().astype(int)
    assert np.allclose(s.array("videos/tokens")[row], vids["v1"][pick], atol=1e-2)
    assert s.array("videos/frame_index")[row].tolist() == pick.tolist()


def test_foreign_attributes_are_not_taken_into_the_store(export, tmp_path):
    def foreign(f):
        f.attrs["store:notes"] = json.dumps("x" * (10 << 20))  # an unknown store key, 10 MB
        f.attrs["made_by"] = "another tool"

    with pytest.warns(UserWarning, match="not taken into the store: 'made_by', 'store:notes'"):
        import_hdf5(changed(export, tmp_path, foreign), tmp_path / "foreign.zarr", progress=False)
    same_store(tmp_path / "foreign.zarr", export.with_suffix(".zarr"))
    assert "notes" not in CacheStore.open(tmp_path / "foreign.zarr").attrs

    refused = {  # known keys whose value would overwrite the store's own, or is too big or of the wrong type
        "store:schema_version": ("99", "store attribute schema_version is 99, the store it describes has 2"),
        "store:format": ('"evil"', "store attribute format is \"evil\""),
        "store:created_by": (json.dumps("y" * (10 << 20)), "over the import limit attr_bytes="),
        "store:encoder": ('"not an object"', "'store:encoder' does not have the type a store gives it"),
    }
    for key, (value, message) in refused.items():
        dest = tmp_path / f"{key[6:]}.zarr"
        with pytest.raises(ExternalFormatError, match=message):
            import_hdf5(changed(export, tmp_path, lambda f: f.attrs.__setitem__(key, value)), dest, progress=False)
        assert nothing_at(dest), key

    # another tool's file: its encoder description becomes the store's identity, so it is bounded
    small = {"v0": np.ones((3, 2, 4), np.float32)}
    m = manifest(tmp_path)
    big_encoder = features(tmp_path / "encoder.h5", small, attrs={"encoder": json.dumps({"name": "z" * (10 << 20)})})
    with pytest.raises(ExternalFormatError, match="encoder.h5: the size of root attribute 'encoder' is .* attr_bytes="):
        import_features(big_encoder, tmp_path / "encoder.zarr", m, progress=False)
    assert nothing_at(tmp_path / "encoder.zarr")
    with pytest.raises(ExternalFormatError, match="root attribute 'fps' has shape"):
        import_features(features(tmp_path / "fps.h5", small, attrs={"fps": np.arange(1000.0)}), tmp_path / "fps.zarr",
                        m, progress=False)
    assert nothing_at(tmp_path / "fps.zarr")


def test_a_failure_midway_leaves_nothing_at_the_destination(export, tmp_path, monkeypatch):
    real, calls = CacheStore.write_shard, []

    def failing(self, i, **data):
        calls.append(i)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(self, i, **data)

    monkeypatch.setattr(CacheStore, "write_shard", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        import_hdf5(export, tmp_path / "midway.zarr", progress=False)
    monkeypatch.undo()
    assert nothing_at(tmp_path / "midway.zarr")

    rng = np.random.default_rng(2)
    m = manifest(tmp_path)
    good = {f"v{i}": rng.normal(size=(3, 2, 4)).astype(np.float32) for i in range(6)}
    late = {  # the last video is malformed: found only when it is read (values) or before anything (shape)
        "nan.h5": ({**good, "v5": np.full((3, 2, 4), np.nan, np.float32)}, "/videos/v5 has values that are not finite"),
        "shape.h5": ({**good, "v5": np.ones((3, 2, 5), np.float32)}, "/videos/v5 has shape"),
    }
    for name, (videos, message) in late.items():
        dest = tmp_path / f"{name}.zarr"
        with pytest.raises(ExternalFormatError, match=message):
            import_features(features(tmp_path / name, videos), dest, m, shard_size=2, progress=False)
        assert nothing_at(dest), name

    taken = tmp_path / "taken.zarr"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="already exists"):
        import_hdf5(export, taken, progress=False)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


@pytest.mark.integration
def test_a_killed_import_leaves_only_its_temporary_store_which_the_next_one_removes(export, tmp_path):
    dest = tmp_path / "killed.zarr"
    script = textwrap.dedent(f"""
        import os, sys
        from pipeline.store import CacheStore
        from pipeline.hdf5io import import_hdf5
        real, calls = CacheStore.write_shard, []
        def dying(self, i, **data):
            calls.append(i)
            if len(calls) == 2:
                os._exit(9)
            return real(self, i, **data)
        CacheStore.write_shard = dying
        import_hdf5({str(export)!r}, {str(dest)!r}, progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 9, done.stderr
    left = list(tmp_path.glob("killed.zarr.importing-*"))
    assert not dest.exists() and len(left) == 1, sorted(p.name for p in tmp_path.iterdir())
    import_hdf5(export, dest, progress=False)  # its process is gone: the leftover goes
    assert not left[0].exists()
    same_store(dest, export.with_suffix(".zarr"))


def test_limits_are_configurable(export, tmp_path):
    from core.errors import UsageError
    from pipeline.hdf5_checks import ImportLimits

    with pytest.raises(ExternalFormatError, match="store attribute sampling.num_frames is 3, over the import "
                                                  "limit frames=2"):
        import_hdf5(export, tmp_path / "tight.zarr", progress=False, limits=ImportLimits(frames=2))
    assert ImportLimits.from_options({"frames": 2, "total_bytes": 10}) == ImportLimits(frames=2, total_bytes=10)
    with pytest.raises(UsageError, match="unknown import limit fromes"):
        ImportLimits.from_options({"fromes": 2})
    with pytest.raises(UsageError, match="whole number"):
        ImportLimits.from_options({"frames": 0})
