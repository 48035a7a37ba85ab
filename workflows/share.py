"""The work behind the ``cache`` commands that share stores: info, verify (and repair), pull, HDF5
export and import (docs/SHARING.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import UsageError


def info(store: str) -> dict:
    """``pipeline.sharing.store_info`` of the store at ``store``."""
    from pipeline.sharing import store_info

    return store_info(store)


def verify(store: str, progress: bool = True, expect: str | None = None) -> Any:
    """Recompute the store's checksums and its digest (``pipeline.integrity.verify``; ``expect``: the digest
    it must have)."""
    from pipeline.integrity import verify as verify_store
    from pipeline.store import CacheStore

    return verify_store(CacheStore.open(store), progress=progress, expect=expect)


def repair(store: str, report: Any, manifest: Any, encoder: str, device: str = "cpu", workers: int = 2,
           timeout: float = 60.0, progress: bool = True, decode_fn: Any = None) -> Any:
    """Re-extract just the shards ``report`` (a ``VerifyReport``) names, from the store's own manifest
    (its videos at hand) with ``encoder`` (checked against the store's identity); every other shard is
    left as it is. Returns the store's verification afterwards."""
    from core.identity import EXTRACTION_KEY
    from pipeline.config import ExtractConfig
    from pipeline.encoders import parse_encoder
    from pipeline.extraction.job import extract
    from pipeline.extraction.thumbnail_backfill import add_thumbnails
    from pipeline.sampling import strategy_fps
    from pipeline.store import CacheStore

    s = CacheStore.open(store, mode="r+")
    if manifest.sha256() != s.attrs.get("manifest_sha256"):
        raise UsageError(f"--manifest: not the manifest the store was built from (hash {manifest.sha256()[:12]} vs "
                         f"the store's {str(s.attrs.get('manifest_sha256'))[:12]})")
    if s.attrs.get("sampling", {}).get("strategy") == "external":
        raise UsageError(f"{store}: imported from another tool's features; it cannot be re-extracted here")
    videos, texts, thumbs = (report.bad_shards(k) for k in ("videos", "texts", "thumbnails"))
    s.reset_shards(videos)
    s.reset_text_shards(texts)
    if s.has_thumbnails:
        s.reset_thumbnail_shards(sorted(set(thumbs) | set(videos)))
    a = s.attrs
    spec = parse_encoder(encoder)
    layer = a["encoder"].get("token_layer")
    ext = a["encoder"].get(EXTRACTION_KEY) or {}  # computed as the store's features were (a store refuses others)
    cfg = ExtractConfig(num_frames=int(a["sampling"]["num_frames"]), sample_fps=strategy_fps(a["sampling"]["strategy"]),
                        precision=ext.get("precision", "auto"),
                        resize=ext.get("resize") if ext.get("resize") in ("worker", "device") else "auto",
                        shard_size=s.shard_size, text_shard_size=s.text_shard_size,
                        max_text_tokens=int(a["max_text_tokens"]), compressor=a.get("compressor"), workers=workers,
                        timeout=timeout, token_layer=layer,
                        thumbnails=int((a.get("thumbnails") or {}).get("count", 0)))
    extract(manifest, [spec], [store], cfg, device=device, progress=progress, decode_fn=decode_fn)
    if s.has_thumbnails and set(thumbs) - set(videos):
        add_thumbnails(store, manifest, workers=workers, timeout=timeout, progress=progress, decode_fn=decode_fn)
    return verify(store, progress=progress)


def pull(url: str, dest: str, progress: bool = True, expect: str | None = None) -> tuple[Any, Any]:
    """Copy a store to local disk, resumable and verified (``pipeline.sharing.pull``; ``expect``: the
    store digest the source and the copy must have)."""
    from pipeline.sharing import pull as pull_store

    return pull_store(url, dest, progress=progress, expect=expect)


def export_h5(store: str, out: str, progress: bool = True) -> Path:
    """The store as one HDF5 file (``pipeline.hdf5io.export_hdf5``)."""
    from pipeline.hdf5io import export_hdf5
    from pipeline.store import CacheStore

    return export_hdf5(CacheStore.open(store), out, progress=progress)


def import_h5(path: str, store: str, manifest: Any = None, num_frames: int | None = None, shard_size: int = 64,
              compressor: str | None = None, progress: bool = True, limits: dict | None = None) -> str:
    """A new store from an HDF5 file: one ``cache export`` wrote (round trip), or per-frame features
    of another tool in the minimal layout (needs the ``manifest`` of their videos and captions), checked
    against ``limits`` (``pipeline.hdf5_checks.ImportLimits`` fields). Returns a summary, with a line per foreign
    attribute left out."""
    import warnings

    from pipeline.hdf5_checks import ForeignAttributeWarning, ImportLimits
    from pipeline.hdf5_features import import_features
    from pipeline.hdf5io import import_hdf5, is_store_export

    if not Path(path).is_file():
        raise UsageError(f"{path}: no such HDF5 file")
    bounds = ImportLimits.from_options(limits or {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ForeignAttributeWarning)
        if is_store_export(path):
            s = import_hdf5(path, store, progress=progress, limits=bounds)
            line = f"imported {path} -> {store}: {s.num_videos} videos, {s.num_captions} captions"
        elif manifest is None:
            raise UsageError(f"{path}: per-frame features of another tool; give --manifest DIR (or --dataset) with "
                             f"their videos and captions (docs/SHARING.md)")
        else:
            line = import_features(path, store, manifest, num_frames=num_frames, shard_size=shard_size,
                                   compressor=compressor, progress=progress, limits=bounds).summary()
    foreign = [w for w in caught if issubclass(w.category, ForeignAttributeWarning)]
    for w in caught:
        if w not in foreign:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return "\n".join([line] + [str(w.message) for w in foreign])


def dumps(obj: Any) -> str:
    """JSON for ``--json`` outputs."""
    from core.fileio import jsonable

    return json.dumps(jsonable(obj), indent=1, sort_keys=True)
