"""Shared-memory slots, mapped once and reused batch after batch, that carry band arrays out of DataLoader workers.

A fresh shared-memory tensor per batch costs, for every tensor: a new /dev/shm file whose pages
are zero-filled in the worker, an fd handed over a socket served by the worker's resource-sharer
thread (which must wait for the worker's GIL), then a new mapping, page faults and an munmap in
the main process. With 2 workers on 2 cores that was about 10% of each worker's time and a third
of the main process's. A `BatchRing` is one anonymous shared mapping made before the workers
fork, so every process sees the same pages at the same offsets: a worker stacks a batch's bands
into its next free slot and sends only a `SlotArray` (offsets, shape, dtype); the main process
copies the slot out (mixing the workers' batches copies anyway) and frees it.

Slots are handed back through one semaphore per worker (free slots). A worker fills its slots in
turn and the main process frees them in the order it receives them, which the DataLoader keeps
per worker, so the semaphore alone says the worker's next slot is free. The DataLoader lets a
worker run at most `prefetch_factor` batches ahead, so with two spare slots a worker never
waits; if it ever does (past `wait_s`), that batch goes the old way, as a fresh tensor.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 64  # bytes: arrays start on cache lines


@dataclass(frozen=True)
class SlotArray:
    """Where a worker put one array of a batch (pickled in its place: a few dozen bytes)."""

    worker: int
    offset: int  # bytes from the start of the ring
    shape: tuple[int, ...]
    dtype: str


class BatchRing:
    """`slots` slots of `slot_bytes` per worker in one MAP_SHARED | MAP_ANONYMOUS mapping (fork only)."""

    def __init__(self, num_workers: int, slots: int, slot_bytes: int, wait_s: float = 1.0):
        assert num_workers > 0 and slots > 0 and slot_bytes > 0
        self.num_workers, self.slots, self.slot_bytes, self.wait_s = num_workers, slots, slot_bytes, wait_s
        self.buffer = mmap.mmap(-1, num_workers * slots * slot_bytes)  # pages appear when first written
        context = multiprocessing.get_context("fork")
        self.free = [context.Semaphore(slots) for _ in range(num_workers)]
        self.next_slot = 0  # worker side: each forked copy of the ring counts its own worker's slots

    def put(self, worker: int, parts: dict[str, list[np.ndarray]]) -> dict[str, SlotArray] | None:
        """Stack each list of equal-shape arrays into `worker`'s next slot; None when it does not fit or stays busy."""
        if not parts:  # nothing to place: a slot taken for it would never be released
            return None
        shapes = {name: (len(rows), *rows[0].shape) for name, rows in parts.items()}
        sizes = {name: _aligned(math.prod(shape) * parts[name][0].itemsize) for name, shape in shapes.items()}
        if sum(sizes.values()) > self.slot_bytes or not self.free[worker].acquire(timeout=self.wait_s):
            return None
        offset = (worker * self.slots + self.next_slot) * self.slot_bytes
        self.next_slot = (self.next_slot + 1) % self.slots
        placed = {}
        for name, rows in parts.items():
            array = SlotArray(worker, offset, shapes[name], rows[0].dtype.str)
            np.stack(rows, out=self.view(array))
            placed[name] = array
            offset += sizes[name]
        return placed

    def view(self, array: SlotArray) -> np.ndarray:
        """The array in the ring (valid until its slot is released)."""
        return np.ndarray(array.shape, np.dtype(array.dtype), buffer=self.buffer, offset=array.offset)

    def views(self, batch: dict) -> dict:
        """`batch` with its SlotArrays as views into the ring: copy them before `release(batch)`."""
        return {name: self.view(value) if isinstance(value, SlotArray) else value for name, value in batch.items()}

    def release(self, batch: dict) -> bool:
        """Give `batch`'s slot back to its worker; False for a batch that did not go through the ring."""
        workers = {value.worker for value in batch.values() if isinstance(value, SlotArray)}
        assert len(workers) <= 1, "a batch's arrays share one worker's slot"
        for worker in workers:
            self.free[worker].release()
        return bool(workers)


def uses_fork(loader: torch.utils.data.DataLoader) -> bool:
    """True when the loader's workers are forked (so they share mappings made before they start)."""
    context = loader.multiprocessing_context or multiprocessing.get_context()
    return context.get_start_method() == "fork"


def shared_empty(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """A tensor allocated straight in shared memory (`share_memory_()` would allocate twice and copy)."""
    torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * np.dtype(dtype).itemsize)
    return torch.empty(0, dtype=torch_dtype).set_(storage, 0, shape)


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN
