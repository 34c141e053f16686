"""Per-epoch data plan: which crops each rank and DataLoader worker trains, dealt one crop at a time.

An epoch's crops form one sequence: the shards in a (seed, epoch) shuffled order, each shard's
tiles in file order, K crops per tile (crop id = K x tile number + crop index). Every rank must
run the same number of micro-batches, or DDP hangs at the first all-reduce a rank does not
reach; so `steps` = crops // (ranks x batch x grad_accum) x grad_accum, the crops left over (less
than one global batch) are dropped, and nothing is repeated. The dealt crops are cut into
contiguous ranges, rank after rank and worker after worker within a rank; a worker gets
steps // workers batches, the first steps % workers workers one more (the DataLoader then takes
batch i from worker i % workers). A range may begin or end inside a shard (the worker reads only
that part of it) or inside a tile (the two workers cut disjoint crops of it).

A resumed epoch continues from an `EpochPosition`: the segments trained so far, each with its
layout and the micro-batches every rank trained in it. The crops not trained yet form the next
sequence (training/data/position.py computes any part of it without pixels), dealt the same
way on the current layout, whatever it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np

from training.config import DataConfig
from training.data.deal import Deal, Layout, Segment
from training.data.position import RemainingCrops
from training.data.shards import ShardInfo


class PlanError(ValueError):
    """The data cannot feed this world size / batch size; the message says what to change."""


@dataclass(frozen=True)
class EpochPosition:
    """The resume state: where in which epoch, and the layouts it was computed with (a few hundred bytes)."""

    epoch: int
    seed: int
    crops_per_tile: int
    dataset: str  # `fingerprint` of the shard list: the position means nothing on other data
    segments: tuple[Segment, ...] = ()

    def to_dict(self) -> dict:
        """Plain ints and strings, as a checkpoint loaded with weights_only=True accepts."""
        return asdict(self) | {"segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, values: dict) -> EpochPosition:
        segments = tuple(Segment(Layout(**s["layout"]), int(s["batches"])) for s in values["segments"])
        return cls(int(values["epoch"]), int(values["seed"]), int(values["crops_per_tile"]), str(values["dataset"]),
                   segments)


def fingerprint(shards: list[ShardInfo]) -> str:
    """Shard count, tiles and a digest of the sample counts in order (not the URLs: data may move)."""
    counts = np.array([s.samples for s in shards], dtype=np.int64)
    return f"{len(shards)}:{int(counts.sum())}:{hashlib.sha256(counts.tobytes()).hexdigest()[:16]}"


@dataclass
class EpochPlan:
    """The same on every rank; workers ask it for their crops (`crop_ids`)."""

    epoch: int
    seed: int
    crops_per_tile: int
    shards: list[ShardInfo]
    order: np.ndarray  # shard indices in this epoch's order
    history: tuple[Segment, ...]
    deal: Deal
    dataset: str
    total_crops: int  # crops of the whole epoch
    _crops: RemainingCrops | None = field(default=None, repr=False)  # made on first use

    @property
    def layout(self) -> Layout:
        return self.deal.layout

    @property
    def steps(self) -> int:
        return self.deal.steps

    @property
    def dropped(self) -> int:
        """Crops of this epoch never trained: the last, partial global batch."""
        return self.deal.length - self.deal.dealt

    @property
    def repeated(self) -> int:
        """Crops the plan trains twice: none (bad data is made up by the loader, counted there)."""
        return 0

    def totals(self) -> tuple[int, int]:
        return self.dropped, self.repeated

    @cached_property
    def tile_starts(self) -> np.ndarray:
        """First epoch tile number of each shard in `order` (one more entry: the epoch's tile count)."""
        counts = np.array([self.shards[i].samples for i in self.order], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)])

    def unit(self, rank: int, worker: int) -> int:
        return rank * self.layout.streams + worker

    def quota(self, rank: int, worker: int) -> int:
        """Crops this worker yields: whole batches."""
        return int(self.deal.batches[self.unit(rank, worker)]) * self.layout.batch_size

    @property
    def remaining(self) -> RemainingCrops:
        """The crops of this epoch not trained before this segment (made on first use, then cached)."""
        if self._crops is None:
            self._crops = RemainingCrops(self.seed, self.epoch, self.crops_per_tile, self.tile_starts,
                                         self.history, self.total_crops)
        return self._crops

    def crop_ids(self, rank: int, worker: int) -> np.ndarray:
        """This worker's crop ids, increasing (tile = id // K, crop index = id % K)."""
        unit = self.unit(rank, worker)
        return self.remaining.slice(len(self.history), int(self.deal.starts[unit]), int(self.deal.starts[unit + 1]))

    def position_after(self, micro_batches: int) -> EpochPosition:
        """The resume state once every rank has trained `micro_batches` of this plan."""
        assert 0 <= micro_batches <= self.steps, (micro_batches, self.steps)
        return EpochPosition(self.epoch, self.seed, self.crops_per_tile, self.dataset,
                             (*self.history, Segment(self.layout, micro_batches)))


def plan_epoch(shards: list[ShardInfo], world_size: int, num_workers: int, batch_size: int,
               crops_per_tile: int, seed: int, epoch: int, grad_accum: int = 1,
               history: tuple[Segment, ...] = (), shuffle_buffer: int = DataConfig.shuffle_buffer,
               shards_in_parallel: int = DataConfig.shards_in_parallel) -> EpochPlan:
    """The same plan on every rank, from sample counts alone; `history`: the segments of this epoch already
    trained (a resume). PlanError when a fresh epoch cannot make one optimizer step.
    """
    layout = Layout(world_size, num_workers, batch_size, grad_accum, shuffle_buffer, shards_in_parallel)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shards))
    total = sum(s.samples for s in shards) * crops_per_tile
    length = total
    for segment in history:  # every rank trained the same micro-batches of each segment
        deal = Deal(segment.layout, length)
        length -= segment.batches * segment.layout.world_size * segment.layout.batch_size
        assert 0 <= segment.batches <= deal.steps and length >= 0, (segment, deal.steps)
    plan = EpochPlan(epoch, seed, crops_per_tile, shards, order, tuple(history), Deal(layout, length),
                     fingerprint(shards), total)
    if plan.steps == 0 and not history:
        raise PlanError(f"{total} crops in an epoch: less than {grad_accum} batch(es) of {batch_size} per rank on "
                        f"{world_size} ranks; use a smaller --batch-size or fewer ranks")
    return plan


def balance(sizes: dict[str, int], order: list[str], bins: int) -> list[list[str]]:
    """Whole shards largest-first onto the least-loaded bin (evaluation, which needs no equal steps)."""
    loads, members = [0] * bins, [set() for _ in range(bins)]
    position = {url: i for i, url in enumerate(order)}
    for url in sorted(order, key=lambda u: (-sizes[u], position[u])):
        target = min(range(bins), key=lambda b: (loads[b], len(members[b]), b))
        loads[target] += sizes[url]
        members[target].add(url)
    return [[url for url in order if url in bin_members] for bin_members in members]
