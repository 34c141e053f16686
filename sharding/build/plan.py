"""Planning: filter the catalog, then cut it into work units that mix regions.

MajorTOM files are spatially clustered, so writing shards in file order would make every
batch come from one region. Source groups (parquet files, or grid rows of the extracted
layout) are dealt into mixing pools of `mix_groups` groups each by a seeded permutation;
each pool's rows are permuted and cut into units of about `shard_size` bytes. A unit is
the unit of retry and resume, and its shards are named after it, so the plan (saved in
the output) fully determines every shard name and its content.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phileo.geo import parse_grid_cell
from sharding.errors import InputError
from sharding.sources.majortom_catalog import Catalog, dictionary_encoded, float_column, reject


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


DROP_REASONS = ("grid_cells", "time", "bbox", "cloud", "nodata")  # checked in this order: the first one counts


def drop_reasons(table: pa.Table, filters: Filters) -> np.ndarray:
    """Per row, 0 if kept at plan time, else 1 + the index in DROP_REASONS of the first filter that drops it.

    Columnar (a 2.25M-row catalog takes about a second); cloud and no-data drop only where the catalog
    knows them (not NaN): the unit applies the same filters to the values it computes from pixels."""
    reasons = np.zeros(table.num_rows, dtype=np.int8)

    def drop(reason: str, mask) -> None:
        mask = np.asarray(mask.to_numpy(zero_copy_only=False) if hasattr(mask, "to_numpy") else mask, dtype=bool)
        reasons[(reasons == 0) & mask] = DROP_REASONS.index(reason) + 1

    if filters.grid_cells is not None:
        drop("grid_cells", pc.invert(pc.is_in(table.column("grid_cell"),
                                              value_set=pa.array(sorted(filters.grid_cells), pa.string()))))
    if filters.start or filters.end:
        day = pc.utf8_slice_codeunits(table.column("timestamp"), 0, 10)
        if filters.start:
            drop("time", pc.less(day, filters.start))
        if filters.end:
            drop("time", pc.greater(day, filters.end))
    if filters.bbox is not None:
        west, south, east, north = filters.bbox
        lat, lon = float_column(table, "centre_lat"), float_column(table, "centre_lon")
        drop("bbox", ~((west <= lon) & (lon <= east) & (south <= lat) & (lat <= north)))
    for reason, name, limit in (("cloud", "cloud_cover", filters.max_cloud), ("nodata", "nodata", filters.max_nodata)):
        if limit is not None:
            with np.errstate(invalid="ignore"):
                drop(reason, float_column(table, name) > limit)  # NaN (unknown) compares False: kept
    return reasons


def select_rows(catalog: Catalog, filters: Filters) -> tuple[np.ndarray, list[dict], Counter]:
    """(positions of the kept rows in `catalog.table`, in source order; rejected duplicates; rows dropped
    at plan time by each filter)."""
    table = catalog.table
    reasons = drop_reasons(table, filters)
    counts = np.bincount(reasons, minlength=len(DROP_REASONS) + 1)
    dropped = Counter({name: int(counts[i + 1]) for i, name in enumerate(DROP_REASONS) if counts[i + 1]})
    kept = np.flatnonzero(reasons == 0)
    is_first = _first_of_each_key(table.column("key").take(pa.array(kept)))
    duplicates = [reject(row["source_file"], row["source_row"], f"duplicate key {row['key']} (first occurrence "
                         "kept)", row["key"]) for row in table.take(pa.array(kept[~is_first])).to_pylist()]
    kept = kept[is_first]
    if filters.limit is not None and len(kept) > filters.limit:
        dropped["limit"] += len(kept) - filters.limit
        kept = kept[: filters.limit]
    return kept, duplicates, dropped


def _first_of_each_key(keys: pa.ChunkedArray) -> np.ndarray:
    """True where a key occurs for the first time (a stable sort and a look at each key's neighbour:
    less memory than a hash table of millions of strings)."""
    order = pc.sort_indices(keys).to_numpy(zero_copy_only=False)  # stable: equal keys keep their order
    ordered = keys.take(pa.array(order))
    repeated = np.zeros(len(order), dtype=bool)
    if len(order) > 1:
        repeated[1:] = pc.equal(ordered.slice(1), ordered.slice(0, len(order) - 1)).to_numpy(zero_copy_only=False)
    is_first = np.ones(len(order), dtype=bool)
    is_first[order[repeated]] = False
    return is_first


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(each row's rank among the column's distinct strings in sorted order, the sorted distinct strings)."""
    encoded = dictionary_encoded(column)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    used = np.unique(codes)  # a dictionary may hold values of rows filtered out since
    names = encoded.dictionary.take(pa.array(used)).to_pylist()
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.full(len(encoded.dictionary), -1, dtype=np.int64)
    rank[used[order]] = np.arange(len(used))
    return rank[codes], np.array([names[i] for i in order], dtype=object)


def assign_units(catalog: Catalog, kept: np.ndarray, shard_size: int, mix_groups: int, seed: int) -> pa.Table:
    """The plan: the `kept` rows of the catalog cut into work units (column `unit`), each mixing rows of up
    to `mix_groups` source groups; sorted by unit, and inside a unit by (source_file, source_row) so a unit
    reads one footer and sequential row groups per file. Columnar, one Python step per unit, not per row.

    Takes the catalog's rows over: it is emptied column by column as the plan's columns are made, so
    that the catalog and the plan are never both whole in memory."""
    rng = np.random.default_rng(seed)
    rows = catalog.table.select(["source_group", "source_file", "source_row", "est_bytes"]).take(pa.array(kept))
    group_rank, groups = _codes(rows.column("source_group"))
    pool_of_group = np.empty(len(groups), dtype=np.int64)
    pool_of_group[rng.permutation(len(groups))] = np.arange(len(groups)) // mix_groups
    row_pool = pool_of_group[group_rank] if rows.num_rows else np.empty(0, dtype=np.int64)
    by_pool = np.argsort(row_pool, kind="stable")  # each pool's rows in source order
    bounds = np.searchsorted(row_pool[by_pool], np.arange(row_pool.max(initial=-1) + 2))
    est_bytes = pc.fill_null(rows.column("est_bytes"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    file_rank, _ = _codes(rows.column("source_file"))
    source_row = rows.column("source_row").to_numpy(zero_copy_only=False)
    order, unit_of = [], []
    for pool in range(len(bounds) - 1):
        members = by_pool[bounds[pool]:bounds[pool + 1]]
        for unit_rows in _cut(members[rng.permutation(len(members))], est_bytes, shard_size):
            order.append(unit_rows[np.lexsort((source_row[unit_rows], file_rank[unit_rows]))])
            unit_of.append(np.full(len(unit_rows), len(unit_of), dtype=np.int64))
    taken = np.concatenate(order) if order else np.empty(0, dtype=np.int64)
    units = np.concatenate(unit_of) if unit_of else np.empty(0, dtype=np.int64)
    return _take_over(catalog, pa.array(kept[taken])).append_column("unit", pa.array(units))


def _take_over(catalog: Catalog, positions: pa.Array) -> pa.Table:
    """`catalog.table.take(positions)`, freeing each catalog column once its plan column exists."""
    table, catalog.chunks = catalog.table, []
    names, columns = table.column_names, []
    for name in names:
        columns.append(table.column(name).take(positions))
        table = table.drop_columns([name])
        pa.default_memory_pool().release_unused()  # hand the freed column back, not only to the pool
    return pa.table(columns, names=names)


def _cut(members: np.ndarray, est_bytes: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """Consecutive runs of `members`, each closed by the first row that brings it to `shard_size` bytes."""
    cumulative = np.cumsum(est_bytes[members])
    runs, start, base = [], 0, 0
    while start < len(members):
        end = min(int(np.searchsorted(cumulative, base + shard_size, side="left")), len(members) - 1)
        runs.append(members[start:end + 1])
        start, base = end + 1, int(cumulative[end])
    return runs


class SavedPlan:
    """plan.parquet as loaded for a build: rows sorted by unit; a unit's rows become dicts only when it runs."""

    def __init__(self, table: pa.Table) -> None:
        units = table.column("unit").to_numpy(zero_copy_only=False) if table.num_rows else np.empty(0, np.int64)
        assert (np.diff(units) >= 0).all(), "plan.parquet rows are not sorted by unit"
        self.table = table.drop_columns(["unit"])
        self.starts = np.searchsorted(units, np.arange(units.max(initial=-1) + 2))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def rows(self, unit: int) -> list[dict]:
        start, end = int(self.starts[unit]), int(self.starts[unit + 1])
        return self.table.slice(start, end - start).to_pylist()

    def tiles(self, units: list[int] | None = None) -> int:
        counts = np.diff(self.starts)
        return int(counts.sum() if units is None else counts[units].sum())

    def unit_bytes(self, floor: int = 0) -> np.ndarray:
        """Estimated source bytes per unit; each row counts at least `floor` (1 balances units of unknown size)."""
        sizes = pc.fill_null(self.table.column("est_bytes"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        sizes = np.maximum(sizes, floor)
        return np.add.reduceat(sizes, self.starts[:-1]) if len(self) else np.empty(0, np.int64)


class PendingUnits:
    """The units a run builds, handed to the runners lazily: (unit, its row dicts), one unit at a time."""

    def __init__(self, plan: SavedPlan, units: list[int]) -> None:
        self.plan, self.units = plan, units

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self):
        for unit in self.units:
            yield unit, self.plan.rows(unit)

    def tiles(self) -> int:
        return self.plan.tiles(self.units)
