"""Generate a MajorTOM Core-S2L2A-sized metadata.parquet (and, optionally, footer-only tile files).

The rows follow the real metadata's columns (grid_cell, grid_row_u, grid_col_r, product_id, timestamp,
cloud_cover, nodata, centre_lat, centre_lon, crs, parquet_url, parquet_row). Grid cells are taken in
row-major order over the MajorTOM grid (46% of its cells, at random), so each parquet file holds
`--rows-per-file` consecutive, spatially clustered rows, as Core-S2L2A's do. With `--files-dir DIR
--files N`, the first N files are written as real parquet files with Core-S2L2A's columns and one row
group per tile, whose bands are empty: their footers and id columns are what listing reads.

    python tools/scale_catalog.py OUT/metadata.parquet [--rows 2245886] [--files-dir OUT/images --files 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from phileo.bands import ALL_BANDS, CLOUD_MASK  # noqa: E402
from phileo.geo import (  # noqa: E402
    EARTH_RADIUS_EQUATOR_KM,
    GRID_DISTANCE_KM,
    ROW_HEIGHT_DEG,
    grid_cell_centres,
)

CORE_ROWS = 2_245_886
IMAGES_URL = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/"
LAND_FRACTION = 0.46  # of all grid cells: MajorTOM Core holds land and coasts, ~2.25M of ~5M cells


def grid_cells(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` (row, col) pairs in row-major order from the south pole northwards, LAND_FRACTION of the cells."""
    rows, cols, found = [], [], 0
    for row in range(-int(90 / ROW_HEIGHT_DEG) + 1, int(90 / ROW_HEIGHT_DEG)):
        lat = row * ROW_HEIGHT_DEG
        width = int(np.ceil(2 * np.pi * EARTH_RADIUS_EQUATOR_KM * np.cos(np.radians(lat)) / GRID_DISTANCE_KM))
        half = width // 2
        picked = np.flatnonzero(rng.random(width) < LAND_FRACTION) - half
        rows.append(np.full(len(picked), row))
        cols.append(picked)
        found += len(picked)
        if found >= count:
            break
    if found < count:
        raise SystemExit(f"--rows {count}: the grid holds only {found} land-like cells")
    return np.concatenate(rows)[:count], np.concatenate(cols)[:count]


def cell_names(rows: np.ndarray, cols: np.ndarray) -> list[str]:
    return [f"{abs(r)}{'U' if r >= 0 else 'D'}_{abs(c)}{'R' if c >= 0 else 'L'}" for r, c in zip(rows.tolist(),
                                                                                         cols.tolist())]


def metadata_table(count: int, rows_per_file: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    grid_rows, grid_cols = grid_cells(count, rng)
    lat, lon = grid_cell_centres(grid_rows, grid_cols)
    lon = (lon + 180) % 360 - 180
    seconds = rng.integers(1_483_228_800, 1_704_067_200, count)  # 2017..2023
    sensed = seconds.astype("datetime64[s]")
    stamp = np.datetime_as_string(sensed, unit="s")  # 2020-06-12T10:40:21
    compact = np.char.replace(np.char.replace(stamp.astype(str), "-", ""), ":", "")
    zones = (np.floor((lon + 180) / 6) % 60 + 1).astype(int)
    epsg = np.where(lat < 0, 32700, 32600) + zones
    orbit = rng.integers(1, 144, count)
    product_ids = [f"S2{'AB'[i % 2]}_MSIL2A_{t}_N0500_R{o:03d}_T{z:02d}XYZ_{t}" for i, (t, o, z) in
                   enumerate(zip(compact.tolist(), orbit.tolist(), zones.tolist()))]
    files = np.arange(count) // rows_per_file
    cloud = np.round(100 * rng.beta(0.6, 1.2, count), 2)
    nodata = np.where(rng.random(count) < 0.8, 0.0, np.round(rng.random(count), 4))
    urls = pa.DictionaryArray.from_arrays(
        pa.array(files.astype(np.int32)), pa.array([f"{IMAGES_URL}part_{f + 1:05d}.parquet"
                                                    for f in range(int(files[-1]) + 1)]))
    return pa.table({
        "grid_cell": cell_names(grid_rows, grid_cols), "grid_row_u": grid_rows, "grid_col_r": grid_cols,
        "product_id": product_ids, "timestamp": np.char.replace(stamp.astype(str), "T", " "),
        "cloud_cover": cloud, "nodata": nodata,
        "centre_lat": lat + rng.normal(0, 0.01, count),
        "centre_lon": (lon + rng.normal(0, 0.01, count) + 180) % 360 - 180,
        "crs": [f"EPSG:{e}" for e in epsg.tolist()], "parquet_url": urls,
        "parquet_row": np.arange(count) % rows_per_file,
    })


def write_footer_only_files(metadata: pa.Table, directory: Path, files: int) -> int:
    """Core-S2L2A-layout parquet files (one row group per tile, empty bands) for the first `files` files."""
    directory.mkdir(parents=True, exist_ok=True)
    urls = metadata.column("parquet_url").combine_chunks()
    codes = urls.indices.to_numpy()
    bounds = np.searchsorted(codes, np.arange(files + 1))
    empty = pa.array([b""] * int(np.diff(bounds).max()), pa.binary())
    for number in range(files):
        rows = metadata.slice(int(bounds[number]), int(bounds[number + 1] - bounds[number]))
        times = [p.split("_")[2] for p in rows.column("product_id").to_pylist()]
        table = pa.table({"product_id": rows.column("product_id"), "grid_cell": rows.column("grid_cell"),
                          "product_datetime": times, "thumbnail": empty[: rows.num_rows],
                          **{band: empty[: rows.num_rows] for band in (*ALL_BANDS, CLOUD_MASK)}})
        name = urls.dictionary[number].as_py().rsplit("/", 1)[1]
        pq.write_table(table, directory / name, row_group_size=1)
    return int(bounds[files])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="metadata.parquet to write")
    parser.add_argument("--rows", type=int, default=CORE_ROWS)
    parser.add_argument("--rows-per-file", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files-dir", type=Path, help="also write footer-only tile files here")
    parser.add_argument("--files", type=int, default=0, help="how many of them (the first N files)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    table = metadata_table(args.rows, args.rows_per_file, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    print(f"{args.out}: {table.num_rows} rows in {len(table.column('parquet_url').combine_chunks().dictionary)} "
          f"files, {args.out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s")
    if args.files_dir and args.files:
        rows = write_footer_only_files(table, args.files_dir, args.files)
        print(f"{args.files_dir}: {args.files} footer-only files, {rows} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
