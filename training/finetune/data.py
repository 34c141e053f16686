"""Fine-tuning data: PhilEO Bench patches (`s2_stack` + one task label) streamed from shards.

Training reuses the pretraining stages (epoch plan with one "crop" per patch, dealt patch by
patch, so every rank runs the same number of steps): patches -> exactly `quota` -> shuffle
buffer -> batches.
Evaluation reads every patch exactly once: shards are dealt to ranks and workers without
padding or repeats, so summed metrics are the exact totals over the split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds

from phileo.bands import REFLECTANCE_SCALE
from phileo.phileo_bench import TASKS, landcover_lookup
from phileo.schema import STACK_MEMBER
from training.data.epoch import EpochPlan, balance
from training.data.loader import (
    BadDataPolicy,
    EpochTiles,
    ShuffleCrops,
    StreamOptions,
    TakeQuota,
    pipeline_loader,
    read_tiles,
    worker_position,
)
from training.data.shards import ShardInfo

_LANDCOVER_CLASSES = np.array(landcover_lookup(), dtype=np.uint8)


class PatchTargets:
    """Patch + target of `task`: density on the 0..1 scale (float32, (1, H, W)) or class indices (uint8)."""

    def __init__(self, task: str):
        self.task = task
        self.member = TASKS[task][0]

    def __call__(self, tiles: Iterator[dict]) -> Iterator[dict]:
        for tile in tiles:
            arrays, meta = tile["arrays"], tile["meta"]
            if STACK_MEMBER not in arrays or self.member not in arrays:
                raise ValueError(f"{tile['url']}: sample {tile['key']} has no {self.member} / {STACK_MEMBER}; "
                                 f"is this a PhilEO Bench dataset with {self.task} labels?")
            label = arrays[self.member]
            if self.task == "landcover":
                target = _LANDCOVER_CLASSES[label]  # codes outside WorldCover -> IGNORE_CLASS
            else:
                scale = float(meta["task_labels"][self.task].get("density_scale", 1.0))
                target = (label.astype(np.float32) / np.float32(scale))[None]
            yield {"key": tile["key"], "url": tile["url"], "repeat": tile.get("repeat", False),
                   "s2": arrays[STACK_MEMBER], "target": target}


def collate_patches(patches: list[dict]) -> dict:
    """uint16 bands (converted on the device by `patch_input`) and targets (int64 classes or float density)."""
    target = np.stack([p["target"] for p in patches])
    return {"s2": torch.from_numpy(np.stack([p["s2"] for p in patches])),
            "target": torch.from_numpy(target.astype(np.int64) if target.dtype == np.uint8 else target),
            "keys": [p["key"] for p in patches], "urls": [p["url"] for p in patches],
            "repeats": sum(p["repeat"] for p in patches)}


def patch_input(batch: dict, device: torch.device) -> torch.Tensor:
    """(B, 10, H, W) float32 reflectance (DN / 10000), as the benchmark's loader."""
    return batch["s2"].to(device, non_blocking=True).float().mul_(1.0 / REFLECTANCE_SCALE)


def train_loader(plan: EpochPlan, rank: int, task: str, options: StreamOptions,
                 num_workers: int) -> torch.utils.data.DataLoader:
    pipeline = wds.DataPipeline(
        EpochTiles(plan, rank, options),
        PatchTargets(task),
        TakeQuota(plan, rank),
        ShuffleCrops(plan.layout.shuffle_buffer, plan.seed, plan.epoch, rank, spread=plan.layout.batch_size),
        wds.batched(plan.layout.batch_size, collation_fn=collate_patches, partial=False),
    )
    return pipeline_loader(pipeline, num_workers)


class EvalPatches(torch.utils.data.IterableDataset):
    """Every patch of this rank's share of the shards, once (no quota, no repeats)."""

    def __init__(self, shards: list[ShardInfo], rank: int, world_size: int, num_workers: int,
                 max_bad_fraction: float):
        sizes = {s.url: s.samples for s in shards}
        per_rank = balance(sizes, [s.url for s in shards], world_size)[rank]
        self.per_worker = balance(sizes, per_rank, max(num_workers, 1))
        self.planned = [sum(sizes[u] for u in urls) for urls in self.per_worker]
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_position()
        policy = BadDataPolicy(self.max_bad_fraction)
        for url in self.per_worker[worker]:
            yield from read_tiles(url, policy)
        policy.check(self.planned[worker])


def eval_loader(shards: list[ShardInfo], rank: int, world_size: int, task: str, batch_size: int,
                num_workers: int, max_bad_fraction: float) -> torch.utils.data.DataLoader:
    workers = min(num_workers, len(shards))  # a worker without a shard would only cost a process
    pipeline = wds.DataPipeline(
        EvalPatches(shards, rank, world_size, workers, max_bad_fraction),
        PatchTargets(task),
        wds.batched(batch_size, collation_fn=collate_patches, partial=True),
    )
    return pipeline_loader(pipeline, workers)

