"""The run report of an extraction, and ``finalize_stores``: consolidation, failure lists, totals."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from pipeline.store import STATUS_FAILED, STATUS_OK, STATUS_PENDING, CacheStore
from pipeline.store.failures import failure_list_location, write_failure_list


@dataclass
class ExtractReport:
    """What one ``extract`` call did, and what its stores hold afterwards."""

    stores: list[str]
    videos: int = 0            # videos in the manifest
    ok: int = 0                # decoded and encoded in this run
    failed: int = 0            # failed in this run (reason in ``failures``)
    skipped: int = 0           # already done in every store
    retried: int = 0           # videos of shards decoded again for --retry-failed
    captions_encoded: int = 0  # captions encoded in this run (per encoder counted once)
    captions_skipped: int = 0
    seconds: float = 0.0
    decode_wait_seconds: float = 0.0   # time the encoder loop waited for decoded videos
    encode_seconds: float = 0.0        # video encoding incl. preprocessing
    text_seconds: float = 0.0
    write_seconds: float = 0.0         # store writes of video shards (in the writer thread unless write_queue=0)
    write_wait_seconds: float = 0.0    # time the encoder loop waited for the writer (its queue full)
    frames_encoded: int = 0            # per encoder
    precision: str = ""                # the encoders' compute precision (fp32, bf16, fp16)
    device: str = ""
    failures: dict[str, str] = field(default_factory=dict)  # failed in this run: short reason
    decoders: dict[str, int] = field(default_factory=dict)  # videos served by each decoder, this run
    totals: dict[str, dict] = field(default_factory=dict)   # per store: ok / failed / pending, failure list
    appended: dict[str, dict] = field(default_factory=dict)  # per grown store: {"videos", "captions"} appended

    def summary(self) -> str:
        """For humans: this run, then every store's totals and where its failure list is."""
        rate = self.ok / self.seconds if self.seconds > 0 else 0.0
        used = ", ".join(f"{n} by {d}" for d, n in sorted(self.decoders.items()))
        lines = [f"store {p}: grown by {n['videos']} videos and {n['captions']} captions (a grown manifest; "
                 f"the store's rows kept)" for p, n in self.appended.items()]
        lines += [f"this run: videos {self.ok} ok ({used or 'none decoded'}), {self.failed} failed, "
                 f"{self.skipped} skipped (done), {self.retried} retried, of {self.videos}; captions "
                 f"{self.captions_encoded} encoded, {self.captions_skipped} skipped; {self.seconds:.1f}s "
                 f"({rate:.2f} videos/s)"]
        if self.frames_encoded:
            lines.append(f"encoders at {self.precision} on {self.device}: {self.frames_encoded} frames in "
                         f"{self.encode_seconds:.1f}s; the loop waited {self.decode_wait_seconds:.1f}s for decoding "
                         f"and {self.write_wait_seconds:.1f}s for the store writer ({self.write_seconds:.1f}s of writes)")
        for path, t in self.totals.items():
            where = f"; failures listed in {t['failure_list']}" if t.get("failure_list") else ""
            lines.append(f"store {path}: {t['ok']} ok, {t['failed']} failed, {t['pending']} pending of "
                         f"{t['videos']} videos{where}")
        return "\n".join(lines)

    @property
    def store_failed(self) -> int:
        """The most failed videos any of the stores holds after the run."""
        return max((t["failed"] for t in self.totals.values()), default=0)

    @property
    def store_pending(self) -> int:
        """The most videos any store still lacks (shards of other parts, or not reached)."""
        return max((t["pending"] for t in self.totals.values()), default=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def merged(cls, reports: Sequence[dict]) -> "ExtractReport":
        """One report of several processes' parts of one job (``to_dict`` of each, the first one's
        stores, videos, precision and device): counts and times added up, ``seconds`` the longest,
        what was done before the run (``skipped``) as the process that looked first saw it (the others
        may see shards written meanwhile), per-video and per-decoder dicts joined; ``totals`` empty
        (the stores' totals come after consolidation)."""
        first = reports[0]
        out = cls(stores=list(first["stores"]), videos=first["videos"], precision=first["precision"],
                  device=first["device"])
        for f in fields(cls):
            name = f.name
            if name in ("stores", "videos", "precision", "device", "totals"):
                continue
            values = [r[name] for r in reports]
            if name in ("skipped", "captions_skipped"):
                setattr(out, name, min(values))
            elif name == "seconds":
                out.seconds = max(values)
            elif name == "decoders":
                for v in values:
                    for k, n in v.items():
                        out.decoders[k] = out.decoders.get(k, 0) + n
            elif isinstance(values[0], dict):
                for v in values:
                    getattr(out, name).update(v)
            else:
                setattr(out, name, sum(values))
        return out


def finalize_stores(store_paths: Sequence[str | os.PathLike], report: ExtractReport,
                    stores: Sequence[CacheStore] | None = None) -> ExtractReport:
    """The end of an extraction: each store's consolidated metadata, its failure list
    (``failures.json`` of a local store) and its totals in ``report``."""
    if stores is None:
        stores = [CacheStore.open(p, mode="r+") for p in store_paths]
    for store, path in zip(stores, store_paths):
        store.consolidate()
        status = write_failure_list(store)
        totals = {"videos": int(status.size), "ok": int((status == STATUS_OK).sum()),
                  "failed": int((status == STATUS_FAILED).sum()), "pending": int((status == STATUS_PENDING).sum()),
                  "failure_list": failure_list_location(path)}
        report.totals[os.fspath(path)] = totals
    return report
