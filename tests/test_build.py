"""`phileo-shard build` on generated MajorTOM data: lossless, geo-correct, filtered, rejected rows."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from rasterio.io import MemoryFile
from rasterio.warp import transform as warp

from phileo.bands import RESOLUTION_GROUPS
from phileo.schema import decode_sample
from sharding.dataset.tarread import iter_tar_samples
from tests.conftest import read_manifest, run_shard
from tools.majortom_fixture import make_majortom_dataset


def read_dataset(dataset):
    """{key: Sample} of every sample in a built dataset, decoded and validated."""
    samples = {}
    for shard in read_manifest(dataset)["shards"]:
        for raw in iter_tar_samples(dataset / shard["url"]):
            assert raw.key not in samples
            samples[raw.key] = decode_sample(raw.key, raw.members)
    return samples


def source_bands(record):
    """{column: (array, crs, transform)} decoded straight from the source parquet row with rasterio."""
    table = pq.read_table(record["file"])
    out = {}
    for column in [*(b for bands, _ in RESOLUTION_GROUPS.values() for b in bands), "cloud_mask"]:
        with MemoryFile(table.column(column)[record["row"]].as_py()) as mem, mem.open() as ds:
            out[column] = (ds.read(1), ds.crs.to_string(), tuple(ds.transform)[:6])
    return out


def build(tmp_path, source, *extra, name="ds"):
    out = tmp_path / name
    result = run_shard("build", "--input", str(source), "--output", str(out), *extra)
    return out, result


def test_every_band_bit_exact_and_meta_matches_rasterio(majortom, built):
    _, records = majortom
    samples = read_dataset(built)
    assert sorted(samples) == sorted(r["key"] for r in records)
    for record in records:
        sample = samples[record["key"]]
        source = source_bands(record)
        for member, (bands, _) in RESOLUTION_GROUPS.items():
            for channel, band in enumerate(bands):
                assert sample.arrays[member][channel].dtype == source[band][0].dtype
                np.testing.assert_array_equal(sample.arrays[member][channel], source[band][0])
        np.testing.assert_array_equal(sample.arrays["cloud"], source["cloud_mask"][0])
        meta = sample.meta
        _, crs, transform = source["B02"]
        assert (meta["crs"], tuple(meta["transform"]), meta["shape"]) == (crs, transform, [120, 120])
        assert (meta["grid_cell"], meta["product_id"]) == (record["grid_cell"], record["product_id"])
        dt = record["product_datetime"]
        assert meta["timestamp"] == f"{dt[:4]}-{dt[4:6]}-{dt[6:8]}T{dt[9:11]}:{dt[11:13]}:{dt[13:15]}Z"
        a, _, c, _, e, f = transform
        xs = [c, c + a * 120, c + a * 120, c]
        ys = [f, f, f + e * 120, f + e * 120]
        lons, lats = warp(crs, "EPSG:4326", xs, ys)
        np.testing.assert_allclose(meta["corners_lonlat"], np.stack([lons, lats], 1), atol=1e-9)
        assert meta["centre_lat"] == pytest.approx(record["centre_lat"], abs=1e-6)
        assert meta["centre_lon"] == pytest.approx(record["centre_lon"], abs=1e-6)
        west, south, east, north = meta["bounds_lonlat"]
        assert west <= min(lons) and east >= max(lons) and south <= min(lats) and north >= max(lats)
        assert meta["cloud_cover"] == pytest.approx(record["cloud_cover"])
        assert meta["nodata"] == pytest.approx(record["nodata"])


def test_tiles_in_all_four_quadrants_get_the_right_hemisphere(majortom, built):
    samples = read_dataset(built).values()
    signs = {(s.meta["centre_lat"] > 0, s.meta["centre_lon"] > 0) for s in samples}
    assert signs == {(True, True), (True, False), (False, True), (False, False)}
    for sample in samples:
        south = sample.meta["centre_lat"] < 0
        assert sample.meta["crs"].startswith("EPSG:327" if south else "EPSG:326")
        assert ("D_" in sample.meta["grid_cell"]) == south


def test_manifest_index_and_mixing(majortom, built):
    manifest = read_manifest(built)
    assert manifest["totals"]["samples"] == 12 and manifest["totals"]["rejected"] == 0
    assert len(manifest["shards"]) >= 3
    for shard in manifest["shards"]:
        assert sum(shard["cloud_cover_histogram"]) == shard["samples"]
        assert shard["distinct_1deg_cells"] >= 1 and len(shard["time_range"]) == 2
        west, south, east, north = shard["bbox_lonlat"]
        assert west < east and south < north
    stats = manifest["band_stats"]
    assert set(stats) >= {"B02", "B12", "B01"} and stats["B04"]["p1"] <= stats["B04"]["mean"] <= stats["B04"]["p99"]
    # each shard mixes tiles from more than one source file (--mix-files 2)
    index = pq.read_table(built / "index.parquet").to_pylist()
    files_per_shard = {}
    samples = read_dataset(built)
    for row in index:
        files_per_shard.setdefault(row["shard"], set()).add(samples[row["key"]].meta["source_file"])
    assert max(len(files) for files in files_per_shard.values()) >= 2
    # index offsets point at the sample's first tar header
    for row in index:
        with open(built / row["shard"], "rb") as shard:
            shard.seek(row["offset"])
            header = shard.read(512)
        assert header[:100].rstrip(b"\0").decode() == f"{row['key']}.meta.json"


def test_filters(majortom, tmp_path):
    source, records = majortom
    cells = tmp_path / "cells.txt"
    cells.write_text(f"# a comment\n{records[0]['grid_cell']}\n\n{records[5]['grid_cell']}\n")
    cases = {
        ("--max-cloud", "10"): lambda r: r["cloud_cover"] <= 10,
        ("--max-nodata", "0.01"): lambda r: r["nodata"] <= 0.01,
        ("--bbox", "0,0,180,90"): lambda r: r["centre_lat"] > 0 and r["centre_lon"] > 0,
        ("--start", "2021-01-01", "--end", "2022-12-31"): lambda r: "2021" <= r["product_datetime"][:4] <= "2022",
        ("--grid-cells", str(cells)): lambda r: r["grid_cell"] in {records[0]["grid_cell"], records[5]["grid_cell"]},
    }
    for number, (flags, keep) in enumerate(cases.items()):
        out, result = build(tmp_path, source, *flags, name=f"f{number}")
        assert result.exit_code == 0, result.output
        expected = sorted(r["key"] for r in records if keep(r))
        assert 0 < len(expected) < len(records), flags
        assert sorted(read_dataset(out)) == expected, flags
        assert read_manifest(out)["totals"]["filtered"] == len(records) - len(expected)
    out, result = build(tmp_path, source, "--limit", "5", name="limit")
    assert sorted(read_dataset(out)) == sorted(r["key"] for r in records[:5])


def test_cloud_filter_without_metadata_uses_pixels(tmp_path):
    records = make_majortom_dataset(tmp_path / "src", num_files=1, rows_per_file=6, with_metadata=False)
    out, result = build(tmp_path, tmp_path / "src", "--max-cloud", "20")
    assert result.exit_code == 0, result.output
    expected = sorted(r["key"] for r in records if r["cloud_cover"] <= 20)
    assert 0 < len(expected) < 6 and sorted(read_dataset(out)) == expected


def test_nodata_comes_from_the_metadata_and_from_the_pixels_only_without_it(tmp_path):
    from sharding.sources.majortom import decode_majortom_row, iter_parquet_rows, nodata_fraction

    record = make_majortom_dataset(tmp_path, num_files=1, rows_per_file=1)[0]
    (_, columns), = iter_parquet_rows(str(next((tmp_path / "images").glob("*.parquet"))), [0], False)
    columns["B02"] = columns["B03"] = columns["B04"] = columns["B08"] = _zero_left_half(columns["B02"])
    plan_row = {"key": "k", "product_id": record["product_id"], "grid_cell": record["grid_cell"],
                "timestamp": "2020-01-01T00:00:00Z", "cloud_cover": 1.0, "source_file": "f.parquet", "source_row": 0}
    from_pixels = decode_majortom_row(plan_row | {"nodata": float("nan")}, columns, False)
    assert from_pixels.meta["nodata"] == 0.5 == nodata_fraction(from_pixels.arrays["s2_10m"])
    assert decode_majortom_row(plan_row | {"nodata": 0.25}, columns, False).meta["nodata"] == 0.25


def _zero_left_half(geotiff: bytes) -> bytes:
    """The same GeoTIFF with the left half of its pixels 0 (no-data)."""
    with MemoryFile(geotiff) as source, source.open() as dataset:
        pixels, profile = dataset.read(1), dataset.profile
    pixels[:, : pixels.shape[1] // 2] = 0
    with MemoryFile() as out:
        with out.open(**profile) as dataset:
            dataset.write(pixels, 1)
        return out.read()


def test_bad_rows_are_rejected_with_file_row_and_reason(tmp_path):
    src = tmp_path / "src"
    records = make_majortom_dataset(src, num_files=3, rows_per_file=3, rows_per_row_group=2,
                                    corrupt=[(0, 1, "B03")], wrong_shape=[(1, 0, "B11")], bad_crs=[(1, 2, "B01")],
                                    drop_column=[(2, "B09")], duplicate=[(0, 2)])
    out, result = build(tmp_path, src)
    assert result.exit_code == 0, result.output
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {(r["file"].rsplit("/", 1)[-1], r["row"]): r["reason"] for r in rejected}
    assert len(rejected) == 3 + 1 + 1 + 1 + 1
    assert "B03: unreadable GeoTIFF" in reasons[("part_00001.parquet", 1)]
    assert "duplicate key" in reasons[("part_00001.parquet", 2)]
    assert "B11: shape" in reasons[("part_00002.parquet", 0)]
    assert "B01: CRS" in reasons[("part_00002.parquet", 2)]
    assert all("missing column(s) B09" in reasons[("part_00003.parquet", row)] for row in range(3))
    good = {records[0]["key"], records[4]["key"]}  # the only rows with nothing wrong
    assert set(read_dataset(out)) == good
    assert "rejected 7" in result.output
    _, strict = build(tmp_path, src, "--strict", name="strict")
    assert strict.exit_code == 1


def test_extracted_layout_gives_the_same_samples(tmp_path):
    make_majortom_dataset(tmp_path / "pq", num_files=2, rows_per_file=2, seed=3)
    make_majortom_dataset(tmp_path / "ex", num_files=2, rows_per_file=2, seed=3, layout="extracted")
    from_parquet, result = build(tmp_path, tmp_path / "pq" / "images", name="a")
    assert result.exit_code == 0, result.output
    from_folders, result = build(tmp_path, tmp_path / "ex", name="b")
    assert result.exit_code == 0, result.output
    a, b = read_dataset(from_parquet), read_dataset(from_folders)
    assert sorted(a) == sorted(b) and len(a) == 4
    for key in a:
        for member in a[key].arrays:
            np.testing.assert_array_equal(a[key].arrays[member], b[key].arrays[member])


def test_single_parquet_file_input(majortom, tmp_path):
    source, records = majortom
    out, result = build(tmp_path, source / "images" / "part_00002.parquet")
    assert result.exit_code == 0, result.output
    assert sorted(read_dataset(out)) == sorted(r["key"] for r in records if r["file_index"] == 1)


@pytest.mark.parametrize("args, message", [
    (["--input", "/nonexistent/x"], "--input /nonexistent/x: no such file or directory"),
    (["--max-cloud", "120"], "--max-cloud 120.0: expected a percentage"),
    (["--bbox", "1,2,3"], "--bbox '1,2,3': expected four numbers"),
    (["--start", "2020-13-01"], "--start '2020-13-01': expected a date"),
    (["--shard-size", "lots"], "--shard-size 'lots'"),
])
def test_bad_input_is_one_line_error(majortom, tmp_path, args, message):
    argv = ["build", "--input", str(majortom[0]), "--output", str(tmp_path / "o"), *args]
    result = run_shard(*argv)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output


def test_unreadable_parquet_and_partial_download(majortom, tmp_path):
    source, records = majortom
    src = tmp_path / "src"
    shutil.copytree(source, src)
    (src / "images" / "part_00004.parquet").unlink()  # partial download: metadata.parquet lists more files
    (src / "images" / "part_00003.parquet").write_bytes(b"PAR1 not really a parquet file")
    out, result = build(tmp_path, src)
    assert result.exit_code == 0, result.output
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and "unreadable parquet file" in rejected[0]["reason"]
    assert rejected[0]["file"].endswith("part_00003.parquet")
    assert sorted(read_dataset(out)) == sorted(r["key"] for r in records if r["file_index"] < 2)


def test_dry_run_plans_reports_and_the_same_command_builds_from_that_plan(majortom, built, tmp_path):
    out = tmp_path / "ds"
    args = ("build", "--input", str(majortom[0]), "--output", str(out), "--shard-size", "300KB", "--mix-files", "2")
    planned = run_shard(*args, "--dry-run")
    assert planned.exit_code == 0, planned.output
    info = json.loads((out / "build.json").read_text())
    assert f"plan: {info['planned_tiles']} tiles in {info['units']} units" in planned.output
    assert "the same command without --dry-run builds it" in planned.output
    assert not list((out / "shards").glob("*.tar")) and not (out / "manifest.json").exists()
    filtered = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "f"), "--dry-run",
                         "--bbox", "0,0,180,90", "--num-nodes", "2")
    assert filtered.exit_code == 0 and "bbox 9" in filtered.output and "node 1: " in filtered.output, filtered.output
    assert run_shard(*args).exit_code == 0  # continues from the saved plan: the same shards as a direct build
    assert [s["sha256"] for s in read_manifest(out)["shards"]] == [s["sha256"] for s in read_manifest(built)["shards"]]
