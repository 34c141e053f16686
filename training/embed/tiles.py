"""The tiles of a rank's shards for `phileo-train embed`, every one exactly once, and their pixels.

Shards are dealt whole (a shard's part file is the unit of resume): to ranks, then to DataLoader
workers, largest first onto the least loaded (training/data/epoch.py `balance`, as evaluation's
EvalPatches). A worker reads its shards one after the other through the training reader
(training/data/loader.py `read_tiles`: retries, bad-data policy), decodes the 10 m and 20 m bands
(never the 60 m ones), works out the fragment windows and every metadata column, and ends each
shard with a marker carrying its counts. The main process upsamples and cuts (`tile_image`,
`cut_fragments`) on the device, as the training loader's `model_input`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from phileo.schema import STACK_MEMBER, SchemaError
from training.data.epoch import balance
from training.data.loader import BadDataPolicy, read_tiles, worker_position
from training.data.shards import ShardInfo
from training.embed.fragments import centre_window, fragment_windows
from training.embed.rows import tile_columns


@dataclass(frozen=True)
class FragmentRule:
    """Which windows of a tile are embedded: Major-TOM's grid of `fragment_size` px fragments, or
    (fragment_size None) one window per tile: the whole tile, or the model's `model_size` px at its centre."""

    fragment_size: int | None
    model_size: int | None

    def windows(self, height: int, width: int) -> tuple[np.ndarray, int]:
        """(windows (n, 2) row/col, side px); ValueError when the tile is too small."""
        side = self.fragment_size or self.model_size
        if side is not None and min(height, width) < side:
            raise ValueError(f"{height}x{width} tile is smaller than the {side} px fragments")
        if self.fragment_size is not None:
            return fragment_windows(height, width, self.fragment_size), self.fragment_size
        if self.model_size is None and height != width:
            raise ValueError(f"{height}x{width} tile is not square; pass --fragment-size")
        return centre_window(height, width, self.model_size)


def _deal(shards: list[ShardInfo], indices: list[int], parts: int) -> list[list[int]]:
    """`indices` (into `shards`) dealt whole into `parts` lists, balanced by tile count (epoch.py `balance`)."""
    sizes = {str(index): shards[index].samples for index in indices}
    return [[int(i) for i in part] for part in balance(sizes, [str(index) for index in indices], parts)]


def rank_share(shards: list[ShardInfo], pending: list[int], rank: int, world_size: int) -> list[int]:
    """The pending shards (indices into `shards`) that `rank` embeds: whole shards, balanced by tile count."""
    return _deal(shards, pending, world_size)[rank]


class EmbedTiles(torch.utils.data.IterableDataset):
    """The tiles of `rank_shards` (indices into `shards`), dealt to `num_workers` workers, one shard after another.

    Yields tile items {"shard", "key", "bands", "windows", "size", "columns"} and, after each shard,
    {"shard", "end": True, "tiles", "bad"}. Bad samples are skipped and counted (BadDataPolicy).
    """

    def __init__(self, shards: list[ShardInfo], rank_shards: list[int], num_workers: int, rule: FragmentRule,
                 max_bad_fraction: float):
        self.per_worker = _deal(shards, rank_shards, max(num_workers, 1))
        self.shards, self.rule, self.max_bad_fraction = shards, rule, max_bad_fraction

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_position()
        policy = BadDataPolicy(self.max_bad_fraction)
        for index in self.per_worker[worker]:
            good, bad = policy.good, policy.bad
            for tile in read_tiles(self.shards[index].url, policy, lazy=True):
                item = self._prepare(tile, policy)
                if item is not None:
                    yield item | {"shard": index}
            yield {"shard": index, "end": True, "tiles": policy.good - good, "bad": policy.bad - bad}
        policy.check(sum(self.shards[index].samples for index in self.per_worker[worker]))

    def _prepare(self, tile: dict, policy: BadDataPolicy) -> dict | None:
        """The tile's bands (uint16 tensors, whole) and its rows' columns; None (counted) when unusable."""
        height, width = tile["meta"]["shape"]
        try:
            windows, size = self.rule.windows(height, width)
            columns = tile_columns(tile["key"], tile["meta"], windows, size)
            members = [STACK_MEMBER] if STACK_MEMBER in tile["arrays"] else ["s2_10m", "s2_20m"]
            bands = {m: torch.from_numpy(np.ascontiguousarray(tile["arrays"][m][...])) for m in members}
        except (ValueError, RuntimeError) as error:  # SchemaError is a ValueError; Blosc2 raises RuntimeError
            policy.record_undecodable(tile["url"], SchemaError(f"{tile['key']}: {error}"))
            return None
        return {"key": tile["key"], "bands": bands, "windows": windows, "size": size, "columns": columns}


def tile_image(bands: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """(10, H, W) float32 digital numbers of the MODEL_BANDS on the 10 m grid: 20 m bands bilinearly upsampled
    over the whole tile, which is what the training loader's halo-padded crops reproduce (loader.py model_input)."""
    if STACK_MEMBER in bands:
        return bands[STACK_MEMBER].to(device).float()
    high = bands["s2_10m"].to(device).float()
    low = bands["s2_20m"].to(device).float()
    up = F.interpolate(low[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    return torch.cat([high, up], dim=0)


def cut_fragments(image: torch.Tensor, windows: np.ndarray, size: int) -> torch.Tensor:
    """(n, C, size, size) copies of the windows (row, col) of a (C, H, W) image."""
    return torch.stack([image[:, row : row + size, col : col + size] for row, col in windows.tolist()])
