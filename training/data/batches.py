"""Batches of crops: collation (numpy / shared memory across DataLoader workers) and worker mixing.

Kept apart from training/data/loader.py (the stages) because both run on either side of the
DataLoader boundary: `collate_crops` in the worker, `as_tensors` and `WorkerMixedBatches` in
the main process.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import numpy as np
import torch

from training.data.ring import BatchRing, shared_empty, uses_fork

log = logging.getLogger(__name__)

LABEL_KEYS = ("coords", "clouds", "landcover", "buildings", "water")
BAND_NAMES = ("s2_10m", "s2_20m")  # s2_20m is None for s2_stack sources: 10 bands on the 10 m grid already
RING_SPARE_SLOTS = 2  # beyond the DataLoader's prefetch_factor: see training/data/ring.py


def collate_crops(crops: list[dict], ring: BatchRing | None = None) -> dict:
    """Stack crops into a batch of raw uint16 bands, labels, weights and keys.

    Bands stay uint16 (4x less to copy between processes than float32); `model_input` turns
    them into reflectance on the training device, where upsampling is cheap. In a DataLoader
    worker the bands go into shared memory: the worker's next `ring` slot, or else a fresh
    shared-memory tensor (sent as a descriptor, not as pickled bytes); the small label arrays
    stay numpy and travel pickled. `WorkerMixedBatches` (in the main process) unpacks them.
    """
    bands = {name: [c[name] for c in crops] for name in BAND_NAMES if crops[0][name] is not None}
    batch = {"keys": [c["key"] for c in crops], "crop_index": [c.get("crop", 0) for c in crops],
             "urls": [c["url"] for c in crops],
             "repeated": np.array([c["repeat"] for c in crops], dtype=bool)} | _stack_bands(bands, ring)
    for name in LABEL_KEYS:
        batch[name] = np.stack([c[name] for c in crops])
        batch[f"{name}_weight"] = np.array([c[f"{name}_weight"] for c in crops], dtype=np.float32)
    return batch


class CollateCrops:
    """`collate_crops` into `ring` when `WorkerMixedBatches` sets one (before it starts the workers)."""

    def __init__(self) -> None:
        self.ring: BatchRing | None = None

    def __call__(self, crops: list[dict]) -> dict:
        return collate_crops(crops, self.ring)


def _stack_bands(bands: dict[str, list[np.ndarray]], ring: BatchRing | None) -> dict:
    """np.stack, or in a DataLoader worker into its ring slot or a fresh shared-memory tensor."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return {name: np.stack(rows) for name, rows in bands.items()}
    placed = None if ring is None else ring.put(info.id, bands)
    if placed is not None:
        return placed
    out = {name: shared_empty((len(rows), *rows[0].shape), rows[0].dtype) for name, rows in bands.items()}
    for name, rows in bands.items():
        np.stack(rows, out=out[name].numpy())
    return out


def as_tensors(batch: dict) -> dict:
    """The batch with its numpy arrays as torch tensors (shared memory, no copy)."""
    return {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for name, value in batch.items()}


class WorkerMixedBatches:
    """Batches that mix the crops of every DataLoader worker.

    Each worker reads its own shards, so its batches hold only its tiles: on a small dataset
    a batch could show at most 1/N of the tiles. The DataLoader hands out the workers'
    batches in turn, so every N consecutive batches hold one per worker; they are re-dealt
    (worker by worker, position by position) into N batches of the same sizes. Same crops,
    same number of batches, so step counts and the exactly-once accounting do not change.

    With `collate` (forked workers only) every iteration maps a fresh `BatchRing` before the
    workers start; re-dealing copies the bands out of it and frees the workers' slots.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, num_workers: int, collate: CollateCrops | None = None,
                 slot_bytes: int = 0):
        self.loader, self.num_workers, self.collate, self.slot_bytes = loader, num_workers, collate, slot_bytes
        self.ring_batches = 0  # batches whose bands came through a ring (the rest: fresh shared tensors)

    def __iter__(self) -> Iterator[dict]:
        ring = None
        if self.num_workers and self.collate is not None and uses_fork(self.loader):
            try:
                ring = BatchRing(self.num_workers, self.loader.prefetch_factor + RING_SPARE_SLOTS, self.slot_bytes)
            except OSError as error:  # a mapping larger than the kernel will promise (strict overcommit)
                log.warning("no shared-memory batch ring (%s): each batch goes as fresh shared tensors", error)
            self.collate.ring = ring
        batches = iter(self.loader)  # forks the workers, each with its copy of the collate stage
        if self.collate is not None:
            self.collate.ring = None
        while group := list(itertools.islice(batches, max(self.num_workers, 1))):
            if ring is None:
                yield from map(as_tensors, redeal(group) if len(group) > 1 else group)
                continue
            mixed = redeal([ring.views(batch) for batch in group])  # copies: the slots can go back
            for batch in group:
                self.ring_batches += ring.release(batch)
            yield from map(as_tensors, mixed)


def redeal(group: list[dict]) -> list[dict]:
    """Interleave the crops of `group` (position 0 of every batch, then 1, ...) and cut the same batch sizes.

    Arrays (numpy, or CPU tensors viewed as numpy) are gathered with numpy: one copy,
    single-threaded, where torch's cat + index would wake its intra-op threads in the main
    process and take CPU from the workers. Equal sizes (every batch but an epoch's last few)
    interleave in one `np.stack(axis=1)` per array instead of row by row.
    """
    sizes = [len(batch["keys"]) for batch in group]
    columns = {name: [batch[name] if isinstance(batch[name], list) else np.asarray(batch[name]) for batch in group]
               for name in group[0]}
    if len(set(sizes)) == 1:
        return _redeal_equal(columns, len(group), sizes[0])
    slots = [(b, j) for j in range(max(sizes)) for b in range(len(group)) if j < sizes[b]]
    out, start = [], 0
    for size in sizes:
        picked = slots[start : start + size]
        start += size
        out.append({name: [parts[b][j] for b, j in picked] if isinstance(parts[0], list)
                    else np.stack([parts[b][j] for b, j in picked]) for name, parts in columns.items()})
    return out


def _redeal_equal(columns: dict[str, list], count: int, size: int) -> list[dict]:
    """`redeal` of `count` batches of `size` crops each: crop j of batch b goes to position j * count + b."""
    out = [{} for _ in range(count)]
    for name, parts in columns.items():
        if isinstance(parts[0], list):
            mixed = [part[j] for j in range(size) for part in parts]
        else:  # (count, size, ...) -> (size, count, ...) in one copy, then rows in interleaved order
            mixed = np.stack(parts, axis=1).reshape(count * size, *parts[0].shape[1:])
        for b in range(count):
            out[b][name] = mixed[b * size : (b + 1) * size]
    return out
