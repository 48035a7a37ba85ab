"""Inference-time post-processing of similarity matrices: dual softmax (DSL) and QB-Norm.

Pure numpy functions. Every matrix follows ``core.metrics``: ``sim`` is ``(C, V)``, rows are
captions, columns are videos, higher = more similar. T2V ranks each row over the videos; V2T
ranks each column over the captions (``core.metrics.v2t_metrics``).

Both methods change scores *across* queries, so they need the whole query set (DSL) or a bank
of other queries (QB-Norm) at once, and both are only defined for the ranking direction they
were computed for:

* ``dual_softmax(sim, temperature, direction="t2v")`` returns a matrix to rank **rows** with
  (``t2v_metrics``); ``direction="v2t"`` returns one to rank **columns** with (``v2t_metrics``).
  ``dual_softmax_metrics`` runs both and returns ``{"t2v": ..., "v2t": ...}``.
* ``qb_norm(sim, bank_sim)`` normalises the rows of a (queries x gallery) matrix. For T2V pass
  ``sim`` (C, V) with a text querybank against the same videos; for V2T pass ``sim.T`` with a
  video querybank against the same captions and transpose back (``qb_norm_metrics`` does both).

``flatten_padded_captions`` turns a dense ``(V, max_captions, ...)`` caption layout with a
padding mask into the flat caption list that ``core.metrics`` ranks, so padded slots never
become queries or candidates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from core.metrics import DEFAULT_KS, check_finite, t2v_metrics, v2t_metrics

__all__ = [
    "DEFAULT_DSL_TEMPERATURE",
    "DEFAULT_QB_BETA",
    "DEFAULT_QB_K",
    "check_querybank_split",
    "dual_softmax",
    "dual_softmax_both",
    "dual_softmax_metrics",
    "flatten_padded_captions",
    "log_softmax",
    "qb_norm",
    "qb_norm_metrics",
]

DEFAULT_DSL_TEMPERATURE = 0.01  # softmax(sim / 0.01) == softmax(100 * sim): CLIP's logit scale on cosines
DEFAULT_QB_K = 1
_QB_BLOCK_ELEMENTS = 1 << 22  # bank entries per block when building QB-Norm's activation set
_DSL_BLOCK_ELEMENTS = 1 << 23  # float64 entries per block of the dual softmax (64 MiB temporaries)
DEFAULT_QB_BETA = 20.0


def log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """``log(softmax(x, axis))`` in float64 via log-sum-exp (finite for any finite ``x``)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[axis] == 0:
        return x.copy()
    with np.errstate(over="ignore"):
        shifted = x - x.max(axis=axis, keepdims=True)  # max of every slice becomes 0
    # a spread beyond float64's range overflows to -inf: such an entry has probability 0 anyway
    shifted = np.maximum(shifted, -np.finfo(np.float64).max)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"dual softmax temperature must be a positive finite number, got {temperature!r}")
    return t


def dual_softmax(sim: np.ndarray, temperature: float = DEFAULT_DSL_TEMPERATURE,
                 direction: str = "t2v") -> np.ndarray:
    """Dual softmax (Cheng et al. 2021) at inference; returns a ``(C, V)`` float64 matrix.

    The scores are multiplied element-wise by a prior, a softmax over the *other* axis than the
    one being ranked, with temperature ``temperature`` (the prior is ``softmax(sim / temperature)``):

    * ``direction="t2v"`` (the default, rank each row over the videos): the prior of entry
      ``(c, v)`` is ``softmax_over_captions(sim[:, v] / temperature)[c]``, i.e. axis 0. A video
      that is similar to every caption (a hub) spreads its prior mass over all of them, so it is
      demoted for the captions that are not its best match. Rank the result with
      ``core.metrics.t2v_metrics``.
    * ``direction="v2t"`` (rank each column over the captions): the prior of ``(c, v)`` is
      ``softmax_over_videos(sim[c, :] / temperature)[v]``, i.e. axis 1. Rank the result with
      ``core.metrics.v2t_metrics``.

    The product is ``sim * prior`` (the published form; a positive common factor such as the
    number of rows does not change any rank and is left out). The prior is computed with
    log-sum-exp in float64, so it never overflows; for finite input the output is finite.
    ``temperature = 0.01`` equals CLIP's logit scale of 100 on cosine similarities; for scores of
    a much wider range (e.g. re-ranked logits) a larger temperature keeps the prior from
    underflowing to exactly 0 (which would turn distinct scores into ties).

    DSL is transductive: the T2V prior of a video depends on all captions of the evaluated set.
    """
    sim = check_finite(sim, "similarity matrix for dual softmax")
    t = _check_temperature(temperature)
    if direction == "t2v":
        axis = 0
    elif direction == "v2t":
        axis = 1
    else:
        raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}")
    out = np.empty(sim.shape, dtype=np.float64)
    # slices along the ranked axis are independent: process them in blocks to bound temporaries
    n = sim.shape[1 - axis]
    step = max(1, _DSL_BLOCK_ELEMENTS // max(1, sim.shape[axis]))
    for lo in range(0, n, step):
        sl = (slice(None), slice(lo, lo + step)) if axis == 0 else (slice(lo, lo + step), slice(None))
        block = np.asarray(sim[sl], dtype=np.float64)
        with np.errstate(over="ignore"):
            logits = block / t
        if not np.isfinite(logits).all():
            raise ValueError(f"dual softmax temperature {t!r} is too small for scores up to "
                             f"{np.abs(block).max():.3g}: sim / temperature overflows")
        out[sl] = block * np.exp(log_softmax(logits, axis=axis))
    return out


def dual_softmax_both(sim: np.ndarray, temperature: float = DEFAULT_DSL_TEMPERATURE
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(dual_softmax(sim, t, "t2v"), dual_softmax(sim, t, "v2t"))``: one matrix per direction."""
    return dual_softmax(sim, temperature, "t2v"), dual_softmax(sim, temperature, "v2t")


def dual_softmax_metrics(sim: np.ndarray, caption_video: np.ndarray,
                         temperature: float = DEFAULT_DSL_TEMPERATURE,
                         ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, float]]:
    """``{"t2v": ..., "v2t": ...}`` metrics, each direction ranked on its own DSL matrix."""
    t2v, v2t = dual_softmax_both(sim, temperature)
    return {"t2v": t2v_metrics(t2v, caption_video, ks), "v2t": v2t_metrics(v2t, caption_video, ks)}


# --------------------------------------------------------------------------- QB-Norm


def check_querybank_split(bank_split: str, eval_split: str) -> None:
    """Refuse a querybank taken from the evaluated split or from any test split.

    QB-Norm's querybank must hold queries that are *not* evaluated (train or val queries): using
    the test queries themselves would let every test query see the others' scores.
    """
    b, e = str(bank_split).lower(), str(eval_split).lower()
    if b == e:
        raise ValueError(f"QB-Norm querybank split {bank_split!r} is the evaluated split; use train or val queries")
    if b.startswith("test"):
        raise ValueError(f"QB-Norm querybank split {bank_split!r} is a test split; use train or val queries")


def qb_norm(sim: np.ndarray, bank_sim: np.ndarray, k: int = DEFAULT_QB_K,
            beta: float = DEFAULT_QB_BETA) -> np.ndarray:
    """Querybank normalisation with the dynamic inverted softmax (Bogolin et al. 2022).

    ``sim``: ``(Q, G)`` scores of the evaluated queries against the gallery (rows are ranked).
    ``bank_sim``: ``(B, G)`` scores of a *querybank* against the same gallery, in the same column
    order. The bank must come from train/val queries, never from the evaluated (test) queries
    (see ``check_querybank_split``).

    Definition, with ``n[g] = sum_b exp(beta * bank_sim[b, g])`` the bank's exp-sum of gallery
    item ``g``:

    1. The activation set ``A`` is every gallery item that is among the top-``k`` of at least one
       bank query (ties at the ``k``-th place are resolved by column order).
    2. A query whose top-1 gallery item (ties: the lowest column) is in ``A`` is normalised: each
       score becomes the inverted softmax ``exp(beta * sim[q, g]) / n[g]``, so gallery items that
       many bank queries favour (hubs) are demoted. Other queries keep their raw scores.

    Normalised rows are returned as the logarithm of the inverted softmax,
    ``beta * sim[q, g] - log(n[g])`` (log-sum-exp, so no overflow for any finite input). The log
    is monotone, so every rank inside a row equals the rank under the ratio itself; rows of
    either kind are only comparable within themselves, so rank the result along rows only.
    Returns a new ``(Q, G)`` float64 matrix.
    """
    sim = check_finite(sim, "similarity matrix for QB-Norm").astype(np.float64, copy=False)
    bank = check_finite(bank_sim, "QB-Norm querybank similarity matrix").astype(np.float64, copy=False)
    if bank.shape[1] != sim.shape[1]:
        raise ValueError(f"QB-Norm querybank has {bank.shape[1]} gallery columns, the evaluated matrix "
                         f"{sim.shape[1]}; both must score the same gallery")
    if bank.shape[0] == 0:
        raise ValueError("QB-Norm querybank is empty")
    k = int(k)
    if k < 1:
        raise ValueError(f"QB-Norm k must be >= 1, got {k}")
    beta = float(beta)
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"QB-Norm beta must be a positive finite number, got {beta!r}")
    out = sim.copy()
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        return out
    kk = min(k, bank.shape[1])
    active = np.zeros(bank.shape[1], dtype=bool)
    m = beta * bank.max(axis=0)  # (G,) shift for the log-sum-exp
    total = np.zeros(bank.shape[1], dtype=np.float64)
    step = max(1, _QB_BLOCK_ELEMENTS // max(1, bank.shape[1]))
    for lo in range(0, bank.shape[0], step):  # bank rows in blocks: bounded temporaries
        b = bank[lo:lo + step]
        # stable sort of -score: equal scores keep column order, so ties go to the lower column
        active[np.unique(np.argsort(-b, axis=1, kind="stable")[:, :kk])] = True
        total += np.exp(beta * b - m).sum(axis=0)
    log_norm = m + np.log(total)  # (G,) log n[g]
    rows = active[np.argmax(sim, axis=1)]  # argmax returns the first (lowest) column on ties
    out[rows] = beta * sim[rows] - log_norm[None, :]
    return out


def qb_norm_metrics(sim: np.ndarray, caption_video: np.ndarray, text_bank_sim: np.ndarray | None,
                    video_bank_sim: np.ndarray | None = None, k: int = DEFAULT_QB_K,
                    beta: float = DEFAULT_QB_BETA, ks: Sequence[int] = DEFAULT_KS
                    ) -> dict[str, dict[str, float]]:
    """Metrics after QB-Norm, each direction with its own querybank.

    ``text_bank_sim``: ``(B_t, V)`` bank captions (train/val) against the evaluated videos, used
    for T2V. ``video_bank_sim``: ``(B_v, C)`` bank videos (train/val) against the evaluated
    captions, used for V2T (``qb_norm(sim.T, video_bank_sim).T`` ranked per column). A direction
    whose bank is ``None`` is ranked on the raw scores.
    """
    sim = check_finite(sim)
    t2v = sim if text_bank_sim is None else qb_norm(sim, text_bank_sim, k=k, beta=beta)
    v2t = sim if video_bank_sim is None else qb_norm(sim.T, video_bank_sim, k=k, beta=beta).T
    return {"t2v": t2v_metrics(t2v, caption_video, ks), "v2t": v2t_metrics(v2t, caption_video, ks)}


# --------------------------------------------------------------------------- padded captions


def flatten_padded_captions(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense per-video caption layout -> the flat caption list of ``core.metrics``.

    ``values``: ``(V, M, ...)`` (e.g. caption embeddings or caption-by-video scores, ``M`` = the
    most captions of any video); ``mask``: ``(V, M)`` bool, True for a real caption. Returns
    ``(flat, caption_video)``: ``flat`` is ``(C, ...)`` with the real captions in video order then
    slot order, ``caption_video`` is ``(C,)`` int64. Padded slots are dropped, so whatever they
    hold (zeros, NaN, -inf) never becomes a query or a candidate. Real captions must be finite.
    """
    vals = np.asarray(values)
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise ValueError(f"caption mask must be boolean, got dtype {m.dtype}")
    if m.ndim != 2 or vals.shape[:2] != m.shape:
        raise ValueError(f"caption mask shape {m.shape} must equal the first two dims of values {vals.shape}")
    vid, slot = np.nonzero(m)  # row-major: video order, then slot order
    flat = vals[vid, slot]
    if np.issubdtype(flat.dtype, np.floating):
        bad = ~np.isfinite(flat.reshape(flat.shape[0], -1)).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"real (unpadded) caption at video {int(vid[i])}, slot {int(slot[i])} holds NaN/inf")
    return flat, vid.astype(np.int64)
