"""`phileo-train plan`: what an epoch will do on a cluster, before any GPU is allocated.

Runs the trainer's own planner (training/data/epoch.py `plan_epoch`, the same call as
training/pretrain.py) on the shard list for the given world size and loader flags, and reports
steps, crops, the crops dropped and repeated to keep ranks in step (at most one global batch),
shards per worker and the size of the data position a checkpoint stores.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass

import numpy as np

from training.config import check_loader, positive
from training.data.epoch import EpochPlan, plan_epoch
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
                      request.seed, request.epoch, request.grad_accum)
    seconds = time.perf_counter() - started
    tiles = sum(shard.samples for shard in shards)
    per_worker, shared = shards_per_worker(plan)
    crops = plan.steps * request.batch_size * request.world_size
    # the state a checkpoint taken mid-epoch stores, pickled as torch.save pickles it
    position = pickle.dumps(plan.position_after(plan.steps // 2).to_dict())
    return [
        f"shards: {len(shards)}, tiles: {tiles}",
        f"ranks x workers: {request.world_size} x {request.num_workers}; shards per worker: "
        f"min {per_worker.min()}, max {per_worker.max()} ({shared} shards split between two workers, each "
        "reading its own byte range)",
        f"steps per rank: {plan.steps // request.grad_accum} optimizer steps ({plan.steps} batches of "
        f"{request.batch_size})",
        f"crops per epoch: {crops} (K={request.crops_per_tile} per tile)",
        f"to keep ranks in step: {plan.dropped} crops dropped, {plan.repeated} repeated "
        f"(at most one global batch of {plan.layout.global_batch}; "
        f"{100 * (plan.dropped + plan.repeated) / max(crops, 1):.4f}% of the epoch)",
        f"resume state: {len(position)} bytes per checkpoint (epoch, micro-batches and layout of each segment)",
        f"planned in {seconds:.1f} s",
    ]


def shards_per_worker(plan: EpochPlan) -> tuple[np.ndarray, int]:
    """Shards each worker reads (from its ranges' first and last tiles), and shards read by two workers."""
    starts = plan.deal.starts
    size = plan.crops_per_tile
    first_tile, last_tile = starts[:-1] // size, (starts[1:] - 1) // size
    first = np.searchsorted(plan.tile_starts, first_tile, side="right") - 1
    last = np.searchsorted(plan.tile_starts, last_tile, side="right") - 1
    reading = plan.deal.batches > 0
    counts = np.where(reading, last - first + 1, 0)
    shared = int(np.count_nonzero(last[reading][:-1] == first[reading][1:]))
    return counts, shared
