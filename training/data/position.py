"""Which crops are left in a resumed epoch, computed from the position alone (no pixels, no shards read).

Segment 0's sequence is every crop id of the epoch, 0 .. tiles x K - 1 (training/data/epoch.py).
Segment i + 1's sequence is segment i's with the crops trained in segment i taken out, in the
same (increasing) order: for each unit (rank x worker) of segment i, its range minus the prefix
of its output that every rank had trained (`Deal.trained`), then the part segment i left
undealt. Which crops a unit had output is replayed on integer ids with the loader's own
`interleave` and `ShuffleCrops` (training/data/order.py) over the unit's tiles grouped by shard
(`tile_groups`, the same grouping the loader reads). Only the units that overlap the asked-for
range are replayed, so a rank resuming on any layout replays a few units of each earlier segment.

Exact when the interrupted segments read every planned tile; a tile lost to bad data there
shifted that worker's stream, so its replayed output may differ from what was trained
(bad data is counted and logged by the loader's BadDataPolicy).
"""

from __future__ import annotations

import numpy as np

from training.data.deal import Deal, Segment
from training.data.order import ShuffleCrops, interleave


def tile_groups(tile_starts: np.ndarray, ids: np.ndarray, crops_per_tile: int) -> list[tuple[int, list]]:
    """(shard slot in the epoch order, [(tile position in the shard, crop ids of it)]) of increasing `ids`."""
    if len(ids) == 0:
        return []
    tiles = ids // crops_per_tile
    cuts = np.flatnonzero(np.diff(tiles)) + 1
    firsts = tiles[np.concatenate([[0], cuts])]
    slots = np.searchsorted(tile_starts, firsts, side="right") - 1
    positions = firsts - tile_starts[slots]
    groups: list[tuple[int, list]] = []
    for slot, position, crops in zip(slots.tolist(), positions.tolist(), np.split(ids, cuts)):
        if not groups or groups[-1][0] != slot:
            groups.append((slot, []))
        groups[-1][1].append((position, crops))
    return groups


class RemainingCrops:
    """Any slice of any segment's sequence of an epoch (`slice`), replaying only what it needs.

    `tile_starts`: the first epoch tile number of each shard in the epoch's order (and the tile
    count); `history`: the segments trained before the current one.
    """

    def __init__(self, seed: int, epoch: int, crops_per_tile: int, tile_starts: np.ndarray,
                 history: tuple[Segment, ...], total_crops: int):
        self.seed, self.epoch, self.crops_per_tile, self.tile_starts = seed, epoch, crops_per_tile, tile_starts
        self.history = history
        self.deals: list[Deal] = []
        length = total_crops
        for segment in history:
            self.deals.append(Deal(segment.layout, length))
            length -= segment.batches * segment.layout.world_size * segment.layout.batch_size
        self.remaining = [self._remaining_per_unit(level) for level in range(len(history))]
        self.replayed: dict[tuple[int, int], np.ndarray] = {}  # (level, unit) -> its remainder; a few per rank

    def _remaining_per_unit(self, level: int) -> np.ndarray:
        """Cumulative crops each unit of segment `level` left untrained (leading 0)."""
        deal = self.deals[level]
        left = deal.batches * deal.layout.batch_size - deal.trained(self.history[level].batches)
        return np.concatenate([[0], np.cumsum(left)])

    def slice(self, level: int, start: int, stop: int) -> np.ndarray:
        """Crop ids at positions [start, stop) of segment `level`'s sequence."""
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        if level == 0:
            return np.arange(start, stop, dtype=np.int64)
        below, deal, cumulative = level - 1, self.deals[level - 1], self.remaining[level - 1]
        parts = []
        first = int(np.searchsorted(cumulative, start, side="right")) - 1
        for unit in range(first, len(cumulative) - 1):
            if cumulative[unit] >= stop:
                break
            if cumulative[unit + 1] == cumulative[unit]:
                continue  # the unit trained all of its range: nothing to replay
            left = self.remainder(below, unit)
            parts.append(left[max(start - cumulative[unit], 0) : stop - cumulative[unit]])
        carried = int(cumulative[-1])  # then what segment level - 1 did not deal
        if stop > carried:
            offset = deal.dealt - carried
            parts.append(self.slice(below, max(start, carried) + offset, stop + offset))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def remainder(self, level: int, unit: int) -> np.ndarray:
        """Crop ids of `unit`'s range in segment `level` that it had not output when the segment ended."""
        if (level, unit) not in self.replayed:
            self.replayed[level, unit] = self._replay_remainder(level, unit)
        return self.replayed[level, unit]

    def _replay_remainder(self, level: int, unit: int) -> np.ndarray:
        deal = self.deals[level]
        ids = self.slice(level, int(deal.starts[unit]), int(deal.starts[unit + 1]))
        trained = int(deal.trained(self.history[level].batches)[unit])
        done = self.replay(level, deal, unit, ids, trained)
        return ids[~np.isin(ids, done)]

    def replay(self, level: int, deal: Deal, unit: int, ids: np.ndarray, count: int) -> np.ndarray:
        """The first `count` crop ids that `unit` of segment `level` (dealt by `deal`, its range `ids`) output:
        the loader's stages replayed on ids."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        layout, size = deal.layout, self.crops_per_tile
        rank, worker = divmod(unit, layout.streams)
        groups = tile_groups(self.tile_starts, ids, size)
        streams = [[(int(crops[0]) // size, crops) for _, crops in tiles] for _, tiles in groups]
        crops = ({"key": tile, "id": int(crop)} for tile, tile_crops in interleave(streams, layout.shards_in_parallel)
                 for crop in tile_crops)
        shuffle = ShuffleCrops(layout.shuffle_buffer, self.seed, self.epoch, rank, spread=layout.batch_size,
                               worker=worker, segment=level)
        out = np.empty(count, dtype=np.int64)
        for index, crop in zip(range(count), shuffle(crops)):
            out[index] = crop["id"]
        return out
