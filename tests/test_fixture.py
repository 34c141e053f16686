"""The MajorTOM-format fixture generator writes what the real Core-S2L2A data holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile
from rasterio.warp import transform as warp_transform

from phileo.geo import parse_grid_cell
from tools.majortom_fixture import (
    COLUMNS,
    FACTOR,
    RASTER_COLUMNS,
    make_majortom_dataset,
)

TILE = 60


def _decode(data: bytes) -> tuple[np.ndarray, rasterio.Affine, str]:
    with MemoryFile(data) as memfile, memfile.open() as src:
        return src.read(1), src.transform, src.crs.to_string()


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*") if root.is_dir() else [root])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("majortom")
    return out, make_majortom_dataset(out, num_files=2, rows_per_file=3, tile_size=TILE)


def test_columns_and_row_groups(dataset: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, records = dataset
    parts = sorted((out / "images").glob("*.parquet"))
    assert [p.name for p in parts] == ["part_00001.parquet", "part_00002.parquet"]
    pf = pq.ParquetFile(parts[0])
    assert pf.schema_arrow.names == list(COLUMNS)
    assert pf.num_row_groups == 3 and pf.metadata.num_rows == 3
    assert len({r["key"] for r in records}) == len(records) == 6
    make_majortom_dataset(tmp_path, num_files=1, rows_per_file=5, rows_per_row_group=2,
                          tile_size=TILE, with_metadata=False)
    pf = pq.ParquetFile(tmp_path / "images" / "part_00001.parquet")
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [2, 2, 1]
    assert not (tmp_path / "metadata.parquet").exists()


def test_bands_decode(dataset: tuple[Path, list[dict]]) -> None:
    out, records = dataset
    row = pq.ParquetFile(out / "images" / "part_00001.parquet").read_row_group(1).to_pylist()[0]
    rec = records[1]
    assert row["product_id"] == rec["product_id"] and rec["product_datetime"] in row["product_id"]
    for column in RASTER_COLUMNS:
        arr, transform, crs = _decode(row[column])
        size = TILE // FACTOR[column]
        assert arr.shape == (size, size)
        assert arr.dtype == (np.uint8 if column == "cloud_mask" else np.uint16)
        assert crs == rec["crs"]
        # every band spans the same bounds as the 10 m grid
        assert (transform.c, transform.f) == (rec["transform"][2], rec["transform"][5])
        assert transform.a == 10 * FACTOR[column]
    assert row["thumbnail"].startswith(b"\x89PNG")


def test_sw_corner_matches_grid_cell(tmp_path: Path) -> None:
    cells = ["454U_120R", "500U_30L", "300D_200R", "250D_400L"]
    records = make_majortom_dataset(tmp_path, num_files=4, rows_per_file=1, cells=cells,
                                    tile_size=TILE, with_metadata=False)
    for cell, rec in zip(cells, records, strict=True):
        assert rec["grid_cell"] == cell
        table = pq.read_table(rec["file"], columns=["B02"])
        _, transform, crs = _decode(table.column("B02")[0].as_py())
        assert crs.startswith("EPSG:326" if "U" in cell else "EPSG:327")
        x, y = transform @ (0, TILE)  # lower-left corner of the pixel grid
        lons, lats = warp_transform(crs, "EPSG:4326", [x], [y])
        lat, lon = parse_grid_cell(cell).sw_corner()
        assert abs(lats[0] - lat) < 0.01 and abs(lons[0] - lon) < 0.01, cell


def test_metadata_matches_files(dataset: tuple[Path, list[dict]]) -> None:
    out, records = dataset
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    assert len(meta) == len(records)
    for entry, rec in zip(meta, records, strict=True):
        part = out / "images" / entry["parquet_url"].rsplit("/", 1)[1]
        row = pq.ParquetFile(part).read_row_group(entry["parquet_row"]).to_pylist()[0]
        assert row["product_id"] == entry["product_id"] == rec["product_id"]
        assert row["grid_cell"] == entry["grid_cell"] and entry["parquet_row"] == rec["row"]
        cell = parse_grid_cell(entry["grid_cell"])
        assert (entry["grid_row_u"], entry["grid_col_r"]) == (cell.row, cell.col)
        mask, _, crs = _decode(row["cloud_mask"])
        assert entry["crs"] == crs
        assert entry["cloud_cover"] == pytest.approx(100 * np.mean(mask > 0))
        assert 0 <= entry["nodata"] <= 1
    covers = [m["cloud_cover"] for m in meta]
    assert min(covers) < 5 and max(covers) > 50


def test_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_majortom_dataset(tmp_path / name, num_files=2, rows_per_file=2, tile_size=TILE,
                              seed=3)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in files_a] == [
        p.relative_to(tmp_path / "b") for p in files_b]
    for a, b in zip(files_a, files_b, strict=True):
        assert a.is_dir() or a.read_bytes() == b.read_bytes(), a


def test_odd_cases(tmp_path: Path) -> None:
    records = make_majortom_dataset(
        tmp_path, num_files=2, rows_per_file=3, tile_size=TILE, corrupt=[(0, 1, "B04")],
        duplicate=[(0, 2)], drop_column=[(1, "B09")], wrong_shape=[(1, 0, "B05")],
        bad_crs=[(1, 1, "B11")],
    )
    first = pq.read_table(tmp_path / "images" / "part_00001.parquet").to_pylist()
    with pytest.raises(RasterioError):
        _decode(first[1]["B04"])
    _decode(first[1]["B03"])
    assert records[1]["corrupt"] == ["B04"]
    assert records[2]["duplicate"] and records[2]["key"] == records[1]["key"]
    assert (first[2]["grid_cell"], first[2]["product_datetime"]) == (
        first[1]["grid_cell"], first[1]["product_datetime"])
    second = pq.read_table(tmp_path / "images" / "part_00002.parquet").to_pylist()
    assert "B09" not in second[0] and "B09" in first[0]
    assert _decode(second[0]["B05"])[0].shape == ((TILE - 6) // 2,) * 2
    assert _decode(second[1]["B11"])[2] != _decode(second[1]["B12"])[2]
    with pytest.raises(ValueError):
        make_majortom_dataset(tmp_path / "bad", tile_size=100)


def test_extracted_layout(tmp_path: Path) -> None:
    records = make_majortom_dataset(tmp_path / "x", num_files=1, rows_per_file=2,
                                    tile_size=TILE, layout="extracted")
    make_majortom_dataset(tmp_path / "p", num_files=1, rows_per_file=2, tile_size=TILE)
    table = pq.read_table(tmp_path / "p" / "images" / "part_00001.parquet").to_pylist()
    assert not (tmp_path / "x" / "images").exists()
    for rec, row in zip(records, table, strict=True):
        row_name = rec["grid_cell"].split("_")[0]
        product = (tmp_path / "x" / "Core-S2L2A" / "L2A" / row_name / rec["grid_cell"]
                   / rec["product_id"])
        assert Path(rec["file"]) == product
        names = sorted(p.name for p in product.iterdir())
        assert names == sorted([f"{c}.tif" for c in RASTER_COLUMNS] + ["thumbnail.png"])
        assert (product / "B8A.tif").read_bytes() == row["B8A"]
        assert (product / "thumbnail.png").read_bytes() == row["thumbnail"]
