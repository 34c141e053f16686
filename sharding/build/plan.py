"""Planning: filter the catalog, then cut it into work units that mix regions.

MajorTOM files are spatially clustered, so writing shards in file order would make every
batch come from one region. Source groups (parquet files, or grid rows of the extracted
layout) are dealt into mixing pools of `mix_groups` groups each by a seeded permutation;
each pool's rows are permuted and cut into units of about `shard_size` bytes. A unit is
the unit of retry and resume, and its shards are named after it, so the plan (saved in
the output) fully determines every shard name and its content.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from phileo.geo import parse_grid_cell
from sharding.errors import InputError
from sharding.sources.majortom_catalog import Catalog, reject


@dataclass(frozen=True)
class Filters:
    """Row filters of `phileo-shard build`; plan-time where the catalog knows the value."""

    max_cloud: float | None = None
    max_nodata: float | None = None
    bbox: tuple[float, float, float, float] | None = None
    start: str | None = None
    end: str | None = None
    grid_cells: frozenset[str] | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.max_cloud is not None and not 0 <= self.max_cloud <= 100:
            raise InputError(f"--max-cloud {self.max_cloud}: expected a percentage in 0..100")
        if self.max_nodata is not None and not 0 <= self.max_nodata <= 1:
            raise InputError(f"--max-nodata {self.max_nodata}: expected a fraction in 0..1")
        if self.bbox is not None:
            west, south, east, north = self.bbox
            if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
                raise InputError(f"--bbox {self.bbox}: expected W,S,E,N with W<E and S<N in degrees")
        for flag, value in (("--start", self.start), ("--end", self.end)):
            if value is not None:
                try:
                    date.fromisoformat(value)
                except ValueError as error:
                    raise InputError(f"{flag} {value!r}: expected a date YYYY-MM-DD") from error
        if self.start is not None and self.end is not None and self.start > self.end:
            raise InputError(f"--start {self.start} is after --end {self.end}: no tile can match")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit {self.limit}: expected a positive number of tiles")

    def passes_pixels(self, cloud_cover: float, nodata: float) -> str | None:
        """Why a decoded tile is filtered out (None if kept): for values known only after decoding."""
        if self.max_cloud is not None and cloud_cover > self.max_cloud:
            return "cloud"
        if self.max_nodata is not None and nodata > self.max_nodata:
            return "nodata"
        return None


def read_grid_cells_file(path: str) -> frozenset[str]:
    """One grid cell per line (blank lines and # comments ignored); InputError names the bad line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--grid-cells {path}: no such file")
    cells = set()
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        try:
            cells.add(parse_grid_cell(name).name)
        except ValueError as error:
            raise InputError(f"--grid-cells {path} line {number}: {error}") from error
    return frozenset(cells)


def drop_reason(row: dict, filters: Filters) -> str | None:
    """The filter that drops `row` at plan time (grid_cells, time, bbox, cloud, nodata), None if kept."""
    if filters.grid_cells is not None and row["grid_cell"] not in filters.grid_cells:
        return "grid_cells"
    day = row["timestamp"][:10]
    if (filters.start and day < filters.start) or (filters.end and day > filters.end):
        return "time"
    if filters.bbox is not None:
        west, south, east, north = filters.bbox
        if not (west <= row["centre_lon"] <= east and south <= row["centre_lat"] <= north):
            return "bbox"
    known = {name: row[name] for name in ("cloud_cover", "nodata") if not math.isnan(row[name])}
    return filters.passes_pixels(known.get("cloud_cover", -1.0), known.get("nodata", -1.0))


def select_rows(catalog: Catalog, filters: Filters) -> tuple[list[dict], list[dict], Counter]:
    """(kept rows in source order, rejected duplicates, rows dropped at plan time by each filter)."""
    kept, duplicates, seen, dropped = [], [], set(), Counter()
    for row in catalog.rows:
        reason = drop_reason(row, filters)
        if reason is not None:
            dropped[reason] += 1
            continue
        if row["key"] in seen:
            duplicates.append(reject(row["source_file"], row["source_row"],
                                     f"duplicate key {row['key']} (first occurrence kept)", row["key"]))
            continue
        seen.add(row["key"])
        kept.append(row)
    if filters.limit is not None and len(kept) > filters.limit:
        dropped["limit"] += len(kept) - filters.limit
        kept = kept[: filters.limit]
    return kept, duplicates, dropped


def assign_units(rows: list[dict], shard_size: int, mix_groups: int, seed: int) -> list[list[dict]]:
    """Cut rows into work units; each unit mixes rows of up to `mix_groups` source groups."""
    rng = np.random.default_rng(seed)
    groups = sorted({row["source_group"] for row in rows})
    group_order = [groups[i] for i in rng.permutation(len(groups))]
    pool_of = {group: position // mix_groups for position, group in enumerate(group_order)}
    pools: dict[int, list[dict]] = {}
    for row in rows:
        pools.setdefault(pool_of[row["source_group"]], []).append(row)
    units = []
    for pool in sorted(pools):
        members = pools[pool]
        unit, unit_bytes = [], 0
        for index in rng.permutation(len(members)):
            unit.append(members[index])
            unit_bytes += members[index]["est_bytes"]
            if unit_bytes >= shard_size:
                units.append(unit)
                unit, unit_bytes = [], 0
        if unit:
            units.append(unit)
    # Read in file order inside a unit: one footer and sequential row groups per file.
    return [sorted(unit, key=lambda r: (r["source_file"], r["source_row"])) for unit in units]
