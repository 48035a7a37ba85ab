"""Reading an external stage one's files: embeddings keyed by ids, or a similarity matrix.

Accepted inputs (the file type is chosen by extension):

Embeddings (one file for videos, one for captions; the same file may hold both in groups):

* HDF5 (``.h5``, ``.hdf5``): datasets ``ids`` (N,) strings and ``emb`` (N, D) floats (``embeddings``
  is accepted for ``emb``) at the root, or inside a group named ``video``/``videos`` (video file)
  or ``text``/``texts``/``caption``/``captions`` (caption file); otherwise one 1-D dataset of
  length D per id, the dataset's path inside the file being the id.
* NumPy ``.npy``: an (N, D) array, with the ids in a sidecar next to it: ``<stem>.ids.txt`` or
  ``<stem>.txt`` (one id per line) or ``<stem>.ids.json`` / ``<stem>.json`` (a JSON list).
  ``.npz``: arrays ``ids`` and ``emb``.
* Parquet (``.parquet``, ``.pq``): a string column ``id`` and one list column of floats (named
  ``emb`` or ``embedding`` when there are several list columns).

Similarity matrix (rows = captions, columns = videos):

* HDF5: datasets ``sim`` (or ``similarity``) (C, V), ``caption_ids`` (C,), ``video_ids`` (V,).
* ``.npy`` (C, V) with a sidecar ``<stem>.ids.json`` / ``<stem>.json``:
  ``{"caption_ids": [...], "video_ids": [...]}``; ``.npz`` with arrays ``sim``, ``caption_ids``,
  ``video_ids``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from core.errors import ExternalFormatError

HDF5_EXT = (".h5", ".hdf5", ".hdf")
NPY_EXT = (".npy",)
NPZ_EXT = (".npz",)
PARQUET_EXT = (".parquet", ".pq")
_ROLE_GROUPS = {"video": ("video", "videos"), "text": ("text", "texts", "caption", "captions")}
_SHOW = 5  # ids named in an error message


def first_ids(items: Iterable[Any], n: int = _SHOW) -> str:
    """The first ``n`` items quoted, and how many there are in all when more."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def kind_of(path: Path) -> str:
    name = path.name.lower()
    for kind, exts in (("hdf5", HDF5_EXT), ("npy", NPY_EXT), ("npz", NPZ_EXT), ("parquet", PARQUET_EXT)):
        if name.endswith(exts):
            return kind
    raise ExternalFormatError(
        f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; expected HDF5 "
        f"({', '.join(HDF5_EXT)}), NumPy (.npy with an ids sidecar, .npz) or Parquet ({', '.join(PARQUET_EXT)})")


def _as_str_ids(values: Any, path: Path, what: str) -> list[str]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ExternalFormatError(f"{path}: {what} must be 1-D, got shape {arr.shape}")
    out = []
    for v in arr.tolist():
        out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
    return out


def _as_matrix(values: Any, path: Path, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ExternalFormatError(f"{path}: {what} must be 2-D, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ExternalFormatError(f"{path}: {what} must hold numbers, got dtype {arr.dtype}")
    return arr


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise ExternalFormatError(f"{path}: not a readable HDF5 file ({err})") from None


def _h5_strings(ds: Any) -> Any:
    import h5py

    if h5py.check_string_dtype(ds.dtype) is not None:
        return ds.asstr()[...]
    return ds[...]


def _h5_pick(group: Any, names: Sequence[str]) -> Any | None:
    import h5py

    for n in names:
        if n in group and isinstance(group[n], h5py.Dataset):
            return group[n]
    return None


def _read_h5_embeddings(path: Path, role: str) -> tuple[list[str], np.ndarray]:
    import h5py

    with _open_h5(path) as f:
        candidates = [f] + [f[g] for g in _ROLE_GROUPS[role] if g in f and isinstance(f[g], h5py.Group)]
        for group in candidates[::-1]:  # a role group wins over the root
            ids_ds, emb_ds = _h5_pick(group, ["ids"]), _h5_pick(group, ["emb", "embeddings"])
            if ids_ds is not None and emb_ds is not None:
                where = group.name
                ids = _as_str_ids(_h5_strings(ids_ds), path, f"dataset {where.rstrip('/')}/ids")
                emb = _as_matrix(emb_ds[...], path, f"dataset {emb_ds.name}")
                return ids, emb
        # one dataset per id
        found: list[tuple[str, np.ndarray]] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                found.append((name, obj[...]))

        f.visititems(visit)
    if not found:
        raise ExternalFormatError(
            f"{path}: no embeddings found; expected datasets 'ids' + 'emb' (at the root or in a group "
            f"{'/'.join(_ROLE_GROUPS[role])}) or one 1-D dataset per id")
    bad = [name for name, v in found if np.asarray(v).ndim != 1]
    if bad:
        raise ExternalFormatError(
            f"{path}: without 'ids' + 'emb' datasets every dataset must be one id's 1-D embedding; "
            f"not 1-D: {first_ids(bad)}")
    widths = {np.asarray(v).shape[0] for _, v in found}
    if len(widths) > 1:
        raise ExternalFormatError(f"{path}: per-id embeddings have different widths {sorted(widths)}")
    ids = [name for name, _ in found]
    emb = _as_matrix(np.stack([np.asarray(v) for _, v in found]), path, "per-id embeddings")
    return ids, emb


def _sidecar(path: Path, names: Sequence[str]) -> Path | None:
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for n in names:
        p = path.with_name(stem + n)
        if p.is_file():
            return p
    return None


def _load_npy(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ExternalFormatError(f"{path}: not a readable .npy/.npz file ({err})") from None


def _load_array(path: Path) -> np.ndarray:
    arr = _load_npy(path)
    if not isinstance(arr, np.ndarray):
        raise ExternalFormatError(f"{path}: has the .npy extension but is an .npz archive")
    return arr


def _read_npy_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    emb = _as_matrix(_load_array(path), path, "embedding array")
    side = _sidecar(path, [".ids.txt", ".txt", ".ids.json", ".json"])
    if side is None:
        stem = path.name[: -len(path.suffix)]
        raise ExternalFormatError(
            f"{path}: a .npy embedding file needs its ids in a sidecar next to it: {stem}.ids.txt, "
            f"{stem}.txt (one id per line) or {stem}.ids.json / {stem}.json (a JSON list)")
    if side.suffix == ".json":
        try:
            data = json.loads(side.read_text())
        except ValueError as err:
            raise ExternalFormatError(f"{side}: not valid JSON ({err})") from None
        if not isinstance(data, list):
            raise ExternalFormatError(f"{side}: expected a JSON list of ids, got {type(data).__name__}")
        ids = [str(x) for x in data]
    else:
        ids = [line.rstrip("\r") for line in side.read_text().split("\n")]
        while ids and ids[-1] == "":
            ids.pop()
    return ids, emb


def _load_npz(path: Path) -> Any:
    z = _load_npy(path)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ExternalFormatError(f"{path}: has the .npz extension but holds a single array, not an archive")
    return z


def _npz_member(z: Any, names: Sequence[str], path: Path) -> np.ndarray:
    for n in names:
        if n in z.files:
            return z[n]
    raise ExternalFormatError(f"{path}: .npz lacks an array named {' or '.join(map(repr, names))} "
                              f"(it holds {sorted(z.files)})")


def _read_npz_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    with _load_npz(path) as z:
        ids = _as_str_ids(_npz_member(z, ["ids"], path), path, "array 'ids'")
        emb = _as_matrix(_npz_member(z, ["emb", "embeddings"], path), path, "array 'emb'")
    return ids, emb


def _read_parquet_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ExternalFormatError(f"{path}: not a readable Parquet file ({err})") from None
    if "id" not in table.column_names:
        raise ExternalFormatError(f"{path}: Parquet embeddings need a column 'id' (columns: {table.column_names})")
    lists = [n for n in table.column_names
             if pa.types.is_list(table.schema.field(n).type) or pa.types.is_large_list(table.schema.field(n).type)
             or pa.types.is_fixed_size_list(table.schema.field(n).type)]
    named = [n for n in ("emb", "embedding", "embeddings") if n in lists]
    if named:
        col_name = named[0]
    elif len(lists) == 1:
        col_name = lists[0]
    else:
        raise ExternalFormatError(
            f"{path}: expected one list column of floats (or one named 'emb'/'embedding'), found "
            f"list columns {lists} among {table.column_names}")
    ids_col = table.column("id")
    if ids_col.null_count:
        raise ExternalFormatError(f"{path}: column 'id' holds {ids_col.null_count} null(s)")
    ids = [str(x) for x in ids_col.to_pylist()]
    col = table.column(col_name).combine_chunks()
    if col.null_count:
        rows = np.flatnonzero(np.asarray(col.is_null()))
        raise ExternalFormatError(f"{path}: column {col_name!r} is null for id(s) {first_ids(ids[r] for r in rows)}")
    lengths = np.asarray(pc.list_value_length(col))
    if lengths.size and (lengths != lengths[0]).any():
        odd = np.flatnonzero(lengths != lengths[0])
        raise ExternalFormatError(
            f"{path}: column {col_name!r} rows have different lengths ({lengths[0]} for {ids[0]!r}, "
            f"{lengths[odd[0]]} for {ids[odd[0]]!r})")
    width = int(lengths[0]) if lengths.size else 0
    values = col.flatten()
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise ExternalFormatError(f"{path}: column {col_name!r} must hold numbers, got {values.type}")
    flat = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64 if values.null_count else None)
    return ids, flat.reshape(len(ids), width)


def read_embeddings(path: str | Path, role: str = "video") -> tuple[list[str], np.ndarray]:
    """``(ids, emb)`` from one embedding file (``role``: ``"video"`` or ``"text"``); see the module doc."""
    if role not in _ROLE_GROUPS:
        raise ValueError(f"role must be 'video' or 'text', got {role!r}")
    p = Path(path)
    kind = kind_of(p)
    if not p.is_file():
        raise ExternalFormatError(f"{p}: no such file")
    reader = {"hdf5": lambda: _read_h5_embeddings(p, role), "npy": lambda: _read_npy_embeddings(p),
              "npz": lambda: _read_npz_embeddings(p), "parquet": lambda: _read_parquet_embeddings(p)}[kind]
    ids, emb = reader()
    if len(ids) != emb.shape[0]:
        raise ExternalFormatError(f"{p}: {len(ids)} ids but {emb.shape[0]} embedding rows")
    if emb.shape[1] == 0:
        raise ExternalFormatError(f"{p}: embeddings have width 0")
    return ids, emb


def read_similarity(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(caption_ids, video_ids, sim)`` from a similarity-matrix file; see the module doc."""
    p = Path(path)
    kind = kind_of(p)
    if not p.is_file():
        raise ExternalFormatError(f"{p}: no such file")
    if kind == "hdf5":
        with _open_h5(p) as f:
            sim_ds = _h5_pick(f, ["sim", "similarity"])
            cid_ds, vid_ds = _h5_pick(f, ["caption_ids"]), _h5_pick(f, ["video_ids"])
            if sim_ds is None or cid_ds is None or vid_ds is None:
                raise ExternalFormatError(
                    f"{p}: a similarity HDF5 file needs datasets 'sim' (captions x videos), 'caption_ids' "
                    f"and 'video_ids' (found {sorted(f.keys())})")
            cids = _as_str_ids(_h5_strings(cid_ds), p, "dataset caption_ids")
            vids = _as_str_ids(_h5_strings(vid_ds), p, "dataset video_ids")
            sim = _as_matrix(sim_ds[...], p, "dataset sim")
    elif kind == "npz":
        with _load_npz(p) as z:
            sim = _as_matrix(_npz_member(z, ["sim", "similarity"], p), p, "array 'sim'")
            cids = _as_str_ids(_npz_member(z, ["caption_ids"], p), p, "array 'caption_ids'")
            vids = _as_str_ids(_npz_member(z, ["video_ids"], p), p, "array 'video_ids'")
    elif kind == "npy":
        sim = _as_matrix(_load_array(p), p, "similarity array")
        side = _sidecar(p, [".ids.json", ".json"])
        if side is None:
            stem = p.name[: -len(p.suffix)]
            raise ExternalFormatError(
                f"{p}: a .npy similarity matrix needs a sidecar {stem}.ids.json or {stem}.json with "
                f'{{"caption_ids": [...], "video_ids": [...]}}')
        try:
            data = json.loads(side.read_text())
        except ValueError as err:
            raise ExternalFormatError(f"{side}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or not {"caption_ids", "video_ids"} <= set(data):
            raise ExternalFormatError(f"{side}: expected an object with 'caption_ids' and 'video_ids'")
        cids, vids = [str(x) for x in data["caption_ids"]], [str(x) for x in data["video_ids"]]
    else:
        raise ExternalFormatError(f"{p}: a similarity matrix must be HDF5, .npy (+ ids sidecar) or .npz, "
                                  f"not {kind}")
    if sim.shape != (len(cids), len(vids)):
        raise ExternalFormatError(f"{p}: similarity has shape {sim.shape} but the file lists "
                                  f"{len(cids)} caption ids x {len(vids)} video ids")
    return cids, vids, sim
