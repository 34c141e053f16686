"""`phileo-shard subset / split / coverage`: queries over index.parquet, byte copies, spatial hold-out, maps."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sharding.dataset.coverage import latitude_band_counts
from sharding.dataset.query import parse_where
from sharding.dataset.split import SplitArgs, _assign, block_of
from sharding.dataset.tarread import iter_tar_samples
from sharding.errors import InputError
from tests.conftest import read_manifest, run_shard
from tools.majortom_fixture import make_majortom_dataset
from training.data.shards import count_tar_samples, resolve_shards

KM_PER_DEGREE = 111.32  # of the equator; the tests' own footprint maths
HALF_TILE_KM = 5.4  # half of a real MajorTOM tile (10.68 km): fixture tiles are smaller, footprints are not


def index_rows(dataset):
    return pq.read_table(dataset / "index.parquet").to_pylist()


def raw_at(dataset, row) -> bytes:
    """The tar bytes an index row points at (headers, data, padding of every member of the sample)."""
    with open(dataset / row["shard"], "rb") as file:
        file.seek(row["offset"])
        return file.read(row["bytes"])


def members(dataset) -> dict:
    return {s.key: s.members for shard in read_manifest(dataset)["shards"]
            for s in iter_tar_samples(dataset / shard["url"])}


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# --- subset ------------------------------------------------------------------------------------------------

def test_subset_copies_selected_samples_byte_for_byte_and_verifies(built, tmp_path):
    where = "cloud_cover < 50 and centre_lat > 0"
    source = index_rows(built)
    expected = {r["key"] for r in source if r["cloud_cover"] < 50 and r["centre_lat"] > 0}
    assert 1 < len(expected) < len(source)  # the query really selects
    out = tmp_path / "sub"
    result = run_shard("subset", str(built), "--where", where, "--shard-size", "1", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert f"selected {len(expected)} of {len(source)} samples" in result.output
    rows = index_rows(out)
    assert {r["key"] for r in rows} == expected and len(rows) == len(expected)
    by_key = {r["key"]: r for r in source}
    for row in rows:  # the bytes at the new offsets are the source bytes, unchanged
        assert row["bytes"] == by_key[row["key"]]["bytes"]
        assert raw_at(out, row) == raw_at(built, by_key[row["key"]])
        assert {k: v for k, v in row.items() if k not in ("shard", "offset")} == \
            {k: v for k, v in by_key[row["key"]].items() if k not in ("shard", "offset")}
    source_members = members(built)
    copied = members(out)
    assert copied == {key: source_members[key] for key in expected}
    manifest = read_manifest(out)
    assert manifest["totals"]["samples"] == len(expected) and manifest["totals"]["shards"] == len(expected)
    assert manifest["totals"]["filtered"] == len(source) - len(expected)
    assert manifest["derived_from"]["query"]["where"] == where
    assert manifest["derived_from"]["dataset"] == str(built.resolve())
    assert manifest["band_stats"] == read_manifest(built)["band_stats"]
    verified = run_shard("verify", str(out))
    assert verified.exit_code == 0 and f"ok: {len(expected)} samples verified" in verified.output, verified.output


def test_subset_manifest_is_read_by_the_training_shard_resolver(built, tmp_path):
    out = tmp_path / "sub"
    result = run_shard("subset", str(built), "--where", "centre_lon < 0", "--shard-size", "120KB", "--output",
                       str(out))
    assert result.exit_code == 0, result.output
    expected = sum(1 for r in index_rows(built) if r["centre_lon"] < 0)
    for spec in (str(out), str(out / "manifest.json")):
        shards = resolve_shards(spec)
        assert len(shards) == read_manifest(out)["totals"]["shards"] > 1
        assert sum(s.samples for s in shards) == expected
        for shard in shards:  # counts from the manifest agree with the tar headers
            assert shard.samples == count_tar_samples(shard.url)


def test_subset_bbox_and_inclusive_time_range(built, tmp_path):
    source = index_rows(built)
    north_east = sorted((r for r in source if r["centre_lat"] > 0 and r["centre_lon"] > 0),
                        key=lambda r: r["timestamp"])
    start, end = north_east[0]["timestamp"][:10], north_east[1]["timestamp"][:10]  # end: a date, whole day
    expected = {r["key"] for r in north_east if start <= r["timestamp"][:10] <= end}
    assert len(expected) >= 2
    out = tmp_path / "sub"
    result = run_shard("subset", str(built), "--bbox", "0,0,180,90", "--start", start, "--end", end,
                       "--output", str(out))
    assert result.exit_code == 0, result.output
    assert {r["key"] for r in index_rows(out)} == expected
    query = read_manifest(out)["derived_from"]["query"]
    assert query == {"where": None, "bbox": [0.0, 0.0, 180.0, 90.0], "start": start, "end": end}
    moment = north_east[1]["timestamp"]  # a full time: inclusive to the second
    for end_time, included in ((moment, True), (moment.replace("Z", "+01:00"), False)):
        out = tmp_path / f"until-{included}"
        result = run_shard("subset", str(built), "--bbox", "0,0,180,90", "--end", end_time, "--output", str(out))
        assert result.exit_code == 0, result.output
        assert (north_east[1]["key"] in {r["key"] for r in index_rows(out)}) is included, end_time


def test_where_expressions_select_like_python():
    table = pa.table({"a": [-2.0, 0.5, 1.0, 3.0, 4.0, 7.0], "b": ["x", "y", "x", "z", "y", "x"],
                      "n": pa.array([1, 2, 3, 4, 5, 6], pa.int64())})
    rows = table.to_pylist()
    cases = {
        "a < 3 and not (b == 'x')": lambda r: r["a"] < 3 and r["b"] != "x",
        "1 <= a < 4": lambda r: 1 <= r["a"] < 4,
        "b in ('x', 'y') and n > 2 or a >= 7": lambda r: (r["b"] in ("x", "y") and r["n"] > 2) or r["a"] >= 7,
        "a >= -1.5 and b not in ['x']": lambda r: r["a"] >= -1.5 and r["b"] not in ["x"],
        "not (n != 3)": lambda r: r["n"] == 3,
        "2 < n": lambda r: 2 < r["n"],
        "a > n": lambda r: r["a"] > r["n"],
    }
    for text, python in cases.items():
        got = table.filter(parse_where(text, table.schema)).column("n").to_pylist()
        assert got == [r["n"] for r in rows if python(r)], text


@pytest.mark.parametrize("where, message", [
    ("cloud_cover <", "syntax error"),
    ("clouds < 10", "unknown column 'clouds'"),
    ("__import__('os').system('true')", "is not a condition"),
    ("cloud_cover < len('ab')", "is not allowed"),
    ("cloud_cover + 1 < 5", "is not allowed"),
    ("cloud_cover", "is not a condition"),
    ("cloud_cover < 'ten'", "expected a number"),
    ("grid_cell > 5", "expected a quoted string"),
    ("cloud_cover is None", "operator Is is not allowed"),
    ("cloud_cover > 1000", "selects none of the 12 samples"),
])
def test_bad_where_is_one_line_error_naming_the_expression(built, tmp_path, where, message):
    out = tmp_path / "sub"
    result = run_shard("subset", str(built), "--where", where, "--output", str(out))
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert line.startswith(f"error: --where {where!r}") and message in line, line
    assert not (out / "manifest.json").exists()


def test_subset_refuses_existing_output_and_stale_index(built, tmp_path):
    out = tmp_path / "sub"
    assert run_shard("subset", str(built), "--where", "centre_lat > 0", "--output", str(out)).exit_code == 0
    again = run_shard("subset", str(built), "--where", "centre_lat < 0", "--output", str(out))
    assert again.exit_code == 2 and "add --overwrite" in error_line(again)
    replaced = run_shard("subset", str(built), "--where", "centre_lat < 0", "--output", str(out), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert all(r["centre_lat"] < 0 for r in index_rows(out))
    itself = run_shard("subset", str(built), "--output", str(built))
    assert itself.exit_code == 2 and "is the source dataset" in error_line(itself)
    stale = tmp_path / "stale"  # a source whose index points one sample off: an error, not a corrupt copy
    (stale / "shards").mkdir(parents=True)
    for name in ("manifest.json", *(s["url"] for s in read_manifest(built)["shards"])):
        (stale / name).write_bytes((built / name).read_bytes())
    table = pq.read_table(built / "index.parquet")
    offsets = table.column("offset").to_pylist()
    shifted = [o + table.column("bytes")[0].as_py() if n == 0 else o for n, o in enumerate(offsets)]
    pq.write_table(table.set_column(2, "offset", pa.array(shifted, pa.int64())), stale / "index.parquet")
    broken = run_shard("subset", str(stale), "--output", str(tmp_path / "from_stale"))
    assert broken.exit_code == 2 and "does not match the member" in error_line(broken)
    assert not (tmp_path / "from_stale" / "manifest.json").exists()
    assert not list((tmp_path / "from_stale" / "shards").glob("*.tmp"))


# --- split -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """100 tiles on a contiguous 10 x 10 block of MajorTOM cells (~100 km a side, adjacent cells 10 km apart)."""
    root = tmp_path_factory.mktemp("spread")
    make_majortom_dataset(root / "src", num_files=4, rows_per_file=25, tile_size=12,
                          cells=["454U_120R", "454U_125R", "459U_120R", "459U_125R"])
    result = run_shard("build", "--input", str(root / "src"), "--output", str(root / "ds"), "--shard-size", "60KB",
                       "--mix-files", "4")
    assert result.exit_code == 0, result.output
    return root / "ds"


def run_split(dataset, out, *extra):
    result = run_shard("split", str(dataset), "--output-train", str(out / "train"), "--output-val", str(out / "val"),
                       "--val-fraction", "0.2", "--block-km", "40", *extra)
    assert result.exit_code == 0, result.output
    return result


def footprints(rows) -> np.ndarray:
    lat = np.array([r["centre_lat"] for r in rows])
    lon = np.array([r["centre_lon"] for r in rows])
    dlat = HALF_TILE_KM / KM_PER_DEGREE
    dlon = HALF_TILE_KM / (KM_PER_DEGREE * np.cos(np.radians(lat)))
    return np.stack([lon - dlon, lat - dlat, lon + dlon, lat + dlat], 1)


def overlapping_pairs(rows_a, rows_b) -> int:
    a, b = footprints(rows_a)[:, None, :], footprints(rows_b)[None, :, :]
    overlap = (a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])
    return int(overlap.sum())


def test_split_val_never_overlaps_train_and_counts_add_up(spread, tmp_path):
    result = run_split(spread, tmp_path)
    source, train, val = index_rows(spread), index_rows(tmp_path / "train"), index_rows(tmp_path / "val")
    assert train and val
    assert overlapping_pairs(train, val) == 0
    keys = {r["key"] for r in source}
    train_keys, val_keys = {r["key"] for r in train}, {r["key"] for r in val}
    assert not train_keys & val_keys and (train_keys | val_keys) <= keys
    counts = read_manifest(tmp_path / "val")["derived_from"]["counts"]
    assert counts == read_manifest(tmp_path / "train")["derived_from"]["counts"]
    dropped = counts["dropped_train_side"] + counts["dropped_val_side"]
    assert dropped > 0 and len(train) + len(val) + dropped == len(source) == counts["input"]
    assert (counts["train"], counts["val"]) == (len(train), len(val))
    assert f"dropped {dropped} within 12 km" in result.output
    assert 0 < len(val) / (len(train) + len(val)) < 0.5
    val_blocks = {tuple(b) for b in read_manifest(tmp_path / "val")["derived_from"]["parameters"]["val_blocks"]}

    def block(row):  # whole blocks: the test's own equal-area block maths
        x = row["centre_lon"] * math.cos(math.radians(row["centre_lat"])) * KM_PER_DEGREE
        return math.floor(row["centre_lat"] * KM_PER_DEGREE / 40), math.floor(x / 40)

    assert all(block(r) in val_blocks for r in val) and not any(block(r) in val_blocks for r in train)
    for side in ("train", "val"):
        verified = run_shard("verify", str(tmp_path / side))
        assert verified.exit_code == 0, verified.output
        assert sum(s.samples for s in resolve_shards(str(tmp_path / side))) == len(index_rows(tmp_path / side))


def test_split_without_buffer_would_overlap(spread, tmp_path):
    """The overlap check above can fail: with no buffer, adjacent tiles straddle train/val block edges."""
    run_split(spread, tmp_path, "--buffer-km", "0")
    train, val = index_rows(tmp_path / "train"), index_rows(tmp_path / "val")
    assert len(train) + len(val) == len(index_rows(spread))
    assert overlapping_pairs(train, val) > 0


def test_split_is_deterministic_for_a_seed(spread, tmp_path):
    def outcome(name, seed):
        run_split(spread, tmp_path / name, "--seed", str(seed))
        return [([r["key"] for r in index_rows(tmp_path / name / side)],
                 [s["sha256"] for s in read_manifest(tmp_path / name / side)["shards"]]) for side in ("train", "val")]

    first = outcome("a", 0)
    assert outcome("b", 0) == first
    assert any(outcome(f"s{seed}", seed)[1][0] != first[1][0] for seed in (1, 2, 3))


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_split_val_fraction_is_roughly_honoured(fraction):
    """On a dense synthetic layout (index only): the kept val share is close to the requested one."""
    rng = np.random.default_rng(7)
    lat, lon = rng.uniform(30, 60, 40_000), rng.uniform(-10, 40, 40_000)
    args = SplitArgs("in", "train", "val", val_fraction=fraction, block_km=100.0)
    rows, cols = block_of(lat, lon, args.block_km)
    blocks, inverse = np.unique(np.stack([rows, cols], 1), axis=0, return_inverse=True)
    _, is_val, drop = _assign(lat, lon, blocks, inverse.reshape(-1), args)
    share = (is_val & ~drop).sum() / (~drop).sum()
    assert abs(share - fraction) < 0.25 * fraction, share
    assert drop.mean() < 6 * fraction + 0.01


@pytest.mark.parametrize("extra, message", [
    (["--val-fraction", "0.7"], "--val-fraction 0.7: expected a fraction in (0, 0.5]"),
    (["--block-km", "20"], "--block-km 20: expected more than twice --buffer-km"),
    (["--shard-size", "lots"], "--shard-size 'lots'"),
])
def test_bad_split_options_are_one_line_errors(built, tmp_path, extra, message):
    result = run_shard("split", str(built), "--output-train", str(tmp_path / "t"), "--output-val",
                       str(tmp_path / "v"), *extra)
    assert result.exit_code == 2 and error_line(result).startswith(f"error: {message}"), result.output
    same = run_shard("split", str(built), "--output-train", str(tmp_path / "t"), "--output-val", str(tmp_path / "t"))
    assert same.exit_code == 2 and "same directory as --output-train" in error_line(same)


# --- coverage ----------------------------------------------------------------------------------------------

def test_coverage_writes_png_and_band_counts(built, tmp_path):
    png = tmp_path / "maps" / "coverage.png"
    result = run_shard("coverage", str(built), "--out", str(png))
    assert result.exit_code == 0, result.output
    source = index_rows(built)
    assert f"{len(source)} samples in" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.width > 600 and image.height > 400
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    counts = json.loads(png.with_suffix(".json").read_text())
    expected = {f"{s}..{s + 10}": 0 for s in range(-90, 90, 10)}
    for row in source:
        south = math.floor(row["centre_lat"] / 10) * 10
        expected[f"{south}..{south + 10}"] += 1
    assert counts["lat_bands"] == expected and list(counts["lat_bands"]) == list(expected)
    assert counts["samples"] == len(source) == sum(counts["months"].values())
    month_of = [int(r["timestamp"][5:7]) for r in source]
    assert [counts["months"][m] for m in ("Jan", "Jun", "Dec")] == [month_of.count(m) for m in (1, 6, 12)]
    cloud = [min(int(r["cloud_cover"] // 10), 9) for r in source]
    assert counts["cloud_cover_histogram"] == [cloud.count(b) for b in range(10)]


def test_latitude_bands_hold_their_southern_edge():
    counts = latitude_band_counts(np.array([-90.0, -80.0, -0.5, 0.0, 9.99, 10.0, 89.9, 90.0]))
    assert counts["-90..-80"] == 1 and counts["-80..-70"] == 1 and counts["-10..0"] == 1
    assert counts["0..10"] == 2 and counts["10..20"] == 1 and counts["80..90"] == 2 and sum(counts.values()) == 8


def test_coverage_bad_out_is_one_line_error(built, tmp_path):
    result = run_shard("coverage", str(built), "--output", str(tmp_path / "map.jpg"))
    assert result.exit_code == 2 and error_line(result).startswith("error: --output "), result.output
    missing = run_shard("coverage", str(tmp_path / "nothing"), "--out", str(tmp_path / "map.png"))
    assert missing.exit_code == 2 and "no manifest.json" in error_line(missing)


def test_input_error_is_raised_not_printed_by_the_library(built):
    from sharding.dataset.subset import SubsetArgs, subset

    with pytest.raises(InputError, match="unknown column 'nope'"):
        subset(SubsetArgs(str(built), "/nonexistent/never-created", where="nope > 1"))
