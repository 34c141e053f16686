"""tools/real_s2_fixture.py writes MajorTOM-format rows of the committed real pixels, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rasterio.io import MemoryFile

from sharding.sources.majortom import decode_bands
from tools.majortom_fixture import COLUMNS, FACTOR, make_majortom_dataset
from tools.real_s2_fixture import FIXTURE_JSON, PATCH, load_patches, make_real_s2_dataset, variant


def _rows(root: Path) -> list[dict]:
    return [row for file in sorted((root / "images").glob("*.parquet")) for row in pq.read_table(file).to_pylist()]


def test_rows_have_the_synthetic_fixtures_columns_and_geotiff_encoding(tmp_path):
    make_real_s2_dataset(tmp_path / "real", num_files=2, rows_per_file=2)
    make_majortom_dataset(tmp_path / "synthetic", num_files=1, rows_per_file=1)
    real, synthetic = _rows(tmp_path / "real"), _rows(tmp_path / "synthetic")
    assert list(real[0]) == list(synthetic[0]) == list(COLUMNS)
    assert pq.ParquetFile(tmp_path / "real" / "images" / "part_00001.parquet").num_row_groups == 2
    assert pq.read_table(tmp_path / "real" / "metadata.parquet").schema == \
        pq.read_table(tmp_path / "synthetic" / "metadata.parquet").schema
    with MemoryFile(real[0]["B02"]) as memfile, memfile.open() as dataset:
        assert dataset.tags(ns="IMAGE_STRUCTURE") | {"INTERLEAVE": "BAND"} == {
            "COMPRESSION": "DEFLATE", "PREDICTOR": "2", "INTERLEAVE": "BAND"}
    assert json.loads((tmp_path / "real" / FIXTURE_JSON).read_text())["tiles"] == 4


def test_native_tiles_are_the_patches_pixels_then_their_flips(tmp_path):
    records = make_real_s2_dataset(tmp_path, rows_per_file=4)
    patches = load_patches()
    rows = _rows(tmp_path)
    assert len({r["key"] for r in records}) == 4
    for tile, row in enumerate(rows):
        arrays, crs, transform = decode_bands(row)
        patch = patches[tile % 3]
        assert np.array_equal(arrays["s2_10m"][0], variant(patch.bands["B02"], tile // 3))
        assert np.array_equal(arrays["s2_60m"][1], variant(patch.bands["B09"], tile // 3))
        assert crs == f"EPSG:{patch.epsg}" and transform == patch.transform
        assert not arrays["cloud"].any()


@pytest.mark.parametrize("fill", ["mosaic", "mirror"])
def test_large_tiles_are_made_of_the_patches_at_every_resolution(tmp_path, fill):
    make_real_s2_dataset(tmp_path, rows_per_file=1, tile_size=2 * PATCH + 6, fill=fill)
    arrays, _, _ = decode_bands(_rows(tmp_path)[0])
    patch = load_patches()[0]
    assert arrays["s2_10m"].shape == (4, 246, 246)
    for member, band, channel in (("s2_10m", "B04", 2), ("s2_20m", "B11", 4), ("s2_60m", "B01", 0)):
        side = PATCH // FACTOR[band]
        assert np.array_equal(arrays[member][channel][:side, :side], patch.bands[band])
        right = arrays[member][channel][:side, side : 2 * side]
        if fill == "mirror":
            assert np.array_equal(right, patch.bands[band][:, ::-1])
        else:  # another patch or flip: real values, never the neighbour's bytes again
            assert not np.array_equal(right, patch.bands[band])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 6"):
        make_real_s2_dataset(tmp_path, tile_size=100)
    with pytest.raises(ValueError, match="fill"):
        make_real_s2_dataset(tmp_path, tile_size=240, fill="tile")
