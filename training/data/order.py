"""The order of an epoch's crops inside one DataLoader worker, as pure functions of ids and seeds.

Shared by the loader (training/data/loader.py, on real tiles) and the resume position
(training/data/position.py, on integer crop ids): both call the same `interleave` and
`ShuffleCrops`, so the crops a worker has emitted after n batches can be computed without
reading a pixel. Crop windows come from a per-tile RNG (`crop_origins`), so whichever worker
cuts crop j of a tile, in whichever run, cuts the same window.
"""

from __future__ import annotations

import collections
import hashlib
import random
from collections.abc import Iterable, Iterator

import numpy as np


def interleave(streams: list[Iterable], parallel: int) -> Iterator:
    """Items of `parallel` streams at a time, one from each in turn; the next stream opens when one ends.

    Consecutive tiles then come from different shards (geographic mixing). Streams are
    iterated lazily, so a shard is opened only when its turn comes.
    """
    pending = list(streams)
    active: list[Iterator] = []
    while pending or active:
        while pending and len(active) < parallel:
            active.append(iter(pending.pop(0)))
        for stream in list(active):
            item = next(stream, None)
            if item is None:
                active.remove(stream)
            else:
                yield item


def key_number(key: str) -> int:
    """A stable 63-bit number of a tile key (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def crop_origins(seed: int, epoch: int, key: str, crops_per_tile: int, height: int, width: int,
                 size: int) -> list[tuple[int, int]]:
    """The K crop origins (even, so the 20 m grid stays aligned) of a tile in an epoch: crop j is origins[j]."""
    rng = np.random.default_rng([seed, epoch, key_number(key)])
    return [(2 * int(rng.integers(0, (height - size) // 2 + 1)), 2 * int(rng.integers(0, (width - size) // 2 + 1)))
            for _ in range(crops_per_tile)]


class ShuffleCrops:
    """Seeded shuffle buffer that spreads tiles over batches (reproducible per rank/worker/epoch/segment).

    A plain reservoir over K crops per tile puts several crops of one tile in a batch, even when
    the buffer holds many tiles. Here crops wait per tile, and leave in rounds: each round visits
    the buffered tiles in a random order and takes one random crop of each, and a new round starts
    with the tiles not among the last `spread` taken, so any `spread` consecutive crops (a batch)
    come from different tiles whenever the buffer holds that many tiles.

    The decisions depend only on the order in which tile keys arrive, never on a key's value
    or on pixels: training/data/position.py replays them on integer ids. `worker` is taken from
    the DataLoader when not given (the replay gives it); `segment` > 0 (a resumed epoch) seeds
    a different order.
    """

    def __init__(self, buffer_size: int, seed: int, epoch: int, rank: int, spread: int = 16,
                 worker: int | None = None, segment: int = 0):
        self.buffer_size, self.seed, self.epoch, self.rank, self.spread = buffer_size, seed, epoch, rank, spread
        self.worker, self.segment = worker, segment

    def __call__(self, crops: Iterable[dict]) -> Iterator[dict]:
        worker = self.worker
        if worker is None:  # in a DataLoader worker (the replay passes `worker`, and needs no torch)
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            worker = 0 if info is None else info.id
        salt = f"-{self.segment}" if self.segment else ""
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}{salt}")
        by_tile: dict = {}
        round_order: list = []  # popped from the end
        recent: collections.deque = collections.deque(maxlen=self.spread)
        buffered = 0
        for crop in crops:
            by_tile.setdefault(crop["key"], []).append(crop)
            buffered += 1
            if buffered >= self.buffer_size:
                yield self._take(by_tile, round_order, recent, rng)
                buffered -= 1
        for _ in range(buffered):
            yield self._take(by_tile, round_order, recent, rng)

    @staticmethod
    def _take(by_tile: dict, round_order: list, recent: collections.deque, rng: random.Random) -> dict:
        """One random crop of the next tile of the current round (a new round when it is used up)."""
        while True:
            if not round_order:
                fresh = [key for key in by_tile if key not in recent]
                rng.shuffle(fresh)
                round_order.extend([key for key in reversed(recent) if key in by_tile] + fresh)
            waiting = by_tile.get(round_order.pop())
            if waiting:  # tiles emptied during the round are skipped
                index = rng.randrange(len(waiting))
                waiting[index], waiting[-1] = waiting[-1], waiting[index]
                crop = waiting.pop()
                if not waiting:
                    del by_tile[crop["key"]]
                recent.append(crop["key"])
                return crop
