"""`phileo-shard split`: a spatial train/val hold-out of whole blocks, with a buffer at train/val edges.

Blocks are squares of about `block_km` on the sinusoidal (equal-area) plane
x = lon * cos(lat) * 111.32 km, y = lat * 111.32 km. Whole blocks are drawn for validation in a
seeded order until about `val_fraction` of the samples. A sample is dropped, on either side, when
the box of +/- `buffer_km` around its centre reaches a block of the other side (mapped to the
plane conservatively: its corners, the equator when it crosses it, both sides of the
antimeridian). Adjacent MajorTOM tiles are 10 km apart and 10.68 km wide (their lon/lat boxes
up to ~11.2 km with the UTM grid's rotation), so two tiles that overlap have centres less than
~11.2 km apart along each axis; the default buffer of 12 km (one grid cell and the tile's
overhang) therefore puts each of them within reach of the other's block, and both are dropped:
no kept val tile overlaps a kept train tile. Both outputs are byte copies
(`sharding.dataset.subset.write_selection`) with their own manifests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from phileo.geo import EARTH_RADIUS_EQUATOR_KM
from sharding.dataset.location import DatasetLocation
from sharding.dataset.subset import local_output, read_index, write_selection
from sharding.errors import InputError

log = logging.getLogger(__name__)

KM_PER_DEGREE = math.pi * EARTH_RADIUS_EQUATOR_KM / 180.0
DEFAULT_BUFFER_KM = 12.0  # > 2 x the half-extent of a tile's lon/lat box (<= 5.6 km): see the module doc


def block_of(lat: np.ndarray, lon: np.ndarray, block_km: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the block holding each point, on the sinusoidal plane."""
    x = lon * np.cos(np.radians(lat)) * KM_PER_DEGREE
    return (np.floor(lat * KM_PER_DEGREE / block_km).astype(np.int64),
            np.floor(x / block_km).astype(np.int64))


def _reach(lat, lon, reach_km: float):
    """Lat/lon box of everything within `reach_km` of a centre (longitudes may leave -180..180)."""
    dlat = reach_km / KM_PER_DEGREE
    south, north = np.clip(lat - dlat, -90, 90), np.clip(lat + dlat, -90, 90)
    poleward = np.maximum(np.abs(south), np.abs(north))
    dlon = np.minimum(reach_km / (KM_PER_DEGREE * np.maximum(np.cos(np.radians(poleward)), 1e-9)), 180.0)
    return south, north, lon - dlon, lon + dlon


def _block_range(south, north, west, east, block_km: float):
    """(row_lo, row_hi, col_lo, col_hi) of the blocks a lat/lon box touches on the plane."""
    xs = [lon * np.cos(np.radians(lat)) * KM_PER_DEGREE
          for lon in (west, east) for lat in (south, north, np.clip(0.0, south, north))]
    return (np.floor(south * KM_PER_DEGREE / block_km).astype(np.int64),
            np.floor(north * KM_PER_DEGREE / block_km).astype(np.int64),
            np.floor(np.minimum.reduce(xs) / block_km).astype(np.int64),
            np.floor(np.maximum.reduce(xs) / block_km).astype(np.int64))


def touched_blocks(lat: float, lon: float, block_km: float, reach_km: float) -> Iterator[tuple[int, int]]:
    """Every block within `reach_km` of a centre, both sides of the antimeridian included."""
    south, north, west, east = _reach(lat, lon, reach_km)
    pieces = [(max(west, -180.0), min(east, 180.0))]
    if west < -180:
        pieces.append((west + 360.0, 180.0))
    if east > 180:
        pieces.append((-180.0, east - 360.0))
    for piece_west, piece_east in pieces:
        row_lo, row_hi, col_lo, col_hi = (int(v) for v in _block_range(south, north, piece_west, piece_east,
                                                                       block_km))
        for row in range(row_lo, row_hi + 1):
            for col in range(col_lo, col_hi + 1):
                yield row, col


def interior(lat: np.ndarray, lon: np.ndarray, block_km: float, reach_km: float) -> np.ndarray:
    """Bool per sample: its reach stays inside its own block, so it is kept whichever side its neighbours take."""
    south, north, west, east = _reach(lat, lon, reach_km)
    row_lo, row_hi, col_lo, col_hi = _block_range(south, north, west, east, block_km)
    return (west >= -180) & (east <= 180) & (row_lo == row_hi) & (col_lo == col_hi)


def choose_val_blocks(weights: np.ndarray, target: float, seed: int) -> np.ndarray:
    """Bool per block: blocks in seeded order, each taken if it brings the val weight closer to `target`."""
    chosen = np.zeros(len(weights), dtype=bool)
    taken = 0.0
    for block in np.random.default_rng(seed).permutation(len(weights)):
        if taken >= target:
            break
        if abs(taken + weights[block] - target) < abs(taken - target):
            chosen[block] = True
            taken += weights[block]
    return chosen


def _block_keys(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """One int64 per block, ordered as (row, col) pairs."""
    return np.asarray(rows, dtype=np.int64) * (1 << 32) + (np.asarray(cols, dtype=np.int64) + (1 << 31))


def boundary_drops(lat: np.ndarray, lon: np.ndarray, is_val: np.ndarray, blocks: np.ndarray, val_block: np.ndarray,
                   block_km: float, reach_km: float) -> np.ndarray:
    """Bool per sample: the box of +/- `reach_km` around its centre reaches a block of the other side.

    `blocks` (n, 2) are the sorted (row, col) of the blocks with samples, `val_block` their side;
    a block without samples takes no side. Reaches of up to 3 x 3 blocks are checked vectorised,
    the rest (antimeridian, near the poles) one by one.
    """
    keys = _block_keys(blocks[:, 0], blocks[:, 1])

    def other_side(rows, cols, own):
        wanted = _block_keys(rows, cols)
        position = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        return np.where(keys[position] == wanted, val_block[position], own) != own

    south, north, west, east = _reach(lat, lon, reach_km)
    row_lo, row_hi, col_lo, col_hi = _block_range(south, north, np.maximum(west, -180.0), np.minimum(east, 180.0),
                                                  block_km)
    small = (west >= -180) & (east <= 180) & (row_hi - row_lo < 3) & (col_hi - col_lo < 3)
    drop = np.zeros(len(lat), dtype=bool)
    for row_step in range(3):
        for col_step in range(3):
            inside = small & (row_lo + row_step <= row_hi) & (col_lo + col_step <= col_hi)
            drop |= inside & other_side(row_lo + row_step, col_lo + col_step, is_val)
    for number in np.flatnonzero(~small):
        touched = np.array(list(touched_blocks(float(lat[number]), float(lon[number]), block_km, reach_km)))
        drop[number] = other_side(touched[:, 0], touched[:, 1], bool(is_val[number])).any()
    return drop


@dataclass(frozen=True)
class SplitArgs:
    dataset: str
    output_train: str
    output_val: str
    val_fraction: float = 0.01
    block_km: float = 100.0
    buffer_km: float = DEFAULT_BUFFER_KM
    seed: int = 0
    shard_size: int = 1_000_000_000

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction <= 0.5:
            raise InputError(f"--val-fraction {self.val_fraction}: expected a fraction in (0, 0.5]")
        if not self.block_km > 0:
            raise InputError(f"--block-km {self.block_km}: expected a positive size in km")
        if not self.buffer_km >= 0:
            raise InputError(f"--buffer-km {self.buffer_km}: expected a distance >= 0 in km")
        if not self.block_km > 2 * self.buffer_km:
            raise InputError(f"--block-km {self.block_km:g}: expected more than twice --buffer-km "
                             f"({self.buffer_km:g}), or every sample would be within the buffer of an edge")
        train, val = local_output(self.output_train, "--output-train"), local_output(self.output_val, "--output-val")
        if train.resolve() == val.resolve():
            raise InputError(f"--output-val {self.output_val}: same directory as --output-train")


@dataclass
class SplitSummary:
    samples: int
    blocks: int
    val_blocks: int
    train: int
    val: int
    dropped_train: int
    dropped_val: int
    args: SplitArgs
    seconds: float = 0.0

    def counts(self) -> dict:
        return {"input": self.samples, "train": self.train, "val": self.val,
                "dropped_train_side": self.dropped_train, "dropped_val_side": self.dropped_val,
                "blocks": self.blocks, "val_blocks": self.val_blocks}

    def line(self) -> str:
        kept = self.train + self.val
        return (f"split {self.samples} samples in {self.blocks} blocks of {self.args.block_km:g} km: train "
                f"{self.train}, val {self.val} ({self.val / kept:.2%} of kept, target {self.args.val_fraction:.2%}, "
                f"{self.val_blocks} blocks), dropped {self.dropped_train + self.dropped_val} within "
                f"{self.args.buffer_km:g} km of a train/val boundary ({self.dropped_train} train-side, "
                f"{self.dropped_val} val-side), in {self.seconds:.1f} s")


def _assign(lat: np.ndarray, lon: np.ndarray, blocks: np.ndarray, inverse: np.ndarray, args: SplitArgs):
    """(val per block, val per sample, dropped per sample).

    Blocks are weighed by their interior samples (those no buffer can drop) and drawn until the
    val weight reaches a target, at most half the total weight. The val samples kept also
    include rims shared with other val blocks, and the kept total is only known after the
    draw, so the target starts at `val_fraction` of all samples and is corrected twice by the
    ratio of wanted to obtained val samples.
    """
    weights = np.bincount(inverse, weights=interior(lat, lon, args.block_km, args.buffer_km), minlength=len(blocks))
    target = args.val_fraction * len(lat)
    for _ in range(3):
        val_block = choose_val_blocks(weights, min(target, weights.sum() / 2), args.seed)
        is_val = val_block[inverse]
        drop = boundary_drops(lat, lon, is_val, blocks, val_block, args.block_km, args.buffer_km)
        wanted, obtained = args.val_fraction * (~drop).sum(), (is_val & ~drop).sum()
        if obtained == 0 or abs(obtained - wanted) <= 0.02 * wanted:
            break
        target *= wanted / obtained
    return val_block, is_val, drop


def split(args: SplitArgs, overwrite: bool = False) -> SplitSummary:
    """Run `phileo-shard split`; InputError on bad input or a split that leaves one side empty."""
    started = time.monotonic()
    source = DatasetLocation(args.dataset)
    manifest, index = read_index(source)
    if index.num_rows == 0:
        raise InputError(f"{source}: the dataset has no samples")
    missing = sum(index.column(name).null_count for name in ("centre_lat", "centre_lon"))
    if missing:
        raise InputError(f"{source}: {missing} centre_lat/centre_lon values are null; split needs tile locations")
    lat, lon = (index.column(name).to_numpy() for name in ("centre_lat", "centre_lon"))
    rows, cols = block_of(lat, lon, args.block_km)
    blocks, inverse = np.unique(np.stack([rows, cols], 1), axis=0, return_inverse=True)
    if len(blocks) < 2:
        raise InputError(f"--block-km {args.block_km:g}: all {index.num_rows} samples fall in one block; "
                         "use smaller blocks")
    val_block, is_val, drop = _assign(lat, lon, blocks, inverse.reshape(-1), args)
    train_mask, val_mask = ~is_val & ~drop, is_val & ~drop
    summary = SplitSummary(index.num_rows, len(blocks), int(val_block.sum()), int(train_mask.sum()),
                           int(val_mask.sum()), int((drop & ~is_val).sum()), int((drop & is_val).sum()), args)
    if summary.val == 0 or summary.train == 0:
        raise InputError(f"--block-km {args.block_km:g}: the split leaves {summary.train} train and {summary.val} "
                         "val samples after the boundary buffer; use other --block-km / --val-fraction")
    parameters = {"val_fraction": args.val_fraction, "block_km": args.block_km, "buffer_km": args.buffer_km,
                  "seed": args.seed, "plane": "sinusoidal",
                  "val_blocks": [list(map(int, block)) for block in blocks[val_block]]}
    for role, mask, output, flag in (("train", train_mask, args.output_train, "--output-train"),
                                     ("val", val_mask, args.output_val, "--output-val")):
        derived = {"command": "split", "role": role, "parameters": parameters, "counts": summary.counts()}
        write_selection(source, manifest, index.filter(pa.array(mask)), local_output(output, flag), args.shard_size,
                        derived, overwrite, flag)
    log.debug("val blocks: %s", parameters["val_blocks"])
    summary.seconds = time.monotonic() - started
    return summary

