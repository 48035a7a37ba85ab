"""A FAISS index over a split's stage-one video embeddings: stage one at the scale of a collection.

An index directory holds

    index.faiss        the FAISS index (inner product over unit vectors = cosine)
    video_ids.json     the video id of every index row (row i = row i of the split it was built from)
    index.json         kind and parameters, dims, count, the split and store fingerprint, the encoder
                       identity, the stage one (checkpoint sha256, head), build seconds, what of the
                       store it covers (``covers``, written by ``workflows.search``) and, for an
                       approximate index, its recall against exact search

index.json is the commit point: it names the two data files it goes with (``files``). A rewrite of the
directory (a build over it, ``index add``) writes the next generation's data files
(``index.<g>.faiss``, ``video_ids.<g>.json``) beside the current ones, then index.json, then deletes
the files no longer named; a process killed at any point leaves the old index or the new one.

Kinds: ``flat`` (exact inner product, the default), ``ivf`` (``IndexIVFFlat``: k-means cells, a
query scans ``nprobe`` of them) and ``hnsw`` (``IndexHNSWFlat``: a navigable small-world graph,
``ef_search`` candidates per query). The exact kind is searched with a blocked matrix product over
the vectors its ``IndexFlatIP`` holds (``exact_top_k``: about 5x FAISS's own flat search on the
reference CPU). Scores are the same cosine stage one ranks by; an approximate
index only may miss some of the exact top K, which ``recall_at`` measures.

Torch-free: the embeddings come in as float32 arrays (``heads.evaluation.similarity`` encodes them).
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from core.errors import ConfigError, StoreMismatchError, UsageError
from core.fileio import atomic_write, write_json
from core.urls import redact_urls

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "video_ids.json", "index.json"
INDEX_FORMAT = "crosstvr-index"
DATA_FILE = re.compile(r"^(index(\.\d+)?\.faiss|video_ids(\.\d+)?\.json)$")  # a generation's data files
LOCK_FILE = ".lock"  # writers of one index directory (``index_lock``)
# defaults of the approximate kinds (options: nlist, nprobe, train_size; m, ef_construction, ef_search)
IVF_DEFAULTS = {"nlist": 0, "nprobe": 32, "train_size": 0}  # nlist 0: about 4 * sqrt(N); train_size 0: 64 * nlist
HNSW_DEFAULTS = {"m": 32, "ef_construction": 80, "ef_search": 128}


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a pinned requirement
        raise ConfigError("the vector index needs faiss (pip install faiss-cpu)") from exc
    return faiss


def set_threads(n: int | None) -> None:
    """FAISS's OpenMP threads (None: leave as is)."""
    if n:
        _faiss().omp_set_num_threads(int(n))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Contiguous float32 copy of ``x`` with unit rows (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-d (rows, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings hold non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def resolve_options(kind: str, num: int, options: dict | None = None) -> dict:
    """The kind's parameters with ``options`` applied (unknown names refused) and sizes resolved."""
    if kind not in INDEX_KINDS:
        raise UsageError(f"--kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    defaults = {"flat": {}, "ivf": IVF_DEFAULTS, "hnsw": HNSW_DEFAULTS}[kind]
    given = dict(options or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UsageError(f"index kind {kind!r} has no option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(defaults) or 'none'})")
    out = {k: int(given.get(k, v)) for k, v in defaults.items()}
    if kind == "ivf":
        if out["nlist"] <= 0:
            out["nlist"] = int(max(1, min(num // 39 or 1, round(4 * np.sqrt(max(num, 1))))))
        out["nlist"] = int(min(out["nlist"], max(num, 1)))
        out["nprobe"] = int(max(1, min(out["nprobe"], out["nlist"])))
        if out["train_size"] <= 0:
            out["train_size"] = int(min(num, 64 * out["nlist"]))
    return out


def make_index(emb: np.ndarray, kind: str = "flat", options: dict | None = None, seed: int = 0) -> tuple[Any, dict]:
    """A FAISS inner-product index of the unit rows of ``emb`` and its resolved parameters."""
    faiss = _faiss()
    x = unit_rows(emb)
    num, dim = x.shape
    if num == 0:
        raise UsageError("no videos to index (the split holds no extracted video)")
    params = resolve_options(kind, num, options)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        rng = np.random.default_rng(seed)
        sample = x if params["train_size"] >= num else x[np.sort(rng.choice(num, params["train_size"], replace=False))]
        index.train(sample)
        index.nprobe = params["nprobe"]
    index.add(x)
    return index, params


def _flat_vectors(index: Any) -> np.ndarray | None:
    """The (N, d) float32 rows an exact inner-product index holds, as a view of its own memory (valid
    while ``index`` lives); ``None`` for other kinds."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT or not index.ntotal:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def exact_top_k(rows: np.ndarray, queries: np.ndarray, k: int, block_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top ``k`` of ``queries`` (Q, d) over ``rows`` (N, d): one matrix product per
    block of rows (at most ``block_bytes`` of scores) and a partial selection, merged across blocks.
    Returns ``(scores (Q, k), row indices (Q, k))`` in no particular order within a query; of rows
    tied at the k-th score the lower ones are kept.

    Why not ``IndexFlatIP.search``: on the reference machine FAISS's flat search ran at about a fifth
    of the speed of the same product through numpy's BLAS (BENCHMARKS.md, "Stage one over a million
    videos"); the index still holds the vectors, so stored indexes do not change."""
    n, nq = rows.shape[0], queries.shape[0]
    k = int(min(k, n))
    step = int(max(4096, block_bytes // (4 * max(nq, 1))))
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for lo in range(0, n, step):
        sc = queries @ rows[lo:lo + step].T
        s, i = _top_k_rows(sc, k)
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i + lo], axis=1)
        if best_s.shape[1] > k:
            keep = _top_k_positions(best_s, best_i, k)
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_s, best_i


def _top_k_rows(sc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of each row of ``sc`` (scores, columns); of columns tied at the k-th score the
    lower ones are kept."""
    m = sc.shape[1]
    if k >= m:
        cols = np.broadcast_to(np.arange(m), sc.shape)
        return sc.copy(), np.array(cols, dtype=np.int64)
    cols = np.argpartition(-sc, k - 1, axis=1)[:, :k]
    return np.take_along_axis(sc, cols, 1), _lowest_at_ties(sc, cols, k)


def _lowest_at_ties(sc: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """``cols`` (a top-k selection of each row of ``sc``), with the rows whose k-th score is tied
    outside the selection re-selected so the lower columns win the tie."""
    kth = np.take_along_axis(sc, cols, 1).min(axis=1)
    tied = np.flatnonzero((sc >= kth[:, None]).sum(axis=1) > k)
    cols = cols.astype(np.int64)
    for r in tied:
        cand = np.flatnonzero(sc[r] >= kth[r])
        cols[r] = cand[np.lexsort((cand, -sc[r, cand]))[:k]]
    return cols


def _top_k_positions(s: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top ``k`` of each row of scores ``s`` with row ids ``i`` (lower ids win ties)."""
    return np.lexsort((i, -s), axis=1)[:, :k]


def search(index: Any, queries: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (Q, k'), rows (Q, k'))`` of each query's ``k' = min(k, N)`` best rows, best first
    (queries are made unit first); ties in score keep the lower row first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = unit_rows(queries)
    kk = int(min(k, index.ntotal))
    scores = np.empty((q.shape[0], kk), dtype=np.float32)
    rows = np.empty((q.shape[0], kk), dtype=np.int64)
    flat = _flat_vectors(index)
    for start in range(0, q.shape[0], batch):
        if flat is not None:
            d, i = exact_top_k(flat, q[start:start + batch], kk)
        else:
            d, i = index.search(q[start:start + batch], kk)
        scores[start:start + batch], rows[start:start + batch] = d, i
    # an approximate index may find fewer than k rows for a query: -1 rows, -inf scores
    scores[rows < 0] = -np.inf
    order = np.lexsort((rows, -scores), axis=1) if rows.size else np.zeros_like(rows)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def recall_at(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top ``k`` that the approximate top ``k`` holds."""
    k = int(min(k, exact_rows.shape[1], approx_rows.shape[1]))
    if exact_rows.shape[0] == 0 or k == 0:
        return float("nan")
    hits = [np.intersect1d(a[:k], e[:k]).size for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits) / k)


@dataclass
class VideoIndex:
    """A loaded (or just built) index directory: the FAISS index, its row ids and its metadata."""

    index: Any
    video_ids: list[str]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "flat"))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the ``k`` best videos of every query (see module ``search``)."""
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries of shape {queries.shape} for an index of {self.index.d}-d vectors")
        return search(self.index, queries, k)

    def check(self, *, store_fingerprint: str | None = None, split: str | None = None,
              stage_one_sha256: str | None = None, video_ids: Sequence[str] | None = None) -> None:
        """Refuse (``StoreMismatchError``) an index made from another store, split, stage one or video list."""
        where = self.path or "the index"
        m = self.meta
        if store_fingerprint is not None and m.get("store_fingerprint") != store_fingerprint:
            raise StoreMismatchError(f"{where} was built from store {str(m.get('store_fingerprint'))[:12]}, not "
                                     f"{store_fingerprint[:12]}; build one with `python cli.py index build`")
        if split is not None and m.get("split") != split:
            raise StoreMismatchError(f"{where} holds split {m.get('split')!r}, not {split!r}")
        if stage_one_sha256 is not None and (m.get("stage_one") or {}).get("sha256") != stage_one_sha256:
            raise StoreMismatchError(f"{where} was built with another stage one (sha256 "
                                     f"{str((m.get('stage_one') or {}).get('sha256'))[:12]}, given "
                                     f"{stage_one_sha256[:12]})")
        if video_ids is not None and list(video_ids) != self.video_ids:
            raise StoreMismatchError(f"{where} lists {self.size} videos that differ from the split's "
                                     f"{len(video_ids)} (the store changed since it was built?)")


def build_index(emb: np.ndarray, video_ids: Sequence[str], kind: str = "flat", options: dict | None = None,
                meta: dict | None = None, recall_queries: np.ndarray | None = None, seed: int = 0) -> VideoIndex:
    """Index ``emb`` (one row per id of ``video_ids``); an approximate kind measures its recall@10 /
    @100 against exact search on ``recall_queries`` (e.g. the split's caption embeddings)."""
    if len(video_ids) != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings for {len(video_ids)} video ids")
    t0 = time.perf_counter()
    index, params = make_index(emb, kind, options, seed=seed)
    info = {"format": INDEX_FORMAT, "version": 1, "kind": kind, "params": params, "metric": "inner product of unit "
            "vectors (cosine)", "dim": int(index.d), "count": int(index.ntotal), **dict(meta or {}),
            "build_seconds": round(time.perf_counter() - t0, 3)}
    if kind != "flat" and recall_queries is not None and len(recall_queries):
        info["recall"] = measure_recall(index, unit_rows(emb), recall_queries)  # no second copy in an index
    return VideoIndex(index, list(video_ids), info)


def measure_recall(index: Any, vectors: np.ndarray, queries: np.ndarray) -> dict:
    """Recall@10 / @100 of ``index``'s search against exact search over ``vectors`` (the unit rows it
    holds), on ``queries``."""
    k = min(100, int(index.ntotal))
    e_scores, e_rows = exact_top_k(vectors, unit_rows(queries), k)
    e_rows = np.take_along_axis(e_rows, np.lexsort((e_rows, -e_scores), axis=1), axis=1)  # best first
    _, a_rows = search(index, queries, k)
    return {"queries": int(len(queries)), "recall@10": recall_at(a_rows, e_rows, 10),
            "recall@100": recall_at(a_rows, e_rows, 100), "k_max": k, "videos": int(index.ntotal)}


def add_vectors(vi: VideoIndex, emb: np.ndarray, video_ids: Sequence[str]) -> None:
    """Add the unit rows of ``emb`` (one per id of ``video_ids``) after ``vi``'s rows, as its kind adds
    them: flat and HNSW append (HNSW links them into its graph), IVF assigns them to its trained cells
    (the cells are not trained again). Updates ``vi.video_ids`` and ``vi.meta["count"]``."""
    if len(video_ids) != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings for {len(video_ids)} video ids")
    x = unit_rows(emb)
    if x.shape[1] != vi.index.d:
        raise ValueError(f"{x.shape[1]}-d embeddings for an index of {vi.index.d}-d vectors")
    clash = set(video_ids) & set(vi.video_ids)
    if clash:
        raise ValueError(f"videos already in the index: {sorted(clash)[:3]}")
    if len(x):
        vi.index.add(x)
    vi.video_ids = list(vi.video_ids) + list(video_ids)
    vi.meta["count"] = int(vi.index.ntotal)


def index_vectors(index: Any) -> np.ndarray:
    """A copy of the (N, d) unit rows ``index`` holds, in row order, whatever its kind (read from its
    storage: nothing is recomputed and the index is not changed)."""
    faiss = _faiss()
    n, d = int(index.ntotal), int(index.d)
    flat = _flat_vectors(index)
    if flat is not None or n == 0:
        return np.array(flat if flat is not None else np.zeros((0, d), np.float32))
    if hasattr(index, "hnsw"):
        storage = faiss.downcast_index(index.storage)
        return np.array(faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d))
    ivf = faiss.extract_index_ivf(index)
    if ivf.code_size != 4 * d:
        raise ValueError(f"cannot read the vectors of a {type(ivf).__name__} (codes of {ivf.code_size} bytes)")
    out = np.empty((n, d), dtype=np.float32)
    lists = ivf.invlists
    for cell in range(ivf.nlist):
        size = lists.list_size(cell)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(cell), size).copy()
            out[ids] = faiss.rev_swig_ptr(lists.get_codes(cell), size * ivf.code_size).view(np.float32).reshape(size, d)
    return out


def _data_files(generation: int) -> dict:
    """The data files of one generation of an index directory (generation 0: the plain names)."""
    if generation == 0:
        return {"index": INDEX_FILE, "video_ids": IDS_FILE}
    return {"index": f"index.{generation}.faiss", "video_ids": f"video_ids.{generation}.json"}


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def save_index(vi: VideoIndex, out_dir: str | Path) -> Path:
    """Write the index directory (each file whole or not at all; URLs in the metadata without
    credentials or signed query, ``core.urls.redact_url``); returns it. Over an existing index the
    data files of the next generation are written first and index.json last (the commit point), so a
    reader, or a process killed meanwhile, sees the old index or the new one, never a mix."""
    faiss = _faiss()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    current = _read_meta(out) if (out / META_FILE).is_file() else None
    generation = int(current.get("generation", 0)) + 1 if current else 0
    files = _data_files(generation)
    data = np.asarray(faiss.serialize_index(vi.index), dtype=np.uint8).tobytes()
    atomic_write(out / files["index"], lambda tmp: tmp.write_bytes(data))
    write_json(out / files["video_ids"], list(vi.video_ids))
    vi.meta.update(generation=generation, files=files)
    write_json(out / META_FILE, redact_urls(vi.meta))
    for old in out.iterdir():  # the previous generation's files (and those of a writer killed before its commit)
        if DATA_FILE.match(old.name) and old.name not in files.values():
            old.unlink(missing_ok=True)
    vi.path = out
    return out


def write_meta(vi: VideoIndex) -> None:
    """Rewrite only index.json of a saved index (its data files unchanged), whole or not at all."""
    if vi.path is None:
        raise ValueError("the index was not saved")
    write_json(Path(vi.path) / META_FILE, redact_urls(vi.meta))


@contextmanager
def index_lock(path: str | Path) -> Iterator[None]:
    """Hold the writers' lock of an index directory (``.lock``, ``fcntl``): one ``index add`` at a time."""
    import fcntl

    p = Path(path)
    fd = os.open(p / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_index_dir(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / META_FILE).is_file()):
        return False
    files = (_read_meta(p) or {}).get("files") or _data_files(0)
    name = files.get("index") if isinstance(files, dict) else None
    return isinstance(name, str) and bool(DATA_FILE.match(name)) and (p / name).is_file()


def load_index(path: str | Path, nprobe: int | None = None, ef_search: int | None = None) -> VideoIndex:
    """Read an index directory; ``nprobe`` / ``ef_search`` override an approximate index's search width."""
    faiss = _faiss()
    p = Path(path)
    if not is_index_dir(p):
        raise FileNotFoundError(f"{p}: not an index directory (no {META_FILE} / {INDEX_FILE}; "
                                f"build one with `python cli.py index build`)")
    for attempt in (1, 2):  # a writer may replace the generation between reading index.json and its files
        try:
            meta = json.loads((p / META_FILE).read_text())
            files = meta.get("files") or _data_files(0)
            if not all(isinstance(files.get(k), str) and DATA_FILE.match(files[k]) for k in ("index", "video_ids")):
                raise ValueError(f"{META_FILE} names data files {files!r}, not those of an index directory")
            ids = json.loads((p / files["video_ids"]).read_text())
            raw = np.fromfile(p / files["index"], dtype=np.uint8)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{p}: cannot read the index metadata: {exc}") from exc
    if meta.get("format") != INDEX_FORMAT:
        raise ConfigError(f"{p / META_FILE}: not an index of this project (format {meta.get('format')!r})")
    index = faiss.deserialize_index(raw)
    if index.ntotal != len(ids):
        raise ConfigError(f"{p}: the index holds {index.ntotal} vectors but {files['video_ids']} lists {len(ids)} ids")
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search)
    return VideoIndex(index, ids, meta, p)
