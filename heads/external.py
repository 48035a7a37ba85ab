"""External stage one: a similarity matrix made by any outside method, aligned to a split.

A user's own fine-tuned stage one (CLIP4Clip, TS2-Net, X-Pool, ...) comes in as embeddings or as
a full similarity matrix keyed by the manifest's ids. ``import_stage_one`` validates it against
one split of a feature store, reorders it to the split's order and writes a directory::

    <out>/external_stage_one.json   identity: kind, split, store fingerprint, encoder identity of
                                    the store, source files (path, format, sha256), normalisation,
                                    shapes, ids digests, dropped ids, similarity sha256
    <out>/ids.json                  {"caption_ids": [...], "video_ids": [...]} (row / column order)
    <out>/similarity.npy            (C, V) float32, rows = captions, columns = videos

``load_external(path, split)`` reads it back aligned to ``split.caption_ids x split.video_ids``
(``.similarity()``, ``.identity``); ``is_external(path)`` tells such a directory from a stage-one
checkpoint. Re-ranking then uses it exactly like the similarity of our own stage-one heads.

Similarity from embeddings: each video and caption embedding is L2-normalised and the similarity
is their dot product (cosine), as for our own heads; ``normalize=False`` keeps raw dot products.

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

Id checks (every message names the file and the first few offending ids): duplicated ids,
ids unknown to the store, and ids of the split missing from the file are errors; ids of other
splits of the same store (or of videos whose extraction failed) are dropped and counted.
Values must be finite and embedding widths equal; zero vectors cannot be normalised.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "EXTERNAL_JSON",
    "ExternalFormatError",
    "ExternalStageOne",
    "SplitIds",
    "import_stage_one",
    "is_external",
    "load_external",
    "read_embeddings",
    "read_similarity",
    "split_ids_from_store",
]

EXTERNAL_JSON = "external_stage_one.json"
IDS_JSON = "ids.json"
SIMILARITY_NPY = "similarity.npy"
KIND = "crosstvr-external-stage-one"
FORMAT_VERSION = 1
HDF5_EXT = (".h5", ".hdf5", ".hdf")
NPY_EXT = (".npy",)
NPZ_EXT = (".npz",)
PARQUET_EXT = (".parquet", ".pq")
_ROLE_GROUPS = {"video": ("video", "videos"), "text": ("text", "texts", "caption", "captions")}
_SHOW = 5  # ids named in an error message
_BLOCK = 4096  # caption rows per block of the similarity product


class ExternalFormatError(ValueError):
    """An external stage-one file or directory is unreadable, malformed or does not fit the split."""


def _first(items: Iterable[Any], n: int = _SHOW) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- split ids


@dataclass
class SplitIds:
    """The ids an import is checked against: one split, in its staged order.

    ``known_video_ids`` / ``known_caption_ids``: every id of the store (all splits, failed videos
    included); ids in a file that are known but not in the split are dropped, unknown ids are an
    error. Empty means "only the split's own ids are known". Any object with ``split``,
    ``video_ids``, ``caption_ids``, ``store_fingerprint`` and ``encoder_identity`` (a staged
    split) can be used instead.
    """

    split: str
    video_ids: list[str]
    caption_ids: list[str]
    store_fingerprint: str
    encoder_identity: dict = field(default_factory=dict)
    known_video_ids: frozenset = frozenset()
    known_caption_ids: frozenset = frozenset()
    caption_video: np.ndarray | None = None  # (C,) row of each caption's video in video_ids


def split_ids_from_store(store_url: str, split: str) -> SplitIds:
    """Video and caption ids of ``split`` in a feature store, in the order ``CacheStore.stage``
    uses (the split's videos with status ok in store order; their captions in store order)."""
    from pipeline.store import STATUS_OK, CacheStore

    store = CacheStore.open(store_url)
    arr = store.array("videos/split")
    splits = np.array([str(s) for s in arr[...].tolist()] if arr.shape[0] else [], dtype=object)
    in_split = splits == split
    if not in_split.any():
        raise ExternalFormatError(f"{store_url}: no videos of split {split!r} (splits: {store.splits()})")
    rows = np.flatnonzero(in_split & (store.status() == STATUS_OK))
    vidx = np.asarray(store.array("texts/video_index")[...]) if store.num_captions else np.zeros(0, np.int64)
    crows = np.flatnonzero(np.isin(vidx, rows))
    vids, cids = store.video_ids, store.caption_ids
    return SplitIds(split=split, video_ids=[vids[r] for r in rows], caption_ids=[cids[c] for c in crows],
                    store_fingerprint=store.fingerprint, encoder_identity=dict(store.encoder_identity),
                    known_video_ids=frozenset(vids), known_caption_ids=frozenset(cids),
                    caption_video=np.searchsorted(rows, vidx[crows]).astype(np.int64))


# --------------------------------------------------------------------------- readers


def _kind_of(path: Path) -> str:
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
            f"not 1-D: {_first(bad)}")
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
        raise ExternalFormatError(f"{path}: column {col_name!r} is null for id(s) {_first(ids[r] for r in rows)}")
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
    kind = _kind_of(p)
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
    kind = _kind_of(p)
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


# --------------------------------------------------------------------------- validation


def _align(file_ids: Sequence[str], wanted: Sequence[str], known: Iterable[str], what: str,
           path: Path, split: str) -> tuple[np.ndarray, int]:
    """Rows of ``file_ids`` in ``wanted`` order, and how many known-but-unwanted ids were dropped."""
    pos: dict[str, int] = {}
    dup: dict[str, int] = {}
    for i, x in enumerate(file_ids):
        if x in pos:
            dup[x] = dup.get(x, 1) + 1
        else:
            pos[x] = i
    if dup:
        raise ExternalFormatError(f"{path}: duplicated {what} ids: "
                                  + _first(f"{k} (x{v})" for k, v in dup.items()))
    want = set(wanted)
    known_all = want | set(known)
    unknown = [x for x in file_ids if x not in known_all]
    if unknown:
        raise ExternalFormatError(f"{path}: {len(unknown)} {what} id(s) are not in the store: {_first(unknown)}")
    missing = [x for x in wanted if x not in pos]
    if missing:
        raise ExternalFormatError(f"{path}: lacks {len(missing)} of the {len(want)} {what} ids of split "
                                  f"{split!r}: {_first(missing)}")
    idx = np.fromiter((pos[x] for x in wanted), dtype=np.int64, count=len(wanted))
    return idx, len(file_ids) - len(wanted)


def _check_rows_finite(arr: np.ndarray, ids: Sequence[str], path: Path, what: str) -> None:
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ExternalFormatError(f"{path}: {len(rows)} {what} row(s) hold NaN/inf, ids "
                                  f"{_first(ids[r] for r in rows)}")


def _unit(emb: np.ndarray, ids: Sequence[str], path: Path, what: str) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    zero = norms[:, 0] <= np.finfo(np.float64).tiny
    if zero.any():
        rows = np.flatnonzero(zero)
        raise ExternalFormatError(f"{path}: {len(rows)} {what} embedding(s) are zero vectors and cannot be "
                                  f"L2-normalised: ids {_first(ids[r] for r in rows)} (use --no-normalize "
                                  f"for raw dot products)")
    return emb / norms


# --------------------------------------------------------------------------- import / load


@dataclass
class ExternalStageOne:
    """An imported external stage one, aligned to ``caption_ids`` x ``video_ids``."""

    path: Path
    identity: dict
    caption_ids: list[str]
    video_ids: list[str]
    _rows: np.ndarray | None = None
    _cols: np.ndarray | None = None

    def similarity(self) -> np.ndarray:
        """(C, V) float32 similarity, rows = ``caption_ids``, columns = ``video_ids``."""
        sim = np.load(self.path / SIMILARITY_NPY, mmap_mode="r")
        expect = (int(self.identity["num_captions"]), int(self.identity["num_videos"]))
        if sim.shape != expect:
            raise ExternalFormatError(f"{self.path / SIMILARITY_NPY}: shape {sim.shape}, identity says {expect}")
        if self._rows is not None:
            sim = sim[self._rows]
        if self._cols is not None:
            sim = sim[:, self._cols]
        return np.array(sim, dtype=np.float32)

    @property
    def name(self) -> str:
        return str(self.identity.get("name") or self.path.name)


def _sources(entries: list[tuple[str, Path, str]]) -> list[dict]:
    return [{"role": role, "path": str(p.resolve()), "format": kind, "sha256": sha256_file(p),
             "bytes": p.stat().st_size} for role, p, kind in entries]


def import_stage_one(
    split: Any,
    out_dir: str | Path,
    *,
    video_emb: str | Path | None = None,
    text_emb: str | Path | None = None,
    similarity: str | Path | None = None,
    normalize: bool = True,
    name: str | None = None,
    progress: bool = True,
) -> ExternalStageOne:
    """Validate an external stage one against ``split`` and write ``out_dir`` (see the module doc).

    Give either ``video_emb`` and ``text_emb`` (similarity = dot product of the L2-normalised
    embeddings, or of the raw ones with ``normalize=False``) or ``similarity`` (a full matrix,
    used as is). ``split``: a ``SplitIds`` or a staged split. Returns the loaded result.
    """
    from tqdm.auto import tqdm

    if (similarity is None) == (video_emb is None and text_emb is None):
        raise ValueError("give either video and text embeddings or a similarity matrix (not both, not neither)")
    if similarity is None and (video_emb is None or text_emb is None):
        raise ValueError("embeddings need both a video file and a text file")
    split_name = str(split.split)
    vids, cids = [str(x) for x in split.video_ids], [str(x) for x in split.caption_ids]
    known_v = getattr(split, "known_video_ids", frozenset()) or frozenset()
    known_c = getattr(split, "known_caption_ids", frozenset()) or frozenset()
    if not vids or not cids:
        raise ExternalFormatError(f"split {split_name!r} has {len(vids)} videos and {len(cids)} captions; nothing to import")
    out = Path(out_dir)
    C, V = len(cids), len(vids)
    dropped: dict[str, int] = {}
    if similarity is not None:
        sp = Path(similarity)
        f_cids, f_vids, sim = read_similarity(sp)
        ridx, dropped["captions"] = _align(f_cids, cids, known_c, "caption", sp, split_name)
        cidx, dropped["videos"] = _align(f_vids, vids, known_v, "video", sp, split_name)
        sim = np.asarray(sim[ridx][:, cidx], dtype=np.float64)
        _check_rows_finite(sim, cids, sp, "caption")
        sources = _sources([("similarity", sp, _kind_of(sp))])
        how = "similarity matrix"
        embed_dim = None
        sim_iter = None
    else:
        vp, tp = Path(video_emb), Path(text_emb)
        f_vids, v = read_embeddings(vp, "video")
        f_cids, t = read_embeddings(tp, "text")
        if v.shape[1] != t.shape[1]:
            raise ExternalFormatError(f"video embeddings ({vp}) are {v.shape[1]}-d but text embeddings ({tp}) "
                                      f"are {t.shape[1]}-d; both must have the same width")
        vidx, dropped["videos"] = _align(f_vids, vids, known_v, "video", vp, split_name)
        tidx, dropped["captions"] = _align(f_cids, cids, known_c, "caption", tp, split_name)
        v = np.asarray(v[vidx], dtype=np.float64)
        t = np.asarray(t[tidx], dtype=np.float64)
        _check_rows_finite(v, vids, vp, "video")
        _check_rows_finite(t, cids, tp, "caption")
        if normalize:
            v, t = _unit(v, vids, vp, "video"), _unit(t, cids, tp, "caption")
        sources = _sources([("video_emb", vp, _kind_of(vp)), ("text_emb", tp, _kind_of(tp))])
        how = "cosine of L2-normalised embeddings" if normalize else "dot product of raw embeddings"
        embed_dim = int(v.shape[1])
        sim = None
        sim_iter = (v, t)

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SIMILARITY_NPY + ".tmp")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(C, V))
    starts = range(0, C, _BLOCK)
    for lo in tqdm(starts, desc="external similarity", disable=not progress or len(starts) < 2, leave=False):
        hi = min(C, lo + _BLOCK)
        block = sim[lo:hi] if sim is not None else sim_iter[1][lo:hi] @ sim_iter[0].T
        if not np.isfinite(block).all():  # finite inputs can still overflow a dot product
            r = lo + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ExternalFormatError(f"similarity of caption {cids[r]!r} is not finite (overflow)")
        if not np.isfinite(block.astype(np.float32)).all():
            raise ExternalFormatError(f"similarities of captions {cids[lo]!r}..{cids[hi - 1]!r} overflow float32")
        mm[lo:hi] = block
    mm.flush()
    del mm
    final = out / SIMILARITY_NPY
    tmp.replace(final)
    (out / IDS_JSON).write_text(json.dumps({"caption_ids": cids, "video_ids": vids}))
    identity = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "name": name or out.name,
        "split": split_name,
        "store_fingerprint": str(split.store_fingerprint),
        "store_encoder_identity": json.loads(json.dumps(getattr(split, "encoder_identity", {}) or {}, default=str)),
        "similarity_from": how,
        "normalize": bool(normalize) if similarity is None else None,
        "embed_dim": embed_dim,
        "num_captions": C,
        "num_videos": V,
        "caption_ids_sha256": _ids_digest(cids),
        "video_ids_sha256": _ids_digest(vids),
        "dropped_other_ids": dropped,
        "sources": sources,
        "similarity_sha256": sha256_file(final),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / EXTERNAL_JSON).write_text(json.dumps(identity, indent=2, allow_nan=False) + "\n")
    return load_external(out, split)


def _identity_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.name == EXTERNAL_JSON else p / EXTERNAL_JSON


def is_external(path: str | Path) -> bool:
    """True when ``path`` (a directory, or its ``external_stage_one.json``) is an imported external
    stage one; False for a stage-one checkpoint, any other path, or a path that does not exist."""
    p = _identity_path(path)
    if not p.is_file():
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == KIND


def _same_ids(have: Sequence[str], want: Sequence[str], what: str, root: Path, split: str) -> None:
    h, w = set(have), set(want)
    if h != w or len(have) != len(want):
        raise ExternalFormatError(
            f"{root} was imported for other {what} ids than split {split!r} now has: "
            f"{len(w - h)} missing ({_first(sorted(w - h))}), {len(h - w)} extra ({_first(sorted(h - w))}); "
            f"import it again")


def _positions(have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    pos = {x: i for i, x in enumerate(have)}
    return np.fromiter((pos[x] for x in want), dtype=np.int64, count=len(want))


def load_external(path: str | Path, split: Any) -> ExternalStageOne:
    """Read an imported external stage one aligned to ``split.caption_ids`` x ``split.video_ids``.

    Raises ``ExternalFormatError`` for a directory that is not an import or was made for another
    split or other ids, and ``heads.train.StoreMismatchError`` when it was checked against a
    different store (fingerprint) than the one ``split`` comes from.
    """
    jp = _identity_path(path)
    root = jp.parent
    if not is_external(root):
        raise ExternalFormatError(f"{path}: not an external stage-one directory (no {EXTERNAL_JSON} of kind {KIND!r})")
    identity = json.loads(jp.read_text())
    if int(identity.get("format_version", 0)) > FORMAT_VERSION:
        raise ExternalFormatError(f"{jp}: format_version {identity.get('format_version')} is newer than this code "
                                  f"reads ({FORMAT_VERSION})")
    if str(identity["split"]) != str(split.split):
        raise ExternalFormatError(f"{root} was imported for split {identity['split']!r}, not {split.split!r}")
    if str(identity["store_fingerprint"]) != str(split.store_fingerprint):
        from heads.train import StoreMismatchError

        raise StoreMismatchError(
            f"{root} was imported against store {str(identity['store_fingerprint'])[:12]}, but split "
            f"{split.split!r} comes from store {str(split.store_fingerprint)[:12]}")
    ids = json.loads((root / IDS_JSON).read_text())
    f_cids, f_vids = [str(x) for x in ids["caption_ids"]], [str(x) for x in ids["video_ids"]]
    cids, vids = [str(x) for x in split.caption_ids], [str(x) for x in split.video_ids]
    rows = cols = None
    if f_cids != cids:
        _same_ids(f_cids, cids, "caption", root, str(split.split))
        rows = _positions(f_cids, cids)
    if f_vids != vids:
        _same_ids(f_vids, vids, "video", root, str(split.split))
        cols = _positions(f_vids, vids)
    return ExternalStageOne(path=root, identity=identity, caption_ids=cids, video_ids=vids, _rows=rows, _cols=cols)
