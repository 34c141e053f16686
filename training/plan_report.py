"""`phileo-train plan`: what an epoch will do on a cluster, before any GPU is allocated.

Runs the trainer's own planner (training/data/epoch.py `plan_epoch`, the same call as
training/pretrain.py) on the shard list for the given world size and loader flags, and reports
steps, crops, the crops dropped and repeated to keep ranks in step, shards per worker and the size
of the data position a checkpoint stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from training.config import check_loader, positive
from training.data.epoch import plan_epoch
from training.data.shards import resolve_shards


@dataclass(frozen=True)
class PlanRequest:
    shards: str
    world_size: int
    num_workers: int
    batch_size: int
    crops_per_tile: int
    grad_accum: int = 1
    epoch: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value in (("--world-size", self.world_size), ("--batch-size", self.batch_size),
                            ("--crops-per-tile", self.crops_per_tile), ("--grad-accum", self.grad_accum)):
            positive(flag, value)
        check_loader(self.num_workers, 0.0)


def plan_report(request: PlanRequest) -> list[str]:
    """The report's lines; ShardSpecError / PlanError on bad input, as `pretrain` would raise them."""
    started = time.perf_counter()
    shards = resolve_shards(request.shards)
    plan = plan_epoch(shards, request.world_size, request.num_workers, request.batch_size, request.crops_per_tile,
                      request.seed, request.epoch, grad_accum=request.grad_accum)
    seconds = time.perf_counter() - started
    tiles = sum(shard.samples for shard in shards)
    dropped, repeated = plan.totals(request.crops_per_tile)
    per_worker = [len(worker.shards) for rank in plan.workers for worker in rank]
    crops = plan.steps * request.batch_size * request.world_size
    key_bytes = 27  # a MajorTOM key, e.g. 454U_121R_20231102T103325, plus its quotes and comma in JSON
    return [
        f"shards: {len(shards)}, tiles: {tiles}",
        f"ranks x workers: {request.world_size} x {request.num_workers}; shards per worker: "
        f"min {min(per_worker)}, max {max(per_worker)}",
        f"steps per rank: {plan.steps // request.grad_accum} optimizer steps ({plan.steps} batches of "
        f"{request.batch_size})",
        f"crops per epoch: {crops} (K={request.crops_per_tile} per tile)",
        f"to keep ranks in step: {dropped} crops dropped, {repeated} repeated "
        f"({100 * (dropped + repeated) / max(crops, 1):.3f}% of the epoch)",
        f"resume state: up to {tiles} tile keys at the end of an epoch (~{tiles * key_bytes / 1e6:.1f} MB per "
        "checkpoint)",
        f"planned in {seconds:.1f} s",
    ]
