"""MajorTOM's metadata.parquet, columnar: plan from it alone, or apply it to listed files.

Core-S2L2A's metadata.parquet has 2,245,886 rows. Everything here is Arrow/numpy over whole
columns; Python objects are made only for the (few) rows that fail a check, so that their
reject reasons read exactly as the per-row checks word them (`metadata_problem`, `make_row`).

Planning with `--metadata` opens no source file: est_bytes is MajorTOM's mean tile size (stated
in the plan) because the metadata has no size column, and each unit reads the footers of its own
files when it runs (sharding/sources/remote.py caches them in the output for the other units).
"""

from __future__ import annotations

import logging
import math
import os
import re
import urllib.parse
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from phileo.geo import grid_cell_centres
from sharding.sources.majortom_catalog import (
    CATALOG_SCHEMA,
    Catalog,
    dictionary_encoded,
    float_column,
    make_row,
    reject,
)

log = logging.getLogger(__name__)

METADATA_VALUES = ("cloud_cover", "nodata", "centre_lat", "centre_lon")
METADATA_COLUMNS = ["product_id", "grid_cell", "timestamp", *METADATA_VALUES, "parquet_url", "parquet_row"]
CENTRE_TOLERANCE_DEG = 0.5  # a MajorTOM tile spans ~0.1 degree: half a degree off is another place
MEAN_TILE_BYTES = 10_240_000  # Core-S2L2A: ~23 TB in 2,245,886 rows (about 10.2 MB of parquet per tile)
_RANGES = {"cloud_cover": (0, 100), "nodata": (0, 1), "centre_lat": (-90, 90), "centre_lon": (-180, 180)}
_GRID_CELL = r"^(?P<row>\d{1,6})(?P<ns>[UD])_(?P<col>\d{1,6})(?P<ew>[LR])$"
_PRODUCT_TIME = r"^[^_]*_[^_]*_(?P<time>[^_]{8}T[^_]{6})(?:_|$)"  # the sensing-time field of a product id


def metadata_problem(entry: dict, row: dict) -> str | None:
    """Why metadata.parquet's values for `row` cannot be trusted (None if they can): out-of-range
    cloud cover or no-data, or a centre away from the row's own grid cell."""
    values = {}
    for name in METADATA_VALUES:
        try:
            values[name] = float(entry[name])
        except (TypeError, ValueError):
            return f"metadata.parquet: {name} {entry[name]!r} is not a number"
    for name, (low, high) in _RANGES.items():
        if not low <= values[name] <= high:  # NaN and inf fail too
            return f"metadata.parquet: {name} {values[name]!r} outside {low}..{high}"
    d_lat = abs(values["centre_lat"] - row["centre_lat"])
    d_lon = abs((values["centre_lon"] - row["centre_lon"] + 180) % 360 - 180)  # across the antimeridian too
    d_lon *= math.cos(math.radians(row["centre_lat"]))
    if max(d_lat, d_lon) > CENTRE_TOLERANCE_DEG:
        return (f"metadata.parquet: centre {values['centre_lat']:.4f},{values['centre_lon']:.4f} is "
                f"{max(d_lat, d_lon):.2f} degrees from grid cell {row['grid_cell']}")
    return None


def _values(table: pa.Table) -> dict[str, np.ndarray]:
    """The metadata values of `table` as float64 arrays (nulls as NaN), converted once."""
    return {name: float_column(table, name) for name in METADATA_VALUES}


def _trusted_values(values: dict[str, np.ndarray], cell_lat: np.ndarray, cell_lon: np.ndarray) -> np.ndarray:
    """Rows whose metadata values pass `metadata_problem`'s checks, for whole columns at once."""
    ok = np.ones(len(cell_lat), dtype=bool)
    with np.errstate(invalid="ignore"):
        for name, (low, high) in _RANGES.items():
            ok &= (values[name] >= low) & (values[name] <= high)
        d_lat = np.abs(values["centre_lat"] - cell_lat)
        d_lon = np.abs((values["centre_lon"] - cell_lon + 180) % 360 - 180) * np.cos(np.radians(cell_lat))
        ok &= np.maximum(d_lat, d_lon) <= CENTRE_TOLERANCE_DEG
    return ok


def _grid_centres(grid_cells: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parsed, centre_lat, centre_lon) of grid cell names; `parsed` is False where a name is malformed."""
    parts = pc.extract_regex(grid_cells, _GRID_CELL)
    parsed = parts.is_valid().to_numpy(zero_copy_only=False)
    fields = {name: pc.struct_field(parts, name).fill_null("0") for name in ("row", "ns", "col", "ew")}
    rows = pc.cast(fields["row"], pa.int64()).to_numpy(zero_copy_only=False)
    cols = pc.cast(fields["col"], pa.int64()).to_numpy(zero_copy_only=False)
    south = pc.equal(fields["ns"], "D").to_numpy(zero_copy_only=False)
    west = pc.equal(fields["ew"], "L").to_numpy(zero_copy_only=False)
    parsed &= ~(south & (rows == 0))  # southern rows start at 1D
    lat, lon = grid_cell_centres(np.where(south, -rows, rows), np.where(west, -cols, cols))
    return parsed, lat, lon


def _sensing_times(product_ids: pa.ChunkedArray, timestamps: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(YYYYMMDDTHHMMSS, its ISO timestamp) per row: the product id's sensing-time field, else the metadata
    timestamp (as `_product_datetime`); nulls where neither parses."""
    field = pc.struct_field(pc.extract_regex(product_ids, _PRODUCT_TIME), "time")
    parsed = pc.strptime(field, format="%Y%m%dT%H%M%S", unit="s", error_is_null=True)
    if pc.any(pc.and_(field.is_null(), timestamps.is_valid())).as_py():
        parsed = pc.coalesce(parsed, _timestamps(timestamps))
    return pc.strftime(parsed, format="%Y%m%dT%H%M%S"), pc.strftime(parsed, format="%Y-%m-%dT%H:%M:%SZ")


def _timestamps(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """metadata.parquet's `timestamp` as timestamps: a timestamp column, or `YYYY-MM-DD[ T]HH:MM:SS[Z]` strings."""
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("s"), safe=False)
    text = pc.replace_substring(pc.replace_substring(pc.cast(column, pa.string()), "Z", ""), "T", " ")
    return pc.strptime(pc.utf8_slice_codeunits(text, 0, 19), format="%Y-%m-%d %H:%M:%S", unit="s",
                       error_is_null=True)


_HUB_FILE_URL = re.compile(r"^https://(?:huggingface\.co|hf\.co)/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def hub_file_url(url: str) -> str:
    """A Hub download URL (`https://huggingface.co/datasets/ORG/NAME/resolve/REV/PATH`, as MajorTOM's
    metadata.parquet names its files) as `hf://datasets/ORG/NAME[@REV]/PATH`: read through
    huggingface_hub (HF_ENDPOINT, HF_TOKEN, ranged reads at the endpoint) instead of plain HTTP to
    huggingface.co. Any other URL is returned unchanged."""
    match = _HUB_FILE_URL.match(url)
    if match is None:
        return url
    repo, revision, path = match.groups()
    revision = urllib.parse.unquote(revision)
    return f"hf://datasets/{repo}{'' if revision == 'main' else '@' + revision}/{path}"


def rebase(parquet_url: str, root: str | None) -> str:
    """Where to read a metadata parquet_url: itself (a Hub URL through hf://), or the same images/ path
    under `root`."""
    if not root:
        return hub_file_url(parquet_url)
    tail = parquet_url.split("/images/", 1)[1] if "/images/" in parquet_url else f"{os.path.basename(parquet_url)}"
    prefix = "images/" if "/images/" in parquet_url else ""
    return f"{root.rstrip('/')}/{prefix}{tail}"


def _product_datetime(product_id: str, timestamp: str) -> str:
    """`YYYYMMDDTHHMMSS`: the product id's sensing time field, else the metadata timestamp."""
    parts = product_id.split("_")
    if len(parts) > 2 and len(parts[2]) == 15 and parts[2][8] == "T":
        return parts[2]
    return datetime.fromisoformat(str(timestamp).replace("Z", "")).strftime("%Y%m%dT%H%M%S")


def _row_by_row(entry: dict, url: str, catalog: Catalog) -> dict | None:
    """The per-row path for a row the columnar checks did not accept: a catalog row, or a reject."""
    number = entry["parquet_row"]
    try:
        if number is None:
            raise ValueError("parquet_row is missing")
        row = make_row(url, url, number, entry["product_id"], entry["grid_cell"],
                       _product_datetime(entry["product_id"], entry["timestamp"]), MEAN_TILE_BYTES)
    except (TypeError, ValueError) as error:
        catalog.rejected.append(reject(url, number, f"metadata.parquet: {error}"))
        return None
    problem = metadata_problem(entry, row)
    if problem is not None:
        catalog.rejected.append(reject(url, number, problem, row["key"]))
        return None
    return row | {name: float(entry[name]) for name in METADATA_VALUES}


def _rebased_urls(source, root: str | None) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """(each row's file code, the rebased URL of each code, each code's rank in URL order): one pass over
    the parquet_url column, read as a dictionary (a few thousand distinct files)."""
    urls = dictionary_encoded(pq.read_table(source, columns=["parquet_url"], read_dictionary=["parquet_url"]).column(0))
    names = [rebase(url, root) for url in urls.dictionary.to_pylist()]  # one per file, not per row
    rank = np.empty(len(names), dtype=np.int64)
    rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
    return urls.indices.to_numpy(zero_copy_only=False), pa.array(names, pa.string()), rank


BATCH_ROWS = 1 << 18  # metadata rows checked at a time: bounds the temporaries of the columnar checks


def catalog_from_metadata(source, root: str | None) -> Catalog:
    """The catalog of a metadata.parquet (path or file object), in (rebased URL, row) order; no file opened.

    Read in batches of BATCH_ROWS, so that only the catalog itself grows with the metadata."""
    catalog = Catalog(tile_bytes=f"estimated: {MEAN_TILE_BYTES / 1e6:.2f} MB, MajorTOM's mean tile")
    codes, names, rank = _rebased_urls(source, root)
    parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)  # pages streamed, not whole groups
    chunks, order_keys, start = [], [], 0
    for batch in parquet.iter_batches(BATCH_ROWS, columns=[c for c in METADATA_COLUMNS if c != "parquet_url"]):
        batch = pa.Table.from_batches([batch])
        file_codes = codes[start:start + batch.num_rows]
        chunk, codes_of_rows = _catalog_batch(batch, file_codes, names, catalog)
        chunks.append(chunk)
        order_keys.append((chunk.column("source_row").to_numpy(zero_copy_only=False), rank[codes_of_rows]))
        start += batch.num_rows
        pa.default_memory_pool().release_unused()  # the batch's temporaries: keep the peak to the catalog
    numbers = np.concatenate([n for n, _ in order_keys]) if order_keys else np.empty(0, np.int64)
    ranks = np.concatenate([r for _, r in order_keys]) if order_keys else np.empty(0, np.int64)
    order = np.lexsort((numbers, ranks))
    table = pa.concat_tables(chunks) if chunks else CATALOG_SCHEMA.empty_table()
    if not (order == np.arange(len(order))).all():  # Core-S2L2A's metadata is in file order: no copy then
        table = table.take(pa.array(order))
    catalog.table = table
    log.info("metadata: %d rows, %d rejected by its own checks", start, len(catalog.rejected))
    return catalog


def _catalog_batch(batch: pa.Table, file_codes: np.ndarray, names: pa.Array,
                   catalog: Catalog) -> tuple[pa.Table, np.ndarray]:
    """(catalog rows of one metadata batch, their file codes); rows that fail a check go row by row."""
    urls = pa.DictionaryArray.from_arrays(pa.array(file_codes, pa.int32()), names)
    parsed, cell_lat, cell_lon = _grid_centres(batch.column("grid_cell"))
    times, stamps = _sensing_times(batch.column("product_id"), batch.column("timestamp"))
    values = _values(batch)
    fast = parsed & times.is_valid().to_numpy(zero_copy_only=False) & _trusted_values(values, cell_lat, cell_lon)
    fast &= pc.is_valid(batch.column("parquet_row")).to_numpy(zero_copy_only=False)
    rows = pa.array(np.flatnonzero(fast))
    table = pa.table({
        "source_file": urls.take(rows), "source_group": urls.take(rows),
        "source_row": pc.cast(batch.column("parquet_row").take(rows), pa.int64()),
        "key": pc.binary_join_element_wise(batch.column("grid_cell").take(rows), times.take(rows), "_"),
        "product_id": batch.column("product_id").take(rows), "grid_cell": batch.column("grid_cell").take(rows),
        "timestamp": stamps.take(rows), **{name: column[fast] for name, column in values.items()},
        "est_bytes": np.full(len(rows), MEAN_TILE_BYTES, dtype=np.int64)})
    slow = np.flatnonzero(~fast)
    extra = [_row_by_row(entry, names[int(file_codes[i])].as_py(), catalog)
             for i, entry in zip(slow, batch.take(pa.array(slow)).to_pylist())]
    accepted = [row is not None for row in extra]
    codes = file_codes[fast]
    if any(accepted):  # the per-row path accepted rows the columnar checks flagged (a timestamp fallback, an edge)
        codes = np.concatenate([codes, file_codes[slow[accepted]]])
        slow_table = pa.Table.from_pylist([row for row in extra if row is not None], CATALOG_SCHEMA)
        for position, name in enumerate(("source_file", "source_group")):
            slow_table = slow_table.set_column(position, name, pa.DictionaryArray.from_arrays(
                pa.array(file_codes[slow[accepted]], pa.int32()), names))
        table = pa.concat_tables([table, slow_table.cast(table.schema)])
    return table, codes


def apply_metadata(source, images: dict[str, str], catalog: Catalog) -> None:
    """Take cloud_cover/nodata/centre from metadata.parquet for the listed rows of the input's files.

    `images` maps a file name to where it was listed. Rows of files that are not in the input (a
    partial download) are ignored, not rejected; a listed row the metadata lacks keeps NaN (the
    unit computes cloud and no-data from its pixels). Rows are matched on integer (file, row) keys
    with a sorted search: no hash table of strings, no Python object per row."""
    listed = catalog.table
    meta, found = _metadata_rows(source, images, listed)
    known = found.to_numpy(zero_copy_only=False)
    if not known.all():
        first = int(np.flatnonzero(~known)[0])
        log.warning("%d listed row(s) are not in metadata.parquet (first: %s row %s): cloud/nodata computed from "
                    "pixels", int((~known).sum()), listed.column("source_file")[first],
                    listed.column("source_row")[first])
    same = pc.fill_null(pc.equal(meta.column("product_id"), listed.column("product_id")), False)
    trusted = same.to_numpy(zero_copy_only=False) & _trusted_values(
        _values(meta), float_column(listed, "centre_lat"), float_column(listed, "centre_lon"))
    keep = ~known | trusted
    for index in np.flatnonzero(known & ~trusted):
        row = listed.slice(int(index), 1).to_pylist()[0]
        entry = meta.slice(int(index), 1).to_pylist()[0]
        if entry["product_id"] != row["product_id"]:
            problem = f"metadata.parquet says {entry['product_id']}, the file holds {row['product_id']}"
        else:
            problem = metadata_problem(entry, row)
        if problem is None:  # the columnar check was stricter at the tolerance's edge
            keep[index] = trusted[index] = True
            continue
        catalog.rejected.append(reject(row["source_file"], row["source_row"], problem, row["key"]))
    for name in METADATA_VALUES:  # the metadata's value where it is known and trusted, else the listed one
        column = pc.if_else(pa.array(trusted), meta.column(name), listed.column(name))
        listed = listed.set_column(listed.schema.get_field_index(name), name, column)
    catalog.table = listed.filter(pa.array(keep))


def _metadata_rows(source, images: dict[str, str], listed: pa.Table) -> tuple[pa.Table, pa.Array]:
    """(metadata.parquet's row for each listed row, null where it has none; whether it has one). Where the
    metadata repeats a (file, row), its first entry counts."""
    table = pq.read_table(source, columns=["product_id", *METADATA_VALUES, "parquet_url", "parquet_row"],
                          read_dictionary=["parquet_url"])
    code_of = {name: code for code, name in enumerate(sorted(images))}
    meta_keys, inside = _row_keys(table.column("parquet_url"), table.column("parquet_row"),
                                  lambda url: code_of.get(os.path.basename(url), -1))
    if not inside.all():
        log.info("metadata.parquet: %d of %d rows are of files not in the input; ignored",
                 int((~inside).sum()), table.num_rows)
    unique_keys, first = np.unique(meta_keys[inside], return_index=True)
    positions = np.flatnonzero(inside)[first]
    code_of_path = {path: code_of[name] for name, path in images.items()}
    listed_keys, _ = _row_keys(listed.column("source_file"), listed.column("source_row"),
                               lambda path: code_of_path.get(path, -1))
    slot = np.minimum(np.searchsorted(unique_keys, listed_keys), max(len(unique_keys) - 1, 0))
    found = (unique_keys[slot] == listed_keys) if len(unique_keys) else np.zeros(len(listed_keys), dtype=bool)
    rows = pa.array(np.where(found, positions[slot] if len(positions) else 0, 0), mask=~found)
    return table.select(["product_id", *METADATA_VALUES]).take(rows), pa.array(found)


def _row_keys(files: pa.ChunkedArray, numbers: pa.ChunkedArray, code) -> tuple[np.ndarray, np.ndarray]:
    """(file code << 32 | row number, whether the file has a code) per row; `code` maps a file name once."""
    files = dictionary_encoded(files)
    codes = np.array([code(name) for name in files.dictionary.to_pylist()], dtype=np.int64)
    per_row = codes[files.indices.to_numpy(zero_copy_only=False)] if len(codes) else np.empty(0, np.int64)
    rows = pc.fill_null(numbers, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return (per_row << 32) | (rows & 0xFFFFFFFF), per_row >= 0
