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
