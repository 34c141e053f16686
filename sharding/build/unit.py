"""One work unit: read its planned rows, decode, filter, write shards, then its stats file.

Files of a unit, in the order they appear: shards (temp + rename each), the unit's index
rows and band histogram, and last `units/<unit>.json`. A unit with that stats file is
complete; resume skips it. Anything else a killed unit left behind is rewritten.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow as pa

from phileo.bands import ALL_BANDS, RESOLUTION_GROUPS
from phileo.schema import DEFAULT_CLEVEL, Sample
from sharding.build.fasttom import FastTomRules, fasttom_quadrant
from sharding.build.labels import LabelRaster, LabelSpec, add_labels, close_label_rasters, open_label_rasters
from sharding.build.plan import Filters
from sharding.build.remote_output import publish_unit
from sharding.build.unit_files import index_schema, new_histogram, write_unit_files
from sharding.build.writer import ShardWriter, atomic_write
from sharding.errors import RowError
from sharding.layout import FOOTERS, SHARDS_DIR, unit_stats_path, unit_temp_files
from sharding.sources.majortom import (
    BAND_COLUMNS,
    decode_majortom_row,
    iter_parquet_rows,
    nodata_fraction,
    read_extracted_product,
)
from sharding.sources.majortom_catalog import reject
from sharding.sources.remote import restore_credentials, retry_count, set_footer_cache

log = logging.getLogger(__name__)

PIXELS_SAMPLED_PER_TILE = 1024
INDEX_FIELDS = ("key", "shard", "offset", "bytes", "grid_cell", "centre_lat", "centre_lon", "timestamp",
                "cloud_cover", "nodata", "product_id")


@dataclass(frozen=True)
class UnitOptions:
    """Everything a worker needs besides the rows; picklable for the process pool."""

    output: str
    layout: str
    shard_size: int
    filters: Filters
    clevel: int = DEFAULT_CLEVEL
    with_thumbnail: bool = False
    labels: tuple[LabelSpec, ...] = ()
    fasttom: FastTomRules | None = None
    sink: str | None = None  # s3:// output URL: publish the unit's files there (sharding/build/remote_output.py)
    # URLs given with credentials (redacted -> as given), handed to workers in memory, never written
    credentials: dict[str, str] = field(default_factory=dict, repr=False)


def iter_unit_rows(rows: list[dict], layout: str, with_thumbnail: bool) -> Iterator[tuple[dict, dict | str]]:
    """Yield (plan row, columns) or (plan row, reason) when the source file itself is unreadable."""
    for source_file, file_rows in groupby(rows, key=lambda row: row["source_file"]):
        file_rows = list(file_rows)
        if layout == "extracted":
            for row in file_rows:
                yield row, read_extracted_product(source_file, with_thumbnail)
            continue
        by_number = {row["source_row"]: row for row in file_rows}
        numbers, done = sorted(by_number), 0
        try:  # a bad row group comes back as its rows' reasons; what raises here is the file itself
            for number, columns in iter_parquet_rows(source_file, numbers, with_thumbnail):
                done += 1
                yield by_number[number], columns
        except (OSError, ValueError, pa.ArrowException) as error:
            for number in numbers[done:]:
                yield by_number[number], f"unreadable parquet file: {error}"


def sample_band_histogram(sample: Sample, histogram: np.ndarray) -> None:
    """Add PIXELS_SAMPLED_PER_TILE random pixels per band to a (bands, 65536) histogram."""
    rng = np.random.default_rng(zlib.crc32(sample.key.encode()))
    for member, (bands, _) in RESOLUTION_GROUPS.items():
        array = sample.arrays[member]
        ys = rng.integers(0, array.shape[1], PIXELS_SAMPLED_PER_TILE)
        xs = rng.integers(0, array.shape[2], PIXELS_SAMPLED_PER_TILE)
        for channel, band in enumerate(bands):  # add.at: no 65536-bin bincount per band (1.5 ms a tile)
            np.add.at(histogram[ALL_BANDS.index(band)], array[channel, ys, xs], 1)


Progress = Callable[[int, int], None]  # (bytes read, bytes written) after each tile


def build_unit(unit: int, rows: list[dict], options: UnitOptions, progress: Progress | None = None) -> dict:
    """Convert one unit; returns (and writes last) its stats. `progress` is called once per tile."""
    output = Path(options.output)
    restore_credentials(options.credentials)
    set_footer_cache(output / FOOTERS)  # footers fetched at plan time or by other units: no GET again
    shards_dir = output / SHARDS_DIR
    for leftover in unit_temp_files(output, unit):
        leftover.unlink(missing_ok=True)
    writer = ShardWriter(shards_dir, unit, options.shard_size, options.clevel)
    histogram = new_histogram()
    index, rejected = [], []
    counts = {"filtered": 0, "bytes_in": 0}
    rasters = open_label_rasters(options.labels)
    retries_before = retry_count()
    try:
        for row, columns in iter_unit_rows(rows, options.layout, options.with_thumbnail):
            bytes_in = counts["bytes_in"]
            sample = _convert(row, columns, options, rejected, counts)
            entry = {"bytes": 0}
            if sample is not None:  # a raster read error fails the unit: a rerun retries it
                sample = _labelled_sample(sample, options, counts, rasters)
            if sample is not None:
                sample_band_histogram(sample, histogram)
                entry = writer.write(sample)
                index.append(entry | {name: sample.meta[name] for name in INDEX_FIELDS if name not in entry})
            if progress is not None:
                progress(counts["bytes_in"] - bytes_in, entry["bytes"])
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        close_label_rasters(rasters)
    write_unit_files(output, unit, index, index_schema(), histogram)
    stats = {"unit": unit, "planned": len(rows), "written": len(index), "rejected": rejected,
             "filtered": counts["filtered"], "bytes_in": counts["bytes_in"],
             "bytes_out": sum(shard.bytes for shard in shards), "shards": [s.to_json() for s in shards]}
    stats["retries"] = retry_count() - retries_before  # remote reads retried (sharding/sources/remote.py)
    atomic_write(unit_stats_path(output, unit), lambda p: p.write_text(json.dumps(stats)))
    if options.sink:  # shards, index, histogram, then the stats object last
        publish_unit(options.sink, unit, stats, unit_stats_path(output, unit))
    return stats


def _convert(row: dict, columns: dict | str, options: UnitOptions, rejected: list, counts: dict) -> Sample | None:
    """Decode and filter one row; rejects/filters are recorded, None returned."""
    if isinstance(columns, str):
        rejected.append(reject(row["source_file"], row["source_row"], columns, row["key"]))
        return None
    counts["bytes_in"] += sum(len(columns.get(name) or b"") for name in BAND_COLUMNS)
    try:
        sample = decode_majortom_row(row, columns, options.with_thumbnail)
    except RowError as error:
        rejected.append(reject(row["source_file"], row["source_row"], str(error), row["key"]))
        return None
    # the metadata's values, then the pixels' own: metadata saying "no cloud" cannot keep a cloudy tile
    filters = options.filters
    if filters.max_nodata is None:
        pixel_nodata = 0.0
    elif math.isnan(row["nodata"]):  # no metadata value: meta["nodata"] is the pixels' own already
        pixel_nodata = sample.meta["nodata"]
    else:
        pixel_nodata = nodata_fraction(sample.arrays["s2_10m"])
    if (filters.passes_pixels(sample.meta["cloud_cover"], sample.meta["nodata"]) is not None
            or filters.passes_pixels(sample.meta["cloud_cover_pixels"], pixel_nodata) is not None):
        counts["filtered"] += 1
        return None
    return sample


def _labelled_sample(sample: Sample, options: UnitOptions, counts: dict, rasters: list[LabelRaster]) -> Sample | None:
    """The sample with its labels: the tile, or its FastTOM quadrant (labels on the quadrant only) or None."""
    if options.fasttom is None:
        add_labels(sample, rasters)
        return sample
    quadrant = fasttom_quadrant(sample, options.fasttom, lambda kept: add_labels(kept, rasters))
    if isinstance(quadrant, str):
        counts["filtered"] += 1
        log.debug("%s: dropped by the FastTOM rules: %s", sample.key, quadrant)
        return None
    return quadrant
