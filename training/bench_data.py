"""`phileo-train bench-data`: the training data pipeline alone (no model), timed.

Runs exactly what pretraining runs for one rank (plan_epoch -> make_loader, epoch after
epoch, new workers every epoch as in training) for a fixed wall time and reports crops/s,
tiles/s, MB/s of shard bytes, batch diversity and the loader's peak RSS. The rates count from
the first batch on, the steady state that an epoch of a real dataset (hours) runs in; the
start-up before it (workers, shuffle-buffer fill) is reported apart, and later epoch restarts
within the run are paid as in training.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from training.config import BenchConfig
from training.data.epoch import plan_epoch
from training.data.loader import ShuffleCrops, StreamOptions, make_loader
from training.data.shards import ShardInfo, is_remote, resolve_shards

log = logging.getLogger(__name__)

MB = 1e6


@dataclass
class BenchResult:
    crops_per_tile: int
    batch_size: int
    num_workers: int
    dataset_tiles: int
    bytes_per_tile: float | None  # mean shard bytes per sample; None when unknown (remote, no manifest)
    crops: int = 0
    batches: int = 0
    distinct: int = 0  # sum over batches of the distinct tile keys in the batch
    repeats: int = 0  # crops cut from tiles read a second time to fill a quota
    epochs: int = 0  # epochs started
    seconds: float = 0.0
    first_batch_s: float | None = None  # start-up: from the first plan to the first batch (not counted)
    peak_rss: int | None = None  # bytes, main process + DataLoader workers
    steady_distinct: float = 0.0  # distinct tiles per batch of the shuffle stage on a dataset >> its buffer

    @property
    def crops_per_s(self) -> float:
        return self.crops / self.seconds if self.seconds else 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.crops_per_s / self.crops_per_tile

    @property
    def mb_per_s(self) -> float | None:
        return None if self.bytes_per_tile is None else self.tiles_per_s * self.bytes_per_tile / MB

    @property
    def mean_distinct(self) -> float:
        return self.distinct / self.batches if self.batches else 0.0

    @property
    def ideal_distinct(self) -> int:
        """Upper bound: every crop of a batch from another tile (what a large, fully shuffled dataset gives)."""
        return min(self.batch_size, self.dataset_tiles)

    @property
    def diversity(self) -> float:
        return self.mean_distinct / self.ideal_distinct if self.ideal_distinct else 0.0

    @property
    def shuffled_distinct(self) -> float:
        return expected_distinct(self.dataset_tiles, self.crops_per_tile, self.batch_size)


def expected_distinct(tiles: int, crops_per_tile: int, batch_size: int) -> float:
    """Mean distinct tiles in a batch drawn uniformly from all tiles x K crops of an epoch.

    On a small dataset this is below min(B, tiles): K crops of a tile are in the epoch, so
    even a perfect shuffle puts several of them in one batch now and then.
    """
    total = tiles * crops_per_tile
    if total == 0:
        return 0.0
    absent = 1.0  # probability that a given tile has none of its K crops in the batch
    for i in range(min(batch_size, total)):
        absent *= max(total - crops_per_tile - i, 0) / (total - i)
    return tiles * (1.0 - absent)


def steady_state_distinct(crops_per_tile: int, batch_size: int, shuffle_buffer: int, seed: int = 0,
                          batches: int = 400) -> float:
    """Mean distinct tiles per batch of the real ShuffleCrops stage fed as on a large dataset (keys only).

    A worker cuts K consecutive crops per tile; once the data is much larger than the buffer,
    batch diversity is set by the buffer (about buffer / K tiles in it), not by the dataset.
    The first two buffers' worth of output is skipped so the buffer's mix of ages is settled.
    """
    warmup = 2 * shuffle_buffer // batch_size
    total = shuffle_buffer + (warmup + batches) * batch_size

    def crops() -> Iterator[dict]:
        for index in range(total):
            yield {"key": index // crops_per_tile}

    shuffled = ShuffleCrops(shuffle_buffer, seed, 0, 0, spread=batch_size)(crops())
    distinct = [len({c["key"] for c in itertools.islice(shuffled, batch_size)}) for _ in range(warmup + batches)]
    return sum(distinct[warmup:]) / batches


def mean_sample_bytes(shards: list[ShardInfo]) -> float | None:
    """Shard bytes per sample from the local file sizes (tar headers included: what a reader consumes)."""
    samples = sum(s.samples for s in shards)
    if not samples or any(is_remote(s.url) for s in shards):
        return None
    try:
        return sum(os.path.getsize(s.url) for s in shards) / samples
    except OSError:  # a missing shard: the loader counts it as bad data; the figure is just unknown
        return None


class RssMonitor:
    """Peak RSS of this process plus its children (the DataLoader workers), sampled at most every `interval` s.

    A sum of RSS counts pages shared after fork once per process: an upper bound of real use.
    """

    def __init__(self, interval: float = 0.25):
        try:
            import psutil
        except ImportError:  # psutil is a test extra; the benchmark still runs without it
            log.warning("psutil is not installed: peak RSS is not measured")
            self.process = None
        else:
            self.process, self._errors = psutil.Process(), (psutil.NoSuchProcess, psutil.AccessDenied)
        self.interval, self.last, self.peak = interval, 0.0, None
        self.children: list | None = None

    def sample(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.process is None or (not force and now - self.last < self.interval):
            return
        if self.children is None:  # listing children scans all of /proc: only when the workers changed
            self.children = self.process.children(recursive=True)
        self.last, total = now, self.process.memory_info().rss
        for child in self.children:
            try:
                total += child.memory_info().rss
            except self._errors:  # a worker that exited (a new epoch): list the children again next time
                self.children = None
        self.peak = max(self.peak or 0, total)


def _count_batch(result: BenchResult, keys: Iterable[str], repeats: int) -> None:
    keys = list(keys)
    result.crops += len(keys)
    result.batches += 1
    result.distinct += len(set(keys))
    result.repeats += int(repeats)


def _run_epoch(config: BenchConfig, shards: list[ShardInfo], epoch: int, result: BenchResult,
               monitor: RssMonitor, started: float) -> bool:
    """Stream one epoch; True when the time is up (checked after every batch, so >= 1 batch after the first counts)."""
    data = config.data
    plan = plan_epoch(shards, world_size=1, num_workers=data.num_workers, batch_size=data.batch_size,
                      crops_per_tile=data.crops_per_tile, seed=config.seed, epoch=epoch,
                      shuffle_buffer=data.shuffle_buffer, shards_in_parallel=data.shards_in_parallel)
    result.epochs += 1
    loader = make_loader(plan, 0, StreamOptions.from_config(config.data, config.seed), data.num_workers)
    for batch in loader:
        now = time.perf_counter()
        if result.first_batch_s is None:  # start-up ends here, and the clock of the rates starts
            result.first_batch_s = now - started
            continue
        _count_batch(result, batch["keys"], int(batch["repeated"].sum()))
        monitor.sample()
        result.seconds = now - started - result.first_batch_s
        if result.seconds >= config.seconds:
            monitor.sample(force=True)  # workers are still alive here
            return True
    return False


def run_bench(config: BenchConfig) -> BenchResult:
    """Iterate epochs of the real loader until `config.seconds` have passed; ShardSpecError/PlanError on bad input."""
    shards = resolve_shards(config.data.shards)
    data = config.data
    result = BenchResult(data.crops_per_tile, data.batch_size, data.num_workers, sum(s.samples for s in shards),
                         mean_sample_bytes(shards))
    log.info("bench-data: %d shards, %d tiles, K=%d, batch %d, %d workers, %.0f s", len(shards),
             result.dataset_tiles, data.crops_per_tile, data.batch_size, data.num_workers, config.seconds)
    monitor = RssMonitor()
    started = time.perf_counter()
    epoch = 0
    while not _run_epoch(config, shards, epoch, result, monitor, started):
        epoch += 1
    result.peak_rss = monitor.peak
    result.steady_distinct = steady_state_distinct(data.crops_per_tile, data.batch_size, data.shuffle_buffer)
    return result


def format_report(result: BenchResult) -> list[str]:
    """Human-readable lines; the last one is `crops/s: X` (scripts parse it)."""
    mbs = "n/a (remote shards)" if result.mb_per_s is None else f"{result.mb_per_s:.1f}"
    rss = "n/a (needs psutil)" if result.peak_rss is None else f"{result.peak_rss / MB:.0f} MB"
    shuffled = result.shuffled_distinct
    return [
        f"batches: {result.batches} of {result.batch_size} crops in {result.seconds:.2f} s over "
        f"{result.epochs} epoch(s) (first batch after {result.first_batch_s:.2f} s; "
        f"{result.repeats} crops from repeated tiles)",
        f"tiles/s: {result.tiles_per_s:.2f} (crops/s / {result.crops_per_tile} crops per tile)",
        f"MB/s read: {mbs} (tiles/s x {(result.bytes_per_tile or 0) / MB:.2f} MB of shard per tile)",
        f"batch diversity: {result.mean_distinct:.2f} distinct tiles per batch = {result.diversity:.0%} of the "
        f"ideal min(batch, tiles) = {result.ideal_distinct} (a uniform shuffle of this epoch: {shuffled:.2f} = "
        f"{shuffled / max(result.ideal_distinct, 1):.0%})",
        f"batch diversity at scale (shuffle stage alone, dataset >> --shuffle-buffer): {result.steady_distinct:.2f} "
        f"distinct tiles per batch = {result.steady_distinct / result.batch_size:.0%} of {result.batch_size}",
        f"peak RSS (main + {result.num_workers} workers, summed): {rss}",
        f"crops/s: {result.crops_per_s:.1f}",
    ]
