"""Geo maths: the MajorTOM grid, tile corners, per-pixel lat/lon and its encoding.

Only `corners_lonlat_from_transform` needs rasterio (build time); everything used at
train time is pure numpy, so training never needs GDAL/PROJ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# MajorTOM grid constants (ESA-PhiLab/Major-TOM MajorTOM/grid.py with dist = 10 km).
EARTH_RADIUS_EQUATOR_KM = 6378.137
GRID_DISTANCE_KM = 10.0
_ROWS_PER_HALF_TURN = math.ceil(math.pi * EARTH_RADIUS_EQUATOR_KM / GRID_DISTANCE_KM)
ROW_HEIGHT_DEG = 180.0 / _ROWS_PER_HALF_TURN

_GRID_CELL_RE = re.compile(r"^(\d+)([UD])_(\d+)([LR])$")


@dataclass(frozen=True)
class GridCell:
    """A MajorTOM grid cell such as `454U_120R`, named by its south-west corner."""

    row: int  # signed: north of the equator >= 0 ("U"), south < 0 ("D")
    col: int  # signed: east of longitude 0 >= 0 ("R"), west < 0 ("L")

    @property
    def name(self) -> str:
        row = f"{abs(self.row)}{'U' if self.row >= 0 else 'D'}"
        col = f"{abs(self.col)}{'R' if self.col >= 0 else 'L'}"
        return f"{row}_{col}"

    @property
    def hemisphere(self) -> str:
        return "N" if self.row >= 0 else "S"

    def sw_corner(self) -> tuple[float, float]:
        """(lat, lon) of the cell's south-west corner, as MajorTOM's Grid computes it."""
        lat = self.row * ROW_HEIGHT_DEG
        return lat, self.col * column_width_deg(lat)


def parse_grid_cell(name: str) -> GridCell:
    """Parse `454U_120R` / `12D_3L`; raise ValueError naming the bad cell otherwise."""
    match = _GRID_CELL_RE.match(name)
    if match is None:
        raise ValueError(f"not a MajorTOM grid cell: {name!r} (expected e.g. '454U_120R')")
    row, up, col, right = match.groups()
    if up == "D" and int(row) == 0:
        raise ValueError(f"not a MajorTOM grid cell: {name!r} (southern rows start at 1D)")
    return GridCell(int(row) * (1 if up == "U" else -1), int(col) * (1 if right == "R" else -1))


def column_width_deg(lat: float) -> float:
    """Longitude width of the grid columns on the row whose southern edge is `lat`."""
    circumference = 2 * math.pi * EARTH_RADIUS_EQUATOR_KM * math.cos(math.radians(lat))
    return 360.0 / math.ceil(circumference / GRID_DISTANCE_KM)


def grid_cell_centre(name: str) -> tuple[float, float]:
    """Approximate (lat, lon) of a cell centre: good enough for planning-time bbox filters."""
    cell = parse_grid_cell(name)
    lat, lon = cell.sw_corner()
    return lat + ROW_HEIGHT_DEG / 2, lon + column_width_deg(lat) / 2


def grid_cell_centres(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`grid_cell_centre` for arrays of signed grid rows and columns (the planner's millions of rows)."""
    lat = rows * ROW_HEIGHT_DEG
    width = 360.0 / np.ceil(2 * np.pi * EARTH_RADIUS_EQUATOR_KM * np.cos(np.radians(lat)) / GRID_DISTANCE_KM)
    return lat + ROW_HEIGHT_DEG / 2, cols * width + width / 2


def utm_epsg(lat: float, lon: float) -> int:
    """EPSG code of the UTM zone of a point (with the Norway/Svalbard exceptions, as MajorTOM)."""
    zone = math.floor((lon + 180) / 6) % 60 + 1
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    elif 72.0 <= lat < 84.0:
        for lo, hi, special in ((0, 9, 31), (9, 21, 33), (21, 33, 35), (33, 42, 37)):
            if lo <= lon < hi:
                zone = special
    return (32700 if lat < 0 else 32600) + zone


def corners_lonlat_from_transform(
    crs: str, transform: tuple[float, ...], shape: tuple[int, int]
) -> dict[str, object]:
    """Corners (UL, UR, LR, LL), bounds and centre in lon/lat of a raster grid.

    `transform` is GDAL order (a, b, c, d, e, f) as rasterio's Affine. Needs rasterio.
    """
    from rasterio.warp import transform as warp_transform
    from rasterio.warp import transform_bounds

    a, b, c, d, e, f = transform
    height, width = shape

    def to_xy(col: float, row: float) -> tuple[float, float]:
        return a * col + b * row + c, d * col + e * row + f

    pixel_corners = [(0, 0), (width, 0), (width, height), (0, height), (width / 2, height / 2)]
    xs, ys = zip(*(to_xy(col, row) for col, row in pixel_corners))
    lons, lats = warp_transform(crs, "EPSG:4326", list(xs), list(ys))
    west, south, east, north = transform_bounds(
        crs, "EPSG:4326", min(xs[:4]), min(ys[:4]), max(xs[:4]), max(ys[:4]), densify_pts=21
    )
    return {
        "corners_lonlat": [[float(lon), float(lat)] for lon, lat in zip(lons[:4], lats[:4])],
        "bounds_lonlat": [float(west), float(south), float(east), float(north)],
        "centre_lon": float(lons[4]),
        "centre_lat": float(lats[4]),
    }


def pixel_lonlat(
    corners_lonlat: list[list[float]], shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear lon/lat of pixel positions (fractional rows/cols) from the 4 tile corners.

    Corners are UL, UR, LR, LL of the pixel grid edges; a UTM tile of 10 km is close
    enough to a bilinear patch in lon/lat (error well below one pixel).
    """
    height, width = shape
    corners = np.asarray(corners_lonlat, dtype=np.float64)
    u = np.asarray(cols, dtype=np.float64) / width
    v = np.asarray(rows, dtype=np.float64) / height
    ul, ur, lr, ll = corners
    top = ul[None, :] * (1 - u)[..., None] + ur[None, :] * u[..., None]
    bottom = ll[None, :] * (1 - u)[..., None] + lr[None, :] * u[..., None]
    point = top * (1 - v)[..., None] + bottom * v[..., None]
    return point[..., 0], point[..., 1]


def encode_latlon(lat: np.ndarray | float, lon: np.ndarray | float) -> np.ndarray:
    """The original's 4-value coordinate label in [0, 1]: sin/cos of lat and lon.

    Kept exactly as `data/utils.py` of PhilEO-MajorTOM so pretrained heads stay valid:
    latitude uses a 180 degree period, so -90 and +90 share a code (its known quirk).
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    lat_angle = 2 * np.pi * (lat + 90) / 180
    lon_angle = 2 * np.pi * (lon + 180) / 360
    parts = [np.sin(lat_angle), np.cos(lat_angle), np.sin(lon_angle), np.cos(lon_angle)]
    return ((np.stack(parts, axis=-1) + 1) / 2).astype(np.float32)


def window_rings(transform: tuple[float, ...] | list[float], windows: np.ndarray, size: int) -> np.ndarray:
    """(n, 5, 2) CRS x/y of each pixel window's outline, closed, in the vertex order of Major-TOM's
    footprints (a shapely `box` of its corners: upper-right, lower-right, lower-left, upper-left, upper-right).

    `windows` are (row, col) of the upper-left pixels of `size` px squares; `transform` is GDAL order
    (a, b, c, d, e, f), so a rotated grid gets its true outline, not a bounding box.
    """
    a, b, c, d, e, f = (float(v) for v in transform)
    rows = windows[:, :1].astype(np.float64)
    cols = windows[:, 1:].astype(np.float64)
    # pixel corners (col, row) of each window: UR, LR, LL, UL, UR
    corner_cols = cols + np.array([size, size, 0, 0, size], dtype=np.float64)
    corner_rows = rows + np.array([0, size, size, 0, 0], dtype=np.float64)
    return np.stack([a * corner_cols + b * corner_rows + c, d * corner_cols + e * corner_rows + f], axis=-1)


def rings_to_lonlat(crs: str, rings: np.ndarray) -> np.ndarray:
    """`window_rings` reprojected vertex by vertex to (lon, lat) degrees, as Major-TOM's pyproj transform
    (always_xy, no densification). Needs rasterio (PROJ), like corners_lonlat_from_transform."""
    from rasterio.warp import transform as warp_transform

    lons, lats = warp_transform(crs, "EPSG:4326", rings[..., 0].ravel().tolist(), rings[..., 1].ravel().tolist())
    return np.stack([np.asarray(lons), np.asarray(lats)], axis=-1).reshape(rings.shape)


def ring_centroids(rings: np.ndarray) -> np.ndarray:
    """(n, 2) planar area centroid of closed rings (n, k, 2), as shapely's `Polygon.centroid`."""
    x, y = rings[..., 0], rings[..., 1]
    # shift to the first vertex: the shoelace sums then keep their precision far from the origin
    x0, y0 = x[:, :1], y[:, :1]
    x, y = x - x0, y - y0
    cross = x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]
    area = cross.sum(axis=1) / 2
    cx = ((x[:, :-1] + x[:, 1:]) * cross).sum(axis=1) / (6 * area)
    cy = ((y[:, :-1] + y[:, 1:]) * cross).sum(axis=1) / (6 * area)
    return np.stack([cx + x0[:, 0], cy + y0[:, 0]], axis=-1)
