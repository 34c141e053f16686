"""Write samples into size-capped tar shards, atomically, with byte-identical reruns.

A shard is written under a temporary name and renamed only when complete, so no partial
shard is ever visible under its final name. Tar headers are fixed (mtime, owner, mode)
so the same samples always give the same bytes and the same sha256.
"""

from __future__ import annotations

import hashlib
import math
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from phileo.schema import BLOSC_ENCODING_ENV, DEFAULT_CLEVEL, Sample, encode_sample
from sharding.errors import InputError
from sharding.layout import shard_name, shard_url, temp_name

FIXED_MTIME = 1_600_000_000  # any constant: reruns must produce identical bytes
CLOUD_HISTOGRAM_BINS = 10  # 0-10%, ..., 90-100%


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: readers never see a partial file."""
    tmp = path.with_name(temp_name(path.name))
    try:
        write(tmp)
    except OSError as error:  # a full disk must not stay full of our half-written files
        tmp.unlink(missing_ok=True)
        if error.filename is None:  # a write into an open file names no path: name ours
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def check_codec_environment() -> None:
    """Refuse to write shards while a BLOSC_* variable would change their bytes (phileo/schema.py)."""
    found = [name for name in BLOSC_ENCODING_ENV if name in os.environ]
    if found:
        raise InputError(f"environment variable {found[0]} is set: c-blosc2 would let it override the shard "
                         "encoding, so shards would differ from any other build's bytes; unset it")


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
        return {"url": shard_url(self.name), "samples": self.samples, "bytes": self.bytes,
                "sha256": self.sha256, "bbox_lonlat": self.bbox_lonlat, "time_range": self.time_range,
                "distinct_1deg_cells": len(self.one_degree_cells),
                "cloud_cover_histogram": self.cloud_cover_histogram}


class ShardWriter:
    """Size-capped tar shards `{unit}-{part}.tar` of about `shard_size` bytes, each closed once over target.

    One writer for every command that writes shards: the build encodes samples (`write`), the
    PhilEO Bench build the same with its own summary type, subset/split copy samples' raw tar
    blocks (`RawShardWriter`). A shard is written under a temp name, hashed as it is written,
    fsynced and renamed; the bytes are exactly what tarfile writes in USTAR format with these
    fixed headers (tests/test_build_identity.py).
    """

    summary_type: type[ShardSummary] = ShardSummary

    def __init__(self, shards_dir: Path, unit: int, shard_size: int, clevel: int = DEFAULT_CLEVEL):
        self.shards_dir, self.unit, self.shard_size, self.clevel = shards_dir, unit, shard_size, clevel
        self.shards: list[ShardSummary] = []
        self._file: BinaryIO | None = None
        self._current: ShardSummary | None = None
        self._digest = hashlib.sha256()
        self._offset = 0

    def _tmp_path(self, name: str) -> Path:
        return self.shards_dir / temp_name(name)

    def _open_next(self) -> None:
        self._current = self.summary_type(shard_name(self.unit, len(self.shards)))
        self._file = open(self._tmp_path(self._current.name), "wb")
        self._digest, self._offset = hashlib.sha256(), 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)
        self._offset += len(data)

    def write(self, sample: Sample) -> dict:
        """Append one sample; returns its index entry (key, shard, offset, bytes)."""
        members = encode_sample(sample, self.clevel)
        if self._file is None:
            self._open_next()
        offset = self._offset
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{sample.key}.{extension}")
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o444
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            self._write(data)
            self._write(bytes(-len(data) % tarfile.BLOCKSIZE))
        return self._added(sample.key, offset, sample.meta)

    def _added(self, key: str, offset: int, meta: dict) -> dict:
        """Account for the sample just written; close the shard once over target (it exceeds it by < 1 sample)."""
        self._current.add(meta)
        entry = {"key": key, "shard": shard_url(self._current.name), "offset": offset,
                 "bytes": self._offset - offset}
        if self._offset >= self.shard_size:
            self._finish_shard()
        return entry

    def _finish_shard(self) -> None:
        """End-of-archive blocks and record padding as tarfile writes them, fsync, rename."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self._offset % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._current.bytes, self._current.sha256 = self._offset, self._digest.hexdigest()
        os.replace(self._tmp_path(self._current.name), self.shards_dir / self._current.name)
        self.shards.append(self._current)
        self._file, self._current = None, None

    def close(self) -> list[ShardSummary]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file), keeping completed ones."""
        if self._file is not None:
            self._file.close()
            self._tmp_path(self._current.name).unlink(missing_ok=True)
            self._file, self._current = None, None
