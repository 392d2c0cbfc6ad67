"""Multi-process training under ``torchrun``: the process group, this rank, its share of a batch.

``torchrun --nproc_per_node N -m captioning train ...`` starts N copies of ``train``; each calls
:func:`from_env`, which joins the process group torchrun describes in the environment (gloo for
CPU training, nccl for CUDA). Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a
no-op: one process trains alone, with no process group.

The data order does not depend on the number of processes: every rank computes the same global
batch of ``batch_images`` images, and :func:`shard` gives rank r its contiguous part of it.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT = dt.timedelta(minutes=60)  # rank 0 evaluates dev and writes checkpoints meanwhile


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world`` processes (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank on this node
    owns_group: bool = False  # True when from_env created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


ONE = Dist()  # a single process, no process group


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """Rank r > 0's RNG seed (dropout masks differ between ranks); rank 0 keeps ``seed``'s."""
    return seed * 100_003 + 7919 * rank + epoch


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def from_env(device: torch.device | None = None) -> Dist:
    """Join the process group that torchrun set up (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...).

    Uses a group that already exists (e.g. made by a test harness) and leaves it alone.
    """
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), _local_rank(), owns_group=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ONE
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run one process")
    backend = backend_for(device or torch.device("cpu"))
    dist.init_process_group(backend, timeout=TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), _local_rank(), owns_group=True)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def close(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous part of a global batch; sizes differ by at most one.

    Concatenating the parts of ranks 0..world-1 gives ``items`` back in order. A rank gets an
    empty part when the batch has fewer items than there are ranks.
    """
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (1 if rank < extra else 0)]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_sum(d: Dist, value: float) -> float:
    """The sum of ``value`` over all ranks (float64)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def broadcast(d: Dist, values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every rank (a tensor, never a pickle); same length everywhere."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(t, src=0)
    return t.tolist()


def gather_rng(d: Dist) -> list[torch.Tensor]:
    """torch's CPU RNG state of every rank, in rank order (on every rank)."""
    mine = torch.get_rng_state()
    if not d.enabled:
        return [mine]
    out = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(out, mine)
    return out
