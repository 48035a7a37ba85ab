"""The offline extraction job, one module per stage, in the order a run takes them.

- ``plan``: what to extract: the manifest's rows in store order, the stores opened (grown, checked),
  the shards still to do (skip-if-done, ``--retry-failed``, ``--part``), the single-grower wait of
  remote stores;
- decoding: ``pipeline.decode`` (one video) and ``pipeline.decode_pool`` (the worker processes);
- ``captions``: the captions' text shards, encoded and committed while the decoders start;
- ``encode``: decoded videos through the encoders in frame batches (pinned copies up and back, one
  batch in flight), shard by shard;
- ``write``: whole shards committed (``pipeline.store.commit``) by a writer thread;
- ``report``: the run report and ``finalize_stores`` (consolidation, failure lists, totals);
- ``job``: ``extract()``, which wires the stages in that order.

``thumbnail_backfill`` is a job of its own: thumbnails for a store made without them.
"""
