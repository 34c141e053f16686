"""A unit's histogram file: one sparse format for every build; dense files of earlier builds still read."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from sharding.build.unit_files import HISTOGRAM_SHAPE, add_histogram, index_schema, new_histogram, write_unit_files


def _read(path) -> np.ndarray:
    histogram = new_histogram()
    add_histogram(histogram, path)
    return histogram


def test_sparse_histogram_round_trip_and_index_rows(tmp_path):
    (tmp_path / "units").mkdir()
    histogram = new_histogram()
    rng = np.random.default_rng(0)
    np.add.at(histogram, (rng.integers(0, HISTOGRAM_SHAPE[0], 500), rng.integers(0, 65536, 500)), 3)
    rows = [{"key": "a", "shard": "shards/000004-0000.tar", "offset": 0, "bytes": 10}]
    write_unit_files(tmp_path, 4, rows, index_schema(), histogram)
    np.testing.assert_array_equal(_read(tmp_path / "units" / "000004.hist.npz"), histogram)
    with np.load(tmp_path / "units" / "000004.hist.npz") as saved:
        assert sorted(saved.files) == ["counts", "rows", "values"] and saved["counts"].size < 600
    table = pq.read_table(tmp_path / "units" / "000004.index.parquet")
    assert table.schema == index_schema() and table.column("key").to_pylist() == ["a"]


def test_dense_histograms_of_earlier_builds_still_read(tmp_path):
    dense = new_histogram()
    dense[2, 1234] = 7
    np.savez_compressed(tmp_path / "old.hist.npz", histogram=dense)
    np.testing.assert_array_equal(_read(tmp_path / "old.hist.npz"), dense)


def test_temp_files_are_this_process_own(tmp_path):
    import os

    from sharding.build.writer import atomic_write

    seen = []
    atomic_write(tmp_path / "build.json", lambda path: (seen.append(path.name), path.write_text("{}")))
    assert seen == [f"build.json.{os.getpid()}.tmp"] and (tmp_path / "build.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.json"]


def test_a_units_next_run_removes_the_temp_files_dead_processes_left(tmp_path):
    from sharding.layout import unit_temp_files

    (tmp_path / "shards").mkdir()
    (tmp_path / "units").mkdir()
    dead = ["shards/000005-0000.tar.999999.tmp", "shards/000005-0001.tar.tmp", "units/000005.hist.npz.999999.tmp",
            "units/000005.json.999999.tmp"]
    kept = ["shards/000050-0000.tar.999999.tmp", "units/000050.hist.npz.999999.tmp", "units/000005.json"]
    for name in dead + kept:
        (tmp_path / name).write_text("x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in unit_temp_files(tmp_path, 5)) == sorted(dead)
