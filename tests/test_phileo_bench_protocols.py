"""PhilEO Bench build: `--regions`, `--split-ratio` (the benchmark's protocol_split) and the 224 px / 30 m sets."""

import json
import os
import subprocess
import sys
from glob import glob

import numpy as np
import pytest

from phileo.phileo_bench import REGION_BUCKETS
from sharding.phileo_bench.split import split_selection
from sharding.sources.phileo_bench import group_tiles, scan_inputs
from tests.conftest import read_manifest
from tests.test_phileo_bench_build import (
    SMALL,
    expected_patches,
    original_protocol,
    phileo_bench_build,
    read_samples,
)
from tools.phileo_bench_fixture import make_phileo_bench_dataset


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    return root, make_phileo_bench_dataset(root)


def test_regions_limit_the_train_and_val_buckets_and_keep_the_full_test_set(bench_dir, tmp_path):
    root, files = bench_dir
    result = phileo_bench_build(root, tmp_path / "out", "--task", "landcover", "--n-shot", "5", "--split-ratio", "1",
                                "--regions", "japan,europe")
    assert result.exit_code == 0, result.output
    expected = original_protocol(files, "lc", 5)
    manifest = read_manifest(tmp_path / "out" / "landcover-n5" / "train")
    assert manifest["build_args"]["regions"] == ["japan", "europe"]
    assert manifest["selection"]["regions"] == ["japan", "europe"]
    assert manifest["selection"]["buckets"] == {b: expected[b] for b in ("europe", "japan")}
    split = read_samples(tmp_path / "out" / "landcover-p1" / "train")
    assert {key.split("_")[0] for key in split} == {"europe", "denmark-1", "japan"}
    assert set(read_samples(tmp_path / "out" / "test")) == set(expected_patches(files, "test"))


def test_unknown_region_bucket_is_a_one_line_error_listing_the_buckets(bench_dir, tmp_path):
    result = phileo_bench_build(bench_dir[0], tmp_path / "out", "--task", "roads", "--n-shot", "5",
                                "--regions", "japan,atlantis")
    error = result.stderr.strip()
    assert result.exit_code == 2 and len(error.splitlines()) == 1
    assert "--regions 'atlantis'" in error and ", ".join(REGION_BUCKETS) in error
    alone = phileo_bench_build(bench_dir[0], tmp_path / "out2", "--regions", "japan")
    assert alone.exit_code == 2 and "give --task" in alone.stderr


# ------------------------------------------------------------------------------ --split-ratio


def reference_protocol_split(folder, split_percentage, regions, y):
    """utils/data_protocol.py:121-177 `protocol_split` of 91097luke/phileo-bench, copied as is up to the
    file lists (the module imports buteo, which is not installed; the MultiArrays are left out).
    REGIONS_BUCKETS is data_protocol.py:24 with the sub-region names spelled as our files are."""
    import pandas as pd

    REGIONS_BUCKETS = {k: list(v) for k, v in REGION_BUCKETS.items()}  # noqa: N806 (the original's name)
    if regions is None:
        regions = list(REGIONS_BUCKETS.keys())
    df = pd.read_csv(glob(os.path.join(folder, "*.csv"))[0])
    df = df.sort_values(by=['samples'])
    x_train_files = []
    shots_per_region = {'total': 0}
    for region in regions:
        mask = [False] * len(df)
        for subregion in REGIONS_BUCKETS[region]:
            submask = [subregion in f for f in df.iloc[:, 0]]
            mask = [any(tuple) for tuple in zip(mask, submask)]
        mask = [region in f for f in df.iloc[:, 0]]
        df_temp = df[mask].sample(frac=1).copy().reset_index(drop=True)
        if df_temp.shape[0] == 0:
            continue
        df_temp['cumsum'] = df_temp['samples'].cumsum()
        idx_closest = df_temp.iloc[
            (df_temp['cumsum'] - int(df_temp['samples'].sum() * split_percentage)).abs().argsort()[:1]].index.values[0]
        x_train_files = x_train_files + list(df_temp.iloc[:idx_closest, 0])
        shots_per_region[region] = df_temp['cumsum'].values[idx_closest]
    x_train_files = [os.path.join(folder, f_name) for f_name in x_train_files]
    y_train_files = [f_name.replace('s2', f'label_{y}') for f_name in x_train_files]
    x_val_files = [f_name.replace('train', 'val') for f_name in x_train_files]
    y_val_files = [f_name.replace('train', 'val') for f_name in y_train_files]
    keep = [os.path.exists(f) for f in y_train_files]  # sanity_check_labels_exist, data_protocol.py:35
    keep_val = [os.path.exists(f) for f in y_val_files]
    return ([os.path.basename(f) for f, k in zip(x_train_files, keep) if k],
            [os.path.basename(f) for f, k in zip(x_val_files, keep_val) if k], shots_per_region)


def write_split_input(folder, seed=7):
    """Tiny npy files (2 x 2 px rows: only the headers matter) with 1..30 rows, many ties, a label missing here
    and there, and train files whose names hold a bucket name; the CSV the benchmark reads, in name order."""
    rng = np.random.default_rng(seed)
    regions = ["europe", "denmark-1", "denmark-2", "east-africa", "tanzania-2", "uganda-1", "ghana-1", "nigeria",
               "north-america", "south-america", "japan"]
    rows = {}
    for region in regions:
        for tile in range(int(rng.integers(2, 6))):
            count = int(rng.choice([3, 5, 5, 8, 13, 21, 30]))
            rows[f"{region}_{tile}"] = count
            for split, n in (("train", count), ("val", max(1, count // 4))):
                np.save(folder / f"{region}_{tile}_{split}_s2.npy", np.zeros((n, 2, 2, 10), np.uint16))
                if rng.random() > 0.15:
                    np.save(folder / f"{region}_{tile}_{split}_label_roads.npy", np.zeros((n, 2, 2, 1), np.float32))
    names = sorted(f"{stem}_train_s2.npy" for stem in rows)
    lines = ["filename,samples"] + [f"{name},{rows[name[: -len('_train_s2.npy')]]}" for name in names]
    (folder / "samples.csv").write_text("\n".join(lines) + "\n")
    assert len(names) > 16  # past numpy's insertion sort: quicksort's order of ties is the one to match


@pytest.mark.parametrize(("ratio", "regions"), [(0.3, None), (0.75, ["japan", "europe", "east-africa"]), (1.0, None)])
def test_bench_split_is_the_benchmark_protocol_split(tmp_path, ratio, regions):
    pytest.importorskip("pandas")
    write_split_input(tmp_path)
    tiles, _ = group_tiles(scan_inputs([str(tmp_path)])[0])
    np.random.seed(1234)  # data_protocol.py:17, at import
    x_train, x_val, shots = reference_protocol_split(str(tmp_path), ratio, regions, "roads")
    selection, chosen = split_selection(tiles, "roads", ratio, tuple(regions or REGION_BUCKETS), "bench")
    ours = selection["buckets"]
    assert [f for b in ours.values() for f in b["train_files"]] == x_train
    assert [f for b in ours.values() for f in b["val_files"]] == x_val
    assert {b: v["counted"] for b, v in ours.items()} == {b: v for b, v in shots.items() if b != "total"}
    assert "northwest-africa" not in ours and not any("denmark" in f or "tanzania" in f for f in x_train)
    assert [t.s2.name for t in chosen["train"]] == sorted(x_train)


def test_fixed_split_takes_every_sub_region_and_the_closest_file(tmp_path):
    write_split_input(tmp_path)
    tiles, _ = group_tiles(scan_inputs([str(tmp_path)])[0])
    labelled = [t for t in tiles if t.split == "train" and "roads" in t.labels]
    everything, _ = split_selection(tiles, "roads", 1.0, tuple(REGION_BUCKETS), "fixed")
    assert sorted(f for b in everything["buckets"].values() for f in b["train_files"]) == \
           sorted(t.s2.name for t in labelled)  # P = 1: every file, ghana-1 and nigeria in northwest-africa too
    half, _ = split_selection(tiles, "roads", 0.5, tuple(REGION_BUCKETS), "fixed")
    for chosen in half["buckets"].values():
        sizes = {t.s2.name: t.rows for t in labelled}
        kept = [sizes[f] for f in chosen["train_files"]]
        assert chosen["counted"] == sum(kept) == chosen["patches_train"]  # the closest file is kept
        assert abs(sum(kept) - chosen["target"]) <= abs(sum(kept[:-1]) - chosen["target"])
    japan, _ = split_selection(tiles, "roads", 0.5, ("japan",), "fixed")
    assert japan["buckets"]["japan"] == half["buckets"]["japan"]  # a bucket's draw is its own


def test_split_ratio_build_writes_whole_files_of_the_selection(bench_dir, tmp_path):
    root, files = bench_dir
    result = phileo_bench_build(root, tmp_path / "out", "--task", "roads", "--split-ratio", "1",
                                "--split-protocol", "bench")  # two files per bucket: the first shuffled one
    assert result.exit_code == 0, result.output
    for split in ("train", "val"):
        manifest = read_manifest(tmp_path / "out" / "roads-p1" / split)
        assert manifest["selection"]["method"] == "split-bench"
        chosen = {f for b in manifest["selection"]["buckets"].values() for f in b[f"{split}_files"]}
        assert chosen and not any(f.startswith(("denmark", "tanzania", "ghana")) for f in chosen)
        expected = {key for key, (name, _) in expected_patches(files, split).items() if name in chosen}
        assert set(read_samples(tmp_path / "out" / "roads-p1" / split)) == expected
    bad = phileo_bench_build(root, tmp_path / "bad", "--task", "roads", "--split-ratio", "1.5")
    assert bad.exit_code == 2 and "--split-ratio 1.5: expected fractions in (0, 1]" in bad.stderr


# ------------------------------------------------------------------------------ 224 px, 30 m


def test_224_px_hls_set_is_bit_exact_and_recorded(tmp_path):
    root = tmp_path / "downstream_dataset_patches_np_HLS"
    files = make_phileo_bench_dataset(root, regions=("japan", "europe"), tiles_per_region=1,
                                      patches={"train": 2, "val": 1, "test": 1}, size=224)
    index = {"japan": {"train_indices": [1], "val_indices": [0], "length_multi_array_train": 2,
                       "length_multi_array_val": 1},
             "europe": {"train_indices": [0], "val_indices": [0], "length_multi_array_train": 2,
                        "length_multi_array_val": 1}}
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "indices_16012024_224_30m_lc_1.json").write_text(json.dumps(index))
    result = phileo_bench_build(root, tmp_path / "out", "--task", "landcover", "--n-shot", "1",
                                "--indices", str(tmp_path / "idx"))
    assert result.exit_code == 0, result.output
    build = json.loads((tmp_path / "out" / "build.json").read_text())
    assert (build["patch_size"], build["gsd"], build["indices_name"]) == (224, 30, "224_30m")
    manifest = read_manifest(tmp_path / "out" / "landcover-n1" / "train")
    assert (manifest["patch_size"], manifest["gsd"]) == (224, 30)
    assert manifest["selection"]["indices_file"] == "indices_16012024_224_30m_lc_1.json"
    samples = read_samples(tmp_path / "out" / "landcover-n1" / "train")
    assert sorted(samples) == ["europe_train_000000", "japan_train_000001"]
    sample = samples["japan_train_000001"]
    assert sample.meta["shape"] == [224, 224]
    np.testing.assert_array_equal(sample.arrays["s2_stack"], np.moveaxis(files["japan_0_train_s2.npy"][1], -1, 0))
    np.testing.assert_array_equal(sample.arrays["label_landcover"], files["japan_0_train_label_lc.npy"][1, ..., 0])
    ten = phileo_bench_build(root, tmp_path / "ten", "--gsd", "10")
    assert ten.exit_code == 0, ten.output
    assert read_manifest(tmp_path / "ten" / "test")["gsd"] == 10


def test_a_mix_of_patch_sizes_is_a_one_line_error_naming_the_file(tmp_path):
    make_phileo_bench_dataset(tmp_path / "in", **SMALL)
    fixture = subprocess.run([sys.executable, "tools/phileo_bench_fixture.py", str(tmp_path / "in224"), "--size",
                              "224", "--regions", "north-america", "--tiles", "1", "--train", "1", "--val", "1",
                              "--test", "1"], capture_output=True, text=True)
    assert fixture.returncode == 0, fixture.stderr
    result = phileo_bench_build([tmp_path / "in", tmp_path / "in224"], tmp_path / "out")
    error = result.stderr.strip()
    assert result.exit_code == 2 and len(error.splitlines()) == 1
    assert "north-america_0_test_s2.npy: 224 x 224 px patches" in error and "has 128 x 128" in error
