"""What a store holds and how its values are encoded: the layout, its constants, fixed-width strings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.errors import StoreError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 stored strings as zarr-python's variable-length strings
FORMAT = "crosstvr-feature-cache"
CREATED_BY = "pipeline.store (crosstvr-cache 0.1.0)"
STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
ERROR_BYTES = 200  # the short failure reason ("kind: one line"), shortened by design
DETAIL_BYTES = 1000  # the decoder's raw message, shortened by design
DECODER_BYTES = 16  # which decoder served the video (decord, pyav)
MAX_STRING_BYTES = 4096  # ids and split names: wider values are refused, never cut (StoreError)
THUMBNAIL_ARRAYS = ("videos/thumbnails", "videos/thumbnail_bytes")
THUMBNAILS_DONE = "shards/thumbnails_done"
# what a video / text shard's checksum record covers (each array's objects of that shard)
VIDEO_SHARD_ARRAYS = ("videos/ids", "videos/split", "videos/source", "videos/status", "videos/error",
                      "videos/error_detail", "videos/decoder", "videos/tokens", "videos/frame_emb",
                      "videos/frame_mask", "videos/frame_index", "videos/frame_time")
TEXT_SHARD_ARRAYS = ("texts/ids", "texts/split", "texts/source", "texts/video_index", "texts/tokens", "texts/mask",
                     "texts/emb")
# the string arrays whose values are given by the manifest: widened on append, never truncated
GIVEN_STRINGS = ("videos/ids", "videos/split", "texts/ids", "texts/split")
DONE_ARRAYS = {"videos": "shards/done", "texts": "shards/text_done", "thumbnails": THUMBNAILS_DONE}
LOCK_FILE = ".lock"  # the local store's writer lock (store_lock); not part of the zarr hierarchy
COMPRESSORS = ("zstd", "blosc-zstd", "blosc-lz4")  # of the token arrays (--compressor); bench/store_size.py
SOURCE_BYTES = 16  # videos/source, texts/source: the first bytes of each manifest row's sha256
APPEND_PREFIX = "append"  # append/<kind>-<shard>.npz: old rows of a partial shard an append reopened
JOURNAL_KEY = f"{APPEND_PREFIX}/journal.npz"  # an append's intent, written before it changes anything
FAILURES_JSON = "failures.json"
# Keys of the attrs that must equal the request for a store to be reused.
MATCH_KEYS = ("dataset", "manifest_sha256", "encoder", "sampling",
              "max_text_tokens", "shard_size", "text_shard_size", "num_videos", "num_captions")


@dataclass(frozen=True)
class StoreLayout:
    """What a store holds: identity of its content plus array sizes."""

    dataset: str
    manifest_sha256: str
    encoder: dict
    num_frames: int
    num_tokens: int
    token_dim: int
    embed_dim: int
    text_dim: int
    max_text_tokens: int = 32
    shard_size: int = 64
    text_shard_size: int = 1024
    strategy: str = "uniform-midpoint"
    compressor: str | None = None

    def attrs(self, num_videos: int, num_captions: int) -> dict:
        """The store's root attributes."""
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "manifest_sha256": self.manifest_sha256,
            "encoder": json.loads(json.dumps(self.encoder)),
            "sampling": {"num_frames": int(self.num_frames), "strategy": self.strategy},
            "max_text_tokens": int(self.max_text_tokens),
            "shard_size": int(self.shard_size),
            "num_shards": ceil_div(num_videos, self.shard_size),
            "text_shard_size": int(self.text_shard_size),
            "num_text_shards": ceil_div(num_captions, self.text_shard_size),
            "num_videos": int(num_videos),
            "num_captions": int(num_captions),
            "dims": {"num_tokens": self.num_tokens, "token_dim": self.token_dim,
                     "embed_dim": self.embed_dim, "text_dim": self.text_dim},
            "compressor": self.compressor,
            "created_by": CREATED_BY,
        }


def layout_dict(layout: StoreLayout) -> dict:
    """A layout as a plain dict (for reports)."""
    return asdict(layout)


def row_digest(*fields: Any) -> bytes:
    """The digest of one manifest row (its id and everything extraction reads from it) that a store
    keeps, so that a grown manifest can be told from one whose existing rows changed."""
    return hashlib.sha256(json.dumps([None if f is None else str(f) for f in fields]).encode()).digest()[:SOURCE_BYTES]


def digest_rows(values: Sequence[bytes], n: int) -> np.ndarray:
    """Row digests as the ``(n, SOURCE_BYTES)`` uint8 array ``videos/source`` / ``texts/source`` hold."""
    out = np.zeros((n, SOURCE_BYTES), dtype=np.uint8)
    for i, b in enumerate(values):
        out[i] = np.frombuffer(bytes(b)[:SOURCE_BYTES].ljust(SOURCE_BYTES, b"\0"), dtype=np.uint8)
    return out


def manifest_version(sha: str, videos: int, captions: int) -> dict:
    """One entry of ``attrs["manifest_history"]``."""
    return {"manifest_sha256": sha, "num_videos": int(videos), "num_captions": int(captions)}


def thumbnail_info(count: int, max_side: int, max_bytes: int) -> dict:
    """``attrs["thumbnails"]``."""
    return {"count": int(count), "max_side": int(max_side), "max_bytes": int(max_bytes), "format": "jpeg"}


def ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def fingerprint_of(attrs: dict) -> str:
    """sha256 of what determines a store's content: schema, encoder identity, sampling,
    manifest hash and text length."""
    key = {k: attrs.get(k) for k in ("schema_version", "encoder", "sampling", "manifest_sha256",
                                     "max_text_tokens")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def codecs(compressor: str | None) -> Any:
    """The zarr codecs of the token arrays for ``--compressor`` (``None``: uncompressed)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if compressor in (None, "", "none"):
        return None
    if compressor == "zstd":
        return (ZstdCodec(level=3),)
    if compressor == "blosc-zstd":
        return (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)
    if compressor == "blosc-lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    raise StoreError(f"unknown compressor {compressor!r} (none, {', '.join(COMPRESSORS)})")


def string_width(values: Sequence[str]) -> int:
    """Bytes the longest of ``values`` takes as UTF-8 (at least 1)."""
    return max([len(str(v).encode("utf-8")) for v in values] + [1])


def check_given_strings(name: str, values: Sequence[str]) -> int:
    """The width ``values`` of the manifest-given string array ``name`` need; ``StoreError`` naming the
    value when one is wider than ``MAX_STRING_BYTES`` (never stored cut)."""
    for v in values:
        n = len(str(v).encode("utf-8"))
        if n > MAX_STRING_BYTES:
            raise StoreError(f"{name}: value {_short(str(v))} is {n} bytes, wider than the store's limit of "
                             f"{MAX_STRING_BYTES} bytes")
    return string_width(values)


def encode_strings(values: Sequence[str], width: int = 0, cut: bool = False, name: str = "strings") -> np.ndarray:
    """``values`` as zero-padded UTF-8 bytes, ``uint8 (N, width)`` (``width`` 0: the longest). A longer
    value is cut at a character boundary only with ``cut=True`` (the store's own messages, shortened by
    design); otherwise it is a ``StoreError`` naming the value and the width. Any zarr reader gets the
    row -> id mapping."""
    raw = [str(v).encode("utf-8") for v in values]
    w = int(width) or max([len(b) for b in raw] + [1])
    out = np.zeros((len(raw), w), dtype=np.uint8)
    for i, b in enumerate(raw):
        if len(b) > w:
            if not cut:
                raise StoreError(f"{name}: value {_short(b.decode('utf-8', 'replace'))} is {len(b)} bytes, "
                                 f"wider than the array's {w}")
            b = b[:w].decode("utf-8", "ignore").encode("utf-8")
        out[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def decode_strings(values: Any) -> list[str]:
    """The strings of ``encode_strings`` (or of a variable-length string array, schema version 1)."""
    a = np.asarray(values)
    if a.dtype == np.uint8 and a.ndim == 2:
        a = np.ascontiguousarray(a)
        return [b.decode("utf-8", "replace") for b in a.view(f"S{a.shape[1]}").reshape(-1).tolist()]
    return [str(v) for v in a.tolist()]


def _short(value: Any) -> str:
    s = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    s = s if len(s) <= 120 else s[:117] + "..."
    return repr(s) if isinstance(value, str) else s


def short(value: Any) -> str:
    """``value`` as JSON, cut to 120 characters (for messages)."""
    s = json.dumps(value, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."
