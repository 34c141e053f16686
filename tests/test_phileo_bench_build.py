"""`phileo-shard build --source phileo-bench` on generated PhilEO-downstream data.

Lossless (dir, deflated zip, multi-part zip), exactly once, the benchmark's n-shot selection
(seeded and from index files), rejected rows, resume, density scale detection.
"""

import io
import json
import math
import random
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from phileo.bands import MODEL_BANDS
from phileo.phileo_bench import REGION_BUCKETS, bucket_of
from phileo.schema import decode_sample
from sharding.dataset.tarread import iter_tar_samples
from sharding.sources.phileo_bench import MultiPartFile
from tests.conftest import read_manifest, run_shard
from tools.phileo_bench_fixture import make_phileo_bench_dataset

SMALL = {"regions": ("europe", "tanzania-1", "japan"), "tiles_per_region": 2,
         "patches": {"train": 3, "val": 2, "test": 1}}
ARCHIVE_DIR = "PhilEO-downstream/data"


@pytest.fixture(scope="session")
def phileo_bench_dir(tmp_path_factory):
    """Default fixture (6 regions in 4 buckets, 2 tiles each, 6/3/2 patches), plain npy files; read-only."""
    root = tmp_path_factory.mktemp("phileo_bench")
    return root, make_phileo_bench_dataset(root)


@pytest.fixture(scope="session")
def phileo_bench_built(phileo_bench_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("phileo_bench_built") / "out"
    result = run_shard("build", "--source", "phileo-bench", "--input", str(phileo_bench_dir[0]), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("wrote 132 patches in ")
    return out


def phileo_bench_build(source, out, *extra):
    sources = source if isinstance(source, list | tuple) else [source]
    flags = [arg for path in sources for arg in ("--input", str(path))]
    return run_shard("build", "--source", "phileo-bench", *flags, "--output", str(out), *extra)


def read_samples(dataset):
    """{key: Sample} of a dataset, decoded and validated against the schema."""
    samples = {}
    for shard in read_manifest(dataset)["shards"]:
        assert not shard["url"].startswith("/")
        for raw in iter_tar_samples(dataset / shard["url"]):
            assert raw.key not in samples
            samples[raw.key] = decode_sample(raw.key, raw.members)
    return samples


def s2_names(files, region, split):
    return sorted(n for n in files if n.startswith(f"{region}_") and n.endswith(f"_{split}_s2.npy"))


def expected_patches(files, split):
    """{key: (s2 file name, row)}: index = position in the region's split files in name order."""
    out = {}
    for region in sorted({name.split("_", 1)[0] for name in files}):
        index = 0
        for name in s2_names(files, region, split):
            for row in range(len(files[name])):
                out[f"{region}_{split}_{index:06d}"] = (name, row)
                index += 1
    return out


def shard_digests(dataset):
    return [(s["url"], s["samples"], s["sha256"]) for s in read_manifest(dataset)["shards"]]


def check_round_trip(samples, files, split, file_prefix=lambda name: "", scale=1):
    """Every patch of `split` once, bit-exact, with the contract's meta (`file_prefix`: archive path)."""
    expected = expected_patches(files, split)
    assert sorted(samples) == sorted(expected)
    for key, (name, row) in expected.items():
        sample, stem, prefix = samples[key], name[: -len("s2.npy")], file_prefix(name)
        stack = sample.arrays["s2_stack"]
        assert stack.dtype == np.uint16 and stack.shape == (10, 128, 128)
        np.testing.assert_array_equal(stack, np.moveaxis(files[name][row], -1, 0))
        for member, kind in (("label_roads", "label_roads"), ("label_buildings", "label_building")):
            assert sample.arrays[member].dtype == np.float32
            np.testing.assert_array_equal(sample.arrays[member], files[f"{stem}{kind}.npy"][row, :, :, 0])
        assert sample.arrays["label_landcover"].dtype == np.uint8
        np.testing.assert_array_equal(sample.arrays["label_landcover"], files[f"{stem}label_lc.npy"][row, :, :, 0])
        meta = sample.meta
        region = name.split("_", 1)[0]
        assert (meta["source"], meta["region"], meta["bucket"], meta["split"]) == \
               ("phileo-bench", region, bucket_of(region), split)
        assert (meta["file"], meta["row"], meta["shape"]) == (prefix + name, row, [128, 128])
        assert meta["tile"] == name[len(region) + 1 : -len(f"_{split}_s2.npy")]
        assert meta["bands"] == {"s2_stack": list(MODEL_BANDS)}
        coords = files.get(f"{stem}label_coords.npy")
        assert meta["coords"] == (None if coords is None else [float(v) for v in coords[row]])
        assert meta["task_labels"] == {
            "roads": {"member": "label_roads", "source": f"{prefix}{stem}label_roads.npy", "density_scale": scale},
            "buildings": {"member": "label_buildings", "source": f"{prefix}{stem}label_building.npy",
                          "density_scale": scale},
            "landcover": {"member": "label_landcover", "source": f"{prefix}{stem}label_lc.npy"}}


def test_dir_build_is_bit_exact_and_covers_every_row_once(phileo_bench_dir, phileo_bench_built):
    _, files = phileo_bench_dir
    total = 0
    for split in ("train", "val", "test"):
        dataset = phileo_bench_built / split
        samples = read_samples(dataset)
        check_round_trip(samples, files, split)
        total += len(samples)
        manifest = read_manifest(dataset)
        assert manifest["source"] == "phileo-bench" and manifest["totals"]["samples"] == len(samples)
        assert manifest["totals"]["rejected"] == 0 and (dataset / "rejected.jsonl").read_text() == ""
        index = pq.read_table(dataset / "index.parquet").to_pylist()
        assert sorted(row["key"] for row in index) == sorted(samples)
        assert {row["split"] for row in index} == {split} and all(row["region"] for row in index)
        assert run_shard("verify", str(dataset)).exit_code == 0
    assert total == sum(len(a) for name, a in files.items() if name.endswith("_s2.npy"))
    assert any(key.startswith("tanzania-1_test_") for key in read_samples(phileo_bench_built / "test"))


@pytest.mark.parametrize(("layout", "compress"), [("zip", True), ("zip-split", False)])
def test_zip_layouts_are_bit_exact(tmp_path, layout, compress):
    files = make_phileo_bench_dataset(tmp_path / "in", layout=layout, compress=compress, with_coords=False, **SMALL)
    inputs = sorted((tmp_path / "in").iterdir())
    # one part of a split zip finds its siblings
    result = phileo_bench_build(inputs if layout == "zip" else inputs[:1], tmp_path / "out")
    assert result.exit_code == 0, result.output
    for split in ("train", "val", "test"):
        samples = read_samples(tmp_path / "out" / split)
        check_round_trip(samples, files, split, file_prefix=lambda name: f"{archive(layout, name)}/{ARCHIVE_DIR}/")


def archive(layout, name):
    if layout == "zip-split":
        return "phileo-downstream.zip"
    return "phileo-downstream-a.zip" if name.split("_", 1)[0] in ("europe",) else "phileo-downstream-b.zip"


def test_multi_part_file_reads_and_seeks_across_parts(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    paths = []
    for number, start in enumerate((0, 3000, 3001, 7000)):
        paths.append(tmp_path / f"x.zip.{number + 1:03d}")
        paths[-1].write_bytes(data[start : (3000, 3001, 7000, 10_000)[number]])
    with io.BufferedReader(MultiPartFile([str(p) for p in paths])) as file:
        assert file.read() == data
        file.seek(2990)
        assert file.read(20) == data[2990:3010]
        file.seek(-5, io.SEEK_END)
        assert file.read() == data[-5:]


def original_protocol(files, y, n, seed=12345):
    """The benchmark's protocol_fewshot_memmapped 'create' branch, restated on in-memory arrays."""
    out = {}
    for bucket, regions in REGION_BUCKETS.items():
        x_train_files = [f for r in regions for f in s2_names(files, r, "train")]
        y_train_files = [f.replace("s2", f"label_{y}") for f in x_train_files]
        x_val_files = [f.replace("train", "val") for f in x_train_files]
        y_val_files = [f.replace("train", "val") for f in y_train_files]
        if not x_train_files:
            continue
        y_train = np.concatenate([files[f] for f in y_train_files])
        y_val = np.concatenate([files[f] for f in y_val_files])
        x_val_len = sum(len(files[f]) for f in x_val_files)
        n_train, n_val = min(n, len(y_train)), min(int(np.ceil(n * 0.2)), x_val_len)
        train = random.Random(seed).sample(range(0, len(y_train)), n_train)
        val = random.Random(seed).sample(range(0, len(y_val)), n_val)
        sampler = random.Random(156)
        if y in ("roads", "building"):
            train, val = [], []
            for i in random.Random(seed).sample(range(0, len(y_train)), len(y_train)):
                if np.mean(y_train[i]) > 0.005 or sampler.random() > 0.75:
                    train.append(i)
                if len(train) == n_train:
                    break
            for i in random.Random(seed).sample(range(0, len(y_val)), len(y_val)):
                if np.mean(y_val[i]) > 0.01 or sampler.random() > 0.75:
                    val.append(i)
                if len(val) == n_val:
                    break
        out[bucket] = {"train_indices": train, "val_indices": val, "length_train": len(y_train),
                       "length_val": x_val_len}
    return out


def pool_key(files, bucket, split, index):
    """Key of pool position `index` of a bucket's split pool."""
    names = [f for r in REGION_BUCKETS[bucket] for f in s2_names(files, r, split)]
    for name in names:
        if index < len(files[name]):
            return next(k for k, v in expected_patches(files, split).items() if v == (name, index))
        index -= len(files[name])
    raise IndexError(index)


@pytest.fixture(scope="session")
def nshot_built(phileo_bench_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nshot") / "out"
    result = phileo_bench_build(phileo_bench_dir[0], out, "--task", "roads,buildings,landcover", "--n-shot", "5,30")
    assert result.exit_code == 0, result.output
    return out


def test_nshot_selection_is_the_benchmark_s(phileo_bench_dir, nshot_built):
    _, files = phileo_bench_dir
    for task, y in (("roads", "roads"), ("buildings", "building"), ("landcover", "lc")):
        for n in (5, 30):
            expected = original_protocol(files, y, n)
            for split in ("train", "val"):
                dataset = nshot_built / f"{task}-n{n}" / split
                selection = read_manifest(dataset)["selection"]
                assert (selection["task"], selection["n"], selection["method"], selection["seed"]) == \
                       (task, n, "seeded", 12345)
                assert selection["buckets"] == expected
                keys = {pool_key(files, b, split, i) for b, s in expected.items() for i in s[f"{split}_indices"]}
                samples = read_samples(dataset)
                assert set(samples) == keys
            if n == 5:  # pools hold 12..24 patches: exact counts n and ceil(0.2 n) per bucket
                for chosen in expected.values():
                    assert len(chosen["train_indices"]) == 5 and len(chosen["val_indices"]) == math.ceil(0.2 * 5)
    full_test = expected_patches(files, "test")
    assert set(read_samples(nshot_built / "test")) == set(full_test)
    assert any(key.startswith("tanzania-1_") for key in full_test)


def test_nshot_samples_equal_the_full_build_and_roads_prefer_roads(phileo_bench_built, nshot_built):
    full = {split: read_samples(phileo_bench_built / split) for split in ("train", "val")}
    for split in ("train", "val"):
        for key, sample in read_samples(nshot_built / "roads-n5" / split).items():
            np.testing.assert_array_equal(sample.arrays["s2_stack"], full[split][key].arrays["s2_stack"])
            assert sample.meta == full[split][key].meta
    chosen = read_samples(nshot_built / "roads-n5" / "train")
    chosen_mean = np.mean([s.arrays["label_roads"].mean() for s in chosen.values()])
    pool_mean = np.mean([s.arrays["label_roads"].mean() for s in full["train"].values()])
    assert chosen_mean > pool_mean


def test_nshot_build_is_deterministic_across_workers(phileo_bench_dir, nshot_built, tmp_path):
    result = phileo_bench_build(phileo_bench_dir[0], tmp_path / "again", "--task", "roads,landcover", "--n-shot", "5",
                         "--workers", "2")
    assert result.exit_code == 0, result.output
    for dataset in ("test", "roads-n5/train", "roads-n5/val", "landcover-n5/train"):
        assert shard_digests(tmp_path / "again" / dataset) == shard_digests(nshot_built / dataset)
        again, first = read_manifest(tmp_path / "again" / dataset), read_manifest(nshot_built / dataset)
        assert again.pop("build_args") != first.pop("build_args") and again == first  # other tasks, same dataset


def write_index(directory, name, buckets, date="01012024", n=3, task="roads"):
    directory.mkdir(exist_ok=True)
    path = directory / f"indices_{date}_128_10M_{task}_{n}.json"
    path.write_text(json.dumps(buckets))
    return path


HAND_PICKED = {"europe": {"train_indices": [23, 0, 7], "val_indices": [11],
                          "length_multi_array_train": 24, "length_multi_array_val": 12},
               "east-africa": {"train_indices": [5, 6, 19], "val_indices": [0],
                               "length_multi_array_train": 24, "length_multi_array_val": 12},
               "northwest-africa": {"train_indices": [1, 2, 3], "val_indices": [5],
                                    "length_multi_array_train": 12, "length_multi_array_val": 6},
               "japan": {"train_indices": [11, 10, 9], "val_indices": [2],
                         "length_multi_array_train": 12, "length_multi_array_val": 6}}


def test_indices_files_are_reproduced_exactly(phileo_bench_dir, tmp_path):
    _, files = phileo_bench_dir
    write_index(tmp_path / "idx", "a", HAND_PICKED)
    write_index(tmp_path / "idx", "b", HAND_PICKED, date="02022024")  # identical duplicate: fine
    result = phileo_bench_build(phileo_bench_dir[0], tmp_path / "out", "--task", "roads", "--n-shot", "3", "--indices",
                         str(tmp_path / "idx"))
    assert result.exit_code == 0, result.output
    for split in ("train", "val"):
        dataset = tmp_path / "out" / "roads-n3" / split
        selection = read_manifest(dataset)["selection"]
        assert (selection["method"], selection["indices_file"]) == ("indices", "indices_01012024_128_10M_roads_3.json")
        for bucket, chosen in HAND_PICKED.items():
            assert selection["buckets"][bucket]["train_indices"] == chosen["train_indices"]
        keys = {pool_key(files, b, split, i) for b, c in HAND_PICKED.items() for i in c[f"{split}_indices"]}
        assert set(read_samples(dataset)) == keys


@pytest.mark.parametrize(("change", "message"), [
    ("differ", "indices_01012024_128_10M_roads_3.json and indices_02022024_128_10M_roads_3.json"),
    ("length", "dataset version differs"),
    ("missing", "no indices_*_128_10M_roads_3.json"),
    ("range", "outside the pool"),
])
def test_bad_indices_files_are_one_line_errors(phileo_bench_dir, tmp_path, change, message):
    buckets = json.loads(json.dumps(HAND_PICKED))
    directory = tmp_path / "idx"
    directory.mkdir()
    if change == "differ":
        write_index(directory, "a", buckets)
        buckets["japan"]["val_indices"] = [3]
        write_index(directory, "b", buckets, date="02022024")
    elif change == "length":
        buckets["europe"]["length_multi_array_train"] = 25
        write_index(directory, "a", buckets)
    elif change == "range":
        buckets["japan"]["train_indices"] = [12]
        write_index(directory, "a", buckets)
    result = phileo_bench_build(phileo_bench_dir[0], tmp_path / "out", "--task", "roads", "--n-shot", "3", "--indices",
                         str(directory))
    assert result.exit_code == 2, result.output
    error = result.stderr.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1


def test_bad_input_goes_to_rejected_with_file_row_and_reason(tmp_path):
    root = tmp_path / "in"
    files = make_phileo_bench_dataset(root, bad_label_rows=["japan_1_0_train_label_roads"],
                                      bad_s2_shape=["europe_0_val_s2"], **SMALL)
    inexact = files["tanzania-1_0_test_label_building.npy"].astype(np.float64)
    inexact[0, 5, 5, 0] = 0.1  # not exact in float32
    np.save(root / "tanzania-1_0_test_label_building.npy", inexact)
    codes = files["tanzania-1_1_0_test_label_lc.npy"].astype(np.int16)
    codes[0, 0, 0, 0] = 300  # does not fit uint8
    np.save(root / "tanzania-1_1_0_test_label_lc.npy", codes)
    result = phileo_bench_build(root, tmp_path / "out")
    assert result.exit_code == 0, result.output
    rejected = {split: [json.loads(line) for line in (tmp_path / "out" / split / "rejected.jsonl").open()]
                for split in ("train", "val", "test")}
    assert [(r["file"], r["row"], r["key"]) for r in rejected["train"]] == \
           [("japan_1_0_train_label_roads.npy", row, f"japan_train_{3 + row:06d}") for row in range(3)]
    assert "has 2 rows, the s2 file has 3" in rejected["train"][0]["reason"]
    assert [(r["file"], r["row"]) for r in rejected["val"]] == [("europe_0_val_s2.npy", 0), ("europe_0_val_s2.npy", 1)]
    assert "expected uint16 (N, 128, 128, 10)" in rejected["val"][0]["reason"]
    assert sorted((r["file"], r["row"]) for r in rejected["test"]) == \
           [("tanzania-1_0_test_label_building.npy", 0), ("tanzania-1_1_0_test_label_lc.npy", 0)]
    for split in ("train", "val", "test"):  # every row written or rejected, once
        written = set(read_samples(tmp_path / "out" / split))
        lost = {r["key"] for r in rejected[split]}
        assert not written & lost and written | lost == set(expected_patches(files, split))
    strict = phileo_bench_build(root, tmp_path / "strict", "--strict")
    assert strict.exit_code == 1 and "rejected" in strict.stderr


def test_unknown_region_is_a_one_line_error(tmp_path):
    make_phileo_bench_dataset(tmp_path / "in", regions=("japan",), tiles_per_region=1,
                              patches={"train": 1, "val": 1, "test": 1})
    np.save(tmp_path / "in" / "atlantis_0_train_s2.npy", np.zeros((1, 128, 128, 10), np.uint16))
    result = phileo_bench_build(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 2
    assert "atlantis_0_train_s2.npy" in result.stderr and "unknown PhilEO Bench region" in result.stderr


def test_resume_after_a_partial_build_reproduces_every_shard(tmp_path):
    make_phileo_bench_dataset(tmp_path / "in", **SMALL)
    out = tmp_path / "out"
    assert phileo_bench_build(tmp_path / "in", out, "--shard-size", "300KB").exit_code == 0
    before = {split: (shard_digests(out / split), (out / split / "manifest.json").read_bytes())
              for split in ("train", "val", "test")}
    train = out / "train"
    assert len(before["train"][0]) > len(list((train / "units").glob("*.json")))  # several shards per unit
    (train / "manifest.json").unlink()
    (train / "units" / "000001.json").unlink()  # as if killed while writing unit 1
    for shard in (train / "shards").glob("000001-*.tar"):
        shard.rename(shard.with_name(shard.name + ".tmp"))
    result = phileo_bench_build(tmp_path / "in", out, "--shard-size", "300KB")
    assert result.exit_code == 0, result.output
    assert not list((train / "shards").glob("*.tmp"))
    for split, (digests, manifest) in before.items():
        assert shard_digests(out / split) == digests and (out / split / "manifest.json").read_bytes() == manifest
    other = phileo_bench_build(tmp_path / "in", out, "--shard-size", "200KB")
    assert other.exit_code == 2 and "other arguments" in other.stderr


def test_density_scale_is_detected_per_label_file(tmp_path):
    files = make_phileo_bench_dataset(tmp_path / "in", density_scale=100.0, regions=("japan",), tiles_per_region=1,
                                      patches={"train": 4, "val": 1, "test": 1})
    assert max(a.max() for n, a in files.items() if n.endswith("label_roads.npy")) == 100.0
    assert phileo_bench_build(tmp_path / "in", tmp_path / "auto").exit_code == 0
    check_round_trip(read_samples(tmp_path / "auto" / "train"), files, "train", scale=100)
    assert phileo_bench_build(tmp_path / "in", tmp_path / "one", "--density-scale", "1").exit_code == 0
    check_round_trip(read_samples(tmp_path / "one" / "train"), files, "train", scale=1)
    nshot = phileo_bench_build(tmp_path / "in", tmp_path / "nshot", "--task", "buildings", "--n-shot", "2")
    assert nshot.exit_code == 0, nshot.output
    for sample in read_samples(tmp_path / "nshot" / "buildings-n2" / "train").values():
        assert sample.meta["task_labels"]["buildings"]["density_scale"] == 100


def test_fixture_cli_and_installed_command(tmp_path):
    fixture = subprocess.run([sys.executable, "tools/phileo_bench_fixture.py", str(tmp_path / "in"), "--layout",
                              "zip-split", "--tiles", "1", "--train", "1", "--val", "1", "--test", "1",
                              "--regions", "japan,tanzania-1"], capture_output=True, text=True)
    assert fixture.returncode == 0, fixture.stderr
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [f"phileo-downstream.zip.00{i}" for i in (1, 2, 3)]
    build = subprocess.run(["phileo-shard", "build", "--source", "phileo-bench", "--input", str(tmp_path / "in"),
                            "--output", str(tmp_path / "out"), "--task", "landcover", "--n-shot", "1"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert build.stdout.strip().startswith("wrote 6 patches in ")  # 2 buckets x (1 train + 1 val) + 2 test
    assert sorted(read_samples(tmp_path / "out" / "test")) == ["japan_test_000000", "tanzania-1_test_000000"]


def test_options_of_the_other_source_are_refused(phileo_bench_dir, tmp_path):
    result = phileo_bench_build(phileo_bench_dir[0], tmp_path / "out", "--max-cloud", "10")
    assert result.exit_code == 2 and "--max-cloud is not used with --source phileo-bench" in result.stderr
    result = run_shard("build", "--input", str(phileo_bench_dir[0]), "--output", str(tmp_path / "m"), "--task", "roads")
    assert result.exit_code == 2 and "--task is not used with --source majortom" in result.stderr
    result = phileo_bench_build(phileo_bench_dir[0], tmp_path / "out", "--task", "roads")
    assert result.exit_code == 2 and "--task goes with --n-shot and/or --split-ratio" in result.stderr


def test_inspect_and_verify_work_on_phileo_bench_datasets(phileo_bench_built):
    shard = sorted((phileo_bench_built / "test" / "shards").glob("*.tar"))[0]
    result = run_shard("inspect", str(shard), "--max-samples", "1")
    assert result.exit_code == 0, result.output
    assert "region " in result.output and "B04 " in result.output
    assert run_shard("verify", str(phileo_bench_built / "test")).exit_code == 0
