"""Deterministic generator of small datasets in the format of HF `Major-TOM/Core-S2L2A`.

Writes `images/part_NNNNN.parquet` files (one row per row group by default, one complete
single-band GeoTIFF per band cell, as the real data) and `metadata.parquet`, or the original
loader's extracted layout `Core-S2L2A/L2A/<row>/<row>_<col>/<product_id>/*.tif`. Tiles are
small (`tile_size`, default 120 px at 10 m) but otherwise match the real grids, CRSs and
geotransforms. Odd cases (corrupt bytes, wrong shapes, wrong CRS, missing columns, duplicate
keys) are keyword options. Same arguments -> byte-identical files.

    python tools/majortom_fixture.py OUT [--files N] [--rows N] [--tile-size T] [--layout L]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from rasterio.crs import CRS
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform

try:
    from phileo.bands import CLOUD_MASK, RESOLUTION_GROUPS
    from phileo.geo import GridCell, parse_grid_cell, utm_epsg
except ModuleNotFoundError:  # run as a script from a checkout: python tools/majortom_fixture.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from phileo.bands import CLOUD_MASK, RESOLUTION_GROUPS
    from phileo.geo import GridCell, parse_grid_cell, utm_epsg

logger = logging.getLogger(__name__)

BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
RASTER_COLUMNS = BANDS + (CLOUD_MASK,)
COLUMNS = ("product_id", "grid_cell", "product_datetime", "thumbnail") + RASTER_COLUMNS
# Downsampling factor against the 10 m grid of every raster column.
FACTOR = {b: f for bands, f in RESOLUTION_GROUPS.values() for b in bands} | {CLOUD_MASK: 1}
# (mean DN, gain of the "vegetation" field) per band: plausible L2A digital numbers.
BAND_STATS = {
    "B01": (350, -50), "B02": (450, -100), "B03": (700, -50), "B04": (650, -300),
    "B05": (1100, -100), "B06": (2000, 400), "B07": (2400, 600), "B08": (2600, 800),
    "B8A": (2800, 800), "B09": (900, 200), "B11": (2200, -200), "B12": (1400, -300),
}
# Base cells: north/east, north/west, south/east, south/west, and near the equator / lon 0.
DEFAULT_CELLS = ("454U_120R", "500U_30L", "300D_200R", "250D_400L", "2U_1L")
CLOUD_LEVELS = (0.0, 0.65, 0.08, 0.35, 0.85, 0.01)
HF_IMAGES_URL = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/"
_DAYS = (datetime(2024, 1, 1) - datetime(2019, 1, 1)).days
_BASELINES = {2019: "N0213", 2020: "N0214", 2021: "N0300", 2022: "N0400", 2023: "N0509"}
_LAT_BANDS = "CDEFGHJKLMNPQRSTUVWX"
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def _neighbour_offsets(count: int) -> list[tuple[int, int]]:
    """(d_row, d_col) of the base cell and its neighbours, nearest first, cycled to `count`."""
    ring = sorted(
        ((dr, dc) for dr in range(-3, 4) for dc in range(-3, 4)),
        key=lambda o: (max(abs(o[0]), abs(o[1])), abs(o[0]) + abs(o[1]), -o[0], -o[1]),
    )
    return [ring[i % len(ring)] for i in range(count)]


def _cell_for(base: str, file_index: int, n_bases: int, offset: tuple[int, int]) -> str:
    """Neighbour cell of a file's base cell; later cycles over the bases move 10 rows poleward."""
    cell = parse_grid_cell(base)
    sign = 1 if cell.row >= 0 else -1
    return GridCell(cell.row + sign * 10 * (file_index // n_bases) + offset[0],
                    cell.col + offset[1]).name


def _product_id(rng: np.random.Generator, when: datetime, epsg: int, lat: float) -> str:
    zone = epsg % 100
    band = _LAT_BANDS[min(max(int((lat + 80) // 8), 0), len(_LAT_BANDS) - 1)]
    square = "".join(_LETTERS[i] for i in rng.integers(0, len(_LETTERS), 2))
    processed = when + timedelta(seconds=int(rng.integers(3600, 6 * 3600)))
    return (f"S2{'AB'[int(rng.integers(0, 2))]}_MSIL2A_{when:%Y%m%dT%H%M%S}_"
            f"{_BASELINES[when.year]}_R{int(rng.integers(1, 144)):03d}_T{zone:02d}{band}{square}_"
            f"{processed:%Y%m%dT%H%M%S}")


def _plan_rows(num_files: int, rows_per_file: int, bases: list[str], seed: int,
               duplicate: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """Identity (cell, datetime, product_id) of every row; keys unique unless duplicated."""
    plans: list[dict[str, Any]] = []
    used: set[str] = set()
    offsets = _neighbour_offsets(rows_per_file)
    for file_index in range(num_files):
        base = bases[file_index % len(bases)]
        for row in range(rows_per_file):
            plan = {"file_index": file_index, "row": row, "tile_index": len(plans)}
            if (file_index, row) in duplicate:
                if not plans:
                    raise ValueError("duplicate=(0, 0): the first row has no previous row")
                prev = plans[-1]
                plan.update({k: prev[k] for k in ("grid_cell", "product_datetime", "product_id")})
                plans.append({**plan, "duplicate": True})
                continue
            rng = np.random.default_rng([seed, len(plans), 1])
            cell = _cell_for(base, file_index, len(bases), offsets[row])
            day, secs = int(rng.integers(0, _DAYS)), int(rng.integers(9 * 3600, 12 * 3600))
            while True:
                when = datetime(2019, 1, 1) + timedelta(days=day, seconds=secs)
                if f"{cell}_{when:%Y%m%dT%H%M%S}" not in used:
                    break
                day = (day + 1) % _DAYS
            used.add(f"{cell}_{when:%Y%m%dT%H%M%S}")
            lat, lon = parse_grid_cell(cell).sw_corner()
            plan.update(grid_cell=cell, product_datetime=f"{when:%Y%m%dT%H%M%S}",
                        product_id=_product_id(rng, when, utm_epsg(lat, lon), lat))
            plans.append({**plan, "duplicate": False})
    return plans


def _tile_geo(grid_cell: str, tile_size: int) -> dict[str, Any]:
    """UTM CRS, 10 m geotransform and lon/lat centre of a cell's tile (SW corner anchored)."""
    lat, lon = parse_grid_cell(grid_cell).sw_corner()
    epsg = utm_epsg(lat, lon)
    xs, ys = warp_transform("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
    left, bottom = round(xs[0]), round(ys[0])
    top = bottom + tile_size * 10
    half = tile_size * 5
    lons, lats = warp_transform(f"EPSG:{epsg}", "EPSG:4326", [left + half], [bottom + half])
    return {"epsg": epsg, "left": left, "top": top, "centre_lat": float(lats[0]),
            "centre_lon": float(lons[0]), "sw_lat": lat, "sw_lon": lon}


def _waves(rng: np.random.Generator, count: int) -> np.ndarray:
    """Low-frequency plane waves: rows of (amplitude, cycles in x, cycles in y, phase)."""
    return np.column_stack([
        rng.uniform(0.3, 1.0, count), rng.uniform(-3, 3, count),
        rng.uniform(-3, 3, count), rng.uniform(0, 2 * np.pi, count),
    ])


def _field(waves: np.ndarray, tile_size: int, factor: int) -> np.ndarray:
    """Sum of the waves on the pixel centres of a grid downsampled by `factor`, in [-1, 1]."""
    pos = (np.arange(tile_size // factor) + 0.5) * factor / tile_size
    yy, xx = np.meshgrid(pos, pos, indexing="ij")
    out = np.zeros_like(xx)
    for amp, fx, fy, phase in waves:
        out += amp * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    return out / waves[:, 0].sum()


def _cloud_mask(rng: np.random.Generator, tile_size: int, tile_index: int) -> np.ndarray:
    """uint8 mask: Gaussian blobs thresholded to a per-tile cloud fraction; classes 1..3."""
    target = float(np.clip(CLOUD_LEVELS[tile_index % len(CLOUD_LEVELS)]
                           + rng.uniform(-0.02, 0.02), 0.0, 0.95))
    mask = np.zeros((tile_size, tile_size), np.uint8)
    if target < 0.005:
        return mask
    pos = np.arange(tile_size) + 0.5
    yy, xx = np.meshgrid(pos, pos, indexing="ij")
    blobs = np.zeros_like(xx)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, tile_size, 2)
        sigma = rng.uniform(0.08, 0.3) * tile_size
        blobs += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    blobs += 0.05 * _field(_waves(rng, 3), tile_size, 1)
    cloud = blobs > np.quantile(blobs, 1 - target)
    shift = max(tile_size // 12, 1)
    shadow = np.roll(cloud, (shift, shift), axis=(0, 1)) & ~cloud
    mask[cloud] = 2
    mask[blobs > np.quantile(blobs, 1 - 0.5 * target)] = 1
    mask[shadow & (rng.random(mask.shape) < 0.5)] = 3
    return mask


def _tile_arrays(seed: int, tile_index: int, tile_size: int) -> dict[str, np.ndarray]:
    """All raster columns of one tile as arrays, with an optional nodata strip of zeros."""
    rng = np.random.default_rng([seed, tile_index, 2])
    bright, veg = _waves(rng, 4), _waves(rng, 4)
    mask = _cloud_mask(rng, tile_size, tile_index)
    strip = 6 * int(rng.integers(1, tile_size // 12 + 1)) if tile_index % 3 == 2 else 0
    on_left = bool(rng.integers(0, 2))
    thick = np.array([0.0, 1.0, 0.4, -0.3])[mask]  # brightening by cloud class
    arrays: dict[str, np.ndarray] = {}
    for band in BANDS:
        f = FACTOR[band]
        mean, gain = BAND_STATS[band]
        value = (mean * (1 + 0.25 * _field(bright, tile_size, f)) + gain * _field(veg, tile_size, f)
                 + rng.normal(0, 0.02 * mean, (tile_size // f,) * 2)
                 + 3000 * thick[f // 2::f, f // 2::f])
        arrays[band] = np.clip(np.rint(value), 1, 12000).astype(np.uint16)
    arrays["cloud_mask"] = mask
    if strip:
        for column, arr in arrays.items():
            w = strip // FACTOR[column]
            arr[:, slice(0, w) if on_left else slice(arr.shape[1] - w, None)] = 0
    return arrays


def _geotiff(arr: np.ndarray, epsg: int, left: float, top: float, res: int) -> bytes:
    """Bytes of a complete single-band deflate GeoTIFF."""
    profile = {
        "driver": "GTiff", "width": arr.shape[1], "height": arr.shape[0], "count": 1,
        "dtype": arr.dtype.name, "crs": CRS.from_epsg(epsg),
        "transform": Affine(res, 0, left, 0, -res, top), "compress": "deflate", "predictor": 2,
    }
    with MemoryFile() as memfile:
        with memfile.open(**profile) as dst:
            dst.write(arr, 1)
        return memfile.read()


def _thumbnail(arrays: dict[str, np.ndarray]) -> bytes:
    """PNG of a small true-colour preview (B04, B03, B02), at most ~64 px a side."""
    step = max(1, -(-arrays["B02"].shape[0] // 64))
    rgb = np.stack([arrays[b][::step, ::step] for b in ("B04", "B03", "B02")], axis=-1)
    img = Image.fromarray(np.clip(rgb / 3000.0 * 255, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _odd_epsg(epsg: int) -> int:
    """The same hemisphere's next UTM zone."""
    zone = epsg % 100
    return epsg - zone + zone % 60 + 1


def _encode_row(plan: dict[str, Any], arrays: dict[str, np.ndarray], geo: dict[str, Any],
                odd: dict[str, set[str]]) -> dict[str, Any]:
    """Column name -> value of one row, with the odd cases applied."""
    row: dict[str, Any] = {k: plan[k] for k in ("product_id", "grid_cell", "product_datetime")}
    row["thumbnail"] = _thumbnail(arrays)
    for column in RASTER_COLUMNS:
        arr, f = arrays[column], FACTOR[column]
        if column in odd["wrong_shape"]:
            cut = 6 // f
            arr = arr[: arr.shape[0] - cut, : arr.shape[1] - cut]
        epsg = _odd_epsg(geo["epsg"]) if column in odd["bad_crs"] else geo["epsg"]
        row[column] = _geotiff(np.ascontiguousarray(arr), epsg, geo["left"], geo["top"], 10 * f)
    for column in odd["corrupt"]:
        row[column] = row[column][: len(row[column]) // 2]
    for column in odd["dropped"]:
        row.pop(column)
    return row


def _flags(plan: dict[str, Any], cell_opts: dict[str, set], drops: set) -> dict[str, set[str]]:
    """Odd-case columns that apply to one planned row."""
    at = (plan["file_index"], plan["row"])
    flags = {name: {c for f, r, c in opts if (f, r) == at} for name, opts in cell_opts.items()}
    flags["dropped"] = {c for f, c in drops if f == plan["file_index"]}
    return flags


def _validate(num_files: int, rows_per_file: int, tile_size: int, layout: str,
              cell_opts: dict[str, set], drop_column: set) -> None:
    if num_files < 1 or rows_per_file < 1:
        raise ValueError(f"need num_files, rows_per_file >= 1, got {num_files}, {rows_per_file}")
    if tile_size <= 0 or tile_size % 6:
        raise ValueError(f"tile_size must be a positive multiple of 6, got {tile_size}")
    if layout not in ("parquet", "extracted"):
        raise ValueError(f"layout must be 'parquet' or 'extracted', got {layout!r}")
    allowed = {"corrupt": RASTER_COLUMNS + ("thumbnail",), "wrong_shape": RASTER_COLUMNS,
               "bad_crs": RASTER_COLUMNS}
    for name, entries in cell_opts.items():
        for f, r, c in entries:
            if not (0 <= f < num_files and 0 <= r < rows_per_file) or c not in allowed[name]:
                raise ValueError(f"{name}: bad entry {(f, r, c)!r}")
    for f, c in drop_column:
        if not 0 <= f < num_files or c not in COLUMNS:
            raise ValueError(f"drop_column: bad entry {(f, c)!r}")


def _write_parquet(path: Path, rows: list[dict[str, Any]], rows_per_row_group: int) -> None:
    """One ParquetWriter file, one write_table call per row group."""
    names = [c for c in COLUMNS if c in rows[0]]
    schema = pa.schema([(c, pa.string() if c in COLUMNS[:3] else pa.binary()) for c in names])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Statistics / dictionaries only for the strings: at real tile sizes the blobs exceed
    # parquet's statistics size limit anyway, so small fixtures get a footer like the real one.
    strings = [c for c in names if c in COLUMNS[:3]]
    with pq.ParquetWriter(path, schema, use_dictionary=strings,
                          write_statistics=strings) as writer:
        for start in range(0, len(rows), rows_per_row_group):
            chunk = rows[start : start + rows_per_row_group]
            table = pa.Table.from_pylist(chunk, schema=schema)
            writer.write_table(table, row_group_size=len(chunk))


def _write_extracted(out: Path, row: dict[str, Any]) -> Path:
    """The original loader's layout; returns the product directory."""
    cell = row["grid_cell"]
    product = out / "Core-S2L2A" / "L2A" / cell.split("_")[0] / cell / row["product_id"]
    product.mkdir(parents=True, exist_ok=True)
    for column in RASTER_COLUMNS + ("thumbnail",):
        if column in row:
            name = "thumbnail.png" if column == "thumbnail" else f"{column}.tif"
            (product / name).write_bytes(row[column])
    return product


def _write_metadata(path: Path, records: list[dict[str, Any]]) -> None:
    schema = pa.schema([
        ("grid_cell", pa.string()), ("grid_row_u", pa.int64()), ("grid_col_r", pa.int64()),
        ("product_id", pa.string()), ("timestamp", pa.string()), ("cloud_cover", pa.float64()),
        ("nodata", pa.float64()), ("centre_lat", pa.float64()), ("centre_lon", pa.float64()),
        ("crs", pa.string()), ("parquet_url", pa.string()), ("parquet_row", pa.int64()),
    ])
    rows = []
    for rec in records:
        cell = parse_grid_cell(rec["grid_cell"])
        when = datetime.strptime(rec["product_datetime"], "%Y%m%dT%H%M%S")
        rows.append({
            **{k: rec[k] for k in ("grid_cell", "product_id", "cloud_cover", "nodata",
                                   "centre_lat", "centre_lon", "crs")},
            "grid_row_u": cell.row, "grid_col_r": cell.col,
            "timestamp": f"{when:%Y-%m-%d %H:%M:%S}",
            "parquet_url": HF_IMAGES_URL + f"part_{rec['file_index'] + 1:05d}.parquet",
            "parquet_row": rec["row"],
        })
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _record(plan: dict[str, Any], arrays: dict[str, np.ndarray], geo: dict[str, Any],
            odd: dict[str, set[str]], tile_size: int) -> dict[str, Any]:
    """The dict returned to callers for one row (file filled in by the caller)."""
    key = f"{plan['grid_cell']}_{plan['product_datetime']}"
    nodata = np.all(np.stack([arrays[b] for b in ("B02", "B03", "B04", "B08")]) == 0, axis=0)
    return {
        "file": "", "file_index": plan["file_index"], "row": plan["row"],
        **{k: plan[k] for k in ("product_id", "grid_cell", "product_datetime")}, "key": key,
        "crs": f"EPSG:{geo['epsg']}",
        "transform": (10.0, 0.0, float(geo["left"]), 0.0, -10.0, float(geo["top"])),
        "shape": (tile_size, tile_size),
        "cloud_cover": float(100.0 * np.mean(arrays["cloud_mask"] > 0)),
        "nodata": float(nodata.mean()), "centre_lat": geo["centre_lat"],
        "centre_lon": geo["centre_lon"], "sw_lat": geo["sw_lat"], "sw_lon": geo["sw_lon"],
        "duplicate": plan["duplicate"], **{k: sorted(v) for k, v in odd.items()},
    }


def make_majortom_dataset(
    out_dir: str | Path, *, num_files: int = 2, rows_per_file: int = 4,
    rows_per_row_group: int = 1, tile_size: int = 120, cells: Iterable[str] | None = None,
    seed: int = 0, layout: str = "parquet", with_metadata: bool = True,
    corrupt: Iterable[tuple[int, int, str]] = (), wrong_shape: Iterable[tuple[int, int, str]] = (),
    bad_crs: Iterable[tuple[int, int, str]] = (), drop_column: Iterable[tuple[int, str]] = (),
    duplicate: Iterable[tuple[int, int]] = (),
) -> list[dict[str, Any]]:
    """Write a small Core-S2L2A-format dataset under `out_dir`; return one dict per row.

    `cells` are base cells: file k holds cells[k % len(cells)] (row 0) and its neighbours.
    Odd cases address rows by (file_index, row_index[, column]). A duplicated row repeats
    the previous row's product_id, grid_cell and product_datetime (so its key); in the
    extracted layout it overwrites that product directory.
    """
    out = Path(out_dir)
    cell_opts = {"corrupt": {tuple(x) for x in corrupt},
                 "wrong_shape": {tuple(x) for x in wrong_shape},
                 "bad_crs": {tuple(x) for x in bad_crs}}
    drops = {tuple(x) for x in drop_column}
    _validate(num_files, rows_per_file, tile_size, layout, cell_opts, drops)
    bases = list(cells) if cells is not None else list(DEFAULT_CELLS)
    for base in bases:
        parse_grid_cell(base)
    plans = _plan_rows(num_files, rows_per_file, bases, seed, {tuple(x) for x in duplicate})
    records: list[dict[str, Any]] = []
    for file_index in range(num_files):
        path = out / "images" / f"part_{file_index + 1:05d}.parquet"
        rows = []
        for plan in plans[file_index * rows_per_file : (file_index + 1) * rows_per_file]:
            arrays = _tile_arrays(seed, plan["tile_index"], tile_size)
            geo = _tile_geo(plan["grid_cell"], tile_size)
            odd = _flags(plan, cell_opts, drops)
            row = _encode_row(plan, arrays, geo, odd)
            record = _record(plan, arrays, geo, odd, tile_size)
            record["file"] = str(_write_extracted(out, row) if layout == "extracted" else path)
            rows.append(row)
            records.append(record)
        if layout == "parquet":
            _write_parquet(path, rows, max(1, rows_per_row_group))
        logger.info("wrote file %d (%d rows, %s layout)", file_index, len(rows), layout)
    if with_metadata:
        out.mkdir(parents=True, exist_ok=True)
        _write_metadata(out / "metadata.parquet", records)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--files", type=int, default=2, help="number of parquet files")
    parser.add_argument("--rows", type=int, default=4, help="rows (tiles) per file")
    parser.add_argument("--rows-per-row-group", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=120, help="10 m pixels, multiple of 6")
    parser.add_argument("--layout", choices=("parquet", "extracted"), default="parquet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    records = make_majortom_dataset(
        args.out, num_files=args.files, rows_per_file=args.rows,
        rows_per_row_group=args.rows_per_row_group, tile_size=args.tile_size,
        seed=args.seed, layout=args.layout,
    )
    print(f"wrote {len(records)} tiles in {args.files} files ({args.layout}, "
          f"{args.tile_size}px) to {args.out} in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
