"""Per-epoch data plan: which shards each rank and DataLoader worker reads, and how many crops.

Every rank must run the same number of optimizer steps, or DDP hangs at the first
all-reduce a rank does not reach. So the plan is made up front from manifest sample
counts, identically on every rank: shards are dealt to ranks largest-first onto the
least-loaded rank (balanced), then to workers the same way; the global mean gives the
steps per epoch; each worker gets an exact crop quota. A worker with more crops than its
quota drops the excess, one with fewer repeats tiles: both are counted and logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.data.shards import ShardInfo


class PlanError(ValueError):
    """The data cannot feed this world size / worker count; the message says what to change."""


@dataclass
class WorkerPlan:
    shards: list[str] = field(default_factory=list)
    tiles: int = 0  # tiles still to train on this epoch
    quota: int = 0  # crops this worker must yield (a multiple of the batch size)

    def drops_and_repeats(self, crops_per_tile: int) -> tuple[int, int]:
        available = self.tiles * crops_per_tile
        return max(0, available - self.quota), max(0, self.quota - available)


@dataclass
class EpochPlan:
    epoch: int
    steps: int  # batches per rank (micro-batches; optimizer steps = steps // grad_accum)
    workers: list[list[WorkerPlan]]  # [rank][worker]

    def totals(self, crops_per_tile: int) -> tuple[int, int]:
        pairs = [w.drops_and_repeats(crops_per_tile) for rank in self.workers for w in rank]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def balance(sizes: dict[str, int], order: list[str], bins: int) -> list[list[str]]:
    """Largest-first onto the least-loaded bin; each bin keeps the (shuffled) `order`."""
    loads, members = [0] * bins, [set() for _ in range(bins)]
    position = {url: i for i, url in enumerate(order)}
    for url in sorted(order, key=lambda u: (-sizes[u], position[u])):
        target = min(range(bins), key=lambda b: (loads[b], len(members[b]), b))
        loads[target] += sizes[url]
        members[target].add(url)
    return [[url for url in order if url in bin_members] for bin_members in members]


def plan_epoch(shards: list[ShardInfo], world_size: int, num_workers: int, batch_size: int,
               crops_per_tile: int, seed: int, epoch: int, done: dict[str, int] | None = None,
               grad_accum: int = 1) -> EpochPlan:
    """The same plan on every rank. `done` maps shard url -> tiles already trained on this epoch (resume).

    Batches per rank are a multiple of `grad_accum` so every optimizer step is complete.
    """
    workers_per_rank = max(num_workers, 1)
    if len(shards) < world_size * workers_per_rank:
        raise PlanError(f"{len(shards)} shards for {world_size} ranks x {workers_per_rank} workers: every worker "
                        f"needs a shard; use fewer --num-workers or rebuild with a smaller --shard-size")
    done = done or {}
    remaining = {s.url: max(0, s.samples - done.get(s.url, 0)) for s in shards}
    rng = np.random.default_rng([seed, epoch])
    order = [shards[i].url for i in rng.permutation(len(shards))]
    per_rank = balance(remaining, order, world_size)
    total_crops = sum(remaining.values()) * crops_per_tile
    steps = total_crops // (world_size * batch_size * grad_accum) * grad_accum
    if steps == 0:
        raise PlanError(f"{total_crops} crops left this epoch: less than {grad_accum} batch(es) of {batch_size} "
                        f"per rank on {world_size} ranks")
    plans = []
    for rank_shards in per_rank:
        groups = balance(remaining, rank_shards, workers_per_rank)
        workers = [WorkerPlan(group, sum(remaining[u] for u in group)) for group in groups]
        _assign_quotas(workers, steps, batch_size, crops_per_tile)
        plans.append(workers)
    return EpochPlan(epoch, steps, plans)


def _assign_quotas(workers: list[WorkerPlan], steps: int, batch_size: int, crops_per_tile: int) -> None:
    """Split `steps` batches over workers in proportion to their crops (largest remainder)."""
    crops = np.array([w.tiles * crops_per_tile for w in workers], dtype=np.float64)
    share = steps * crops / crops.sum() if crops.sum() else np.full(len(workers), steps / len(workers))
    batches = np.floor(share).astype(int)
    for index in np.argsort(-(share - batches), kind="stable")[: steps - batches.sum()]:
        batches[index] += 1
    for worker, count in zip(workers, batches):
        worker.quota = int(count) * batch_size
