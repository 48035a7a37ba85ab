"""The report's plots, drawn headless with matplotlib's object API (``Figure``: no pyplot state, no GUI
backend) and returned as SVG text for inlining: recall@K curves, rank changes, training curves,
within-group accuracy.

Every figure is deterministic (fixed ids, no date), and text stays text (``svg.fonttype: none``) so the
files stay small and searchable.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from reports.inputs import RunCurves

__all__ = ["recall_svg", "rank_change_svg", "training_svg", "group_svg"]

STAGE_ONE, RERANKED = "#8c8c8c", "#1f77b4"
DIRECTION_NAMES = {"t2v": "text → video", "v2t": "video → text"}
PHASE_NAMES = {"stage_one": "stage one", "itc": "stage two: contrastive (ITC)", "itm": "stage two: matching (ITM)"}
MAX_POINTS = 1500


def _svg(fig) -> str:
    """``fig`` as SVG text, without the XML prologue (the report inlines it)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "crosstvr-report"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def recall_svg(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], k: int, complete: bool = True) -> str:
    """R@K for K = 1..len(curve) per direction: stage one vs re-ranked, the re-ranked K marked."""
    fig = _figure(4.2 * max(1, len(curves)), 3.2)
    axes = fig.subplots(1, max(1, len(curves)), squeeze=False)[0]
    for ax, (d, (before, after)) in zip(axes, curves.items()):
        ks = np.arange(1, len(before) + 1)
        ax.plot(ks, before, color=STAGE_ONE, lw=1.8, label="stage one")
        ax.plot(ks, after, color=RERANKED, lw=1.8, label="re-ranked")
        ax.axvline(k, color="#d62728", lw=0.8, ls="--", label=f"K = {k} (re-ranked)")
        ax.set_xscale("log")
        ax.set_xlim(1, len(before))
        ax.set_ylim(0, 100)
        ax.set_xlabel("K")
        ax.set_ylabel("R@K (%)")
        ax.set_title(DIRECTION_NAMES.get(d, d) + ("" if complete else " (ranks known up to K)"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    return _svg(fig)


def rank_change_svg(changes: Mapping[str, Mapping[int, int]]) -> str:
    """Histogram per direction of how many places the re-ranker moved each positive (up is positive)."""
    fig = _figure(4.2 * max(1, len(changes)), 3.2)
    axes = fig.subplots(1, max(1, len(changes)), squeeze=False)[0]
    for ax, (d, hist) in zip(axes, changes.items()):
        xs = np.array(sorted(hist), dtype=np.int64)
        ys = np.array([hist[x] for x in xs], dtype=np.int64)
        colors = [RERANKED if x > 0 else "#d62728" if x < 0 else STAGE_ONE for x in xs]
        ax.bar(xs, ys, color=colors, width=0.8)
        reach = max([3, *np.abs(xs).tolist()])
        ax.set_xlim(-reach - 0.5, reach + 0.5)
        _integer_axis(ax.xaxis)
        _integer_axis(ax.yaxis)
        ax.set_xlabel("places moved by the re-ranker (up > 0)")
        ax.set_ylabel("queries")
        total = int(ys.sum())
        up, down = int(ys[xs > 0].sum()), int(ys[xs < 0].sum())
        ax.set_title(f"{DIRECTION_NAMES.get(d, d)}: {up} up, {down} down, {total - up - down} kept", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    return _svg(fig)


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= MAX_POINTS:
        return x, y
    idx = np.linspace(0, x.size - 1, MAX_POINTS).round().astype(np.int64)
    return x[idx], y[idx]


def _smooth(y: np.ndarray) -> np.ndarray:
    """Moving average over about 1/50 of the steps (edges: the mean of what is there)."""
    w = max(1, y.size // 50)
    if w == 1:
        return y
    kernel = np.ones(w)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


def _values(xs: Sequence, ys: Sequence) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys)
             if x is not None and y is not None and math.isfinite(float(y))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pairs)
    return a[:, 0], a[:, 1]


def training_svg(run: RunCurves) -> str:
    """One row per phase of ``run``: loss (raw and smoothed), learning rate, validation score by step."""
    phases = [p for p in ("stage_one", "itc", "itm") if p in run.phases] + \
             [p for p in run.phases if p not in ("stage_one", "itc", "itm")]
    fig = _figure(12.0, 2.8 * max(1, len(phases)))
    axes = fig.subplots(max(1, len(phases)), 3, squeeze=False)
    for row, phase in zip(axes, phases):
        c = run.phases[phase]
        x, loss = _values(c["step"], c["loss"])
        ax = row[0]
        if x.size:
            tx, ty = _thin(x, loss)
            many = x.size > 50
            ax.plot(tx, ty, color=RERANKED, lw=0.6 if many else 1.4, alpha=0.35 if many else 1.0,
                    label="per step" if many else "loss")
            if many:
                sx, sy = _thin(x, _smooth(loss))
                ax.plot(sx, sy, color=RERANKED, lw=1.6, label="moving average")
            ax.legend(fontsize=7)
        ax.set_title(f"{PHASE_NAMES.get(phase, phase)}: loss", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        x, lr = _values(c["step"], c["lr"])
        ax = row[1]
        if x.size:
            ax.plot(*_thin(x, lr), color="#2ca02c", lw=1.4)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="#777")
        ax.set_title("learning rate", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        x, score = _values(c["val_step"], c["val_score"])
        ax = row[2]
        if x.size:
            ax.plot(x, score, color="#ff7f0e", lw=1.4, marker="o", ms=3)
            best = int(np.argmax(score))
            ax.plot([x[best]], [score[best]], marker="*", ms=11, color="#d62728", ls="none", label="best (kept)")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no validation in this phase", ha="center", va="center", transform=ax.transAxes,
                    color="#777")
        ax.set_title("validation score", fontsize=10)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    return _svg(fig)


def group_svg(accuracy: Mapping[str, Mapping[str, float]]) -> str:
    """Within-group accuracy per varied attribute (and all), stage one vs re-ranked."""
    names = [a for a in accuracy if a != "outside top K"]
    x = np.arange(len(names))
    fig = _figure(max(5.0, 1.0 + 0.9 * len(names)), 3.2)
    ax = fig.subplots()
    ax.bar(x - 0.2, [accuracy[a]["stage one"] for a in names], width=0.4, color=STAGE_ONE, label="stage one")
    ax.bar(x + 0.2, [accuracy[a]["re-ranked"] for a in names], width=0.4, color=RERANKED, label="re-ranked")
    ax.set_xticks(x, [f"{a}\n(n={int(accuracy[a]['n'])})" for a in names], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("within-group accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _svg(fig)
