"""Growing a store to a grown manifest, as a journaled step a killed writer's successor finishes."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np

from core.errors import StoreMismatchError
from core.fileio import jsonable
from pipeline.store import backend
from pipeline.store.layout import (APPEND_PREFIX, GIVEN_STRINGS, JOURNAL_KEY, MATCH_KEYS, TEXT_SHARD_ARRAYS,
                                   THUMBNAIL_ARRAYS, THUMBNAILS_DONE, VIDEO_SHARD_ARRAYS, StoreLayout, ceil_div,
                                   check_given_strings, digest_rows, encode_strings, manifest_version, short)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class AppendMixin:
    """``CacheStore.append`` and the rows it keeps aside (docs/STORE.md, "Appending").

    An append first writes its journal (``append/journal.npz``: the new manifest version and every new
    row), then keeps the old rows of a reopened partial shard aside, widens string arrays a new value needs
    wider, grows the arrays, writes the new ids, and last sets the root attributes in one write (the commit
    point), then deletes the journal. Each step can be done again; whoever opens the store for writing next
    (``recover``) finishes a journal a killed writer left. Readers go by the attributes, so until the commit
    point they see the store as it was."""

    # -- the journal ------------------------------------------------------------------------
    def append(self, layout: StoreLayout, video_ids: Sequence[str], video_splits: Sequence[str],
               caption_ids: Sequence[str], caption_video: Sequence[int], caption_splits: Sequence[str],
               video_source: Sequence[bytes] | None = None, caption_source: Sequence[bytes] | None = None) -> dict:
        """Grow the store to a grown manifest's rows: the store's own rows first, unchanged (else
        ``StoreMismatchError`` saying to make a new store), then the new ones. Old shards stay done and
        untouched; a partial last shard (video or text) is reopened, its old rows kept aside in
        ``append/<kind>-<shard>.npz`` so that the next write of that shard takes them from there rather
        than recomputing them. ``attrs["manifest_history"]`` gains the new manifest version. Idempotent;
        a killed append is finished by the next writer. Returns ``{"videos", "captions"}`` added."""
        self._check_writable()
        want = jsonable(layout.attrs(len(video_ids), len(caption_ids)))
        have = jsonable(self.attrs)
        diff = [k for k in MATCH_KEYS if k not in ("manifest_sha256", "num_videos", "num_captions")
                and want.get(k) != have.get(k)]
        if diff:
            details = "; ".join(f"{k}: store has {short(have.get(k))}, request has {short(want.get(k))}"
                                for k in diff)
            raise StoreMismatchError(f"{self.url}: existing store was made for a different request ({details}); "
                                     f"use another store path or delete it")
        widths = {name: check_given_strings(name, values) for name, values in
                  (("videos/ids", video_ids), ("videos/split", video_splits), ("texts/ids", caption_ids),
                   ("texts/split", caption_splits))}
        with backend.store_lock(self.url):
            self._reload_group()  # another writer of this store may have grown it meanwhile
            self.recover()
            if self.attrs.get("manifest_sha256") == layout.manifest_sha256:
                return {"videos": 0, "captions": 0}
            problem = self._changed_rows(video_ids, video_splits, caption_ids, caption_video, caption_splits,
                                         video_source, caption_source)
            if problem:
                raise StoreMismatchError(f"{self.url}: the manifest {problem}; a store only grows (new videos and "
                                         f"captions are appended): make a new store for this manifest "
                                         f"(another --store)")
            V0, C0, V, C = self.num_videos, self.num_captions, len(video_ids), len(caption_ids)
            S, St = self.shard_size, self.text_shard_size
            meta = {"manifest_sha256": layout.manifest_sha256, "V0": V0, "C0": C0, "V": V, "C": C,
                    "widths": widths,
                    "stash_videos": bool(V > V0 and V0 % S and (V0 // S) in self.done_shards()),
                    "stash_texts": bool(C > C0 and C0 % St and (C0 // St) in self.done_text_shards())}
            rows = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                    "videos__ids": encode_strings(video_ids[V0:], widths["videos/ids"]),
                    "videos__split": encode_strings(video_splits[V0:], widths["videos/split"]),
                    "texts__ids": encode_strings(caption_ids[C0:], widths["texts/ids"]),
                    "texts__split": encode_strings(caption_splits[C0:], widths["texts/split"]),
                    "texts__video_index": np.asarray(caption_video[C0:], dtype=np.int64)}
            if video_source is not None:
                rows["videos__source"] = digest_rows(video_source[V0:], V - V0)
            if caption_source is not None:
                rows["texts__source"] = digest_rows(caption_source[C0:], C - C0)
            self.write_object(JOURNAL_KEY, _npz(rows))  # the intent, before anything changes
            self._finish_append()
        return {"videos": V - V0, "captions": C - C0}

    def recover(self) -> bool:
        """Finish an append a killed writer left (its journal is there); whether there was one."""
        if not self.writable or self.read_object(JOURNAL_KEY) is None:
            return False
        with backend.store_lock(self.url):
            self._reload_group()
            if self.read_object(JOURNAL_KEY) is None:
                return False
            self._finish_append()
        return True

    def _finish_append(self) -> None:
        """Carry out the journal's append (each step idempotent), commit it, delete the journal."""
        with np.load(io.BytesIO(self.read_object(JOURNAL_KEY))) as z:
            rows = {n.replace("__", "/"): z[n] for n in z.files}
        meta = json.loads(rows.pop("meta").tobytes().decode())
        V0, C0, V, C = meta["V0"], meta["C0"], meta["V"], meta["C"]
        S, St = self.shard_size, self.text_shard_size
        if self.attrs.get("manifest_sha256") != meta["manifest_sha256"]:
            # 1. old rows of partial last shards aside (before anything else changes)
            if meta["stash_videos"]:
                self._stash("videos", V0 // S, V0)
            if meta["stash_texts"]:
                self._stash("texts", C0 // St, C0)
            # 2. string arrays widened where a new value needs it (old chunks unchanged: zero padding)
            for name in GIVEN_STRINGS:
                a = self.array(name)
                if a.ndim == 2 and a.shape[1] < int(meta["widths"][name]):
                    a.resize((a.shape[0], int(meta["widths"][name])))
            # 3. the arrays grow (chunks of old rows unchanged), new rows written
            for name in self._array_names():
                a = self.array(name)
                if name.startswith("videos/"):
                    new = (V,) + a.shape[1:]
                elif name.startswith("texts/"):
                    new = (C,) + a.shape[1:]
                elif name in ("shards/done", THUMBNAILS_DONE):
                    new = (ceil_div(V, S),)
                else:
                    new = (ceil_div(C, St),)
                if a.shape != new:
                    a.resize(new)
            for name, value in rows.items():
                if name in self._cache or self.has_array(name):
                    a = self.array(name)
                    lo = V0 if name.startswith("videos/") else C0
                    if value.ndim == 2 and a.ndim == 2 and value.shape[1] < a.shape[1]:
                        value = np.pad(value, ((0, 0), (0, a.shape[1] - value.shape[1])))
                    if len(value):
                        a[lo:lo + len(value)] = value
            if V > V0 and V0 % S:
                self.array("shards/done")[V0 // S] = False
                if self.has_thumbnails:
                    self.array(THUMBNAILS_DONE)[V0 // S] = False
            if C > C0 and C0 % St:
                self.array("shards/text_done")[C0 // St] = False
            # 4. the commit point: the attributes say what the store now holds, in one write
            history = list(self.attrs.get("manifest_history")
                           or [manifest_version(self.attrs["manifest_sha256"], V0, C0)])
            history.append(manifest_version(meta["manifest_sha256"], V, C))
            update = {"manifest_sha256": meta["manifest_sha256"], "num_videos": V, "num_captions": C,
                      "num_shards": ceil_div(V, S), "num_text_shards": ceil_div(C, St),
                      "manifest_history": history}
            backend.set_attrs(self._g, update)
            self.attrs.update(update)
        self.delete_object(JOURNAL_KEY)
        self._cache = {}
        self.consolidate()

    def _array_names(self) -> list[str]:
        names = [*VIDEO_SHARD_ARRAYS, *TEXT_SHARD_ARRAYS, "shards/done", "shards/text_done"]
        if self.has_thumbnails:
            names += [*THUMBNAIL_ARRAYS, THUMBNAILS_DONE]
        return [n for n in names if self.has_array(n)]

    def _changed_rows(self, video_ids: Sequence[str], video_splits: Sequence[str], caption_ids: Sequence[str],
                      caption_video: Sequence[int], caption_splits: Sequence[str],
                      video_source: Sequence[bytes] | None, caption_source: Sequence[bytes] | None) -> str:
        """What the grown manifest removes or changes of the store's rows ("" when nothing)."""
        V0, C0 = self.num_videos, self.num_captions
        old_v, old_c = self.video_ids, self.caption_ids
        if len(video_ids) < V0 or list(video_ids[:V0]) != old_v:
            gone = sorted(set(old_v) - set(video_ids))
            return f"lacks {len(gone)} of the store's videos (first: {gone[0]!r})" if gone else \
                "lists the store's videos in another order"
        if len(caption_ids) < C0 or list(caption_ids[:C0]) != old_c:
            gone = sorted(set(old_c) - set(caption_ids))
            return f"lacks {len(gone)} of the store's captions (first: {gone[0]!r})" if gone else \
                "lists the store's captions in another order"
        splits = self.strings("videos/split")
        moved = [v for v, a, b in zip(old_v, splits, video_splits) if a != b]
        if moved:
            return f"moves {len(moved)} of the store's videos to another split (first: {moved[0]!r})"
        vidx = self.caption_video()
        changed = [c for c, a, b in zip(old_c, vidx.tolist(), caption_video) if a != b]
        if changed:
            return f"gives {len(changed)} of the store's captions another video (first: {changed[0]!r})"
        for name, ids, source in (("videos", old_v, video_source), ("texts", old_c, caption_source)):
            if source is None or not self.has_array(f"{name}/source") or not ids:
                continue
            stored = np.asarray(self.array(f"{name}/source")[:len(ids)])
            given = digest_rows(source[:len(ids)], len(ids))
            diff = np.flatnonzero((stored != given).any(axis=1))
            if diff.size:
                what = "videos (start, end or split)" if name == "videos" else "captions (text)"
                return f"changes {diff.size} of the store's {what} (first: {ids[int(diff[0])]!r})"
        return ""

    # -- rows kept aside --------------------------------------------------------------------
    def _stash(self, kind: str, index: int, end: int) -> None:
        """Keep the rows ``[start of shard, end)`` of shard ``index`` aside (``append/<kind>-<index>.npz``)."""
        key = f"{APPEND_PREFIX}/{kind}-{int(index)}.npz"
        if self.read_object(key) is not None:
            return
        if kind == "videos":
            lo = index * self.shard_size
            names = [n for n in (*VIDEO_SHARD_ARRAYS, *(THUMBNAIL_ARRAYS if self.has_thumbnails else ()))
                     if self.has_array(n) and n not in ("videos/ids", "videos/split", "videos/source")]
        else:
            lo = index * self.text_shard_size
            names = [n for n in TEXT_SHARD_ARRAYS if n not in ("texts/ids", "texts/split", "texts/source",
                                                                "texts/video_index")]
        self.write_object(key, _npz({n.replace("/", "__"): np.asarray(self.array(n)[lo:end]) for n in names}))

    def kept_rows(self, kind: str, index: int) -> dict[str, np.ndarray]:
        """The rows of shard ``index`` an append kept aside (array name -> rows from the shard's first),
        which the shard's next write takes instead of recomputing them; ``{}`` when none."""
        if int(index) not in self.reopened_shards(kind):
            return {}
        data = self.read_object(f"{APPEND_PREFIX}/{kind}-{int(index)}.npz")
        if data is None:
            return {}
        with np.load(io.BytesIO(data)) as z:
            return {n.replace("__", "/"): z[n] for n in z.files}

    def reopened_shards(self, kind: str) -> set[int]:
        """The shards of ``kind`` (videos / texts) an append reopened: each earlier manifest version's
        partial last shard (``attrs["manifest_history"]``); only they can have rows kept aside."""
        count, size = (("num_videos", self.shard_size) if kind == "videos" else
                       ("num_captions", self.text_shard_size))
        history = self.attrs.get("manifest_history") or []
        return {int(v[count]) // size for v in history[:-1] if int(v[count]) % size}

    def num_kept_rows(self, kind: str, index: int) -> int:
        """How many leading rows of shard ``index`` an append kept aside (0: none)."""
        kept = self.kept_rows(kind, index)
        return len(next(iter(kept.values()))) if kept else 0

    def _merge_kept(self, kind: str, index: int, data: dict[str, np.ndarray]) -> bool:
        """Put the rows an append kept aside over ``data`` (one shard's arrays); whether there were any."""
        kept = self.kept_rows(kind, index)
        for name, rows in kept.items():
            if name in data:
                data[name] = np.array(data[name], copy=True)
                data[name][:len(rows)] = rows
        return bool(kept)

    def _drop_kept(self, kind: str, index: int) -> None:
        """Delete the rows kept aside for shard ``index`` once the shard (and its thumbnails) is committed."""
        if kind == "videos" and self.has_thumbnails and index not in self.thumbnail_shards():
            return  # the thumbnail back-fill still needs them
        self.delete_object(f"{APPEND_PREFIX}/{kind}-{int(index)}.npz")


