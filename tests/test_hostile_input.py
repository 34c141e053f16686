"""Hostile and faulty input: nothing from data is executed, nothing leaves the dataset root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import read_manifest, run_shard
from training.cli import main as train_main
from training.data.shards import ShardSpecError, resolve_shards


def _copy_with_manifest(built, tmp_path, edit) -> str:
    """A copy of the built dataset whose manifest's first shard URL is replaced by `edit`."""
    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    manifest = read_manifest(dataset)
    manifest["shards"][0]["url"] = edit
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    return str(dataset)


@pytest.mark.parametrize("url", ["pipe:touch {marker}", "/etc/passwd", "../outside.tar", "shards/../../x.tar",
                                 "https://elsewhere.invalid/x.tar"])
def test_a_manifest_url_never_runs_a_command_nor_leaves_the_dataset(built, tmp_path, url):
    marker = tmp_path / "ran"
    dataset = _copy_with_manifest(built, tmp_path, url.format(marker=marker))
    with pytest.raises(ShardSpecError, match=r"manifest.json: shards\[0\]: "):
        resolve_shards(dataset)
    result = CliRunner().invoke(train_main, ["bench-data", "--shards", dataset, "--seconds", "1"])
    assert result.exit_code == 2 and "shards[0]" in result.output and not marker.exists()
    assert result.output.count("\n") == 1  # one line, no traceback
    verified = run_shard("verify", dataset)
    assert verified.exit_code != 0 and "shards[0]" in verified.output and not marker.exists()


def test_url_lists_and_patterns_refuse_other_schemes(built, tmp_path):
    marker = tmp_path / "ran"
    listing = tmp_path / "urls.txt"
    listing.write_text(f"shards/x.tar\npipe:touch {marker}\n")
    with pytest.raises(ShardSpecError, match=r"urls.txt line 2: 'pipe:touch .*never followed"):
        resolve_shards(str(listing))
    with pytest.raises(ShardSpecError, match="never followed"):
        resolve_shards(f"pipe:touch {marker}")
    listing.write_text("../../etc/passwd\n")
    with pytest.raises(ShardSpecError, match="leaves the dataset root"):
        resolve_shards(str(listing))
    assert not marker.exists()


def test_subset_refuses_an_index_that_points_out_of_the_dataset(built, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    table = pq.read_table(dataset / "index.parquet")
    shards = table.column("shard").to_pylist()
    column = table.schema.get_field_index("shard")
    pq.write_table(table.set_column(column, "shard", pa.array(["../../../etc/passwd"] + shards[1:])),
                   dataset / "index.parquet")
    result = run_shard("subset", str(dataset), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "leaves the dataset root" in result.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_second_command_into_a_locked_output_is_refused_and_a_stale_lock_taken_over(majortom, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out / ".phileo-shard.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0}))
        for args in (("build", "--input", str(majortom[0]), "--output", str(out)),
                     ("build", "--source", "phileo-bench", "--input", str(tmp_path), "--output", str(out))):
            refused = run_shard(*args)
            assert refused.exit_code == 2 and f"in use by pid {holder.pid}" in refused.output, refused.output
        assert lock.exists() and not (out / "build.json").exists()  # the holder's lock and output untouched
    finally:
        holder.kill()
        holder.wait()
    built = run_shard("build", "--input", str(majortom[0]), "--output", str(out))  # the holder is gone: stale
    assert built.exit_code == 0, built.output
    assert not lock.exists() and read_manifest(out)["totals"]["samples"] == len(majortom[1])
    assert os.listdir(out) and not [name for name in os.listdir(out) if name.endswith(".lock")]


def test_s3_staging_is_private_and_new_for_every_run(tmp_path, monkeypatch):
    import os
    import stat

    from sharding.build.remote_output import staging_dir

    monkeypatch.setenv("PHILEO_STAGING_DIR", str(tmp_path / "staging"))
    first, second = staging_dir("s3://bucket/prefix"), staging_dir("s3://bucket/prefix")
    assert first != second and first.parent == second.parent == tmp_path / "staging"
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o700 and not first.is_symlink()


@pytest.mark.parametrize(("extra", "message"), [
    (("--start", "2021-01-01", "--end", "2020-01-01"), "--start 2021-01-01 is after --end 2020-01-01"),
    (("--bbox", "10,10,11,11"), "the filters keep none of the 12 listed tiles"),
    (("--max-cloud", "0", "--max-nodata", "0", "--limit", "1", "--grid-cells", "{cells}"),
     "the filters keep none"),
])
def test_filters_that_keep_nothing_are_an_error_not_an_empty_dataset(majortom, tmp_path, extra, message):
    cells = tmp_path / "cells.txt"
    cells.write_text("999U_999R\n")
    out = tmp_path / "out"
    args = [a.format(cells=cells) for a in extra]
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (out / "manifest.json").exists() and not (out / "build.json").exists()
    if "--bbox" in extra:
        allowed = run_shard("build", "--input", str(majortom[0]), "--output", str(out), *args, "--allow-empty")
        assert allowed.exit_code == 0 and read_manifest(out)["totals"]["samples"] == 0


def test_inputs_with_nothing_readable_are_an_error(tmp_path):
    source = tmp_path / "in" / "images"
    source.mkdir(parents=True)
    (source / "part_00000.parquet").write_bytes(b"")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"other": [1, 2]}), source / "part_00001.parquet")
    result = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no readable tile" in result.output, result.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_build_whose_every_row_is_rejected_writes_no_dataset(tmp_path):
    from tools.majortom_fixture import make_majortom_dataset

    make_majortom_dataset(tmp_path / "in", num_files=1, rows_per_file=2, corrupt=[(0, 0, "B04"), (0, 1, "B02")])
    out = tmp_path / "out"
    result = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(out))
    assert result.exit_code == 2 and "every planned tile was rejected" in result.output, result.output
    assert not (out / "manifest.json").exists()
    allowed = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(out), "--allow-empty")
    assert allowed.exit_code == 0 and read_manifest(out)["totals"]["samples"] == 0


def _rewrite_first_meta(shard, meta_bytes) -> None:
    """Rewrite `shard` with its first sample's meta.json replaced by `meta_bytes` (or by what that function
    makes of the original); the manifest's sha256 then differs."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read()))
    first_meta = next(info.name for info, _ in members if info.name.endswith(".meta.json"))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == first_meta:
                data = meta_bytes(data) if callable(meta_bytes) else meta_bytes
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _with_bad_shape(meta: bytes) -> bytes:
    values = json.loads(meta)
    values["shape"] = "120x120"
    return json.dumps(values).encode()


@pytest.mark.parametrize(("meta", "reason"), [(b"[1, 2]", "holds a JSON list, expected an object"),
                                              (b"{not json", "not valid UTF-8 JSON"),
                                              (_with_bad_shape, "shape is '120x120', expected [height, width]")])
def test_a_malformed_sample_is_counted_by_every_reader_never_a_crash(built, tmp_path, meta, reason):
    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    shard = dataset / read_manifest(dataset)["shards"][0]["url"]
    _rewrite_first_meta(shard, meta)
    verified = run_shard("verify", str(dataset))
    assert verified.exit_code == 1 and "Traceback" not in verified.output
    inspected = run_shard("inspect", str(shard), "--max-samples", "3")
    assert inspected.exit_code == 1 and reason in inspected.output and "Traceback" not in inspected.output
    assert inspected.output.count("bad: ") == 1  # the other samples are summarised
    bench = ["bench-data", "--shards", str(dataset), "--seconds", "1", "--crop-size", "64", "--num-workers", "0"]
    lenient = CliRunner().invoke(train_main, [*bench, "--max-bad-fraction", "0.5"])
    assert lenient.exit_code == 0, lenient.output
    strict = CliRunner().invoke(train_main, [*bench, "--max-bad-fraction", "0"])
    assert strict.exit_code == 1 and "planned tiles unreadable" in strict.output and shard.name in strict.output
    assert "Traceback" not in strict.output


def test_empty_and_missing_shards_are_named_not_none_recorded(built, tmp_path):
    import tarfile

    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    shards = read_manifest(dataset)["shards"]
    with tarfile.open(dataset / shards[0]["url"], "w"):
        pass  # an empty tar where samples were
    (dataset / shards[1]["url"]).unlink()
    result = CliRunner().invoke(train_main, ["bench-data", "--shards", str(dataset), "--seconds", "1",
                                             "--crop-size", "64", "--num-workers", "0", "--max-bad-fraction", "0"])
    assert result.exit_code == 1 and "none recorded" not in result.output, result.output
    assert Path(shards[0]["url"]).name in result.output or Path(shards[1]["url"]).name in result.output
    inspected = run_shard("inspect", str(dataset), "--max-samples", "100")
    assert inspected.exit_code == 1 and "unreadable shard" in inspected.output and "Traceback" not in inspected.output


def test_tiles_smaller_than_the_crop_fail_clearly_instead_of_looping(built):
    result = CliRunner().invoke(train_main, ["bench-data", "--shards", str(built), "--seconds", "1",
                                             "--num-workers", "0", "--crop-size", "128"])  # 120 px tiles
    assert result.exit_code == 1 and "planned tiles unreadable" in result.output, result.output


def test_a_resume_says_when_the_input_gained_files_after_planning(tmp_path, caplog):
    import os
    import time

    from tools.majortom_fixture import make_majortom_dataset

    make_majortom_dataset(tmp_path / "in", num_files=2, rows_per_file=2)
    first = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert first.exit_code == 0, first.output
    added = tmp_path / "in" / "images" / "part_00003.parquet"
    shutil.copy(tmp_path / "in" / "images" / "part_00001.parquet", added)
    later = time.time() + 5
    os.utime(added, (later, later))
    caplog.set_level("WARNING")
    again = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert again.exit_code == 0 and "1 parquet file(s) under --input changed or appeared" in caplog.text
    assert "part_00003.parquet" in caplog.text and read_manifest(tmp_path / "out")["totals"]["samples"] == 4


@pytest.mark.parametrize("column", ["product_id", "B04"])  # read while planning / while building the unit
def test_a_corrupt_row_group_rejects_only_its_own_row(tmp_path, column):
    import pyarrow.parquet as pq

    from tools.majortom_fixture import make_majortom_dataset

    rows = make_majortom_dataset(tmp_path / "in", num_files=1, rows_per_file=3, rows_per_row_group=1)
    path = tmp_path / "in" / "images" / "part_00001.parquet"
    group = pq.ParquetFile(path).metadata.row_group(1)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == column)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset
    data[start: start + 64] = b"\xff" * 64  # garbage where row group 1's page header of `column` is
    path.write_bytes(bytes(data))
    result = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["row"], "row group 1" in r["reason"]) for r in rejected] == [(1, True)], rejected
    assert read_manifest(tmp_path / "out")["totals"]["samples"] == len(rows) - 1


def _edit_metadata(root, edit) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "metadata.parquet").to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows), root / "metadata.parquet")


def test_metadata_out_of_range_or_elsewhere_is_rejected_with_the_reason(tmp_path):
    from tools.majortom_fixture import make_majortom_dataset

    make_majortom_dataset(tmp_path / "in", num_files=1, rows_per_file=4)

    def corrupt(rows):
        rows[0]["cloud_cover"] = 1e308
        rows[1]["nodata"] = -5.0
        rows[2]["centre_lat"] = -rows[2]["centre_lat"]  # the other hemisphere
    _edit_metadata(tmp_path / "in", corrupt)
    result = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--bbox",
                       "-180,-90,180,90")
    assert result.exit_code == 0, result.output
    reasons = {r["row"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").open())}
    assert "cloud_cover 1e+308 outside 0..100" in reasons[0] and "nodata -5.0 outside 0..1" in reasons[1]
    assert "degrees from grid cell" in reasons[2] and sorted(reasons) == [0, 1, 2]
    import pyarrow.parquet as pq

    cloud = pq.read_table(tmp_path / "out" / "index.parquet").column("cloud_cover").to_pylist()
    assert len(cloud) == 1 and 0 <= cloud[0] <= 100


def test_metadata_cannot_keep_a_tile_whose_pixels_fail_the_filter(tmp_path):
    from tools.majortom_fixture import make_majortom_dataset

    rows = make_majortom_dataset(tmp_path / "in", num_files=2, rows_per_file=3)
    _edit_metadata(tmp_path / "in", lambda entries: [entry.update(cloud_cover=0.0) for entry in entries])
    result = run_shard("build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--max-cloud", "10", "--allow-empty")
    assert result.exit_code == 0, result.output
    clear = sum(row["cloud_cover"] <= 10 for row in rows)  # the fixture records the pixels' own cover
    assert clear < len(rows) and read_manifest(tmp_path / "out")["totals"]["samples"] == clear


@pytest.fixture
def small_disk(tmp_path, built):
    """A tmpfs of 60% of the `built` dataset's shard bytes (needs root and mount, as in CI)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    size_kb = int(0.6 * read_manifest(built)["totals"]["bytes"]) // 1024
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_clear_error_leaves_no_temp_files_and_a_rerun_recovers(majortom, built, small_disk):
    import subprocess

    out = small_disk / "out"
    args = ("build", "--input", str(majortom[0]), "--output", str(out), "--shard-size", "300KB", "--mix-files", "2")
    filler = small_disk / "filler"
    with open(filler, "wb") as file:  # no room even for the plan
        with pytest.raises(OSError):
            while True:
                file.write(bytes(64 << 10))
                file.flush()
    planless = run_shard(*args)
    assert planless.exit_code == 1 and "No space left on device; fix that and rerun" in planless.output
    assert "Traceback" not in planless.output and f"error: {out}/" in planless.output
    filler.unlink()
    full = run_shard(*args)
    assert full.exit_code == 1 and "No space left on device" in full.output, full.output
    assert "Traceback" not in full.output
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))  # nothing half-written keeps the disk full
    finished = [json.loads(path.read_text()) for path in (out / "units").glob("*.json")]
    written = sum(unit["written"] for unit in finished)
    assert finished and written and f"wrote {written} tiles" in full.output, full.output  # counted truthfully
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    again = run_shard(*args)
    assert again.exit_code == 0, again.output
    keys = [raw.key for shard in read_manifest(out)["shards"] for raw in _tar_samples(out / shard["url"])]
    expected = [raw.key for shard in read_manifest(built)["shards"] for raw in _tar_samples(built / shard["url"])]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))


def _tar_samples(path):
    from sharding.dataset.tarread import iter_tar_samples

    return list(iter_tar_samples(path))


def test_flipped_bytes_inside_a_member_are_a_bad_sample_not_wrong_pixels(built, tmp_path):
    import tarfile

    from phileo.schema import SchemaError, decode_sample
    from sharding.dataset.tarread import iter_tar_samples

    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    shard = dataset / read_manifest(dataset)["shards"][0]["url"]
    with tarfile.open(shard) as tar:
        member = next(info for info in tar if info.name.endswith(".s2_10m.b2nd"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x40  # one bit, in the middle of the compressed bands
    shard.write_bytes(bytes(data))
    first = next(iter(iter_tar_samples(shard)))
    with pytest.raises(SchemaError, match=r"s2_10m.b2nd: xxh3 [0-9a-f]{16}, meta.json says [0-9a-f]{16}"):
        decode_sample(first.key, first.members)
    inspected = run_shard("inspect", str(shard), "--max-samples", "2")
    assert inspected.exit_code == 1 and "corrupt member" in inspected.output
    strict = CliRunner().invoke(train_main, ["bench-data", "--shards", str(dataset), "--seconds", "1",
                                             "--crop-size", "64", "--num-workers", "0", "--max-bad-fraction", "0"])
    assert strict.exit_code == 1 and shard.name in strict.output, strict.output
