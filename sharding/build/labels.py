"""Co-register static label rasters onto each tile's 10 m grid (`phileo-shard build --label`).

`--label NAME=RASTER[:nearest|average]`: RASTER is anything rasterio opens (GeoTIFF, COG, VRT,
/vsicurl/..., any CRS; global EPSG:4326 rasters are the common case). Per tile only a window
around the tile's bounds is read, never the whole raster, through a per-worker LRU of
CHUNK x CHUNK blocks: consecutive tiles of a unit are mostly neighbours and share blocks. The
window is resampled onto the tile grid (CRS, transform, shape from meta) by
`rasterio.warp.reproject`. A tile crossing the antimeridian gets a window stitched from both
ends of a global geographic raster (longitudes kept continuous past 180). Average resampling
of a coarse source (pixels >= 40 m) runs on the tile's 20 m grid, each value stored on its 2x2
10 m pixels (see `_grid_factor`).

Output: member `label_<name>` and meta.json `labels[name]` = {source (as given), resampling,
coverage (fraction of tile pixels holding valid data), nodata}. Pixels the raster does not
cover, or where it has its own nodata, get the layer's nodata. Known layers are uint8:
- landcover: ESA WorldCover codes, nodata 0 (WorldCover's own "no data"; training's class 0),
- water: 0/1, nodata 255,   - buildings: density 0..100, nodata 255.
Other names keep uint8 / uint16 sources so (nodata: the source's, else the type's maximum);
any other source becomes float32 with NaN as nodata ("nodata": null in meta.json).
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window

from phileo.schema import Sample
from sharding.errors import InputError

log = logging.getLogger(__name__)

RESAMPLING = {"nearest": Resampling.nearest, "average": Resampling.average}
DEFAULT_RESAMPLING = {"landcover": "nearest", "water": "nearest", "buildings": "average"}
# Known layers: uint8, (nodata, lowest valid, highest valid). Water/buildings use 0 as a value,
# so their nodata is 255, outside their valid range; landcover's 0 is already "no data".
KNOWN_LAYERS = {"landcover": (0, 0, 255), "water": (255, 0, 254), "buildings": (255, 0, 100)}
CHUNK = 512  # cache block side, a multiple of the usual COG block (256/512)
CACHE_BYTES = 48 * 2**20  # per raster and worker: ~10 tile windows of a 10 m uint8 raster
MARGIN = 3  # source pixels around the tile bounds: rounding + the resampling kernel's reach
MAX_WINDOW_PIXELS = 64 * 2**20  # larger windows (tiles at the poles) are read decimated
COARSE_SOURCE = 4.0  # average sources with pixels of >= 4 tile pixels on the 20 m grid (_grid_factor)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
SPEC_FORMAT = "NAME=RASTER[:nearest|average]"


@dataclass(frozen=True)
class LabelSpec:
    """One `--label NAME=RASTER[:resampling]`; `raster` exactly as given."""

    name: str
    raster: str
    resampling: str

    def defining(self) -> dict:
        """What a dataset depends on: local paths resolved, so a rerun from elsewhere still matches."""
        remote = self.raster.startswith("/vsi") or "://" in self.raster
        raster = self.raster if remote else str(Path(self.raster).resolve())
        return {"name": self.name, "raster": raster, "resampling": self.resampling}


def parse_label_spec(text: str) -> LabelSpec:
    """`landcover=/data/wc.vrt:nearest` -> LabelSpec; InputError names the flag otherwise."""
    if "=" not in text:
        raise InputError(f"--label {text!r}: expected {SPEC_FORMAT}")
    name, raster = (part.strip() for part in text.split("=", 1))
    if not _NAME_RE.match(name):
        raise InputError(f"--label {text!r}: name {name!r} must be lower-case letters, digits or '_'")
    resampling = DEFAULT_RESAMPLING.get(name, "nearest")
    head, colon, tail = raster.rpartition(":")
    # Only a trailing ':word' is a resampling: a path's own colons are followed by '/', '\' or '.'
    # (/vsicurl/https://host:8080/x.tif, C:\x.tif).
    if colon and re.fullmatch(r"[A-Za-z]+", tail):
        if tail.lower() not in RESAMPLING:
            raise InputError(f"--label {text!r}: unknown resampling {tail!r}; expected nearest or average")
        raster, resampling = head, tail.lower()
    if not raster:
        raise InputError(f"--label {text!r}: no raster after '='; expected {SPEC_FORMAT}")
    return LabelSpec(name, raster, resampling)


def validate_label_specs(specs: tuple[LabelSpec, ...]) -> None:
    """Checks that need no I/O: known resampling, each name once."""
    seen = set()
    for spec in specs:
        if spec.resampling not in RESAMPLING:
            raise InputError(f"--label {spec.name}: unknown resampling {spec.resampling!r}")
        if spec.name in seen:
            raise InputError(f"--label {spec.name}: given more than once")
        seen.add(spec.name)


def check_label_rasters(specs: tuple[LabelSpec, ...]) -> None:
    """Open every raster once before any work starts: a bad path fails the build in one line."""
    for spec in specs:
        flag = f"--label {spec.name}={spec.raster}"
        try:
            with rasterio.open(spec.raster) as dataset:
                if dataset.crs is None:
                    raise InputError(f"{flag}: the raster has no CRS")
                if not dataset.transform.is_rectilinear:
                    raise InputError(f"{flag}: rotated rasters are not supported")
        except RasterioError as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise InputError(f"{flag}: cannot open the raster ({reason})") from error


@dataclass(frozen=True)
class Encoding:
    """How resampled values are stored: dtype, nodata (None = NaN) and the valid value range."""

    dtype: np.dtype
    nodata: int | None
    low: float
    high: float

    @staticmethod
    def for_layer(name: str, source_dtype: np.dtype, source_nodata: float | None) -> Encoding:
        if name in KNOWN_LAYERS:
            nodata, low, high = KNOWN_LAYERS[name]
            return Encoding(np.dtype(np.uint8), nodata, low, high)
        if source_dtype in (np.uint8, np.uint16):
            top = int(np.iinfo(source_dtype).max)
            own = source_nodata is not None and float(source_nodata).is_integer() and 0 <= source_nodata <= top
            return Encoding(np.dtype(source_dtype), int(source_nodata) if own else top, 0, top)
        return Encoding(np.dtype(np.float32), None, -math.inf, math.inf)

    def encode(self, values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
        """Resampled values + validity -> (stored array, fraction of pixels holding valid data)."""
        if self.nodata is None:
            out = values.astype(np.float32)
            out[~valid] = np.nan
            return out, float(np.count_nonzero(valid) / valid.size)
        if values.dtype.kind == "f":
            values = np.clip(np.rint(values), self.low, self.high)
        elif not self.holds(values.dtype):
            values = np.clip(values, self.low, self.high)
        out = np.where(valid, values, self.nodata).astype(self.dtype, copy=False)
        return out, float(np.count_nonzero(out != self.nodata) / out.size)

    def holds(self, dtype: np.dtype) -> bool:
        """Whether every value of an integer dtype is a valid stored value (no clipping needed)."""
        return dtype.kind in "iu" and self.low <= np.iinfo(dtype).min and np.iinfo(dtype).max <= self.high


class ChunkCache:
    """LRU of CHUNK x CHUNK blocks of band 1, keyed by block position; serves any window."""

    def __init__(self, dataset: rasterio.DatasetReader, max_bytes: int = CACHE_BYTES) -> None:
        self.dataset, self.max_bytes = dataset, max_bytes
        self.blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        (r0, r1), (c0, c1) = rows, cols
        out = np.empty((r1 - r0, c1 - c0), dtype=self.dataset.dtypes[0])
        for block_row in range(r0 // CHUNK, (r1 - 1) // CHUNK + 1):
            for block_col in range(c0 // CHUNK, (c1 - 1) // CHUNK + 1):
                block = self._block(block_row, block_col)
                top, left = block_row * CHUNK, block_col * CHUNK
                y0, y1 = max(r0, top), min(r1, top + block.shape[0])
                x0, x1 = max(c0, left), min(c1, left + block.shape[1])
                out[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = block[y0 - top : y1 - top, x0 - left : x1 - left]
        return out

    def _block(self, block_row: int, block_col: int) -> np.ndarray:
        key = (block_row, block_col)
        block = self.blocks.get(key)
        if block is not None:
            self.hits += 1
            self.blocks.move_to_end(key)
            return block
        self.misses += 1
        top, left = block_row * CHUNK, block_col * CHUNK
        window = Window(left, top, min(CHUNK, self.dataset.width - left), min(CHUNK, self.dataset.height - top))
        block = self.dataset.read(1, window=window)
        self.blocks[key] = block
        self.bytes += block.nbytes
        while self.bytes > self.max_bytes and len(self.blocks) > 1:
            self.bytes -= self.blocks.popitem(last=False)[1].nbytes
        return block


def _representable(value: float, dtype: np.dtype) -> bool:
    return dtype.kind == "f" or (float(value).is_integer() and np.iinfo(dtype).min <= value <= np.iinfo(dtype).max)


def _tile_bounds(transform: Affine, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    height, width = shape
    xs, ys = zip(*(transform @ corner for corner in ((0, 0), (width, 0), (width, height), (0, height))))
    return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class _Window:
    """Rows [row0, row1) and columns [col0, col1) of a raster around a tile."""

    row0: int
    row1: int
    col0: int
    col1: int
    scale: float  # tile pixels per source pixel
    rows_clipped: bool  # the raster ends inside the wanted rows


@dataclass(frozen=True)
class _Source:
    """A source window ready for reproject."""

    array: np.ndarray
    transform: Affine
    tile_pixels_per_pixel: float  # a source pixel spans about this many tile pixels
    complete: bool  # the window lies inside the raster: it covers the whole tile


@dataclass(frozen=True)
class _Piece:
    """Window columns [lo, hi) (numbered as the raster's, continued past its edges) = raster columns + shift."""

    lo: int
    hi: int
    shift: int


class LabelRaster:
    """One label raster opened in a worker: windowed, cached reads resampled onto tile grids."""

    def __init__(self, spec: LabelSpec, cache_bytes: int = CACHE_BYTES) -> None:
        self.spec = spec
        self.dataset = rasterio.open(spec.raster)
        self.nodata = self.dataset.nodata
        self.encoding = Encoding.for_layer(spec.name, np.dtype(self.dataset.dtypes[0]), self.nodata)
        self.resampling = RESAMPLING[spec.resampling]
        self.cache = ChunkCache(self.dataset, cache_bytes)
        self.period = self._wrap_period()
        self.warned_range = False

    def close(self) -> None:
        log.debug("label %s: %d block reads cached, %d not", self.spec.name, self.cache.hits, self.cache.misses)
        self.dataset.close()

    def _wrap_period(self) -> int | None:
        """Columns per 360 degrees of a geographic raster whose grid repeats every turn, else None."""
        if not self.dataset.crs.is_geographic:
            return None
        columns = 360.0 / abs(self.dataset.transform.a)
        period = round(columns)
        return period if abs(columns - period) <= 1e-6 * columns and self.dataset.width <= period else None

    def co_register(self, crs: str, transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, dict]:
        """(layer on the tile grid, its meta.json `labels` entry)."""
        source = self._read_source(crs, transform, shape)
        factor = self._grid_factor(source, shape)
        values = self._resample(source, crs, transform @ Affine.scale(factor), (shape[0] // factor,
                                                                                 shape[1] // factor))
        valid = values == values if values.dtype.kind == "f" else np.ones(values.shape, bool)  # NaN: no data
        if self.nodata is not None and not math.isnan(self.nodata):
            valid &= values != self.nodata
        self._warn_out_of_range(values, valid)
        array, coverage = self.encoding.encode(values, valid)
        if factor > 1:
            array = array.repeat(factor, axis=0).repeat(factor, axis=1)
        return array, {"source": self.spec.raster, "resampling": self.spec.resampling,
                       "coverage": round(coverage, 6), "nodata": self.encoding.nodata}

    def _resample(self, source: _Source | None, crs: str, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        """Source values on the grid; pixels without source data hold the source nodata, or NaN.

        The destination is pre-filled and GDAL gets no destination nodata: its nodata init and
        masks cost more than the nearest warp itself. Nearest copies values, so source nodata is
        told apart afterwards; average must exclude it from the means, so GDAL gets it.
        """
        dtype = np.dtype(self.dataset.dtypes[0])
        if self.nodata is not None and _representable(self.nodata, dtype):
            values = np.full(shape, self.nodata, dtype=dtype)
        elif source is not None and source.complete:  # every pixel gets a source value
            values = np.zeros(shape, dtype=dtype)
        else:
            values = np.full(shape, np.nan, dtype=np.float32)
        if source is not None:
            nearest = self.resampling == Resampling.nearest
            reproject(source.array, values, src_transform=source.transform, src_crs=self.dataset.crs,
                      src_nodata=None if nearest else self.nodata, dst_transform=transform, dst_crs=crs,
                      resampling=self.resampling, init_dest_nodata=False)
        return values

    def _grid_factor(self, source: _Source | None, shape: tuple[int, int]) -> int:
        """2 to average a coarse source on the tile's 20 m grid, else 1 (the 10 m grid).

        GDAL's average kernel costs ~60 ns per output pixel, the largest label cost. A source pixel
        of >= COARSE_SOURCE tile pixels (40 m) has no detail a 20 m average misses except a blend
        along its edges, and crop means at even offsets (training's) are unchanged.
        """
        if source is None or self.resampling == Resampling.nearest or shape[0] % 2 or shape[1] % 2:
            return 1
        return 2 if source.tile_pixels_per_pixel >= COARSE_SOURCE else 1

    def _warn_out_of_range(self, values: np.ndarray, valid: np.ndarray) -> None:
        if self.warned_range or self.encoding.holds(values.dtype) or not valid.any():
            return
        low, high = float(values[valid].min()), float(values[valid].max())
        if low < self.encoding.low or high > self.encoding.high:
            self.warned_range = True
            log.warning("label %s: raster %s has values %g..%g, stored clipped to %g..%g", self.spec.name,
                        self.spec.raster, low, high, self.encoding.low, self.encoding.high)

    def _window(self, crs: str, transform: Affine, shape: tuple[int, int]) -> _Window | None:
        """The raster's rows/columns around the tile; columns may run past its edges (see _pieces)."""
        west, south, east, north = transform_bounds(crs, self.dataset.crs, *_tile_bounds(transform, shape),
                                                    densify_pts=21)
        if self.dataset.crs.is_geographic and west > east:  # the tile crosses the antimeridian
            east += 360.0
        inverse = ~self.dataset.transform
        (col_a, row_a), (col_b, row_b) = inverse @ (west, north), inverse @ (east, south)
        top, bottom = math.floor(min(row_a, row_b)) - MARGIN, math.ceil(max(row_a, row_b)) + MARGIN
        row0, row1 = max(top, 0), min(bottom, self.dataset.height)
        if row0 >= row1:
            return None
        scale = min(shape[0] / max(abs(row_b - row_a), 1e-9), shape[1] / max(abs(col_b - col_a), 1e-9))
        return _Window(row0, row1, math.floor(min(col_a, col_b)) - MARGIN, math.ceil(max(col_a, col_b)) + MARGIN,
                       scale, (row0, row1) != (top, bottom))

    def _pieces(self, col0: int, col1: int) -> list[_Piece]:
        """Parts of the window's columns inside the raster (both ends of a global raster at +-180)."""
        shifts = (0, -self.period, self.period) if self.period else (0,)
        pieces = []
        for shift in shifts:
            lo, hi = max(col0, -shift), min(col1, self.dataset.width - shift)
            if lo < hi:
                pieces.append(_Piece(lo, hi, shift))
        pieces.sort(key=lambda piece: piece.lo)
        gaps = any(a.hi < b.lo for a, b in zip(pieces, pieces[1:]))
        if gaps and self.nodata is None:  # nothing to mark the gap as invalid with: keep the widest part
            pieces = [max(pieces, key=lambda piece: piece.hi - piece.lo)]
        return pieces

    def _read_source(self, crs: str, transform: Affine, shape: tuple[int, int]) -> _Source | None:
        """The source window around the tile (decimated when huge) and its transform, or None."""
        window = self._window(crs, transform, shape)
        pieces = self._pieces(window.col0, window.col1) if window else []
        if not pieces:
            return None
        row0, row1 = window.row0, window.row1
        lo, hi = pieces[0].lo, pieces[-1].hi
        step = max(1, math.ceil(math.sqrt((row1 - row0) * (hi - lo) / MAX_WINDOW_PIXELS)))
        rows, cols = -(-(row1 - row0) // step), -(-(hi - lo) // step)
        dtype = np.dtype(self.dataset.dtypes[0])
        fill = self.nodata if self.nodata is not None and _representable(self.nodata, dtype) else 0
        array = np.full((rows, cols), fill, dtype=dtype)
        for piece in pieces:
            at = (piece.lo - lo) // step
            if step == 1:
                part = self.cache.read((row0, row1), (piece.lo + piece.shift, piece.hi + piece.shift))
            else:  # a window this large only happens next to a pole: read it coarser, uncached
                part = self.dataset.read(1, window=Window(piece.lo + piece.shift, row0, piece.hi - piece.lo,
                                                          row1 - row0),
                                         out_shape=(rows, -(-(piece.hi - piece.lo) // step)))
            width = min(part.shape[1], cols - at)
            array[:, at : at + width] = part[:, :width]
        contiguous = all(a.hi == b.lo for a, b in zip(pieces, pieces[1:]))
        complete = not window.rows_clipped and contiguous and (lo, hi) == (window.col0, window.col1)
        source_transform = self.dataset.transform @ Affine.translation(lo, row0) @ Affine.scale(step)
        return _Source(array, source_transform, window.scale * step, complete)


def open_label_rasters(specs: tuple[LabelSpec, ...]) -> list[LabelRaster]:
    """Open a unit's rasters (close with close_label_rasters): each unit starts with an empty cache."""
    rasters: list[LabelRaster] = []
    try:
        rasters.extend(LabelRaster(spec) for spec in specs)
    except BaseException:
        close_label_rasters(rasters)
        raise
    return rasters


def close_label_rasters(rasters: list[LabelRaster]) -> None:
    for raster in rasters:
        raster.close()


def add_labels(sample: Sample, rasters: list[LabelRaster]) -> None:
    """Co-register every raster onto the sample's 10 m grid: `label_<name>` arrays + meta `labels`."""
    crs, shape = sample.meta["crs"], tuple(sample.meta["shape"])
    transform = Affine(*sample.meta["transform"][:6])
    labels = sample.meta.setdefault("labels", {})
    for raster in rasters:
        array, info = raster.co_register(crs, transform, shape)
        sample.arrays[f"label_{raster.spec.name}"] = array
        labels[raster.spec.name] = info
