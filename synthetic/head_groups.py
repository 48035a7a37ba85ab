"""Within-group accuracy of stage one and stage-two heads on a split of the synthetic benchmark.

Each grouped caption is scored against every member of its near-duplicate group, and it is right
when its own video scores strictly highest (``synthetic.groups.within_group_accuracy``).

:func:`group_queries` builds the (caption, members) table once per split; :func:`head_group_accuracy`
scores stage one's cosine, each head's score and ``cosine + head score`` (the re-ranking rule) on it.
``bench/groups.py`` and ``cli.py ablation`` both use these. (A report's within-group accuracy comes
from the ranked lists a re-ranking wrote instead: ``synthetic.groups.ranked_within_group``.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from synthetic.groups import group_members, member_columns, within_group_accuracy

__all__ = ["GroupQueries", "group_queries", "head_group_accuracy"]


@dataclass
class GroupQueries:
    """Grouped captions of a split and their groups' members (rows of the split)."""

    captions: np.ndarray    # (Q,) caption rows
    candidates: np.ndarray  # (Q, G) video rows of each caption's group (padded with a repeated member)
    own: np.ndarray         # (Q,) column of each caption's own video in ``candidates``
    attribute: np.ndarray   # (Q,) the attribute the caption's group varies

    @property
    def group_size(self) -> int:
        return int(self.candidates.shape[1])

    def counts(self) -> dict[str, int]:
        """Captions per varied attribute."""
        return {a: int((self.attribute == a).sum()) for a in sorted(set(self.attribute.tolist()))}

    def chance(self) -> str:
        """The chance accuracy per varied attribute, as text ("detail_color 25%, ..., timing 33%"):
        1 / the members of its groups (a smaller group's padding is no member)."""
        per = 100.0 / member_columns(self.candidates).sum(axis=1)
        return ", ".join(f"{a} {per[self.attribute == a].mean():.0f}%" for a in sorted(set(self.attribute.tolist())))


def group_queries(video_ids: list[str], caption_video: np.ndarray, by_id: Mapping[str, Mapping[str, Any]],
                  max_captions: int = 0, seed: int = 0) -> GroupQueries | None:
    """The grouped captions of a split (``None`` when it has none): ``video_ids`` / ``caption_video``
    the split's rows, ``by_id`` the manifest's video rows by id; ``max_captions`` > 0 keeps a seeded
    sample of that many."""
    group, varied = group_members(list(video_ids), by_id)
    cv = np.asarray(caption_video)
    caps = np.flatnonzero(group[cv] >= 0)
    if caps.size == 0:
        return None
    if max_captions and caps.size > max_captions:
        caps = np.sort(np.random.default_rng(seed).choice(caps, max_captions, replace=False))
    members: dict[int, list[int]] = defaultdict(list)
    for v in np.flatnonzero(group >= 0):
        members[int(group[v])].append(int(v))
    size = max(len(m) for m in members.values())
    cand = np.full((caps.size, size), -1, dtype=np.int64)
    own = np.zeros(caps.size, dtype=np.int64)
    for i, c in enumerate(caps):
        m = members[int(group[cv[c]])]
        cand[i, :len(m)] = m
        cand[i, len(m):] = m[0]  # pad (only for uneven groups): a duplicate never wins
        own[i] = m.index(int(cv[c]))
    return GroupQueries(caps, cand, own, varied[cv[caps]].astype(str))


def head_group_accuracy(queries: GroupQueries, sim: np.ndarray, heads: Mapping[str, Any] | None = None,
                        split: Any = None, device: str = "cpu", batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Within-group accuracy (%) per varied attribute and ``"all"``: of stage one (``sim``, the split's
    caption x video cosine), and for each ``heads[name]`` (a stage-two head; ``split`` holds its
    tokens) of ``"<name> head"`` and ``"<name> cosine+head"``."""
    from heads.stage_two.scoring import pair_scorer

    q, g = queries.candidates.shape
    cos = np.asarray(sim)[queries.captions[:, None], queries.candidates]
    scores: dict[str, np.ndarray] = {"stage one": cos}
    for name, head in (heads or {}).items():
        head.eval()
        flat = pair_scorer(head, split, batch_size=batch_size, device=device, progress=False)(
            np.repeat(queries.captions, g), queries.candidates.reshape(-1))
        hs = flat.reshape(q, g)
        scores[f"{name} head"] = hs
        scores[f"{name} cosine+head"] = cos + hs
    return within_group_accuracy(scores, queries.captions, queries.candidates, queries.own, queries.attribute)
