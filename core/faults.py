"""The one gate every store write passes through: it counts writes and, when armed, kills the process at one.

The crash tests (``tests/test_faults.py``, docs/STORE.md "Proven by killing every write") run an
operation once to count its writes, then again killed at each write number ``k``, and check the store
after each kill. Every write to a store (each object a zarr store sets or deletes, each file a store
operation writes beside it) calls :func:`gate` just before it happens.

Armed through the environment, so that subprocesses (extraction, ``cache pull``) are armed too:

- ``CROSSTVR_FAULT_AT=k``: the process dies (``os._exit(FAULT_EXIT)``) at its ``k``-th write (1-based);
- ``CROSSTVR_FAULT_MODE=before`` (default): before writing anything of it; ``torn``: after writing the
  first half of its bytes where the writer can (a torn object, as a power cut leaves);
- ``CROSSTVR_FAULT_LOG=path``: one line per write (``<n>\\t<what>``) appended to ``path``: the count of
  an uninterrupted run, and which write each ``k`` is.

Unarmed (the normal case) a gate costs one integer increment.
"""

from __future__ import annotations

import os
from collections.abc import Callable

FAULT_EXIT = 86  # the exit status of a process the gate killed (the tests tell it from a real failure)
ENV_AT, ENV_MODE, ENV_LOG = "CROSSTVR_FAULT_AT", "CROSSTVR_FAULT_MODE", "CROSSTVR_FAULT_LOG"

_state: dict = {"count": 0, "pid": None, "at": None, "mode": "before", "log": None}


def _load() -> dict:
    """The arming of this process, read from the environment once per process (a forked child
    starts counting from zero)."""
    if _state["pid"] != os.getpid():
        at = os.environ.get(ENV_AT, "").strip()
        _state.update(count=0, pid=os.getpid(), at=int(at) if at.isdigit() and int(at) > 0 else None,
                      mode=os.environ.get(ENV_MODE, "before").strip() or "before",
                      log=os.environ.get(ENV_LOG) or None)
    return _state


def gate(what: str, torn: Callable[[], None] | None = None) -> None:
    """Called just before one store write (``what`` names it: the object key or file). When this is
    the armed write, the process dies here; in ``torn`` mode ``torn()`` (which writes part of the
    object) runs first."""
    st = _load()
    st["count"] += 1
    if st["log"] is not None:
        fd = os.open(st["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{st['count']}\t{what}\n".encode("utf-8", "replace"))
        finally:
            os.close(fd)
    if st["at"] is not None and st["count"] == st["at"]:
        if st["mode"] == "torn" and torn is not None:
            try:
                torn()
            except Exception:  # a torn write that cannot be made is a kill before the write
                pass
        os._exit(FAULT_EXIT)

