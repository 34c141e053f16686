"""Synthetic global label rasters (EPSG:4326) to test and benchmark `phileo-shard build --label`.

Like the real products (ESA WorldCover ships as 3x3 degree tiles, commonly mosaicked by a VRT), each
layer is a global-extent VRT (-180..180, -90..90) referencing small tiled GeoTIFFs that cover only boxes
around the given MajorTOM grid cells; the rest of the world reads as the layer's nodata. Every
pixel value is a pure function of its global pixel index, so overlapping boxes agree and a box
crossing the antimeridian is split into its two halves seamlessly.

Layers (name -> dtype, nodata, pattern):
- landcover: uint8, nodata 0: ESA WorldCover codes in a checkerboard of `checker_deg` squares,
  about 1 square in 12 is 0 (no data).
- water: uint8, nodata 255: 1 on latitude/longitude stripes (~330/450 m wide), else 0.
- buildings: float32, nodata -1: smooth 0..100 waves (coarser grid, `buildings_res_deg`).

    python tools/label_fixture.py OUT [--cells 454U_120R,...] [--res 0.000167] [--pad-cells 2]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

try:
    from phileo.geo import ROW_HEIGHT_DEG, column_width_deg, parse_grid_cell
    from tools.majortom_fixture import DEFAULT_CELLS
except ModuleNotFoundError:  # run as a script from a checkout: python tools/label_fixture.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from phileo.geo import ROW_HEIGHT_DEG, column_width_deg, parse_grid_cell
    from tools.majortom_fixture import DEFAULT_CELLS

logger = logging.getLogger(__name__)

WORLDCOVER_CODES = np.array([10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100], dtype=np.uint8)
LAYERS = {  # name -> (numpy dtype, nodata, VRT data type)
    "landcover": ("uint8", 0, "Byte"),
    "water": ("uint8", 255, "Byte"),
    "buildings": ("float32", -1.0, "Float32"),
}
CHECKER_DEG = 0.004  # landcover squares (~450 m): several classes per tile and per 128 px crop
STRIP_ROWS = 1024  # rows generated and written at a time: bounded memory at 10 m resolution
Box = tuple[float, float, float, float]  # west, south, east, north in degrees


def pattern(name: str, rows: np.ndarray, cols: np.ndarray, res: float, checker_deg: float = CHECKER_DEG) -> np.ndarray:
    """Values of layer `name` at global pixel indices (row 0 at 90 N, col 0 at 180 W), broadcast."""
    lat = 90.0 - (rows + 0.5) * res
    lon = -180.0 + (cols + 0.5) * res
    if name == "landcover":
        i = np.floor(lon / checker_deg).astype(np.int64)
        j = np.floor(lat / checker_deg).astype(np.int64)
        k = (i * 92821 + j * 68917) % 12
        return np.where(k == 11, 0, WORLDCOVER_CODES[np.minimum(k, 10)]).astype(np.uint8)
    if name == "water":
        stripes = (np.floor(lat / 0.003).astype(np.int64) % 3 == 0) | (np.floor(lon / 0.004).astype(np.int64) % 4 == 0)
        return stripes.astype(np.uint8)
    if name == "buildings":
        waves = np.sin(2 * np.pi * lon / 0.03) * np.cos(2 * np.pi * lat / 0.02)
        return (50.0 + 50.0 * waves).astype(np.float32)
    raise ValueError(f"unknown layer {name!r}; expected one of {sorted(LAYERS)}")


def cell_boxes(cells: Iterable[str], pad_cells: float = 2.0, east_cut_deg: float | None = None) -> list[Box]:
    """A box of +-`pad_cells` cells around each cell; `east_cut_deg` ends it that far east of the SW corner."""
    boxes = []
    for name in cells:
        lat, lon = parse_grid_cell(name).sw_corner()
        width = column_width_deg(lat)
        east = lon + (east_cut_deg if east_cut_deg is not None else (pad_cells + 1) * width)
        boxes.append((lon - pad_cells * width, max(lat - pad_cells * ROW_HEIGHT_DEG, -90.0),
                      east, min(lat + (pad_cells + 1) * ROW_HEIGHT_DEG, 90.0)))
    return boxes


def merge_boxes(boxes: list[Box]) -> list[Box]:
    """Union overlapping boxes (fewer, larger region files); repeats until none overlap."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    merged[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged


def split_antimeridian(box: Box) -> list[Box]:
    """A box reaching past +-180 as its parts inside -180..180."""
    west, south, east, north = box
    if west < -180.0:
        return [(west + 360.0, south, 180.0, north), (-180.0, south, east, north)]
    if east > 180.0:
        return [(west, south, 180.0, north), (-180.0, south, east - 360.0, north)]
    return [box]


def _pixel_box(box: Box, res: float) -> tuple[int, int, int, int]:
    """(row0, col0, rows, cols) of the global pixel grid covering `box` (snapped outward)."""
    west, south, east, north = box
    col0 = max(math.floor((west + 180.0) / res + 1e-9), 0)
    col1 = min(math.ceil((east + 180.0) / res - 1e-9), round(360.0 / res))
    row0 = max(math.floor((90.0 - north) / res + 1e-9), 0)
    row1 = min(math.ceil((90.0 - south) / res - 1e-9), round(180.0 / res))
    return row0, col0, row1 - row0, col1 - col0


def write_region(path: Path, name: str, pixels: tuple[int, int, int, int], res: float, checker_deg: float) -> None:
    """One tiled deflate GeoTIFF of the global grid's pixels `pixels`, written in strips."""
    dtype, nodata, _ = LAYERS[name]
    row0, col0, rows, cols = pixels
    profile = {"driver": "GTiff", "width": cols, "height": rows, "count": 1, "dtype": dtype,
               "crs": CRS.from_epsg(4326), "transform": from_origin(-180.0 + col0 * res, 90.0 - row0 * res, res, res),
               "nodata": nodata, "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    col_index = np.arange(col0, col0 + cols)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for start in range(0, rows, STRIP_ROWS):
            count = min(STRIP_ROWS, rows - start)
            values = pattern(name, np.arange(row0 + start, row0 + start + count)[:, None], col_index, res, checker_deg)
            dst.write(values, 1, window=Window(0, start, cols, count))


def write_global_vrt(path: Path, name: str, regions: list[tuple[Path, tuple[int, int, int, int]]],
                     res: float) -> None:
    """A -180..180 x -90..90 VRT mosaicking the region files (areas without one read as nodata)."""
    _, nodata, vrt_type = LAYERS[name]
    width, height = round(360.0 / res), round(180.0 / res)
    sources = []
    for file, (row0, col0, rows, cols) in regions:
        sources.append(
            f'    <SimpleSource>\n'
            f'      <SourceFilename relativeToVRT="1">{escape(file.relative_to(path.parent).as_posix())}'
            f'</SourceFilename>\n      <SourceBand>1</SourceBand>\n'
            f'      <SourceProperties RasterXSize="{cols}" RasterYSize="{rows}" DataType="{vrt_type}" '
            f'BlockXSize="256" BlockYSize="256"/>\n'
            f'      <SrcRect xOff="0" yOff="0" xSize="{cols}" ySize="{rows}"/>\n'
            f'      <DstRect xOff="{col0}" yOff="{row0}" xSize="{cols}" ySize="{rows}"/>\n'
            f'    </SimpleSource>\n')
    path.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f'  <SRS dataAxisToSRSAxisMapping="2,1">{escape(CRS.from_epsg(4326).to_wkt())}</SRS>\n'
        f'  <GeoTransform>-180.0, {res!r}, 0.0, 90.0, 0.0, {-res!r}</GeoTransform>\n'
        f'  <VRTRasterBand dataType="{vrt_type}" band="1">\n    <NoDataValue>{nodata}</NoDataValue>\n'
        + "".join(sources) + '  </VRTRasterBand>\n</VRTDataset>\n')


def make_label_rasters(out_dir: str | Path, cells: Iterable[str] = DEFAULT_CELLS, *, pad_cells: float = 2.0,
                       res_deg: float = 1 / 6000, buildings_res_deg: float = 1 / 1200,
                       checker_deg: float = CHECKER_DEG, east_cut_deg: float | None = None,
                       boxes: list[Box] | None = None, layers: Iterable[str] = tuple(LAYERS)) -> dict[str, Path]:
    """Write the layers under `out_dir`; returns {layer name: global VRT path}.

    Coverage: boxes around `cells` (see `cell_boxes`), or the explicit lon/lat `boxes`.
    """
    out = Path(out_dir)
    parts = [part for box in merge_boxes(boxes if boxes is not None else cell_boxes(cells, pad_cells, east_cut_deg))
             for part in split_antimeridian(box)]
    vrts = {}
    for name in layers:
        res = buildings_res_deg if name == "buildings" else res_deg
        (out / name).mkdir(parents=True, exist_ok=True)
        regions = []
        for number, part in enumerate(parts):
            pixels = _pixel_box(part, res)
            if pixels[2] <= 0 or pixels[3] <= 0:
                continue
            file = out / name / f"region_{number:03d}.tif"
            write_region(file, name, pixels, res, checker_deg)
            regions.append((file, pixels))
        vrts[name] = out / f"{name}.vrt"
        write_global_vrt(vrts[name], name, regions, res)
        logger.info("wrote %s: %d region file(s), %.6f deg pixels", vrts[name], len(regions), res)
    return vrts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS), help="comma-separated MajorTOM grid cells")
    parser.add_argument("--pad-cells", type=float, default=2.0, help="cells of margin around each cell")
    parser.add_argument("--res", type=float, default=1 / 6000, help="landcover/water pixel size in degrees")
    parser.add_argument("--buildings-res", type=float, default=1 / 1200, help="buildings pixel size in degrees")
    parser.add_argument("--east-cut", type=float, help="partial coverage: boxes end this many degrees east of "
                                                       "each cell's SW corner")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    vrts = make_label_rasters(args.out, args.cells.split(","), pad_cells=args.pad_cells, res_deg=args.res,
                              buildings_res_deg=args.buildings_res, east_cut_deg=args.east_cut)
    for name, path in vrts.items():
        print(f"--label {name}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
