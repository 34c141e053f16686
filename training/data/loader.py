"""The streaming training dataset: one flat list of small picklable stages in a wds.DataPipeline.

tiles of this worker's pieces of shards (training/data/pieces.py; several shards interleaved,
repeated passes only to make up for bad data) -> the crops the plan gave this worker of each tile,
with their labels -> exactly `quota` crops -> shuffle buffer -> batches. Rank and worker come from
the epoch plan (training/data/epoch.py), so every rank yields exactly `plan.steps` batches; the
order of crops (training/data/order.py) is what a resume position replays.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields

import blosc2
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from phileo.bands import REFLECTANCE_SCALE
from phileo.schema import SchemaError, decode_sample
from phileo.tarstream import TarFormatError, iter_samples
from training.config import BadDataError, DataConfig
from training.data.batches import CollateCrops, WorkerMixedBatches, collate_crops
from training.data.crop_labels import crop_labels
from training.data.epoch import EpochPlan
from training.data.order import ShuffleCrops, crop_origins, interleave
from training.data.pieces import ShardPiece, rank_pieces
from training.data.ring import ALIGN
from training.data.shards import open_shard
from training.data.windows import BlockDecodeError, decode_windows

log = logging.getLogger(__name__)

UNUSED_MEMBERS = frozenset({"s2_60m"})  # B01/B09: not model inputs, so never decompressed in training
BAND_KEYS = ("s2_10m", "s2_20m")  # uint16 band tensors of a batch; model_input() makes the image
HALO_20M = 1  # extra 20 m pixels around a crop so bilinear upsampling matches the full-tile result


@dataclass(frozen=True)
class StreamOptions:
    """What the pipeline stages need; defaults are the pretraining config's (training/config.py).

    Batch size, shuffle buffer and shards in parallel are taken from the plan's `Layout`
    (training/data/deal.py), which the resume position records; pass the same values to `plan_epoch`.
    """

    crops_per_tile: int = DataConfig.crops_per_tile
    crop_size: int = DataConfig.crop_size
    batch_size: int = DataConfig.batch_size
    shuffle_buffer: int = DataConfig.shuffle_buffer
    shards_in_parallel: int = DataConfig.shards_in_parallel
    seed: int = 0
    max_bad_fraction: float = DataConfig.max_bad_fraction

    @classmethod
    def from_config(cls, data, seed: int, **overrides) -> StreamOptions:
        """The options named like `data`'s fields (a DataConfig or FinetuneDataConfig), by name, not position."""
        names = {f.name for f in fields(cls)} & {f.name for f in fields(data)}
        return cls(**{name: getattr(data, name) for name in names}, seed=seed, **overrides)


def worker_position() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class BadDataPolicy:
    """Counts corrupt shards/samples, logs them (rate-limited), fails past `max_bad_fraction`."""

    def __init__(self, max_bad_fraction: float, log_every: int = 100):
        self.max_bad_fraction, self.log_every, self.bad, self.good = max_bad_fraction, log_every, 0, 0
        self.urls: dict[str, None] = {}  # shards with bad data, in order

    def record(self, url: str, error: Exception) -> bool:
        self.bad += 1
        self.urls[url] = None
        if self.bad <= 10 or self.bad % self.log_every == 0:
            log.warning("skipping bad data in %s (%d so far): %s", url, self.bad, error)
        return True

    def record_undecodable(self, url: str, error: Exception) -> None:
        """A tile whose headers passed (counted good) but whose blocks failed to decode when cropped."""
        self.good -= 1
        self.record(url, error)

    def check(self, planned: int) -> None:
        lost = max(self.bad, planned - self.good)
        if planned and lost / planned > self.max_bad_fraction:
            shards = ", ".join(list(self.urls)[:5]) + (" ..." if len(self.urls) > 5 else "")
            raise BadDataError(f"{lost} of {planned} planned tiles unreadable (> --max-bad-fraction "
                               f"{self.max_bad_fraction}); bad shards: {shards}; see the warnings above")


class EpochTiles(torch.utils.data.IterableDataset):
    """This rank/worker's tiles (training/data/pieces.py): one pass, then repeated passes (marked) forever.

    Each tile carries the crop indices this worker cuts from it (`crops`). Repeated passes only
    happen when bad data left the worker short of its quota. `lazy`: arrays stay compressed
    (headers validated) for CutCrops to decode only what it crops. The pieces (and the byte
    ranges of partial shards, from index.parquet) are found in the rank's main process.
    """

    def __init__(self, plan: EpochPlan, rank: int, options: StreamOptions, lazy: bool = False):
        self.plan, self.rank, self.options, self.lazy = plan, rank, options, lazy
        self.pieces = rank_pieces(plan, rank)

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_position()
        pieces = self.pieces[worker]
        if self.plan.quota(self.rank, worker) == 0:
            return
        policy = BadDataPolicy(self.options.max_bad_fraction)
        for repeat in range(1_000_000):
            delivered = 0
            streams = [read_tiles(p.url, policy, self.lazy, p) for p in pieces]
            for tile in interleave(streams, self.plan.layout.shards_in_parallel):
                delivered += 1
                yield tile | {"repeat": repeat > 0}
            if repeat == 0:
                policy.check(sum(len(p.tiles) for p in pieces))
            if delivered == 0:
                raise BadDataError(f"rank {self.rank} worker {worker}: no readable tile in "
                                   f"{[p.url for p in pieces]}")


def read_tiles(url: str, policy: BadDataPolicy, lazy: bool = False, piece: ShardPiece | None = None) -> Iterator[dict]:
    """Decoded (or `lazy`: still compressed) tiles of one shard, in order; bad shards/samples go to `policy`.

    With `piece`, only its tiles, each with its `crops`: read from its byte span when it has one,
    else from the shard's start, skipping the samples before (and between) its tiles undecoded.
    A damaged tar, or a remote stream that gave up (RemoteReadError: retry budget spent), ends
    the shard: it is recorded once, and the partial sample it was reading is dropped.
    """
    wanted = None if piece is None else dict(piece.tiles)
    last = None if piece is None else piece.tiles[-1][0]
    start, end = (0, None) if piece is None or piece.span is None else piece.span
    try:
        stream = open_shard(url, start, end)
    except OSError as error:
        policy.record(url, error)
        return
    position = piece.tiles[0][0] if start else 0
    samples = 0
    try:
        for raw in iter_samples(stream, url):
            samples += 1
            if wanted is None or position in wanted:
                tile = _decode(raw, url, policy, lazy)
                if tile is not None:
                    yield tile if wanted is None else tile | {"crops": wanted[position]}
            if position == last:
                return
            position += 1
        if samples == 0:  # an empty tar: its planned tiles are lost, and it is the shard to name
            policy.record(url, TarFormatError(f"{url}: no samples"))
    except (TarFormatError, OSError, UnicodeDecodeError) as error:
        policy.record(url, error)
    finally:
        stream.close()


def _decode(raw: dict, url: str, policy: BadDataPolicy, lazy: bool) -> dict | None:
    key = raw["__key__"]
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    try:
        sample = decode_sample(key, members, skip=UNUSED_MEMBERS, lazy=lazy)
    except SchemaError as error:
        policy.record(url, error)
        return None
    policy.good += 1
    return {"key": key, "url": url, "meta": sample.meta, "arrays": sample.arrays, "policy": policy}


class CutCrops:
    """The crops of each tile (its `crops` indices, else all K), with labels.

    Crop j of a tile is the same window in every worker and every run of an epoch
    (training/data/order.py `crop_origins`), so a tile shared by two workers, or finished after
    a resume, is cut exactly as in one uninterrupted pass. The origins are drawn first, so a lazy
    tile decodes only the blocks under its crops; a tile whose blocks fail to decode yields no
    crop at all (counted by the shard's policy).
    """

    def __init__(self, options: StreamOptions, epoch: int):
        self.options, self.epoch = options, epoch

    def __call__(self, tiles: Iterator[dict]) -> Iterator[dict]:
        size, count = self.options.crop_size, self.options.crops_per_tile
        scratch: dict = {}  # decode buffers reused tile after tile: crops are copies, cut before the next decode
        for tile in tiles:
            height, width = tile["meta"]["shape"]
            if height < size or width < size:  # counted as unusable: all tiles too small fails, never loops
                tile["policy"].record_undecodable(tile["url"], SchemaError(
                    f"{tile['key']}: {height}x{width} tile is smaller than --crop-size {size}"))
                continue
            origins = crop_origins(self.options.seed, self.epoch, tile["key"], count, height, width, size)
            indices = tile.get("crops", range(count))
            try:
                arrays = decode_crop_windows(tile["arrays"], [origins[j] for j in indices], size, scratch)
            except BlockDecodeError as error:
                tile["policy"].record_undecodable(tile["url"], SchemaError(f"{tile['key']}: {error}"))
                continue
            decoded = tile | {"arrays": arrays}  # once per tile, not per crop
            for index in indices:
                yield cut_crop(decoded, *origins[index], size) | {"crop": index}


def decode_crop_windows(arrays: dict, origins: list[tuple[int, int]], size: int,
                        scratch: dict | None = None) -> dict[str, np.ndarray]:
    """numpy arrays holding at least the crops at `origins` (and the 20 m halo); decoded arrays pass through.

    With `scratch` (see training/data/windows.py) the arrays are valid until the next call with it.
    """
    decoded = {}
    for member, array in arrays.items():
        if isinstance(array, np.ndarray):
            decoded[member] = array
            continue
        factor = 2 if member == "s2_20m" else 1
        halo = HALO_20M if factor == 2 else 0
        windows = [(y // factor - halo, x // factor - halo, size // factor + 2 * halo, size // factor + 2 * halo)
                   for y, x in origins]
        decoded[member] = decode_windows(array, windows, None if scratch is None else scratch.setdefault(member, {}))
    return decoded


def cut_crop(tile: dict, y: int, x: int, size: int) -> dict:
    """One crop of a decoded tile: uint16 bands (20 m with an edge-replicated halo) and labels."""
    arrays = tile["arrays"]
    if "s2_stack" in arrays:  # already 10 bands on the 10 m grid
        bands_10m, bands_20m = arrays["s2_stack"][:, y : y + size, x : x + size], None
    else:
        bands_10m = arrays["s2_10m"][:, y : y + size, x : x + size]
        bands_20m = _window_20m(arrays["s2_20m"], y // 2, x // 2, size // 2)
    labels = crop_labels(tile["meta"], arrays, y, x, size)
    return {"key": tile["key"], "url": tile["url"], "repeat": tile["repeat"], "s2_10m": bands_10m.copy(),
            "s2_20m": None if bands_20m is None else bands_20m.copy(), **labels}


def _window_20m(bands: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """20 m window with a HALO_20M border, edge-replicated outside the tile (as full-tile upsampling)."""
    height, width = bands.shape[-2:]
    top, left = y - HALO_20M, x - HALO_20M
    bottom, right = y + size + HALO_20M, x + size + HALO_20M
    window = bands[:, max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    pads = ((0, 0), (max(-top, 0), max(bottom - height, 0)), (max(-left, 0), max(right - width, 0)))
    return np.pad(window, pads, mode="edge") if any(any(p) for p in pads) else window


class TakeQuota:
    """Exactly this worker's quota of crops: the plan's promise that keeps ranks in step."""

    def __init__(self, plan: EpochPlan, rank: int):
        self.plan, self.rank = plan, rank

    def __call__(self, crops: Iterator[dict]) -> Iterator[dict]:
        worker, _ = worker_position()
        quota = self.plan.quota(self.rank, worker)
        taken = 0
        for crop in crops:
            if taken == quota:
                return
            taken += 1
            yield crop
        assert taken == quota, f"rank {self.rank} worker {worker}: stream ended after {taken} of {quota} crops"


def model_input(batch: dict, device: torch.device) -> torch.Tensor:
    """(B, 10, S, S) float32 reflectance (DN / 10000) on `device`: 20 m bands bilinearly upsampled."""
    bands_10m = batch["s2_10m"].to(device, non_blocking=True).float()
    if "s2_20m" not in batch:
        return bands_10m.mul_(1.0 / REFLECTANCE_SCALE)
    low = batch["s2_20m"].to(device, non_blocking=True).float()
    up = F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
    margin = 2 * HALO_20M
    image = torch.cat([bands_10m, up[:, :, margin:-margin, margin:-margin]], dim=1)
    return image.mul_(1.0 / REFLECTANCE_SCALE)


def make_pipeline(plan: EpochPlan, rank: int, options: StreamOptions,
                  collate: Callable[[list[dict]], dict] = collate_crops) -> wds.DataPipeline:
    """The stages of one rank; the shuffle buffer and interleaving are the plan's (its resume position records them)."""
    layout = plan.layout
    return wds.DataPipeline(
        EpochTiles(plan, rank, options, lazy=True),
        CutCrops(options, plan.epoch),
        TakeQuota(plan, rank),  # before the shuffle: the buffer must not pull repeats ahead of first-pass crops
        ShuffleCrops(layout.shuffle_buffer, plan.seed, plan.epoch, rank, spread=layout.batch_size,
                     segment=len(plan.history)),
        wds.batched(layout.batch_size, collation_fn=collate, partial=False),
    )


def _init_loader_worker(_: int) -> None:
    # Each worker is one of several processes per rank: one decode/compute thread each, instead
    # of Blosc2's and torch's default of one thread per core in every worker.
    blosc2.set_nthreads(1)
    torch.set_num_threads(1)


def _as_is(batch: dict) -> dict:
    return batch


def pipeline_loader(pipeline: wds.DataPipeline, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a pipeline that batches itself, its workers on one thread each.

    `collate_fn=_as_is`: the default would turn numpy batches into tensors inside the worker,
    and each tensor then crosses to the main process as its own shared-memory file. Workers
    are forked where the platform can (Linux): they then share the batch ring mapped before
    they start (training/data/ring.py); Python 3.14 no longer forks by default.
    """
    context = "fork" if num_workers and sys.platform == "linux" else None
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None,
                                       worker_init_fn=_init_loader_worker if num_workers else None,
                                       multiprocessing_context=context)


def make_loader(plan: EpochPlan, rank: int, options: StreamOptions, num_workers: int) -> Iterable[dict]:
    """Batches of this rank for the epoch (numpy arrays already wrapped as tensors)."""
    assert (plan.layout.num_workers, plan.layout.batch_size) == (num_workers, options.batch_size), \
        "the plan's workers and batch size are how its crops were dealt"
    collate = CollateCrops()
    loader = pipeline_loader(make_pipeline(plan, rank, options, collate), num_workers)
    # room for 10 uint16 bands per crop on the 10 m grid (s2_stack; 4 at 10 m + 6 at 20 m with halos take less),
    # plus the alignment of two arrays; a batch that does not fit goes without the ring
    slot_bytes = options.batch_size * 10 * options.crop_size**2 * np.dtype(np.uint16).itemsize + 2 * ALIGN
    return WorkerMixedBatches(loader, num_workers, collate, slot_bytes)
