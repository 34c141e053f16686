"""The rows of the embedding parquet files: Major-TOM's columns (MajorTOM/embedder/MajorTOM_Embedder.py
`forward`, `column_types`) for each fragment, plus our `key`.

A DataLoader worker makes every column of a tile's rows but the embedding (`tile_columns`, from
meta.json alone); the main process adds the embeddings and their `unique_id` (`rows_table`).
Where we differ from the original, on purpose:
* `geometry`, `utm_footprint`, `centre_*` describe the fragment that was embedded. The original reads
  its (row, col) offsets as (x, y) (MajorTOM_Embedder.py `x_offset,y_offset=xys[...]`), so its
  footprints are transposed: fragment (row r, col c) gets the outline of (row c, col r).
  `pixel_bbox` is [col_start, row_start, col_end, row_end], the order its crop_footprint documents.
* `unique_id` hashes the embedding's float32 bytes; the original hashed numpy's printed text of it,
  which depends on print options and elides the middle of vectors longer than 1000 values.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pyarrow as pa

from phileo.geo import parse_grid_cell, ring_centroids, rings_to_lonlat, window_rings
from phileo.schema import SchemaError

# Major-TOM's columns in its order (dtypes of its column_types: int16 grid indices, float32 centres), then ours.
SCHEMA = pa.schema([
    ("unique_id", pa.string()),
    ("embedding", pa.list_(pa.float32())),
    ("timestamp", pa.string()),
    ("product_id", pa.string()),
    ("grid_cell", pa.string()),
    ("grid_row_u", pa.int16()),
    ("grid_col_r", pa.int16()),
    ("geometry", pa.binary()),  # WKB polygon in lon/lat (GeoParquet, as geopandas writes it)
    ("centre_lat", pa.float32()),
    ("centre_lon", pa.float32()),
    ("utm_footprint", pa.string()),  # WKT polygon in utm_crs
    ("utm_crs", pa.string()),
    ("pixel_bbox", pa.list_(pa.int64())),
    ("key", pa.string()),  # ours: the sample key, which joins to the dataset's index.parquet
])
# GeoParquet 1.0 file metadata; no "crs": the spec's default, OGC:CRS84 (lon/lat on WGS84), is the geometry's.
GEO_METADATA = {"version": "1.0.0", "primary_column": "geometry",
                "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"]}}}
FILE_SCHEMA = SCHEMA.with_metadata({b"geo": json.dumps(GEO_METADATA).encode()})  # what the part files declare
_WKB_POLYGON_HEADER = struct.pack("<BIII", 1, 3, 1, 5)  # little endian, Polygon, 1 ring, 5 points


def majortom_timestamp(timestamp: str) -> str:
    """meta.json's "2023-11-02T10:33:25Z" in Major-TOM's form "20231102T103325"; other text as given."""
    if len(timestamp) == 20 and timestamp[4] == "-" and timestamp.endswith("Z"):
        return timestamp[:-1].replace("-", "").replace(":", "")
    return timestamp


def wkt_number(value: float) -> str:
    """A coordinate as GEOS writes it in shapely's WKT: the shortest round-trip digits, no trailing '.0'."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def polygon_wkt(ring: np.ndarray) -> str:
    return "POLYGON ((" + ", ".join(f"{wkt_number(x)} {wkt_number(y)}" for x, y in ring) + "))"


def polygon_wkb(ring: np.ndarray) -> bytes:
    return _WKB_POLYGON_HEADER + np.ascontiguousarray(ring, dtype="<f8").tobytes()


def _grid_indices(cell: str) -> tuple[int | None, int | None]:
    """Signed (row, col) of a MajorTOM cell ('922D_249L' -> -922, -249); None for a tile without one."""
    try:
        parsed = parse_grid_cell(cell)
    except ValueError:
        return None, None
    return parsed.row, parsed.col


def tile_columns(key: str, meta: dict, windows: np.ndarray, size: int) -> dict[str, list]:
    """Every column but `embedding` and `unique_id` for the fragments `windows` (row, col) of `size` px of
    one tile, and `_geometry_wkt` (what unique_id hashes). SchemaError when the tile is not georeferenced."""
    if not meta.get("crs") or not isinstance(meta.get("transform"), list) or len(meta["transform"]) != 6:
        raise SchemaError(f"{key}: meta.json has no crs and transform (source {meta.get('source')!r}); "
                          "embed needs georeferenced tiles (majortom, fasttom, geotiff)")
    utm = window_rings(meta["transform"], windows, size)
    lonlat = rings_to_lonlat(meta["crs"], utm)
    centres = ring_centroids(lonlat)
    row, col = _grid_indices(meta.get("grid_cell", ""))
    count = len(windows)
    return {
        "timestamp": [majortom_timestamp(meta.get("timestamp", ""))] * count,
        "product_id": [meta.get("product_id", "")] * count,
        "grid_cell": [meta.get("grid_cell", "")] * count,
        "grid_row_u": [row] * count,
        "grid_col_r": [col] * count,
        "geometry": [polygon_wkb(ring) for ring in lonlat],
        "centre_lat": centres[:, 1].tolist(),
        "centre_lon": centres[:, 0].tolist(),
        "utm_footprint": [polygon_wkt(ring) for ring in utm],
        "utm_crs": [meta["crs"]] * count,
        "pixel_bbox": [[int(c), int(r), int(c) + size, int(r) + size] for r, c in windows],
        "key": [key] * count,
        "_geometry_wkt": [polygon_wkt(ring) for ring in lonlat],
    }


def unique_id(geometry_wkt: str, timestamp: str, product_id: str, embedding: np.ndarray) -> str:
    """SHA-256 of the original's "{geometry}_{timestamp}_{product_id}_" and the embedding's float32 bytes."""
    text = f"{geometry_wkt}_{timestamp}_{product_id}_".encode()
    return hashlib.sha256(text + np.ascontiguousarray(embedding, dtype="<f4").tobytes()).hexdigest()


def rows_table(columns: dict[str, list], embeddings: np.ndarray) -> pa.Table:
    """One tile's rows: `tile_columns` + its (n, D) float32 embeddings, in SCHEMA's order."""
    assert embeddings.ndim == 2 and len(embeddings) == len(columns["key"]), embeddings.shape
    embeddings = embeddings.astype(np.float32, copy=False)
    ids = [unique_id(wkt, t, p, e) for wkt, t, p, e in
           zip(columns["_geometry_wkt"], columns["timestamp"], columns["product_id"], embeddings)]
    dim = embeddings.shape[1]
    offsets = np.arange(0, (len(embeddings) + 1) * dim, dim, dtype=np.int32)
    values = {"unique_id": pa.array(ids, pa.string()),
              "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(embeddings.ravel()))}
    arrays = [values[f.name] if f.name in values else pa.array(columns[f.name], f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)

