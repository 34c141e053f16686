"""Write samples into size-capped tar shards, atomically, with byte-identical reruns.

A shard is written under a temporary name and renamed only when complete, so no partial
shard is ever visible under its final name. Tar headers are fixed (mtime, owner, mode)
so the same samples always give the same bytes and the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phileo.schema import DEFAULT_CLEVEL, Sample, encode_sample
from sharding.layout import TMP_SUFFIX, shard_name

FIXED_MTIME = 1_600_000_000  # any constant: reruns must produce identical bytes
CLOUD_HISTOGRAM_BINS = 10  # 0-10%, ..., 90-100%


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: readers never see a partial file."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write(tmp)
    os.replace(tmp, path)


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardSummary:
    """What the manifest says of one shard: counts, checksum and where/when its tiles are."""

    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    bbox_lonlat: list[float] = field(default_factory=lambda: [180.0, 90.0, -180.0, -90.0])
    time_range: list[str] = field(default_factory=list)
    one_degree_cells: set = field(default_factory=set)
    cloud_cover_histogram: list[int] = field(default_factory=lambda: [0] * CLOUD_HISTOGRAM_BINS)

    def add(self, meta: dict) -> None:
        self.samples += 1
        if "bounds_lonlat" in meta:
            west, south, east, north = meta["bounds_lonlat"]
        else:  # sources without densified bounds: the corner box
            lons, lats = zip(*meta["corners_lonlat"])
            west, south, east, north = min(lons), min(lats), max(lons), max(lats)
        box = self.bbox_lonlat
        self.bbox_lonlat = [min(box[0], west), min(box[1], south), max(box[2], east), max(box[3], north)]
        stamp = meta.get("timestamp")
        if stamp:
            self.time_range = [min(self.time_range[0], stamp), max(self.time_range[1], stamp)] \
                if self.time_range else [stamp, stamp]
        self.one_degree_cells.add((math.floor(meta["centre_lat"]), math.floor(meta["centre_lon"])))
        cloud = meta.get("cloud_cover", 0.0)
        self.cloud_cover_histogram[min(int(cloud // 10), CLOUD_HISTOGRAM_BINS - 1)] += 1

    def to_json(self) -> dict:
        return {"url": f"shards/{self.name}", "samples": self.samples, "bytes": self.bytes,
                "sha256": self.sha256, "bbox_lonlat": self.bbox_lonlat, "time_range": self.time_range,
                "distinct_1deg_cells": len(self.one_degree_cells),
                "cloud_cover_histogram": self.cloud_cover_histogram}


class UnitShardWriter:
    """Writes the samples of one work unit into `{unit}-{part}.tar` shards of about `shard_size` bytes."""

    def __init__(self, shards_dir: Path, unit: int, shard_size: int, clevel: int = DEFAULT_CLEVEL):
        self.shards_dir, self.unit, self.shard_size, self.clevel = shards_dir, unit, shard_size, clevel
        self.shards: list[ShardSummary] = []
        self._tar: tarfile.TarFile | None = None
        self._current: ShardSummary | None = None

    def _tmp_path(self, name: str) -> Path:
        return self.shards_dir / f"{name}{TMP_SUFFIX}"

    def _open_next(self) -> None:
        self._current = ShardSummary(shard_name(self.unit, len(self.shards)))
        self._tar = tarfile.open(self._tmp_path(self._current.name), "w", format=tarfile.USTAR_FORMAT)

    def write(self, sample: Sample) -> dict:
        """Append one sample; returns its index entry (shard, offset, bytes)."""
        members = encode_sample(sample, self.clevel)
        if self._tar is None:
            self._open_next()
        offset = self._tar.offset
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{sample.key}.{extension}")
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        size = self._tar.offset - offset
        self._current.add(sample.meta)
        entry = {"key": sample.key, "shard": f"shards/{self._current.name}", "offset": offset, "bytes": size}
        if self._tar.offset >= self.shard_size:  # close once over target: exceeds it by < 1 sample
            self._finish_shard()
        return entry

    def _finish_shard(self) -> None:
        self._tar.close()
        tmp = self._tmp_path(self._current.name)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        self._current.bytes = tmp.stat().st_size
        self._current.sha256 = sha256_file(tmp)
        os.replace(tmp, self.shards_dir / self._current.name)
        self.shards.append(self._current)
        self._tar, self._current = None, None

    def close(self) -> list[ShardSummary]:
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file), keeping completed ones."""
        if self._tar is not None:
            self._tar.close()
            self._tmp_path(self._current.name).unlink(missing_ok=True)
            self._tar, self._current = None, None
