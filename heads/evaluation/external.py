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

Accepted files: ``heads.evaluation.external_files``.

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
from tqdm.auto import tqdm

from core.errors import ExternalFormatError, StoreMismatchError
from core.fileio import atomic_write, jsonable, sha256_file, write_json
from heads.evaluation.external_files import first_ids, kind_of, read_embeddings, read_similarity

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
_BLOCK = 4096  # caption rows per block of the similarity product


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
    coverage: dict = field(default_factory=dict)  # pipeline.store.CacheStore.split_coverage


def split_ids_from_store(store: Any, split: str) -> SplitIds:
    """Video and caption ids of ``split`` in a feature store (an open ``pipeline.store.CacheStore``),
    in the order staging uses (``CacheStore.split_rows``)."""
    rows, crows, caption_video = store.split_rows(split)
    vids, cids = store.video_ids, store.caption_ids
    return SplitIds(split=split, video_ids=[vids[r] for r in rows], caption_ids=[cids[c] for c in crows],
                    store_fingerprint=store.fingerprint, encoder_identity=dict(store.encoder_identity),
                    known_video_ids=frozenset(vids), known_caption_ids=frozenset(cids), caption_video=caption_video,
                    coverage=store.split_coverage(split))


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
                                  + first_ids(f"{k} (x{v})" for k, v in dup.items()))
    want = set(wanted)
    known_all = want | set(known)
    unknown = [x for x in file_ids if x not in known_all]
    if unknown:
        raise ExternalFormatError(f"{path}: {len(unknown)} {what} id(s) are not in the store: {first_ids(unknown)}")
    missing = [x for x in wanted if x not in pos]
    if missing:
        raise ExternalFormatError(f"{path}: lacks {len(missing)} of the {len(want)} {what} ids of split "
                                  f"{split!r}: {first_ids(missing)}")
    idx = np.fromiter((pos[x] for x in wanted), dtype=np.int64, count=len(wanted))
    return idx, len(file_ids) - len(wanted)


def _check_rows_finite(arr: np.ndarray, ids: Sequence[str], path: Path, what: str) -> None:
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ExternalFormatError(f"{path}: {len(rows)} {what} row(s) hold NaN/inf, ids "
                                  f"{first_ids(ids[r] for r in rows)}")


def _unit(emb: np.ndarray, ids: Sequence[str], path: Path, what: str) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    zero = norms[:, 0] <= np.finfo(np.float64).tiny
    if zero.any():
        rows = np.flatnonzero(zero)
        raise ExternalFormatError(f"{path}: {len(rows)} {what} embedding(s) are zero vectors and cannot be "
                                  f"L2-normalised: ids {first_ids(ids[r] for r in rows)} (use --no-normalize "
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

    def summary(self) -> str:
        """One line: what was imported, from what, and which ids were dropped."""
        i = self.identity
        return (f"{i['num_captions']} captions x {i['num_videos']} videos of split {i['split']!r} "
                f"({i['similarity_from']}); dropped ids of other splits: {i['dropped_other_ids']}")

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
        sources = _sources([("similarity", sp, kind_of(sp))])
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
        sources = _sources([("video_emb", vp, kind_of(vp)), ("text_emb", tp, kind_of(tp))])
        how = "cosine of L2-normalised embeddings" if normalize else "dot product of raw embeddings"
        embed_dim = int(v.shape[1])
        sim = None
        sim_iter = (v, t)

    out.mkdir(parents=True, exist_ok=True)

    def write_similarity(tmp: Path) -> None:
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

    final = atomic_write(out / SIMILARITY_NPY, write_similarity)
    write_json(out / IDS_JSON, {"caption_ids": cids, "video_ids": vids}, indent=None)
    identity = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "name": name or out.name,
        "split": split_name,
        "store_fingerprint": str(split.store_fingerprint),
        "store_encoder_identity": jsonable(getattr(split, "encoder_identity", {}) or {}),
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
    write_json(out / EXTERNAL_JSON, identity)
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
            f"{len(w - h)} missing ({first_ids(sorted(w - h))}), {len(h - w)} extra ({first_ids(sorted(h - w))}); "
            f"import it again")


def _positions(have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    pos = {x: i for i, x in enumerate(have)}
    return np.fromiter((pos[x] for x in want), dtype=np.int64, count=len(want))


def load_external(path: str | Path, split: Any) -> ExternalStageOne:
    """Read an imported external stage one aligned to ``split.caption_ids`` x ``split.video_ids``.

    Raises ``ExternalFormatError`` for a directory that is not an import or was made for another
    split or other ids, and ``StoreMismatchError`` when it was checked against a
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
