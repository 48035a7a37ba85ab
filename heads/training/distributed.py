"""More than one process: training under ``torchrun`` with DistributedDataParallel.

``torchrun --nproc_per_node=G cli.py train-stage-one ...`` starts G processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``) in their
environment. ``context()`` reads them (one process without them: world size 1, nothing to set
up), joins the process group once (``nccl`` when the device is CUDA, else ``gloo``) and gives each
rank its device (``cuda:LOCAL_RANK``).

How a run is split (the same global batch as one process, so the same training):

* every rank builds the same epoch plan (same sampler, same seed) and takes its own contiguous
  slice of each global batch (``Dist.part``): it reads only those rows from its local memory
  maps, and every rank runs the same number of steps (batches smaller than the world are dropped
  by every rank alike);
* contrastive losses see the whole global batch: each rank's embeddings are gathered with their
  gradient (``gather_with_grad``: ``torch.distributed.nn.all_gather``, whose backward sums every
  rank's gradient for the local rows); every rank computes the same global loss, so with DDP
  averaging the parameter gradients are those of one process on the whole batch;
* rank 0 alone validates, logs and writes checkpoints (the format is the one-process format: the
  head's own ``state_dict``, not DDP's), then ``barrier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from core.world import world_from_env


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """``device`` for this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` when distributed."""
        if self.enabled and str(device) == "cuda":
            return f"cuda:{self.local_rank}"
        return str(device)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def part(self, rows: np.ndarray) -> slice:
        """This rank's contiguous slice of a global batch of ``len(rows)`` rows."""
        return part_slice(len(rows), self.rank, self.world_size)

    def sizes(self, n: int) -> list[int]:
        """The rows each rank holds of a global batch of ``n``."""
        return [part_slice(n, r, self.world_size).stop - part_slice(n, r, self.world_size).start
                for r in range(self.world_size)]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def part_slice(n: int, rank: int, world_size: int) -> slice:
    """Rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world_size`` takes (sizes differ by at most 1)."""
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def drop_short_last(sampler: Any, d: Dist) -> None:
    """Under torchrun, an epoch's last batch with fewer videos than ranks is dropped (by every rank
    alike: each rank needs a video of every global batch). ``sampler``: a ``heads.training.data.EpochSampler``."""
    if d.enabled and 0 < sampler.videos.size % sampler.batch_size < d.world_size:
        sampler.drop_last = True


def context(device: str = "cpu") -> Dist:
    """This process's ``Dist`` (from torchrun's environment), with the process group joined when
    there is more than one process (``nccl`` for CUDA, else ``gloo``)."""
    rank, world, local = world_from_env()
    d = Dist(rank, world, local)
    if d.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend=backend)
    return d


def gather_with_grad(d: Dist, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The rows of every rank (``sizes[r]`` of rank ``r``), in rank order, with the gradient flowing
    back to each rank's own rows (summed over the ranks' losses). One process: ``local`` itself."""
    if not d.enabled:
        return local
    import warnings

    from torch.distributed.nn import all_gather

    most = max(sizes)
    pad = most - local.shape[0]
    padded = torch.cat([local, local.new_zeros((pad,) + tuple(local.shape[1:]))]) if pad else local
    with warnings.catch_warnings():  # its deprecation names a private replacement; it stays differentiable
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def gather(d: Dist, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``gather_with_grad`` without the gradient."""
    with torch.no_grad():
        return gather_with_grad(d, local.detach(), sizes)


def wrap(model: torch.nn.Module, d: Dist, device: str, find_unused: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when distributed (rank 0's weights broadcast), else itself.
    ``find_unused``: some parameters may get no gradient in a step (a stage-two head's ITM classifier
    in its contrastive phase)."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if str(device).startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


class StepModule(torch.nn.Module):
    """A head whose ``forward(fn, *args)`` is ``fn(head, *args)``: a training step that calls several
    of the head's methods runs as one forward of DistributedDataParallel (``wrap(StepModule(head))``)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, fn: Any, *args: Any) -> Any:
        return fn(self.head, *args)


def all_sum(d: Dist, *values: float) -> list[float]:
    """Each value summed over the ranks (one process: as given)."""
    if not d.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return [float(v) for v in t.tolist()]


class NullLog:
    """A training log that writes nothing (ranks other than 0)."""

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def validation(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
