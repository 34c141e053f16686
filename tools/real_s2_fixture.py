"""MajorTOM-format parquet rows made of real Sentinel-2 L2A pixels (tests/data/s2_real.npz).

The pixels are 3 BigEarthNet patches (120 px at 10 m, provenance in tests/data/README.md). Rows are
written exactly as tools/majortom_fixture.py writes them: the same columns, one DEFLATE (predictor 2)
single-band GeoTIFF per band cell, a cloud_mask, one row per row group, and `metadata.parquet`.

More tiles, or larger ones, than the 3 patches hold are made of the same pixels:

- tile t shows patch t % 3 under one of the 8 flips/quarter turns ((t // 3) % 8): 24 distinct tiles,
  then the same pixels again under new keys (each tile is compressed on its own, so a repeat of a
  whole tile changes no per-tile ratio);
- `tile_size` < 120 crops the patch; > 120 fills the tile with 120 px sub-patches (`fill`):
  `mosaic` (default) puts a different patch/flip in every sub-patch of a row and column, so no
  compressor sees the same bytes twice, at the price of an edge at every seam; `mirror` reflects one
  patch (no seams, but the pixels repeat with a period of 240 px, which long-window codecs such as
  GeoTIFF's DEFLATE strips exploit: byte ratios of `mirror` tiles are not those of real tiles).

Per-band value distributions (histograms) are the patches' own in every mode; what changes is the
spatial structure (seams, repeats) and so the compressed sizes. The cloud mask is all clear (0):
BigEarthNet has no per-pixel cloud mask, and its archive left out cloudy patches. Geometry
(CRS, transform, grid cell) is the patch's; a repeated tile gets its acquisition time plus
one day per repeat, so keys stay unique.

    python tools/real_s2_fixture.py OUT [--files 3] [--rows 8] [--tile-size 120] [--fill mosaic]
    python tools/real_s2_fixture.py --pack BIGEARTHNET_DIR   # rewrite tests/data/s2_real.npz
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.warp import transform as warp_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from phileo.geo import ROW_HEIGHT_DEG, GridCell, column_width_deg  # noqa: E402
from tools.majortom_fixture import (  # noqa: E402
    BANDS,
    FACTOR,
    RASTER_COLUMNS,
    _geotiff,
    _thumbnail,
    _write_metadata,
    _write_parquet,
)

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "s2_real.npz"
PATCH = 120  # 10 m pixels per side of a BigEarthNet patch
VARIANTS = 8  # flips x quarter turns
FILLS = ("mosaic", "mirror")
FIXTURE_JSON = "fixture.json"  # what made this directory (read by tools/bench_shard.py)


@dataclass(frozen=True)
class Patch:
    """One real patch: band arrays at their own resolution and its georeference."""

    name: str
    bands: dict[str, np.ndarray]
    epsg: int
    transform: tuple[float, ...]  # 10 m grid
    acquired: datetime
    l1c_product: str


def load_patches(path: Path = DATA) -> list[Patch]:
    with np.load(path) as data:
        infos = json.loads(str(data["patches"]))
        return [Patch(info["patch"], {band: data[f"p{i}_{band}"] for band in BANDS}, int(info["epsg"]),
                      tuple(info["transform_10m"]), datetime.strptime(info["acquired"], "%Y-%m-%d %H:%M:%S"),
                      info["l1c_product"]) for i, info in enumerate(infos)]


def variant(array: np.ndarray, number: int) -> np.ndarray:
    """Flip/quarter-turn `number` (0..7) of a square array; 0 is the array itself."""
    turned = np.rot90(array, number % 4)
    return turned[:, ::-1] if number >= 4 else turned


def _sub_patch(patches: list[Patch], tile: int, i: int, j: int, band: str) -> np.ndarray:
    """Mosaic sub-patch (i, j) of a tile: a neighbour in the row or column is another (patch, flip)."""
    number = (tile * 7 + i * 3 + j) % (len(patches) * VARIANTS)
    return variant(patches[number % len(patches)].bands[band], number // len(patches))


def tile_band(patches: list[Patch], tile: int, band: str, tile_size: int, fill: str) -> np.ndarray:
    """One band of tile `tile` at the band's resolution (tile_size // factor pixels a side)."""
    factor = FACTOR[band]
    side, sub = tile_size // factor, PATCH // factor
    own = variant(patches[tile % len(patches)].bands[band], (tile // len(patches)) % VARIANTS)
    if side <= sub:
        return np.ascontiguousarray(own[:side, :side])
    if fill == "mirror":
        return np.pad(own, ((0, side - sub), (0, side - sub)), mode="symmetric")
    count = math.ceil(side / sub)
    rows = [np.concatenate([_sub_patch(patches, tile, i, j, band) for j in range(count)], axis=1)
            for i in range(count)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:side, :side])


def grid_cell_of(lat: float, lon: float) -> str:
    """The MajorTOM cell holding a point (the inverse of GridCell.sw_corner)."""
    row = math.floor(lat / ROW_HEIGHT_DEG)
    return GridCell(row, math.floor(lon / column_width_deg(row * ROW_HEIGHT_DEG))).name


def _tile_record(patch: Patch, tile: int, repeat: int, tile_size: int, file_index: int, row: int) -> dict:
    """Identity and georeference of one tile (the plan of a row, as majortom_fixture's records)."""
    a, _, left, _, e, top = patch.transform
    centre_x, centre_y = left + a * tile_size / 2, top + e * tile_size / 2
    lons, lats = warp_transform(f"EPSG:{patch.epsg}", "EPSG:4326", [centre_x], [centre_y])
    when = patch.acquired + timedelta(days=repeat)
    # the L2A product of the patch's L1C one, with this tile's (shifted) time
    _, _, _, baseline, orbit, mgrs, processed = patch.l1c_product.removesuffix(".SAFE").split("_")
    product_id = f"{patch.name[:3]}_MSIL2A_{when:%Y%m%dT%H%M%S}_{baseline}_{orbit}_{mgrs}_{processed}"
    cell = grid_cell_of(float(lats[0]), float(lons[0]))
    return {"file": "", "file_index": file_index, "row": row, "tile_index": tile, "patch": patch.name,
            "product_id": product_id, "grid_cell": cell, "product_datetime": f"{when:%Y%m%dT%H%M%S}",
            "key": f"{cell}_{when:%Y%m%dT%H%M%S}", "crs": f"EPSG:{patch.epsg}",
            "transform": (a, 0.0, left, 0.0, e, top), "shape": (tile_size, tile_size), "cloud_cover": 0.0,
            "centre_lat": float(lats[0]), "centre_lon": float(lons[0]), "duplicate": False}


def _encode_tile(patches: list[Patch], record: dict, tile_size: int, fill: str) -> dict[str, Any]:
    """Column name -> value of one parquet row, and the record's nodata fraction filled in."""
    patch = patches[record["tile_index"] % len(patches)]
    arrays = {band: tile_band(patches, record["tile_index"], band, tile_size, fill) for band in BANDS}
    arrays["cloud_mask"] = np.zeros((tile_size, tile_size), np.uint8)
    nodata = np.all(np.stack([arrays[b] for b in ("B02", "B03", "B04", "B08")]) == 0, axis=0)
    record["nodata"] = float(nodata.mean())
    _, _, left, _, _, top = patch.transform
    row: dict[str, Any] = {k: record[k] for k in ("product_id", "grid_cell", "product_datetime")}
    row["thumbnail"] = _thumbnail(arrays)
    for column in RASTER_COLUMNS:
        row[column] = _geotiff(arrays[column], patch.epsg, left, top, 10 * FACTOR[column])
    return row


def make_real_s2_dataset(out_dir: str | Path, *, num_files: int = 1, rows_per_file: int = 3,
                         rows_per_row_group: int = 1, tile_size: int = PATCH, fill: str = "mosaic",
                         with_metadata: bool = True, data: Path = DATA) -> list[dict[str, Any]]:
    """Write `num_files` x `rows_per_file` tiles of real pixels under `out_dir`; return one dict per row."""
    if num_files < 1 or rows_per_file < 1:
        raise ValueError(f"need num_files, rows_per_file >= 1, got {num_files}, {rows_per_file}")
    if tile_size <= 0 or tile_size % 6:
        raise ValueError(f"tile_size must be a positive multiple of 6, got {tile_size}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    out, patches = Path(out_dir), load_patches(data)
    records: list[dict[str, Any]] = []
    for file_index in range(num_files):
        path = out / "images" / f"part_{file_index + 1:05d}.parquet"
        rows = []
        for row_number in range(rows_per_file):
            tile = len(records)
            record = _tile_record(patches[tile % len(patches)], tile, tile // len(patches), tile_size,
                                  file_index, row_number)
            rows.append(_encode_tile(patches, record, tile_size, fill))
            records.append(record | {"file": str(path)})
        _write_parquet(path, rows, max(1, rows_per_row_group))
    if with_metadata:
        _write_metadata(out / "metadata.parquet", records)
    (out / FIXTURE_JSON).write_text(json.dumps({
        "fixture": "tools/real_s2_fixture.py", "pixels": "real Sentinel-2 L2A (BigEarthNet patches)",
        "patches": [p.name for p in patches], "tiles": len(records), "tile_size": tile_size,
        "fill": fill if tile_size > PATCH else "none"}, indent=1) + "\n")
    return records


def pack(bigearthnet_dir: Path, out: Path = DATA) -> None:
    """tests/data/s2_real.npz from BigEarthNet patch folders (<patch>/<patch>_B01.tif ..., labels json)."""
    import rasterio

    arrays, infos = {}, []
    for number, folder in enumerate(sorted(p for p in bigearthnet_dir.iterdir() if p.is_dir())):
        labels = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
        for band in BANDS:
            with rasterio.open(folder / f"{folder.name}_{band}.tif") as dataset:
                arrays[f"p{number}_{band}"] = dataset.read(1)
                if band == "B02":
                    epsg, transform = dataset.crs.to_epsg(), tuple(dataset.transform)[:6]
        infos.append({"patch": folder.name, "epsg": epsg, "transform_10m": transform,
                      "acquired": labels["acquisition_date"], "l1c_product": labels["tile_source"]})
    np.savez_compressed(out, patches=np.array(json.dumps(infos)), **arrays)
    print(f"wrote {out} ({len(infos)} patches, {out.stat().st_size} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="output directory")
    parser.add_argument("--files", type=int, default=1, help="number of parquet files")
    parser.add_argument("--rows", type=int, default=3, help="rows (tiles) per file")
    parser.add_argument("--tile-size", type=int, default=PATCH, help="10 m pixels, multiple of 6")
    parser.add_argument("--fill", choices=FILLS, default="mosaic", help="how tiles > 120 px are filled")
    parser.add_argument("--pack", type=Path, metavar="DIR", help=f"rewrite {DATA.name} from BigEarthNet patches")
    args = parser.parse_args(argv)
    if args.pack:
        pack(args.pack)
        return 0
    if args.out is None:
        parser.error("OUT is required unless --pack is given")
    start = time.perf_counter()
    records = make_real_s2_dataset(args.out, num_files=args.files, rows_per_file=args.rows,
                                   tile_size=args.tile_size, fill=args.fill)
    print(f"wrote {len(records)} real-pixel tiles of {args.tile_size}px in {args.files} files to {args.out} "
          f"in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
