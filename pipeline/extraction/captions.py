"""The captions' pass: every text shard a store lacks, encoded in batches and committed whole."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from core.errors import EncoderError
from pipeline.encoder_base import Encoder
from pipeline.extraction.plan import in_part
from pipeline.extraction.report import ExtractReport
from pipeline.store import CacheStore
from pipeline.store.rows import Rows


def encode_captions(encs: Sequence[Encoder], stores: Sequence[CacheStore], rows: Rows, max_text_tokens: int,
                    batch: int, part: tuple[int, int] | None, report: ExtractReport, progress: bool) -> None:
    """Encode and commit (``CacheStore.write_text_shard``) every text shard of this ``part`` a store lacks,
    ``batch`` captions per forward pass; rows an append kept aside are taken from the store, not encoded."""
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    counted: set[int] = set()
    for enc, store in zip(encs, stores):
        done = store.done_text_shards()
        pending = [j for j in range(store.num_text_shards) if j not in done and in_part(j, part)]
        sizes = [store.text_shard_range(j) for j in pending]
        bar = tqdm(total=sum(b - a for a, b in sizes),
                   unit="caption", desc=f"texts {enc.spec.short_name()}",
                   disable=not progress or not pending, leave=False)
        for j in range(store.num_text_shards):
            lo, hi = store.text_shard_range(j)
            if j not in pending:
                if j in done and j not in counted:
                    report.captions_skipped += hi - lo
                counted.add(j)
                continue
            keep = store.num_kept_rows("texts", j)  # rows an append kept aside: taken from there, not encoded
            shape = store.array("texts/tokens").shape[1:]
            toks = [np.zeros((keep,) + shape, np.float16)]
            masks = [np.zeros((keep, shape[0]), bool)]
            embs = [np.zeros((keep, store.array("texts/emb").shape[1]), np.float32)]
            bar.update(keep)
            for b in range(lo + keep, hi, batch):
                try:
                    with enc.autocast():
                        t, m, e = enc.encode_texts(rows.caption_texts[b:min(hi, b + batch)],
                                                   max_tokens=max_text_tokens)
                except torch.cuda.OutOfMemoryError as exc:
                    raise EncoderError(f"{enc.device.type.upper()} out of memory encoding {min(hi, b + batch) - b} "
                                       f"captions with {enc.spec}: lower --text-batch-size (now {batch})") from exc
                toks.append(t.to(torch.float16).cpu().numpy())
                masks.append(m.cpu().numpy())
                embs.append(e.float().cpu().numpy())
                bar.update(min(hi, b + batch) - b)
            store.write_text_shard(j, tokens=np.concatenate(toks), mask=np.concatenate(masks),
                                   emb=np.concatenate(embs))
            if j not in counted:
                report.captions_encoded += hi - lo - keep
                report.captions_skipped += keep
                counted.add(j)
        bar.close()
    report.text_seconds += time.perf_counter() - t0
