"""Catalog of MajorTOM Core-S2L2A rows: what exists, before any pixel is read.

Three input layouts are accepted: a directory with `images/*.parquet` (and optionally
`metadata.parquet` beside it), a single parquet file, or the extracted folder layout of
the original loader (`.../<row>/<row>_<col>/<product_id>/B01.tif ...`). Listing reads
parquet footers and the three small string columns only, never a band column.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from phileo.bands import ALL_BANDS, CLOUD_MASK
from phileo.geo import grid_cell_centre, parse_grid_cell
from sharding.errors import InputError
from sharding.sources.remote import column_spans, open_parquet

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("product_id", "grid_cell", "product_datetime", *ALL_BANDS, CLOUD_MASK)
ID_COLUMNS = ["product_id", "grid_cell", "product_datetime"]
CATALOG_FIELDS = ("source_file", "source_group", "source_row", "key", "product_id", "grid_cell",
                  "timestamp", "cloud_cover", "nodata", "centre_lat", "centre_lon", "est_bytes")


@dataclass
class Catalog:
    """Candidate rows (dicts with CATALOG_FIELDS, in source order) and rows rejected while listing."""

    rows: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    layout: str = "parquet"


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
    row_bytes, first = _row_bytes(parquet), 0
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
                _add_row(catalog, path, first + offset, [ids[name][offset] for name in ID_COLUMNS],
                         row_bytes[first + offset])
        first += count


def _add_row(catalog: Catalog, path: Path | str, row: int, values: list, est_bytes: int) -> None:
    try:
        catalog.rows.append(make_row(str(path), str(path), row, *values, est_bytes))
    except ValueError as error:
        catalog.rejected.append(reject(path, row, str(error)))


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
    catalog.layout = "extracted"
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
        catalog.rows.append(row)


METADATA_VALUES = ("cloud_cover", "nodata", "centre_lat", "centre_lon")
CENTRE_TOLERANCE_DEG = 0.5  # a MajorTOM tile spans ~0.1 degree: half a degree off is another place


def metadata_problem(entry: dict, row: dict) -> str | None:
    """Why metadata.parquet's values for `row` cannot be trusted (None if they can): out-of-range
    cloud cover or no-data, or a centre away from the row's own grid cell."""
    values = {}
    for name in METADATA_VALUES:
        try:
            values[name] = float(entry[name])
        except (TypeError, ValueError):
            return f"metadata.parquet: {name} {entry[name]!r} is not a number"
    ranges = {"cloud_cover": (0, 100), "nodata": (0, 1), "centre_lat": (-90, 90), "centre_lon": (-180, 180)}
    for name, (low, high) in ranges.items():
        if not low <= values[name] <= high:  # NaN and inf fail too
            return f"metadata.parquet: {name} {values[name]!r} outside {low}..{high}"
    d_lat = abs(values["centre_lat"] - row["centre_lat"])
    d_lon = abs((values["centre_lon"] - row["centre_lon"] + 180) % 360 - 180)  # across the antimeridian too
    d_lon *= math.cos(math.radians(row["centre_lat"]))
    if max(d_lat, d_lon) > CENTRE_TOLERANCE_DEG:
        return (f"metadata.parquet: centre {values['centre_lat']:.4f},{values['centre_lon']:.4f} is "
                f"{max(d_lat, d_lon):.2f} degrees from grid cell {row['grid_cell']}")
    return None


def apply_metadata(metadata_path: Path, images: dict[str, Path], catalog: Catalog) -> None:
    """Take cloud_cover/nodata/centre from metadata.parquet for the rows of the input's files.

    Rows of files that are not in the input (a partial download) are ignored, not rejected.
    """
    table = pq.read_table(metadata_path, columns=["product_id", "cloud_cover", "nodata", "centre_lat",
                                                  "centre_lon", "parquet_url", "parquet_row"])
    urls = pc.unique(table.column("parquet_url")).to_pylist()
    local = {url: images[os.path.basename(url)] for url in urls if os.path.basename(url) in images}
    selected = table.filter(pc.is_in(table.column("parquet_url"), value_set=pa.array(list(local), pa.string())))
    if selected.num_rows < table.num_rows:
        log.info("metadata.parquet: %d of %d rows are of files not in the input; ignored",
                 table.num_rows - selected.num_rows, table.num_rows)
    known = {(str(local[e["parquet_url"]]), int(e["parquet_row"])): e for e in selected.to_pylist()}
    kept = []
    for row in catalog.rows:
        entry = known.get((row["source_file"], row["source_row"]))
        if entry is None:
            log.warning("%s row %d is not in metadata.parquet: cloud/nodata computed from pixels",
                        row["source_file"], row["source_row"])
        elif entry["product_id"] != row["product_id"]:
            catalog.rejected.append(reject(row["source_file"], row["source_row"], "metadata.parquet "
                                    f"says {entry['product_id']}, the file holds {row['product_id']}", row["key"]))
            continue
        elif (problem := metadata_problem(entry, row)) is not None:
            catalog.rejected.append(reject(row["source_file"], row["source_row"], problem, row["key"]))
            continue
        else:
            row.update({k: float(entry[k]) for k in METADATA_VALUES})
        kept.append(row)
    catalog.rows = kept


def parquet_files(directory: Path) -> list[Path]:
    """The tile parquet files of a local MajorTOM directory (`images/*.parquet`, else `*.parquet`)."""
    images_dir = directory / "images" if (directory / "images").is_dir() else directory
    return sorted(p for p in images_dir.glob("*.parquet") if p.name != "metadata.parquet")


def list_majortom(input_path: str) -> Catalog:
    """Catalog of every row under `input_path`; InputError when nothing usable is there."""
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
        if not catalog.rows and not catalog.rejected:
            raise InputError(f"--input {input_path}: no images/*.parquet, *.parquet or extracted "
                             "<row>/<cell>/<product_id>/B02.tif folders found")
        return catalog
    for file in files:
        list_parquet_file(file, catalog)
    metadata_path = path / "metadata.parquet"
    if metadata_path.is_file():
        apply_metadata(metadata_path, {f.name: f for f in files}, catalog)
    return catalog
