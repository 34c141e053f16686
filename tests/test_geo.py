import math

import numpy as np
import pytest

from phileo.geo import (
    column_width_deg,
    corners_lonlat_from_transform,
    encode_latlon,
    parse_grid_cell,
    pixel_lonlat,
    utm_epsg,
)


def reference_grid_point(row_name: str, col_name: str) -> tuple[float, float]:
    """MajorTOM Grid(dist=10) built the way grid.py does it (linspace + mod + labels)."""
    num_rows = math.ceil(math.pi * 6378.137 / 10)
    lats = np.sort(np.mod(np.linspace(-90, 90, num_rows + 1)[:-1], 180) - 90)
    zeroth = int(np.searchsorted(lats, 0))
    row_names = [f"{abs(i - zeroth)}D" for i in range(zeroth)] + [f"{i}U" for i in range(len(lats) - zeroth)]
    lat = lats[row_names.index(row_name)]
    num_cols = math.ceil(2 * math.pi * 6378.137 * math.cos(lat * math.pi / 180) / 10)
    lons = np.sort(np.mod(np.linspace(-180, 180, num_cols + 1)[:-1], 360) - 180)
    zero = int(np.where(lons == 0)[0][0])
    col_names = [f"{abs(i - zero)}L" for i in range(zero)] + [f"{i}R" for i in range(len(lons) - zero)]
    return float(lat), float(lons[col_names.index(col_name)])


@pytest.mark.parametrize("name", ["454U_120R", "500U_30L", "300D_200R", "250D_400L", "0U_0R", "1D_1L", "900U_5R"])
def test_sw_corner_matches_majortom_grid(name):
    row, col = name.split("_")
    lat, lon = parse_grid_cell(name).sw_corner()
    ref_lat, ref_lon = reference_grid_point(row, col)
    assert lat == pytest.approx(ref_lat, abs=1e-9)
    assert lon == pytest.approx(ref_lon, abs=1e-9)


def test_parse_grid_cell_fields_and_errors():
    cell = parse_grid_cell("300D_200L")
    assert (cell.row, cell.col, cell.hemisphere, cell.name) == (-300, -200, "S", "300D_200L")
    for bad in ["454U120R", "454X_120R", "0D_1R", "", "454U_120R_x"]:
        with pytest.raises(ValueError, match="grid cell"):
            parse_grid_cell(bad)


def test_column_width_grows_towards_poles():
    assert column_width_deg(0) == pytest.approx(360 / math.ceil(2 * math.pi * 6378.137 / 10))
    assert column_width_deg(60) > 1.9 * column_width_deg(0)


@pytest.mark.parametrize("lat, lon, epsg", [(-1, -174.34, 32701), (48, -4, 32630), (78, 13, 32633),
                                             (-34, 19.7, 32734), (-36, 175.7, 32760), (60, 5, 32632)])
def test_utm_epsg_like_majortom(lat, lon, epsg):
    assert utm_epsg(lat, lon) == epsg


def test_corners_and_bilinear_pixel_lonlat_agree_with_rasterio():
    from rasterio.warp import transform as warp

    crs, transform, shape = "EPSG:32733", (10.0, 0.0, 500000.0, 0.0, -10.0, 8_000_000.0), (1068, 1068)
    geo = corners_lonlat_from_transform(crs, transform, shape)
    rows = np.array([0, 0, 1068, 1068, 534, 100.5])
    cols = np.array([0, 1068, 1068, 0, 534, 900.25])
    lons, lats = pixel_lonlat(geo["corners_lonlat"], shape, rows, cols)
    xs, ys = 500000.0 + 10 * cols, 8_000_000.0 - 10 * rows
    ref_lons, ref_lats = warp(crs, "EPSG:4326", xs.tolist(), ys.tolist())
    # bilinear over a 10 km UTM tile: well under a 10 m pixel (1e-4 degree ~ 11 m)
    np.testing.assert_allclose(lons, ref_lons, atol=2e-5)
    np.testing.assert_allclose(lats, ref_lats, atol=2e-5)
    west, south, east, north = geo["bounds_lonlat"]
    assert west <= min(ref_lons) and east >= max(ref_lons) and south <= min(ref_lats) and north >= max(ref_lats)
    assert geo["centre_lat"] < 0  # southern hemisphere zone


def test_encode_latlon_matches_original_formula():
    code = encode_latlon(np.array([0.0, 45.0]), np.array([0.0, -90.0]))
    assert code.shape == (2, 4) and code.dtype == np.float32
    lat_angle, lon_angle = 2 * np.pi * (45 + 90) / 180, 2 * np.pi * (-90 + 180) / 360
    expected = [(np.sin(lat_angle) + 1) / 2, (np.cos(lat_angle) + 1) / 2,
                (np.sin(lon_angle) + 1) / 2, (np.cos(lon_angle) + 1) / 2]
    np.testing.assert_allclose(code[1], expected, atol=1e-6)
    assert (code >= 0).all() and (code <= 1).all()
