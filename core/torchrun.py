"""Where this process stands in a ``torchrun`` job, from the environment torchrun sets (torch-free):
``RANK`` (0..WORLD_SIZE-1 over all machines), ``WORLD_SIZE`` and ``LOCAL_RANK`` (the process's
index on its machine, which picks its GPU). Without them: one process, rank 0 of 1."""

from __future__ import annotations

import os

from core.errors import UsageError


def torchrun_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; ``(0, 1, 0)`` outside torchrun."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in
                              (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise UsageError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return rank, world, local
