"""Batches of crops: collation (numpy / shared memory across DataLoader workers) and worker mixing.

Kept apart from training/data.py (the stages) because both run on either side of the
DataLoader boundary: `collate_crops` in the worker, `as_tensors` and `WorkerMixedBatches` in
the main process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch

LABEL_KEYS = ("coords", "clouds", "landcover", "buildings", "water")


def collate_crops(crops: list[dict]) -> dict:
    """Stack crops into a batch of raw uint16 bands, labels, weights and keys.

    Bands stay uint16 (4x less to copy between processes than float32); `model_input` turns
    them into reflectance on the training device, where upsampling is cheap. In a DataLoader
    worker the bands are stacked straight into shared memory (one descriptor each to pass);
    the small label arrays stay numpy and travel pickled, instead of one shared-memory file and
    handshake per tensor. `as_tensors` (in the main process) wraps them without copying.
    """
    batch = {"s2_10m": _stack_bands([c["s2_10m"] for c in crops]), "keys": [c["key"] for c in crops],
             "urls": [c["url"] for c in crops], "repeated": np.array([c["repeat"] for c in crops], dtype=bool)}
    if crops[0]["s2_20m"] is not None:  # absent for s2_stack sources: already 10 bands on the 10 m grid
        batch["s2_20m"] = _stack_bands([c["s2_20m"] for c in crops])
    for name in LABEL_KEYS:
        batch[name] = np.stack([c[name] for c in crops])
        batch[f"{name}_weight"] = np.array([c[f"{name}_weight"] for c in crops], dtype=np.float32)
    return batch


def _stack_bands(arrays: list[np.ndarray]) -> np.ndarray | torch.Tensor:
    """np.stack, or in a DataLoader worker a shared-memory tensor (sent as a descriptor, not as pickled bytes)."""
    if torch.utils.data.get_worker_info() is None:
        return np.stack(arrays)
    out = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.from_numpy(arrays[0][:0]).dtype).share_memory_()
    np.stack(arrays, out=out.numpy())
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
    """

    def __init__(self, loader: Iterable[dict], num_workers: int):
        self.loader, self.num_workers = loader, num_workers

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        if self.num_workers < 2:
            yield from map(as_tensors, batches)
            return
        while group := list(itertools.islice(batches, self.num_workers)):
            yield from map(as_tensors, redeal(group))


def redeal(group: list[dict]) -> list[dict]:
    """Interleave the crops of `group` (position 0 of every batch, then 1, ...) and cut the same batch sizes.

    Arrays (numpy, or CPU tensors viewed as numpy) are gathered row by row with numpy: one copy,
    single-threaded, where torch's cat + index would wake its intra-op threads in the main
    process and take CPU from the workers.
    """
    sizes = [len(batch["keys"]) for batch in group]
    slots = [(b, j) for j in range(max(sizes)) for b in range(len(group)) if j < sizes[b]]
    columns = {name: [np.asarray(batch[name]) if not isinstance(batch[name], list) else batch[name]
                      for batch in group] for name in group[0]}
    out, start = [], 0
    for size in sizes:
        picked = slots[start : start + size]
        start += size
        out.append({name: [parts[b][j] for b, j in picked] if isinstance(parts[0], list)
                    else np.stack([parts[b][j] for b, j in picked]) for name, parts in columns.items()})
    return out
