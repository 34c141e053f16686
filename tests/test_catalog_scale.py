"""The columnar catalog and planner give what the row-by-row rules give, on generated catalogs."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.build.plan import Filters, assign_units, select_rows  # noqa: E402
from sharding.sources.majortom_catalog import Catalog, make_row  # noqa: E402
from sharding.sources.metadata_catalog import (  # noqa: E402
    MEAN_TILE_BYTES,
    _product_datetime,
    catalog_from_metadata,
    metadata_problem,
    rebase,
)
from sharding.sources.remote_catalog import list_source  # noqa: E402
from tests.conftest import run_shard  # noqa: E402
from tools.scale_catalog import metadata_table, write_footer_only_files  # noqa: E402


def row_by_row(entries: list[dict]) -> tuple[list[dict], list[str]]:
    """The per-row rules (make_row + metadata_problem) over every entry: (rows, reject reasons)."""
    rows, reasons = [], []
    for entry in sorted(entries, key=lambda e: (e["parquet_url"], e["parquet_row"] if e["parquet_row"] is not None
                                                else -1)):
        url, number = rebase(entry["parquet_url"], None), entry["parquet_row"]  # Hub URLs are read as hf://
        try:
            if number is None:
                raise ValueError("parquet_row is missing")
            row = make_row(url, url, number, entry["product_id"], entry["grid_cell"],
                           _product_datetime(entry["product_id"], entry["timestamp"]), MEAN_TILE_BYTES)
        except ValueError as error:
            reasons.append(f"metadata.parquet: {error}")
            continue
        problem = metadata_problem(entry, row)
        if problem:
            reasons.append(problem)
            continue
        rows.append(row | {name: float(entry[name]) for name in ("cloud_cover", "nodata", "centre_lat",
                                                                   "centre_lon")})
    return rows, reasons


def spoil(table: pa.Table) -> list[dict]:
    """The generated rows with every kind of bad value the checks must catch, and a timestamp fallback."""
    entries = table.to_pylist()
    entries[3]["grid_cell"] = "0D_5R"  # southern rows start at 1D
    entries[5]["grid_cell"] = "12X_4R"
    entries[7]["product_id"] = "S2A_MSIL2A_2020BAD_N0500"  # no sensing time: the metadata timestamp is used
    entries[9]["product_id"] = "S2A_MSIL2A_20201332T101010_N0500"  # month 13, and no fallback either
    entries[9]["timestamp"] = "not a time"
    entries[11]["cloud_cover"] = 101.0
    entries[13]["nodata"] = None
    entries[15]["centre_lat"] += 3.0
    entries[17]["parquet_row"] = None
    entries[19]["centre_lon"] = float("nan")
    return entries[::-1]  # not in file order: the catalog sorts by (URL, row) itself


def test_metadata_catalog_equals_the_row_by_row_rules(tmp_path):
    entries = spoil(metadata_table(300, rows_per_file=40, seed=3))
    path = tmp_path / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(entries, schema=metadata_table(1, 40).schema.set(
        10, pa.field("parquet_url", pa.string()))), path)
    catalog = catalog_from_metadata(str(path), None)
    rows, reasons = row_by_row(entries)
    got = catalog.table.to_pylist()
    assert [r["key"] for r in got] == [r["key"] for r in rows] and len(got) == 300 - 8
    for mine, theirs in zip(got, rows):
        assert mine.keys() == theirs.keys()
        for name, value in theirs.items():
            assert mine[name] == pytest.approx(value, abs=1e-9) if isinstance(value, float) else mine[name] == value
    assert sorted(r["reason"] for r in catalog.rejected) == sorted(reasons)
    assert "metadata.parquet: not a MajorTOM grid cell: '12X_4R' (expected e.g. '454U_120R')" in reasons


def old_assign_units(rows: list[dict], shard_size: int, mix_groups: int, seed: int) -> list[list[dict]]:
    """The row-by-row unit cut the columnar one replaced (kept here as the reference)."""
    rng = np.random.default_rng(seed)
    groups = sorted({row["source_group"] for row in rows})
    group_order = [groups[i] for i in rng.permutation(len(groups))]
    pool_of = {group: position // mix_groups for position, group in enumerate(group_order)}
    pools: dict[int, list[dict]] = {}
    for row in rows:
        pools.setdefault(pool_of[row["source_group"]], []).append(row)
    units = []
    for pool in sorted(pools):
        members, unit, unit_bytes = pools[pool], [], 0
        for index in rng.permutation(len(members)):
            unit.append(members[index])
            unit_bytes += members[index]["est_bytes"]
            if unit_bytes >= shard_size:
                units.append(unit)
                unit, unit_bytes = [], 0
        if unit:
            units.append(unit)
    return [sorted(unit, key=lambda r: (r["source_file"], r["source_row"])) for unit in units]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_columnar_units_equal_the_row_by_row_cut(seed):
    rng = np.random.default_rng(seed)
    count = 2000
    files = rng.integers(0, 37, count)
    rows = [{"source_file": f"f{f:03d}.parquet", "source_group": f"f{f:03d}.parquet", "source_row": i,
             "key": f"k{i}", "est_bytes": int(rng.integers(0, 5000))} for i, f in enumerate(files)]
    catalog = Catalog()
    catalog.add_rows(rows)
    kept, duplicates, dropped = select_rows(catalog, Filters())
    assert len(kept) == count and not duplicates and not dropped
    plan = assign_units(catalog, kept, 40_000, 4, seed)
    expected = old_assign_units(rows, 40_000, 4, seed)
    units = plan.column("unit").to_numpy()
    assert units.max() + 1 == len(expected)
    assert plan.column("key").to_pylist() == [row["key"] for unit in expected for row in unit]
    assert units.tolist() == [number for number, unit in enumerate(expected) for _ in unit]


def test_filters_and_duplicates_count_every_row_once(tmp_path):
    table = metadata_table(5000, rows_per_file=500, seed=1)
    entries = table.to_pylist()
    first = next(i for i, e in enumerate(entries) if e["cloud_cover"] <= 50 and e["nodata"] <= 0.1
                 and e["timestamp"] >= "2019")
    entries[first + 1] = dict(entries[first], parquet_row=entries[first + 1]["parquet_row"])  # a repeated key
    path = tmp_path / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(entries, schema=table.schema), path)
    catalog = list_source(None, str(path))
    kept, duplicates, dropped = select_rows(catalog, Filters(max_cloud=50, max_nodata=0.1, start="2019-01-01"))
    listed = catalog.table.to_pylist()
    expected = Counter()
    for row in listed:
        if row["timestamp"][:10] < "2019-01-01":
            expected["time"] += 1
        elif row["cloud_cover"] > 50:
            expected["cloud"] += 1
        elif row["nodata"] > 0.1:
            expected["nodata"] += 1
    assert dropped == expected
    assert len(kept) + len(duplicates) + sum(dropped.values()) == len(listed) == 5000
    keys = [listed[i]["key"] for i in kept]
    assert len(set(keys)) == len(keys) and [(d["row"], d["key"]) for d in duplicates] == [
        (first + 1, listed[first]["key"])]


def test_dry_run_of_generated_metadata_then_footer_only_files_listed_locally(tmp_path):
    table = metadata_table(600, rows_per_file=100, seed=2)
    images = tmp_path / "core" / "images"
    assert write_footer_only_files(table, images, 6) == 600
    pq.write_table(table, tmp_path / "core" / "metadata.parquet")
    planned = run_shard("build", "--metadata", str(tmp_path / "core" / "metadata.parquet"), "--output",
                        str(tmp_path / "a"), "--max-cloud", "50", "--dry-run")
    assert planned.exit_code == 0, planned.output
    info = json.loads((tmp_path / "a" / "build.json").read_text())
    kept = int((table.column("cloud_cover").to_numpy() <= 50).sum())
    assert info["planned_tiles"] == kept and info["filtered_by"] == {"cloud": 600 - kept}
    assert info["tile_bytes"].startswith("estimated") and not (tmp_path / "a" / "manifest.json").exists()
    listed = list_source(str(tmp_path / "core"), None)  # the listing path: footers + id columns of each file
    assert len(listed) == 600 and listed.tile_bytes == "parquet footers"
    assert listed.table.column("cloud_cover").to_pylist() == pytest.approx(table.column("cloud_cover").to_pylist())
