"""The arithmetic of dealing one segment of an epoch: `length` crops onto a `Layout` of ranks x workers.

Kept apart from training/data/epoch.py (the plan) because the resume position
(training/data/position.py) computes the deals of earlier segments too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from training.config import DataConfig


@dataclass(frozen=True)
class Layout:
    """What the deal of a segment depends on, besides the crops: saved in the resume position."""

    world_size: int
    num_workers: int  # DataLoader workers per rank; 0 = in the main process (one stream)
    batch_size: int
    grad_accum: int = 1
    shuffle_buffer: int = DataConfig.shuffle_buffer
    shards_in_parallel: int = DataConfig.shards_in_parallel

    @property
    def streams(self) -> int:
        return max(self.num_workers, 1)

    @property
    def global_batch(self) -> int:
        """Crops of one optimizer step over all ranks: what `steps` is rounded to."""
        return self.world_size * self.batch_size * self.grad_accum


@dataclass(frozen=True)
class Segment:
    """Part of an epoch trained in one run: its layout and the micro-batches each rank trained."""

    layout: Layout
    batches: int


@dataclass(frozen=True)
class Deal:
    """The arithmetic of one segment: `length` crops dealt on `layout` (arrays over rank x worker units)."""

    layout: Layout
    length: int

    @cached_property
    def steps(self) -> int:
        """Micro-batches per rank, a multiple of grad_accum."""
        return self.length // self.layout.global_batch * self.layout.grad_accum

    @property
    def dealt(self) -> int:
        return self.steps * self.layout.world_size * self.layout.batch_size

    @cached_property
    def batches(self) -> np.ndarray:
        """Loader batches of every unit (rank * streams + worker)."""
        streams = self.layout.streams
        per_worker = self.steps // streams + (np.arange(streams) < self.steps % streams)
        return np.tile(per_worker.astype(np.int64), self.layout.world_size)

    @cached_property
    def starts(self) -> np.ndarray:
        """Where each unit's range begins in the segment's sequence (one more entry: the end of the last)."""
        return np.concatenate([[0], np.cumsum(self.batches * self.layout.batch_size)])

    def trained(self, micro_batches: int) -> np.ndarray:
        """Crops of each unit trained once every rank has trained `micro_batches` (a prefix of its output).

        Batch i of a rank comes from worker i % streams, and WorkerMixedBatches (batches.py
        `redeal`) re-deals each group of `streams` batches crop by crop: crop j of the group's
        batch b lands at position j * count + b. So after the group's first m mixed batches,
        worker b has given the crops j with j * count + b < m * batch.
        """
        streams, size = self.layout.streams, self.layout.batch_size
        group, into = divmod(micro_batches, streams)
        lengths = np.full(streams, group * size, dtype=np.int64)
        if into:
            count = min(streams, self.steps - group * streams)
            worker = np.arange(streams)
            part = np.clip(-((worker - into * size) // count), 0, size)
            lengths += np.where(worker < count, part, 0)
        return np.tile(lengths, self.layout.world_size)
