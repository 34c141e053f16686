"""What `phileo-shard verify` keeps while it streams a dataset: bounded, whatever the dataset's size.

* `IndexRows`: index.parquet read a batch at a time, in file order. Every writer (build finalize,
  merge, subset, split) writes the rows in shard order, so verify takes the rows of each shard as
  it streams that shard and never holds more than one batch and one shard's samples.
* `SeenKeys`: the keys of the shards read so far as 64-bit hashes (plus the shard each came
  from), 12 bytes a key in sorted numpy runs instead of a Python dict of every key.
* `Problems`: the messages, counted, of which the first `KEPT` are kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from sharding.layout import INDEX

INDEX_COLUMNS = ["key", "shard", "offset", "bytes"]
BATCH_ROWS = 65_536
KEPT = 1000  # problem messages kept; the rest are counted


class Problems:
    """Problems in the order found: all counted, the first `KEPT` kept (a wholly wrong index of 2.25M rows
    would otherwise be 2.25M messages)."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.kept) < KEPT:
            self.kept.append(message)

    def extend(self, messages) -> None:
        for message in messages:
            self.add(message)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, number: int) -> str:
        return self.kept[number]

    def __iter__(self) -> Iterator[str]:
        return iter(self.kept)


class SeenKeys:
    """The sample keys of the shards read so far, as 64-bit hashes in sorted runs (a log-structured merge:
    a new run is merged into the last while it is at least as long), so each shard's keys are looked up
    in ~log2(keys) runs. A key is a duplicate when its hash was seen: two distinct keys share a hash with
    probability ~n^2 / 2^65 (1e-7 at 2.25M keys). Python's `hash` of a str is stable within a process."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, shard number of each)
        self.distinct = 0

    def add_shard(self, keys: list[str], shard: int) -> list[tuple[str, int]]:
        """(key, number of the shard that held it first) for each of `keys` seen before; remembers the others."""
        hashes = np.fromiter((hash(key) for key in keys), dtype=np.int64, count=len(keys))
        earlier = np.full(len(keys), -1, dtype=np.int64)
        for run_hashes, run_shards in self.runs:  # a hash is in at most one run: only new keys are added
            position = np.minimum(np.searchsorted(run_hashes, hashes), len(run_hashes) - 1)
            hit = run_hashes[position] == hashes
            earlier[hit] = run_shards[position[hit]]
        new = earlier < 0
        self.distinct += int(new.sum())
        self._push(np.sort(hashes[new]), shard)
        return [(keys[number], int(earlier[number])) for number in np.flatnonzero(~new)]

    def _push(self, hashes: np.ndarray, shard: int) -> None:
        run = hashes, np.full(len(hashes), shard, dtype=np.int32)
        while self.runs and len(self.runs[-1][0]) <= len(run[0]):
            last = self.runs.pop()
            merged = np.concatenate([last[0], run[0]])
            order = np.argsort(merged, kind="stable")
            run = merged[order], np.concatenate([last[1], run[1]])[order]
        if len(run[0]):
            self.runs.append(run)


class IndexRows:
    """index.parquet's (row number, key, shard, offset, bytes) in file order, one batch in memory at a time."""

    def __init__(self, index: pq.ParquetFile):
        self._batches = index.iter_batches(batch_size=BATCH_ROWS, columns=INDEX_COLUMNS)
        self._rows: list[tuple] = []
        self._next = 0  # position in _rows
        self._first = 0  # row number of _rows[0]

    def peek(self) -> tuple | None:
        while self._next >= len(self._rows):
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._first += len(self._rows)
            columns = [batch.column(name).to_pylist() for name in INDEX_COLUMNS]
            self._rows, self._next = list(zip(*columns)), 0
        return (self._first + self._next, *self._rows[self._next])

    def advance(self) -> None:
        self._next += 1


def _location(where: tuple[int, int] | None, key: str) -> str:
    return f"{key}@{where[0]}+{where[1]}" if where else f"no sample {key}"


def check_shard_rows(rows: IndexRows, url: str, number: int, shard_number: dict[str, int],
                     found: dict[str, tuple[int, int]]) -> Iterator[str]:
    """Problems of the index rows of shard `url` (number `number` in the manifest), which come next in the
    index: each must locate its sample as the shard's tar headers do (`found`: key -> (offset, bytes)).
    Rows before them that name an earlier shard or one the manifest does not list are problems too."""
    while (row := rows.peek()) is not None:
        row_number, key, shard, offset, size = row
        at = shard_number.get(shard)
        if at is not None and at > number:
            return  # the rows of a later shard: this one has no (more) rows
        rows.advance()
        yield from row_problems(row, url, found, at)


def row_problems(row: tuple, url: str | None, found: dict, at: int | None) -> Iterator[str]:
    """Problems of one index row, read while shard `url` was current (None: after the last shard)."""
    row_number, key, shard, offset, size = row
    head = f"{INDEX} row {row_number} ({key}): points at {shard}@{offset}+{size}"
    if at is None:
        yield f"{head}, a shard the manifest does not list"
    elif shard != url:
        yield f"{head}, out of shard order (after rows of {url or 'the last shard'})"
    elif found.get(key) != (offset, size):
        yield f"{head}, the shards hold {_location(found.get(key), key)} there"
