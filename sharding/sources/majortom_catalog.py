"""Catalog of MajorTOM Core-S2L2A rows: what exists, before any pixel is read.

Three input layouts are accepted: a directory with `images/*.parquet` (and optionally
`metadata.parquet` beside it), a single parquet file, or the extracted folder layout of
the original loader (`.../<row>/<row>_<col>/<product_id>/B01.tif ...`). Listing reads
parquet footers and the three small string columns only, never a band column.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phileo.bands import ALL_BANDS, CLOUD_MASK
from phileo.geo import grid_cell_centre, parse_grid_cell
from sharding.errors import InputError
from sharding.sources.remote import column_spans, open_parquet

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("product_id", "grid_cell", "product_datetime", *ALL_BANDS, CLOUD_MASK)
ID_COLUMNS = ["product_id", "grid_cell", "product_datetime"]

CATALOG_SCHEMA = pa.schema([
    ("source_file", pa.string()), ("source_group", pa.string()), ("source_row", pa.int64()), ("key", pa.string()),
    ("product_id", pa.string()), ("grid_cell", pa.string()), ("timestamp", pa.string()),
    ("cloud_cover", pa.float64()), ("nodata", pa.float64()), ("centre_lat", pa.float64()),
    ("centre_lon", pa.float64()), ("est_bytes", pa.int64())])


def float_column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 numpy, nulls as NaN."""
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def dictionary_encoded(column: pa.ChunkedArray) -> pa.DictionaryArray:
    """One dictionary array of a (chunked) string or dictionary column: its distinct values and an index per row."""
    combined = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return combined if isinstance(combined.type, pa.DictionaryType) else combined.dictionary_encode()


@dataclass
class Catalog:
    """Candidate rows as Arrow tables (CATALOG_SCHEMA columns, in source order; never a Python object per
    row at full size), and rows rejected while listing. `tile_bytes` says where est_bytes come from."""

    chunks: list[pa.Table] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    layout: str = "parquet"
    tile_bytes: str = "parquet footers"

    def add_rows(self, rows: list[dict]) -> None:
        """Append the rows of one file or folder (a few hundred dicts at most)."""
        if rows:
            self.chunks.append(pa.Table.from_pylist(rows))

    @property
    def table(self) -> pa.Table:
        """Every candidate row, in source order (chunks are concatenated once)."""
        if not self.chunks:
            return CATALOG_SCHEMA.empty_table()
        if len(self.chunks) > 1:
            self.chunks = [pa.concat_tables(self.chunks, promote_options="permissive")]
        return self.chunks[0]

    @table.setter
    def table(self, table: pa.Table) -> None:
        self.chunks = [table]

    def __len__(self) -> int:
        return sum(chunk.num_rows for chunk in self.chunks)


def reject(file: str, row: int | None, reason: str, key: str | None = None) -> dict:
    return {"file": str(file), "row": row, "key": key, "reason": reason}


def parse_datetime(value: str) -> str:
    """`20200612T104021` -> `2020-06-12T10:40:21Z`; ValueError names the bad value."""
    try:
        parsed = datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError) as error:
        raise ValueError(f"product_datetime {value!r} is not YYYYMMDDTHHMMSS") from error
    return parsed.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_row(source_file: str, source_group: str, source_row: int, product_id: str, grid_cell: str,
             product_datetime: str, est_bytes: int) -> dict:
    """A catalog row from the identifying strings; ValueError when they are malformed."""
    parse_grid_cell(grid_cell)
    timestamp = parse_datetime(product_datetime)
    centre_lat, centre_lon = grid_cell_centre(grid_cell)
    return {"source_file": source_file, "source_group": source_group, "source_row": source_row,
            "key": f"{grid_cell}_{product_datetime}", "product_id": product_id, "grid_cell": grid_cell,
            "timestamp": timestamp, "cloud_cover": math.nan, "nodata": math.nan,
            "centre_lat": centre_lat, "centre_lon": centre_lon, "est_bytes": est_bytes}


def list_parquet_file(path: Path | str, catalog: Catalog) -> None:
    """Add the rows of one Core-S2L2A parquet file, local or remote (footer + id column chunks only)."""
    try:
        parquet, remote = open_parquet(str(path))
        names = set(parquet.schema_arrow.names)
    except (OSError, ValueError) as error:
        catalog.rejected.append(reject(path, None, f"unreadable parquet file: {error}"))
        return
    num_rows = parquet.metadata.num_rows
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        reason = f"missing column(s) {', '.join(missing)}"
        catalog.rejected.extend(reject(path, row, reason) for row in range(num_rows))
        return
    row_bytes, first, rows = _row_bytes(parquet), 0, []
    for group in range(parquet.metadata.num_row_groups):
        count = parquet.metadata.row_group(group).num_rows
        try:
            if remote is not None:  # one ranged GET per row group for the id columns, not one per page
                remote.fetch_spans(column_spans(parquet, group, ID_COLUMNS))
            ids = parquet.read_row_group(group, columns=ID_COLUMNS).to_pydict()
        except (OSError, ValueError, pa.ArrowException) as error:  # this row group's rows only
            catalog.rejected.extend(reject(path, row, f"unreadable parquet data in row group {group}: {error}")
                                    for row in range(first, first + count))
        else:
            for offset in range(count):
                try:
                    rows.append(make_row(str(path), str(path), first + offset,
                                         *[ids[name][offset] for name in ID_COLUMNS], row_bytes[first + offset]))
                except ValueError as error:
                    catalog.rejected.append(reject(path, first + offset, str(error)))
        first += count
    catalog.add_rows(rows)


def _row_bytes(parquet: pq.ParquetFile) -> list[int]:
    """Compressed bytes of each row, spread evenly over the rows of its row group."""
    sizes = []
    for index in range(parquet.metadata.num_row_groups):
        group = parquet.metadata.row_group(index)
        total = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        sizes.extend([total // max(group.num_rows, 1)] * group.num_rows)
    return sizes


def list_extracted(root: Path, catalog: Catalog) -> None:
    """Add the product folders of the extracted layout `<row>/<row>_<col>/<product_id>/B02.tif`."""
    catalog.layout, catalog.tile_bytes, rows = "extracted", "file sizes", []
    for b02 in sorted(root.rglob("B02.tif")):
        product_dir = b02.parent
        grid_cell, product_id = product_dir.parent.name, product_dir.name
        parts = product_id.split("_")
        est_bytes = sum(f.stat().st_size for f in product_dir.iterdir() if f.is_file())
        try:
            if len(parts) < 3:
                raise ValueError(f"product_id {product_id!r} has no datetime field")
            row = make_row(str(product_dir), str(product_dir.parent.parent), 0, product_id, grid_cell,
                           parts[2], est_bytes)
        except ValueError as error:
            catalog.rejected.append(reject(product_dir, 0, str(error)))
            continue
        rows.append(row)
    catalog.add_rows(rows)


def parquet_files(directory: Path) -> list[Path]:
    """The tile parquet files of a local MajorTOM directory (`images/*.parquet`, else `*.parquet`)."""
    images_dir = directory / "images" if (directory / "images").is_dir() else directory
    return sorted(p for p in images_dir.glob("*.parquet") if p.name != "metadata.parquet")


def list_majortom(input_path: str) -> Catalog:
    """Catalog of every row under `input_path`; InputError when nothing usable is there.

    A metadata.parquet beside the files is applied by the caller (sources/metadata_catalog.py)."""
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"--input {input_path}: no such file or directory")
    catalog = Catalog()
    if path.is_file():
        if path.suffix != ".parquet":
            raise InputError(f"--input {input_path}: expected a .parquet file or a directory")
        list_parquet_file(path, catalog)
        return catalog
    files = parquet_files(path)
    if not files:
        list_extracted(path, catalog)
        if not len(catalog) and not catalog.rejected:
            raise InputError(f"--input {input_path}: no images/*.parquet, *.parquet or extracted "
                             "<row>/<cell>/<product_id>/B02.tif folders found")
        return catalog
    for file in files:
        list_parquet_file(file, catalog)
    return catalog
