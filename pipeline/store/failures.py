"""A store's failure list, ``failures.json``: every committed failed video, its reason and the decoders' message."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from core.fileio import jsonable
from pipeline.store.backend import local_path
from pipeline.store.layout import FAILURES_JSON


def write_failure_list(store: Any) -> np.ndarray:
    """Write ``failures.json`` (every failed video: reason and the decoders' message) into the store and
    return the status it was made from. Several writers of one store may finish at once: each writes
    the list whole (atomically), then reads the status again and writes once more if it changed, so
    the list written last is made from the newest status (status only grows while they run)."""
    status = store.status()
    for _ in range(20):
        body = json.dumps(jsonable(store.failures(detail=True)), indent=1, sort_keys=True) + "\n"
        store.write_object(FAILURES_JSON, body.encode())
        again = store.status()
        if np.array_equal(again, status):
            break
        status = again
    return status


def failure_list_location(path: str | os.PathLike) -> str:
    """Where a store's ``failures.json`` is (a local path, or a URL)."""
    local = local_path(path)
    return str(local / FAILURES_JSON) if local is not None else f"{os.fspath(path).rstrip('/')}/{FAILURES_JSON}"
