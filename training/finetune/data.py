"""Fine-tuning data: PhilEO Bench patches (`s2_stack` + one task label) streamed from shards.

Training reuses the pretraining stages (epoch plan with one "crop" per patch, dealt patch by
patch, so every rank runs the same number of steps): patches -> exactly `quota` -> shuffle
buffer -> (`--augmentations`: training/finetune/augment.py) -> batches. Classification targets
are computed from the dense label here (training/finetune/labels.py): no shard member holds them.
Evaluation reads every patch exactly once: shards are dealt to ranks and workers without
padding or repeats, so summed metrics are the exact totals over the split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds

from phileo.phileo_bench import CLASSIFICATION_TASKS, TASKS
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
from training.finetune.augment import Augment
from training.finetune.labels import class_target, landcover_classes


def dense_task(task: str) -> str:
    """The dense task whose label a task reads: itself, or the one a classification task is computed from."""
    return CLASSIFICATION_TASKS.get(task, task)


class PatchTargets:
    """Patch + target of `task`: density on the 0..1 scale (float32, (1, H, W)), class indices (uint8, (H, W))
    or a per-patch class vector (float32, (classes,))."""

    def __init__(self, task: str):
        self.task = task
        self.member = TASKS[dense_task(task)][0]

    def __call__(self, tiles: Iterator[dict]) -> Iterator[dict]:
        for tile in tiles:
            arrays, meta = tile["arrays"], tile["meta"]
            if STACK_MEMBER not in arrays or self.member not in arrays:
                raise ValueError(f"{tile['url']}: sample {tile['key']} has no {self.member} / {STACK_MEMBER}; "
                                 f"is this a PhilEO Bench dataset with {self.task} labels?")
            label = arrays[self.member]
            scale = float(meta["task_labels"][dense_task(self.task)].get("density_scale", 1.0))
            if self.task in CLASSIFICATION_TASKS:
                target = class_target(self.task, label, scale)
            elif self.task == "landcover":
                target = landcover_classes(label)  # codes outside WorldCover -> IGNORE_CLASS
            else:
                target = (label.astype(np.float32) / np.float32(scale))[None]
            yield {"key": tile["key"], "url": tile["url"], "repeat": tile.get("repeat", False),
                   "s2": arrays[STACK_MEMBER], "target": target}


def collate_patches(patches: list[dict]) -> dict:
    """uint16 bands (the model's input is made on the device by `prepare_input`) and targets (int64 classes,
    float density or float class vectors); `noise` fields of the augmented patches with their `noise_index`."""
    target = np.stack([p["target"] for p in patches])
    batch = {"s2": torch.from_numpy(np.stack([p["s2"] for p in patches])),
             "target": torch.from_numpy(target.astype(np.int64) if target.dtype == np.uint8 else target),
             "keys": [p["key"] for p in patches], "urls": [p["url"] for p in patches],
             "repeats": sum(p["repeat"] for p in patches)}
    noised = [i for i, p in enumerate(patches) if p.get("noise") is not None]
    if noised:
        batch["noise"] = torch.from_numpy(np.stack([patches[i]["noise"] for i in noised]))
        batch["noise_index"] = torch.tensor(noised, dtype=torch.int64)
    return batch


def train_loader(plan: EpochPlan, rank: int, task: str, options: StreamOptions, num_workers: int,
                 augmentations: bool = False) -> torch.utils.data.DataLoader:
    stages = [
        EpochTiles(plan, rank, options),
        PatchTargets(task),
        TakeQuota(plan, rank),
        ShuffleCrops(plan.layout.shuffle_buffer, plan.seed, plan.epoch, rank, spread=plan.layout.batch_size),
    ]
    if augmentations:  # after the shuffle buffer, so it holds no noise fields
        stages.append(Augment(plan.seed, plan.epoch, rank, dense_target=task not in CLASSIFICATION_TASKS))
    stages.append(wds.batched(plan.layout.batch_size, collation_fn=collate_patches, partial=False))
    return pipeline_loader(wds.DataPipeline(*stages), num_workers)


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



def peek_patch_shape(shards: list[ShardInfo]) -> tuple[int, ...] | None:
    """(bands, H, W) of the first readable patch of a dataset (one sample decoded), None if none is readable."""
    policy = BadDataPolicy(1.0)
    for shard in shards:
        tiles = read_tiles(shard.url, policy)
        try:
            for tile in tiles:
                if STACK_MEMBER in tile["arrays"]:
                    return tuple(tile["arrays"][STACK_MEMBER].shape)
        finally:
            tiles.close()
    return None
