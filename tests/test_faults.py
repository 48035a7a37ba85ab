"""The crash tests: every store operation killed at its k-th write, then the store checked (docs/STORE.md).

For each operation the harness counts the writes of an uninterrupted run, kills a fresh run at write
``k`` (``core.faults``), and checks (a) a reader sees only committed rows, each equal to the uninterrupted
run's, (b) ``verify`` passes or names only unfinished shards, (c) a re-run ends with a store equal to the
uninterrupted one (arrays, attributes, digest), (d) nothing was written outside the store (or DEST).

CI runs ``CROSSTVR_FAULT_SPREAD`` kill points per operation (default 3, spread from the first write to
the last); ``make test-faults`` runs every one (``CROSSTVR_FAULT_SPREAD=all``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import fault_ops as F
from core import faults

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_SPREAD = os.environ.get("CROSSTVR_FAULT_SPREAD", "3")
SPREAD = None if _SPREAD == "all" else int(_SPREAD)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict:
    """The world, and the uninterrupted result of each operation (the references)."""
    root = tmp_path_factory.mktemp("faults")
    w = F.make_world(root / "data")
    refs = root / "refs"
    refs.mkdir()
    full = str(refs / "full.zarr")
    assert F.run(F.op_extract, w.grown, full) == 0
    small = str(refs / "small.zarr")
    assert F.run(F.op_extract, w.small, small) == 0
    grown = str(refs / "grown.zarr")
    F.copy_store(Path(small), Path(grown))
    assert F.run(F.op_extract, w.grown, grown) == 0
    bare = str(refs / "bare.zarr")  # no thumbnails: the back-fill's start
    assert F.run(F.op_extract, w.grown, bare, None, 0) == 0
    h5 = str(refs / "full.h5")
    from pipeline.hdf5io import export_hdf5
    from pipeline.store import CacheStore

    export_hdf5(CacheStore.open(full), h5, progress=False)
    return {"root": root, "world": w, "full": full, "small": small, "grown": grown, "bare": bare, "h5": h5}


def _sweep(lab: dict, name: str, prepare, operate, rerun, check, ref: str, mode: str = "before",
           may_finish: bool = False) -> list[int]:
    """Count ``operate``'s writes on a prepared sandbox, then kill it at each chosen write and check."""
    base = lab["root"] / name
    base.mkdir(exist_ok=True)
    log = base / "count.log"
    sandbox = base / "count"
    prepare(sandbox)
    assert operate(sandbox, None, log) == 0
    check(sandbox, ref, final=True)
    n = F.count_writes(log)
    assert n > 0
    points = F.kill_points(n, SPREAD)
    for k in points:
        box = base / f"k{k}"
        prepare(box)
        before = F.tree(box, _skips(box))
        code = operate(box, k, None)
        if code == 0 and may_finish:  # this run's writers shared the work otherwise: fewer than k writes
            shutil.rmtree(box)
            continue
        assert code == faults.FAULT_EXIT, f"{name}: a run armed at write {k} of {n} exited {code}"
        check(box, ref, final=False)
        assert F.tree(box, _skips(box)) == before, f"{name}, killed at {k}: files written outside the store"
        rerun(box)
        check(box, ref, final=True)
        shutil.rmtree(box)
    print(f"{name}: {n} writes, killed at {len(points)} of them ({mode})")
    return points


def _skips(box: Path) -> tuple[Path, ...]:
    return (box / "store.zarr", box / "dest")


def _checker(target: str = "store.zarr"):
    def check(box: Path, ref: str, final: bool) -> None:
        path = box / target
        if final:
            F.assert_same_store(path, ref)
        else:
            F.assert_committed_only(path, ref)
    return check


def _op_sweep(lab: dict, name: str, op, args, ref: str, start: Path | None = None, check=None,
              mode: str = "before", damage=None) -> list[int]:
    """``_sweep`` of one operation ``op(*args(box))`` on a sandbox holding a copy of ``start`` (or nothing),
    ``damage(box)`` applied after the copy."""
    def prepare(box: Path) -> None:
        box.mkdir(parents=True, exist_ok=True)
        if start is not None:
            F.copy_store(Path(start), box / "store.zarr")
        if damage is not None:
            damage(box)

    def operate(box: Path, k, log) -> int:
        return F.run(op, *args(box), at=k, log=log, mode=mode)

    def rerun(box: Path) -> None:
        assert F.run(op, *args(box)) == 0

    return _sweep(lab, name, prepare, operate, rerun, check or _checker(), ref, mode=mode)


def _store(box: Path) -> str:
    return str(box / "store.zarr")


def test_fresh_extract_killed_at_every_write(lab):
    _op_sweep(lab, "fresh", F.op_extract, lambda box: (lab["world"].grown, _store(box)), lab["full"])


def test_fresh_extract_torn_writes(lab):
    """The same, the killed write left half its bytes in a temporary file (a power cut mid-write)."""
    _op_sweep(lab, "torn", F.op_extract, lambda box: (lab["world"].grown, _store(box)), lab["full"], mode="torn")


def test_resume_killed_at_every_write(lab):
    """A store half extracted (part 0 of 2 done), resumed by a full run."""
    half = lab["root"] / "half.zarr"
    if not half.exists():
        assert F.run(F.op_extract, lab["world"].grown, str(half), (0, 2)) == 0
    _op_sweep(lab, "resume", F.op_extract, lambda box: (lab["world"].grown, _store(box)), lab["full"], start=half)


def test_two_part_writers_one_killed(lab):
    """Two ``--part`` writers at once; the first is killed at write k, the second finishes."""
    w = lab["world"]

    def prepare(box: Path) -> None:
        box.mkdir(parents=True, exist_ok=True)

    def operate(box: Path, k, log) -> int:
        store = str(box / "store.zarr")
        first = F.start(F.op_extract, w.grown, store, (0, 2), at=k, log=log)
        second = F.start(F.op_extract, w.grown, store, (1, 2))
        codes = F.wait(first + second)
        assert codes[1] == 0, codes
        if codes[0] == 0:
            assert F.run(F.op_finalize, store) == 0
        return codes[0]

    def rerun(box: Path) -> None:
        store = str(box / "store.zarr")
        assert F.wait(F.start(F.op_extract, w.grown, store, (0, 2)) + F.start(F.op_extract, w.grown, store, (1, 2))) \
            == [0, 0]
        assert F.run(F.op_finalize, store) == 0

    _sweep(lab, "parts", prepare, operate, rerun, _checker(), lab["full"], may_finish=True)


def test_append_killed_at_every_write(lab):
    """A store of the val/test manifest grown by train videos with longer ids and a longer split name."""
    from pipeline.store import CacheStore

    def check(box: Path, ref: str, final: bool) -> None:
        path = box / "store.zarr"
        if final:
            F.assert_same_store(path, ref)
            s = CacheStore.open(path)
            assert "train" in s.splits() and "train-video-with-a-long-identifier-0" in s.video_ids
        else:
            s = CacheStore.open(path)  # the old version or the new one, never a mixture
            F.assert_committed_only(path, lab["grown"] if s.num_videos > 6 else lab["small"])

    _op_sweep(lab, "append", F.op_extract, lambda box: (lab["world"].grown, _store(box)), lab["grown"],
              start=Path(lab["small"]), check=check)


def test_repair_killed_at_every_write(lab):
    """``cache verify --repair`` of a store with one corrupt token shard."""
    from pipeline.integrity import verify
    from pipeline.store import CacheStore

    def damage(box: Path) -> None:
        chunk = box / "store.zarr" / "videos" / "tokens" / "c" / "1" / "0" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[100] ^= 0xFF
        chunk.write_bytes(bytes(data))

    def check(box: Path, ref: str, final: bool) -> None:
        if final:
            F.assert_same_store(box / "store.zarr", ref)
            return
        report = verify(CacheStore.open(box / "store.zarr"), progress=False)
        assert all(p.index == 1 for p in report.problems), report.summary()  # only the shard being repaired

    _op_sweep(lab, "repair", F.op_repair, lambda box: (lab["world"].grown, _store(box)), lab["full"],
              start=Path(lab["full"]), damage=damage, check=check)


def test_pull_killed_at_every_write(lab):
    _op_sweep(lab, "pull", F.op_pull, lambda box: (lab["full"], str(box / "dest")), lab["full"],
              check=_checker("dest"))


def test_hdf5_import_killed_at_every_write(lab):
    def check(box: Path, ref: str, final: bool) -> None:
        path = box / "store.zarr"
        if final:
            F.assert_same_store(path, ref)
        else:
            assert not path.exists(), "a killed import left a store at its destination"

    _op_sweep(lab, "import", F.op_import, lambda box: (lab["h5"], _store(box)), lab["full"], check=check)


def test_thumbnail_backfill_killed_at_every_write(lab):
    _op_sweep(lab, "thumbnails", F.op_thumbnails, lambda box: (lab["world"].grown, _store(box)), lab["full"],
              start=Path(lab["bare"]))


def test_reader_never_sees_a_row_being_written(lab, tmp_path):
    """A reader polling while a writer extracts (slowed at every write) sees only committed rows, each
    equal to the uninterrupted run's."""
    from pipeline.store import CacheStore, StoreError

    w = lab["world"]
    store = tmp_path / "store.zarr"
    procs = F.start(F.op_extract, w.grown, str(store))
    ref = CacheStore.open(lab["full"])
    ref_tokens = np.asarray(ref.array("videos/tokens")[...])
    ref_status = ref.status()
    seen = 0
    deadline = time.monotonic() + 300
    while procs[0].is_alive() and time.monotonic() < deadline:
        try:
            s = CacheStore.open(store)
        except StoreError:
            time.sleep(0.02)
            continue
        status = s.status()
        ok = np.flatnonzero(status == 1)
        tokens = np.asarray(s.array("videos/tokens").get_orthogonal_selection((ok,))) if ok.size else None
        again = s.status()
        stable = ok[again[ok] == 1]  # rows still committed after the read
        assert np.array_equal(status[ok], ref_status[ok])
        if tokens is not None:
            pos = np.searchsorted(ok, stable)
            assert np.array_equal(tokens[pos], ref_tokens[stable])
            seen += stable.size
    assert F.wait(procs) == [0]
    assert seen > 0
