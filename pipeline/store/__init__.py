"""The Zarr v3 feature cache: its layout, its one commit protocol, and reading only what is committed.

docs/STORE.md describes the layout, the commit protocol and what readers and a team can rely on. The
package is split by responsibility:

- ``layout``: what a store holds (``StoreLayout``, constants, fixed-width strings);
- ``backend``: the zarr store objects (every write passes ``core.faults.gate``), opening, the lock;
- ``commit``: the commit protocol every shard write goes through, and the committed view readers use;
- ``append``: growing a store as a journaled step; ``thumbnails``: the thumbnail arrays;
- ``splits``: one split as readers take it; ``failures``: ``failures.json``; ``rows``: a manifest in
  store row order;
- ``cache``: ``CacheStore``, which puts them together.

Staging a split into local memory-mapped files is ``pipeline.staging``; checksums, the store digest and
verification are ``pipeline.integrity``.
"""

from core.errors import StoreError, StoreMismatchError
from core.split import StagedSplit
from pipeline.staging import STAGE_ARRAYS
from pipeline.store.backend import local_path, store_lock
from pipeline.store.cache import CacheStore
from pipeline.store.layout import (APPEND_PREFIX, COMPRESSORS, FAILURES_JSON, JOURNAL_KEY, LOCK_FILE,
                                   MAX_STRING_BYTES, STATUS_FAILED, STATUS_OK, STATUS_PENDING, THUMBNAIL_ARRAYS,
                                   StoreLayout, decode_strings, encode_strings, fingerprint_of, layout_dict,
                                   row_digest)

__all__ = ["CacheStore", "StoreLayout", "StagedSplit", "StoreError", "StoreMismatchError", "STAGE_ARRAYS",
           "THUMBNAIL_ARRAYS", "APPEND_PREFIX", "COMPRESSORS", "FAILURES_JSON", "JOURNAL_KEY", "LOCK_FILE",
           "MAX_STRING_BYTES", "STATUS_PENDING", "STATUS_OK", "STATUS_FAILED", "fingerprint_of", "local_path",
           "layout_dict", "row_digest", "store_lock", "decode_strings", "encode_strings"]
