"""`phileo-shard build --label`: co-registered layers against independent reads of the same rasters."""

import math

import numpy as np
import pytest
import rasterio
import rasterio.mask
from rasterio.transform import Affine, from_origin
from rasterio.warp import Resampling, reproject, transform_geom
from rasterio.warp import transform as warp

import sharding.build.labels as labels_module
from phileo.geo import ROW_HEIGHT_DEG, GridCell, column_width_deg, parse_grid_cell
from sharding.build.labels import LabelRaster, parse_label_spec
from sharding.errors import InputError
from tests.conftest import read_manifest, run_shard
from tests.test_build import read_dataset
from tools.label_fixture import LAYERS, make_label_rasters, pattern
from tools.majortom_fixture import DEFAULT_CELLS, make_majortom_dataset

RES = 1 / 6000  # label_fixture's default landcover/water pixel size
# Independent encoding of a reprojected layer: (stored nodata, valid range) as DESIGN/labels.py document.
EXPECTED = {"landcover": (0, 0, 255), "water": (255, 0, 254), "buildings": (255, 0, 100)}


def label_args(rasters):
    return [arg for name, path in rasters.items() for arg in ("--label", f"{name}={path}")]


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    return make_label_rasters(tmp_path_factory.mktemp("labels"), DEFAULT_CELLS, pad_cells=2)


@pytest.fixture(scope="module")
def labelled(majortom, rasters, tmp_path_factory):
    """The session MajorTOM fixture built with landcover, water, buildings and two extra layers."""
    out = tmp_path_factory.mktemp("labelled") / "ds"
    extra = ["--label", f"density={rasters['buildings']}:average",  # float source: float32 layer
             "--label", f"mixed={rasters['landcover']}:average"]  # a fine source: averaged on the 10 m grid
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), "--shard-size", "300KB",
                       *label_args(rasters), *extra)
    assert result.exit_code == 0, result.output
    return read_dataset(out)


def reference_layer(path, meta, resampling):
    """rasterio's own reprojection of the whole raster band onto the tile grid (GDAL picks the window)."""
    values = np.full(meta["shape"], np.nan, np.float32)
    with rasterio.open(path) as src:
        reproject(rasterio.band(src, 1), values, dst_transform=Affine(*meta["transform"]), dst_crs=meta["crs"],
                  dst_nodata=np.nan, resampling=Resampling[resampling])
        valid = ~np.isnan(values) & (values != np.float32(src.nodata))
    return values, valid


def blocks(array):
    """2x2 block means: the tile's 20 m grid."""
    height, width = array.shape
    return array.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))


def test_layers_match_an_independent_reprojection(labelled, rasters):
    assert len(labelled) == 12
    for sample in labelled.values():
        meta = sample.meta
        for name, (nodata, low, high) in EXPECTED.items():
            info = meta["labels"][name]
            assert info["source"] == str(rasters[name]) and info["nodata"] == nodata
            assert info["resampling"] == ("average" if name == "buildings" else "nearest")
            values, valid = reference_layer(rasters[name], meta, info["resampling"])
            expected = np.full(values.shape, nodata, np.uint8)
            expected[valid] = np.clip(np.rint(values[valid]), low, high)
            layer = sample.arrays[f"label_{name}"]
            assert layer.dtype == np.uint8 and layer.shape == tuple(meta["shape"])
            if name == "buildings":  # a 90 m source is averaged on the 20 m grid: 2x2 means agree
                assert valid.all() and np.all(layer[::2, ::2] == layer[1::2, 1::2])
                np.testing.assert_allclose(blocks(layer.astype(float)), blocks(values), atol=0.6)
            else:
                np.testing.assert_array_equal(layer, expected, err_msg=f"{sample.key} {name}")
            assert info["coverage"] == pytest.approx(np.mean(expected != nodata), abs=1e-6)
        assert 0 < np.mean(sample.arrays["label_water"]) < 1  # the stripes are there, not a constant
        values, valid = reference_layer(rasters["landcover"], meta, "average")
        mixed = sample.arrays["label_mixed"]  # an 18 m source: averaged on the 10 m grid itself
        assert meta["labels"]["mixed"]["nodata"] == 0 and mixed.dtype == np.uint8  # the source's nodata
        assert np.abs(mixed[valid].astype(int) - np.rint(values[valid])).max() <= 1
        assert np.all(mixed[~valid] == 0) and np.mean(mixed[valid] == np.rint(values[valid])) > 0.95
        density = sample.arrays["label_density"]  # other names keep a float source as float32, NaN nodata
        assert density.dtype == np.float32 and meta["labels"]["density"]["nodata"] is None
        values, _ = reference_layer(rasters["buildings"], meta, "average")
        np.testing.assert_allclose(blocks(density), blocks(values), atol=0.1)


def test_training_crop_labels_agree_with_a_direct_clip(labelled, rasters):
    from training.data.crop_labels import WORLDCOVER_CODES, crop_labels

    size = 48
    for sample in list(labelled.values())[:4]:
        meta = sample.meta
        for y, x in ((0, 0), (36, 60), (72, 72)):
            labels = crop_labels(meta, sample.arrays, y, x, size)
            a, _, c, _, e, f = meta["transform"][:6]
            left, top = c + a * x, f + e * y
            ring = [(left, top), (left + a * size, top), (left + a * size, top + e * size), (left, top + e * size)]
            polygon = transform_geom(meta["crs"], "EPSG:4326", {"type": "Polygon", "coordinates": [ring + ring[:1]]})
            clipped = {}
            for name in ("landcover", "water", "buildings"):
                with rasterio.open(rasters[name]) as src:  # pixels whose centre is inside the crop
                    outside, _, window = rasterio.mask.raster_geometry_mask(src, [polygon], crop=True)
                    clipped[name] = src.read(1, window=window)[~outside]
            codes = clipped["landcover"][clipped["landcover"] > 0]
            fractions = np.array([np.mean(codes == code) for code in WORLDCOVER_CODES])
            np.testing.assert_allclose(labels["landcover"], fractions, atol=0.08)
            assert labels["landcover_weight"] == pytest.approx(codes.size / clipped["landcover"].size, abs=0.08)
            assert labels["water"][0] == pytest.approx(clipped["water"].mean(), abs=0.08)
            assert labels["buildings"][0] == pytest.approx(clipped["buildings"].mean() / 100, abs=0.03)
            assert labels["water_weight"] == labels["buildings_weight"] == 1.0


def test_partial_coverage_keeps_nodata_and_records_the_fraction(tmp_path):
    cell = "454U_120R"
    records = make_majortom_dataset(tmp_path / "src", num_files=1, rows_per_file=3, cells=[cell])
    assert [r["grid_cell"] for r in records] == [cell, "455U_120R", "454U_121R"]
    cut = parse_grid_cell(cell).sw_corner()[1] + 0.007  # about half of a 1.2 km tile, at 40.8 N
    rasters = make_label_rasters(tmp_path / "labels", [cell], pad_cells=1, east_cut_deg=0.007)
    plain = tmp_path / "plain.tif"  # no nodata value: uncovered pixels must still come out as nodata
    west, south = parse_grid_cell(cell).sw_corner()[::-1]
    with rasterio.open(plain, "w", driver="GTiff", width=60, height=60, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(west - 0.01, south + 0.05, (cut - west + 0.01) / 60, 0.06 / 60)) as dst:
        dst.write(np.full((1, 60, 60), 7, np.uint8))
    out = tmp_path / "ds"
    result = run_shard("build", "--input", str(tmp_path / "src"), "--output", str(out), *label_args(rasters),
                       "--label", f"plain={plain}")
    assert result.exit_code == 0, result.output
    samples, west_of_cut = read_dataset(out), {}
    for record in records:
        meta = samples[record["key"]].meta
        rows, cols = np.mgrid[0:120, 0:120]
        xs, ys = Affine(*meta["transform"]) @ (cols.ravel() + 0.5, rows.ravel() + 0.5)
        lon = np.asarray(warp(meta["crs"], "EPSG:4326", xs, ys)[0]).reshape(120, 120)
        for name, (nodata, _, _) in EXPECTED.items():
            layer, coverage = samples[record["key"]].arrays[f"label_{name}"], meta["labels"][name]["coverage"]
            assert np.all(layer[lon > cut + 3 * RES * 5] == nodata)  # buildings pixels are 5x larger
            if name != "landcover":  # landcover has its own no-data squares inside the box
                assert np.all(layer[lon < cut - 3 * RES * 5] != nodata)
            assert coverage == pytest.approx(np.mean(layer != nodata), abs=1e-6)
            if name != "landcover":  # up to a buildings pixel (0.0008 deg) of the 0.014 deg tile off
                assert coverage == pytest.approx(np.mean(lon < cut), abs=0.1)
        west_of_cut[record["grid_cell"]] = np.mean(lon < cut)
        layer = samples[record["key"]].arrays["label_plain"]
        assert meta["labels"]["plain"]["nodata"] == 255 and set(np.unique(layer)) <= {7, 255}
        assert np.all(layer[lon > cut + 0.001] == 255) and np.all(layer[lon < cut - 0.001] == 7)
        assert meta["labels"]["plain"]["coverage"] == pytest.approx(np.mean(layer == 7), abs=1e-6)
    # columns differ in width per row: only the base tile straddles the cut
    assert 0.3 < west_of_cut[cell] < 0.7 and west_of_cut["455U_120R"] == west_of_cut["454U_121R"] == 0


def antimeridian_cell(lat: float) -> str:
    """The easternmost cell of the first row at or poleward of `lat` whose 1068 px tile (anchored at the
    cell's SW corner, as tools/majortom_fixture.py does) has the antimeridian in its middle third."""
    row = math.floor(lat / ROW_HEIGHT_DEG)
    while True:
        row_lat = row * ROW_HEIGHT_DEG
        width = column_width_deg(row_lat)
        col = math.ceil(180.0 / width) - 1
        tile_deg = 10.68 / (111.32 * math.cos(math.radians(row_lat)))
        if 1 / 3 < (180.0 - col * width) / tile_deg < 2 / 3:
            return GridCell(row, col).name
        row += 1 if lat >= 0 else -1


def test_antimeridian_and_polar_tiles_read_both_sides(tmp_path):
    cells = [antimeridian_cell(-17.0), antimeridian_cell(83.3)]
    records = make_majortom_dataset(tmp_path / "src", num_files=2, rows_per_file=1, tile_size=1068, cells=cells)
    rasters = make_label_rasters(tmp_path / "labels", cells, pad_cells=1, layers=("landcover", "water"))
    with rasterio.open(rasters["water"]) as src:  # one raster spanning -180..180
        assert (src.bounds.left, src.bounds.right) == (-180.0, 180.0)
    out = tmp_path / "ds"
    result = run_shard("build", "--input", str(tmp_path / "src"), "--output", str(out), *label_args(rasters))
    assert result.exit_code == 0, result.output
    samples = read_dataset(out)
    for record in records:
        sample = samples[record["key"]]
        meta = sample.meta
        rows, cols = np.mgrid[0:1068, 0:1068]
        xs, ys = Affine(*meta["transform"]) @ (cols.ravel() + 0.5, rows.ravel() + 0.5)
        lon, lat = (np.asarray(v) for v in warp(meta["crs"], "EPSG:4326", xs, ys))
        lon = np.where(lon >= 180.0, lon - 360.0, lon)
        east = lon > 0
        assert 0.2 < east.mean() < 0.8, record["grid_cell"]  # the tile really straddles 180
        # nearest = the source pixel under each pixel centre, straight from the fixture's formula
        grid_rows, grid_cols = np.floor((90.0 - lat) / RES), np.floor((lon + 180.0) / RES)
        for name in ("landcover", "water"):
            expected = pattern(name, grid_rows, grid_cols, RES)
            expected = np.where(expected == LAYERS[name][1], EXPECTED[name][0], expected)
            got = sample.arrays[f"label_{name}"].ravel()
            for side in (east, ~east):  # GDAL's approximate transformer may flip pixels on pattern edges
                assert np.mean(got[side] == expected[side]) > 0.99, (record["grid_cell"], name)
        assert meta["labels"]["water"]["coverage"] == 1.0
        check_decimated_read(rasters["landcover"], sample)


def check_decimated_read(path, sample):
    """A window too large to read whole (a tile at a pole) is read coarser: still the right place."""
    meta, spec = sample.meta, parse_label_spec(f"landcover={path}")
    raster = LabelRaster(spec)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(labels_module, "MAX_WINDOW_PIXELS", 200_000)  # the real window is ~1.5M pixels
            array, info = raster.co_register(meta["crs"], Affine(*meta["transform"]), tuple(meta["shape"]))
    finally:
        raster.close()
    assert info["coverage"] > 0.8 and np.mean(array == sample.arrays["label_landcover"]) > 0.6


def test_rerun_with_other_labels_is_refused(majortom, rasters, tmp_path):
    args = ["build", "--input", str(majortom[0]), "--output", str(tmp_path / "ds"), "--limit", "2"]
    water = ["--label", f"water={rasters['water']}"]
    assert run_shard(*args, *water).exit_code == 0
    assert run_shard(*args, *water).exit_code == 0  # same labels: resumes (nothing to do)
    for other in ([], ["--label", f"water={rasters['water']}:average"], [*water, "--label",
                                                                        f"landcover={rasters['landcover']}"]):
        refused = run_shard(*args, *other)
        assert refused.exit_code == 2 and "(labels differ)" in refused.output, other
    assert read_manifest(tmp_path / "ds")["build_args"]["labels"][0]["name"] == "water"
    plain = ["build", "--input", str(majortom[0]), "--output", str(tmp_path / "plain"), "--limit", "1"]
    assert run_shard(*plain).exit_code == 0
    assert "(labels differ)" in run_shard(*plain, *water).output


def test_two_workers_write_the_same_labelled_shards(majortom, rasters, tmp_path):
    digests = []
    for workers in ("1", "2"):  # per-worker caches must not change a byte
        out = tmp_path / f"w{workers}"
        result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), "--shard-size", "200KB",
                           "--limit", "6", "--workers", workers, *label_args(rasters))
        assert result.exit_code == 0, result.output
        digests.append([(s["url"], s["sha256"]) for s in read_manifest(out)["shards"]])
    assert len(digests[0]) >= 2 and digests[0] == digests[1]


@pytest.mark.parametrize("spec, message", [
    ("landcover", "--label 'landcover': expected NAME=RASTER[:nearest|average]"),
    ("landcover=x.tif:bilinear", "--label 'landcover=x.tif:bilinear': unknown resampling 'bilinear'"),
    ("Land Cover=x.tif", "--label 'Land Cover=x.tif': name 'Land Cover' must be"),
    ("water=", "--label 'water=': no raster after '='"),
    ("water=/nonexistent/water.tif", "--label water=/nonexistent/water.tif: cannot open the raster"),
])
def test_bad_label_spec_is_one_line_error(majortom, tmp_path, spec, message):
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "o"), "--label", spec)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
    assert not (tmp_path / "o").exists()


def test_label_given_twice_is_refused(majortom, rasters, tmp_path):
    twice = ["--label", f"water={rasters['water']}", "--label", f"water={rasters['landcover']}"]
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "o"), *twice)
    assert result.exit_code == 2 and result.output.strip() == "error: --label water: given more than once"


def test_spec_parsing_defaults_and_paths_with_colons():
    assert parse_label_spec("buildings=b.tif").resampling == "average"
    assert parse_label_spec("landcover=wc.vrt").resampling == parse_label_spec("slope=s.tif").resampling == "nearest"
    spec = parse_label_spec("water=/vsicurl/https://host:8080/w.tif:Average")
    assert (spec.raster, spec.resampling) == ("/vsicurl/https://host:8080/w.tif", "average")
    assert parse_label_spec(r"water=C:\data\w.tif").raster == r"C:\data\w.tif"
    with pytest.raises(InputError, match="unknown resampling 'cubic'"):
        parse_label_spec("water=w.tif:cubic")
