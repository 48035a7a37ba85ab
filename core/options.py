"""``key=value`` options as the command line and the benchmarks take them (``--head-option``,
``--option``): values are parsed as JSON when they can be (numbers, booleans, null, lists),
otherwise kept as strings; dashes in keys become underscores."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from core.errors import UsageError


def parse_key_values(pairs: Iterable[str], what: str = "option") -> dict[str, Any]:
    """``["width=64", "mode=spatial"]`` -> ``{"width": 64, "mode": "spatial"}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise UsageError(f"{what}: expected key=value, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def format_key_values(options: Mapping[str, Any]) -> list[str]:
    """The inverse of ``parse_key_values``: ``{"width": 64}`` -> ``["width=64"]``."""
    def text(v: Any) -> str:
        if isinstance(v, str):
            try:
                json.loads(v)
            except json.JSONDecodeError:
                return v  # a plain word reads back as itself
        return json.dumps(v)

    return [f"{k}={text(v)}" for k, v in options.items()]


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``K/N`` -> ``(K, N)`` (0 <= K < N): a process writing the shards ``i`` with ``i % N == K``;
    ``UsageError`` naming what is wrong."""
    if not text:
        return None
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UsageError(f"expected K/N (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"{text}: K must be in 0..N-1 and N >= 1")
    return k, n


class FailureBudget:
    """How many failed videos a store may hold and its extraction still count as a success: a count
    (``5``), a percentage (``1%``) or a fraction (``0.01``) of the videos; ``FailureBudget.parse``
    reads the text, ``allowed(videos)`` gives the count."""

    def __init__(self, count: int = 0, share: float | None = None, text: str = "0") -> None:
        self.count, self.share, self.text = int(count), share, text

    @classmethod
    def parse(cls, text: str | None) -> "FailureBudget":
        if text is None or not str(text).strip():
            return cls()
        t = str(text).strip()
        try:
            value = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
        except ValueError:
            raise UsageError(f"expected a count (5), a percentage (1%) or a fraction (0.01), got {text!r}") from None
        if value < 0:
            raise UsageError(f"must be >= 0, got {text!r}")
        if t.endswith("%") or 0 < value < 1:
            return cls(share=value, text=t)
        return cls(count=int(value), text=t)

    def allowed(self, videos: int) -> int:
        """The failed videos tolerated among ``videos``."""
        return int(self.share * videos) if self.share is not None else self.count

    def __repr__(self) -> str:
        return f"FailureBudget({self.text!r})"
