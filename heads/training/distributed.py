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

Two planes, two timeouts:

* the collectives of the training steps (``gather_with_grad``, ``all_sum``, DDP's gradients) run on
  the default group, their tensors on the device its backend needs (``Dist.collective_device``:
  ``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo); a rank that waits there longer than
  ``--dist-timeout`` (``CROSSTVR_DIST_TIMEOUT``, default 4 h: ``collective_timeout``) ends the job
  (rank 0's validation, while the others wait in the next step's collectives, must fit in it);
* the waits of one rank on another that works alone (building a manifest, pretraining an encoder,
  staging a store, extraction's static shard split, rank 0 writing a checkpoint) run on a second,
  gloo, group with a timeout of a week (``CONTROL_TIMEOUT``): ``Dist.barrier``,
  ``Dist.broadcast_object``, ``Dist.gather_object`` and ``rank_zero_first``. No NCCL operation is
  pending during them, so NCCL's watchdog has nothing to time out; a rank that dies closes its gloo
  connections and the waiting ranks fail at once rather than after the week.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch

from core.errors import UsageError
from core.torchrun import torchrun_ranks

TIMEOUT_ENV = "CROSSTVR_DIST_TIMEOUT"  # what ``--dist-timeout`` sets
DEFAULT_TIMEOUT = timedelta(hours=4)
CONTROL_TIMEOUT = timedelta(days=7)
_control_group: Any = None  # the gloo group of the control-plane waits, made by ``context``


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
        """``device`` for this rank. Distributed, every CUDA device, ``cuda`` or ``cuda:N``, becomes
        ``cuda:LOCAL_RANK``: each machine's ranks take its visible GPUs in order (choose which with
        ``CUDA_VISIBLE_DEVICES``), and the index of a ``cuda:N`` given alike to every rank, which
        cannot name one GPU per rank, is not used."""
        if self.enabled and _is_cuda(device):
            return f"cuda:{self.local_rank}"
        return str(device)

    def collective_device(self) -> torch.device:
        """Where the default group's collective tensors live: this rank's GPU under NCCL (which
        has no CPU transport), the CPU under gloo."""
        if self.enabled and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        """Wait for every rank, on the control group (not bound by the collective timeout)."""
        if self.enabled:
            torch.distributed.barrier(group=_control_group)

    def part(self, rows: np.ndarray) -> slice:
        """This rank's contiguous slice of a global batch of ``len(rows)`` rows."""
        return part_slice(len(rows), self.rank, self.world_size)

    def sizes(self, n: int) -> list[int]:
        """The rows each rank holds of a global batch of ``n``."""
        return [part_slice(n, r, self.world_size).stop - part_slice(n, r, self.world_size).start
                for r in range(self.world_size)]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's (picklable) ``obj`` on every rank, sent on the control group."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=_control_group, device=torch.device("cpu"))
        return box[0]

    def gather_object(self, obj: Any) -> list:
        """Every rank's (picklable) ``obj``, in rank order, on every rank, sent on the control group."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=_control_group)
        return out


def _is_cuda(device: Any) -> bool:
    """Whether ``device`` (``cuda``, ``cuda:N``, a ``torch.device``) is a CUDA device."""
    return str(device).partition(":")[0] == "cuda"


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


def parse_timeout(text: str) -> timedelta:
    """``4h``, ``90m``, ``30s`` or a bare number of minutes (``240``), more than zero."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([hms]?)\s*", str(text).lower())
    if not found or float(found.group(1)) <= 0:
        raise UsageError(f"--dist-timeout: expected a duration above 0 such as 4h, 90m, 30s or a number of "
                         f"minutes, got {text!r}")
    unit = {"h": "hours", "m": "minutes", "s": "seconds", "": "minutes"}[found.group(2)]
    return timedelta(**{unit: float(found.group(1))})


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective of the training steps: ``CROSSTVR_DIST_TIMEOUT``
    (``--dist-timeout``), else ``DEFAULT_TIMEOUT``."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    return parse_timeout(text) if text else DEFAULT_TIMEOUT


def context(device: str = "cpu", timeout: timedelta | None = None) -> Dist:
    """This process's ``Dist`` (from torchrun's environment), with the process group joined when
    there is more than one process (``nccl`` for CUDA, else ``gloo``; collectives waiting up to
    ``timeout``, default ``collective_timeout()``) and the control group made beside it. Refused
    (``UsageError``) under NCCL when the machine shows fewer GPUs than its ranks need."""
    global _control_group
    rank, world, local = torchrun_ranks()
    d = Dist(rank, world, local)
    if not d.enabled:
        return d
    limit = timeout or collective_timeout()
    if not torch.distributed.is_initialized():
        backend = "nccl" if _is_cuda(device) else "gloo"
        if backend == "nccl":
            visible = torch.cuda.device_count()
            if local >= visible:
                raise UsageError(f"LOCAL_RANK={local} needs GPU {local} but this machine shows {visible}: start "
                                 f"at most {visible} processes per machine (--nproc_per_node)")
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend=backend, timeout=limit)
    if _control_group is None:
        _control_group = torch.distributed.new_group(backend="gloo", timeout=max(CONTROL_TIMEOUT, limit))
    return d


def rank_zero_first(d: Dist, fn: Callable[[], Any]) -> Any:
    """``fn()`` run by rank 0 alone (building a manifest, pretraining an encoder) and its picklable
    result given to every rank; the others wait on the control group, however long rank 0 takes. An
    exception of rank 0 is raised on every rank. One process: ``fn()``."""
    if not d.enabled:
        return fn()
    outcome: Any = None
    if d.is_main:
        try:
            outcome = (True, fn())
        except Exception as exc:
            d.broadcast_object((False, _picklable(exc)))
            raise
    done, value = d.broadcast_object(outcome)
    if not done:
        raise value
    return value


def _picklable(exc: Exception) -> Exception:
    """``exc``, or a ``RuntimeError`` naming it when it cannot be sent to the other ranks."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"rank 0 failed: {exc!r}")


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
        parts = all_gather(padded.to(d.collective_device()).contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(local.device)


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
    # on the backend's device (NCCL reduces float64 too)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=d.collective_device())
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
