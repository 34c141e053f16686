"""`--source fasttom`: quadrant choice, drops on crafted cloud masks and water, and an end-to-end build."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.transform import Affine, array_bounds

from phileo.bands import RESOLUTION_GROUPS
from phileo.schema import SCHEMA_VERSION, Sample, decode_sample
from sharding.build.fasttom import FastTomRules, fasttom_quadrant, quadrant_offsets
from sharding.dataset.tarread import iter_tar_samples
from tests.conftest import read_manifest, run_shard
from tools.majortom_fixture import make_majortom_dataset

SIZE = 1068
Q = 516
TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 5300000.0)


def tile(cloud: np.ndarray, water: np.ndarray | None = None) -> Sample:
    rng = np.random.default_rng(0)
    arrays = {member: rng.integers(1, 10000, (len(bands), SIZE // factor, SIZE // factor), dtype=np.uint16)
              for member, (bands, factor) in RESOLUTION_GROUPS.items()}
    arrays["cloud"] = cloud
    meta = {"schema": SCHEMA_VERSION, "source": "majortom", "key": "454U_120R_20200612T104021", "shape": [SIZE, SIZE],
            "crs": "EPSG:32631", "transform": list(TRANSFORM), "cloud_cover": 55.0, "nodata": 0.0, "labels": {}}
    if water is not None:
        arrays["label_water"] = water
        meta["labels"]["water"] = {"source": "water.tif", "resampling": "nearest", "coverage": 1.0, "nodata": 255}
    return Sample(meta["key"], meta, arrays)


def cloudy_except(quadrant: int, clear: float = 1.0) -> np.ndarray:
    """Cloud everywhere but the given quadrant, where a `clear` share of rows is cloud-free."""
    cloud = np.full((SIZE, SIZE), 2, dtype=np.uint8)
    y, x = quadrant_offsets(SIZE, SIZE, Q)[quadrant]
    cloud[y : y + int(round(Q * clear)), x : x + Q] = 0
    return cloud


@pytest.mark.parametrize("quadrant", range(4))
def test_the_clearest_quadrant_is_kept_with_its_grid(quadrant):
    source = tile(cloudy_except(quadrant))
    result = fasttom_quadrant(source, FastTomRules(max_water=1.0))
    assert isinstance(result, Sample)
    y, x = quadrant_offsets(SIZE, SIZE, Q)[quadrant]
    assert result.key == f"{source.key}_q{quadrant}" and result.meta["quadrant"] == quadrant
    for member, (_, factor) in RESOLUTION_GROUPS.items():
        expected = source.arrays[member][:, y // factor : (y + Q) // factor, x // factor : (x + Q) // factor]
        assert np.array_equal(result.arrays[member], expected)
    assert result.arrays["s2_60m"].shape[1:] == (86, 86) and result.meta["shape"] == [Q, Q]
    window_transform = Affine(*TRANSFORM) @ Affine.translation(x, y)  # rasterio's window transform
    assert np.allclose(result.meta["transform"], tuple(window_transform)[:6])
    assert result.meta["clear_fraction"] == 1.0 and result.meta["cloud_cover"] == 0.0
    west, south, east, north = array_bounds(Q, Q, window_transform)
    full = array_bounds(SIZE, SIZE, Affine(*TRANSFORM))
    assert full[0] <= west < east <= full[2] and full[1] <= south < north <= full[3]


def test_cloudy_tiles_and_water_tiles_are_dropped():
    assert "clear fraction 0.300" in fasttom_quadrant(tile(cloudy_except(1, clear=0.3)), FastTomRules(max_water=1.0))
    assert isinstance(fasttom_quadrant(tile(cloudy_except(1, clear=0.34)), FastTomRules(max_water=1.0)), Sample)
    water = np.zeros((SIZE, SIZE), dtype=np.uint8)
    y, x = quadrant_offsets(SIZE, SIZE, Q)[3]
    water[y : y + Q * 6 // 10, x : x + Q] = 1  # 60% water in the kept quadrant, none elsewhere
    assert "water fraction 0.599 > --max-water 0.5" in fasttom_quadrant(tile(cloudy_except(3), water), FastTomRules())
    kept = fasttom_quadrant(tile(cloudy_except(0), water), FastTomRules())
    assert isinstance(kept, Sample) and kept.meta["water_fraction"] == 0.0
    water[:] = 255  # not covered by the raster: unknown water, the tile stays
    uncovered = fasttom_quadrant(tile(cloudy_except(3), water), FastTomRules())
    assert uncovered.meta["water_fraction"] is None and uncovered.meta["labels"]["water"]["coverage"] == 0.0


def test_fasttom_build_end_to_end(tmp_path):
    rows = make_majortom_dataset(tmp_path / "in", num_files=1, rows_per_file=2, tile_size=SIZE)
    result = run_shard("build", "--source", "fasttom", "--input", str(tmp_path / "in"), "--output",
                       str(tmp_path / "out"))
    assert result.exit_code == 2 and "--label water=RASTER" in result.output
    result = run_shard("build", "--source", "fasttom", "--input", str(tmp_path / "in"), "--output",
                       str(tmp_path / "out"), "--max-water", "1", "--min-clear", "0")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "out")
    assert manifest["source"] == "fasttom" and manifest["totals"]["samples"] == len(rows)
    keys = []
    for shard in manifest["shards"]:
        for raw in iter_tar_samples(tmp_path / "out" / shard["url"]):
            sample = decode_sample(raw.key, raw.members)
            assert sample.meta["shape"] == [Q, Q] and sample.arrays["s2_20m"].shape == (6, Q // 2, Q // 2)
            keys.append(sample.meta["majortom_key"])
    assert sorted(keys) == sorted(row["key"] for row in rows)
    assert run_shard("verify", str(tmp_path / "out")).exit_code == 0
    assert run_shard("build", "--source", "majortom", "--input", str(tmp_path / "in"), "--output",
                     str(tmp_path / "x"), "--max-water", "1").exit_code == 2


def test_fasttom_water_rule_with_a_co_registered_water_raster(tmp_path):
    """Same input twice: keeping every tile (--max-water 1) records each quadrant's water fraction; the
    default rule must then keep exactly the tiles at or below 0.5."""
    from tools.label_fixture import make_label_rasters

    rows = make_majortom_dataset(tmp_path / "in", num_files=1, rows_per_file=4, tile_size=SIZE)
    water = make_label_rasters(tmp_path / "rasters", layers=("water",))["water"]
    common = ["build", "--source", "fasttom", "--input", str(tmp_path / "in"), "--min-clear", "0",
              "--label", f"water={water}"]
    assert run_shard(*common, "--output", str(tmp_path / "all"), "--max-water", "1").exit_code == 0
    assert run_shard(*common, "--output", str(tmp_path / "rule")).exit_code == 0

    def fractions(dataset):
        found = {}
        for shard in read_manifest(dataset)["shards"]:
            for raw in iter_tar_samples(dataset / shard["url"]):
                sample = decode_sample(raw.key, raw.members)
                layer = sample.arrays["label_water"]
                assert sample.meta["water_fraction"] == np.count_nonzero(layer == 1) / np.count_nonzero(layer != 255)
                found[sample.meta["majortom_key"]] = sample.meta["water_fraction"]
        return found

    every, kept = fractions(tmp_path / "all"), fractions(tmp_path / "rule")
    assert sorted(every) == sorted(row["key"] for row in rows)
    assert set(kept) == {key for key, fraction in every.items() if fraction <= 0.5}
    assert read_manifest(tmp_path / "rule")["totals"]["filtered"] == len(every) - len(kept)


def test_quadrant_labels_are_co_registered_on_the_quadrant_grid(tmp_path):
    """Labels are co-registered on the kept quadrant only (1/4 of the work): they equal an independent
    reprojection onto the quadrant's grid, and the whole tile's layers (a majortom build) cut at the
    quadrant's window up to GDAL's approximate transformer (0.125 px), which picks a few boundary
    pixels differently for different destination extents."""
    from tests.test_labels import EXPECTED, blocks, reference_layer
    from tools.label_fixture import make_label_rasters

    rows = make_majortom_dataset(tmp_path / "in", num_files=1, rows_per_file=3, tile_size=SIZE)
    rasters = make_label_rasters(tmp_path / "rasters", sorted({row["grid_cell"] for row in rows}))
    labels = [flag for name, path in rasters.items() for flag in ("--label", f"{name}={path}")]
    common = ["build", "--input", str(tmp_path / "in"), *labels]
    assert run_shard(*common, "--source", "fasttom", "--output", str(tmp_path / "q"), "--max-water", "1",
                     "--min-clear", "0").exit_code == 0
    assert run_shard(*common, "--source", "majortom", "--output", str(tmp_path / "t")).exit_code == 0

    def samples(dataset):
        return {sample.meta.get("majortom_key", sample.key): sample for shard in read_manifest(dataset)["shards"]
                for sample in (decode_sample(raw.key, raw.members)
                               for raw in iter_tar_samples(dataset / shard["url"]))}

    quadrants, tiles = samples(tmp_path / "q"), samples(tmp_path / "t")
    assert sorted(quadrants) == sorted(tiles) == sorted(row["key"] for row in rows)
    for key, quadrant in quadrants.items():
        (y, x), meta = quadrant.meta["window"], quadrant.meta
        for name, (nodata, low, high) in EXPECTED.items():
            layer = quadrant.arrays[f"label_{name}"]
            values, valid = reference_layer(rasters[name], meta, meta["labels"][name]["resampling"])
            if name == "buildings":  # averaged on the 20 m grid, as in test_labels
                np.testing.assert_allclose(blocks(layer.astype(float)), blocks(values), atol=0.6)
            else:
                expected = np.full(values.shape, nodata, np.uint8)
                expected[valid] = np.clip(np.rint(values[valid]), low, high)
                np.testing.assert_array_equal(layer, expected, err_msg=f"{key} {name}")
            assert meta["labels"][name]["coverage"] == pytest.approx(np.mean(layer != nodata), abs=1e-6)
            whole = tiles[key].arrays[f"label_{name}"][y : y + Q, x : x + Q]
            if name == "buildings":  # means over slightly other source footprints, rounded: a little apart
                difference = np.abs(layer.astype(int) - whole)
                assert difference.max() <= 2 and difference.mean() < 0.1, key
            else:
                assert np.mean(layer == whole) > 0.99, (key, name)
