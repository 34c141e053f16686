"""All rank logic: world info from the torchrun environment, process group, helpers.

Launch with `torchrun --nproc-per-node N -m training.cli ...` (or plain `phileo-train ...` for
one process), as the README shows. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(timeout_minutes: float = 30.0) -> World:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun) and init the process group when world_size > 1."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(rank, world_size, local_rank, device)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_mean(values: dict[str, float], world: World) -> dict[str, float]:
    """Mean of scalar metrics over ranks (one collective for the whole dict)."""
    if not world.distributed or not values:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(names, (tensor / world.world_size).tolist()))


def all_reduce_sum_int(value: int, world: World) -> int:
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor.item())


def gather_objects(obj: object, world: World) -> list[object]:
    """Every rank's `obj`, on every rank (small objects only: per-epoch data position)."""
    if not world.distributed:
        return [obj]
    gathered: list[object] = [None] * world.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
