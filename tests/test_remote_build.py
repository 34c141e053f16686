"""`phileo-shard build` from HTTP / S3 inputs into S3 outputs, against real servers on 127.0.0.1.

An HTTP server with Range support (and optional 429/500 faults) serves the fixture; SeaweedFS
(tools/s3_server.py) is the S3 endpoint. Every remote build must give the shards of the local
build byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phileo.remote import retry_after_s
from sharding.sources import remote
from sharding.sources.remote import RemoteUnavailable, is_transient, with_retries
from tests.conftest import read_manifest, run_shard
from tests.range_server import serve
from tests.s3_server import S3ServerError, SeaweedS3
from training.data import remote as training_remote

BUILD_ARGS = ("--shard-size", "300KB", "--mix-files", "2")  # as the `built` fixture
FOOTER_KB = 64  # fixture files are < 1 MB: a smaller footer sample so row groups are fetched by range


@pytest.fixture
def http(majortom):
    """(base URL, state) of a Range server over the fixture; state["fail_every"] turns faults on."""
    with serve(majortom[0]) as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def built_from_metadata(majortom, tmp_path_factory) -> Path:
    """The local build planned from the fixture's metadata.parquet (est. tile sizes, so other units than
    `built`): what a --metadata build over HTTP or S3 must equal byte for byte."""
    out = tmp_path_factory.mktemp("built-metadata") / "ds"
    result = run_shard("build", "--metadata", str(majortom[0] / "metadata.parquet"), "--input", str(majortom[0]),
                       "--output", str(out), *BUILD_ARGS)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    try:
        with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
            yield server
    except S3ServerError as error:  # pragma: no cover (environment without weed)
        pytest.fail(f"SeaweedFS did not start: {error}")


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PHILEO_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
    monkeypatch.setattr(remote, "FOOTER_BYTES", FOOTER_KB << 10)
    return s3


def s3_objects(s3: SeaweedS3, prefix: str) -> dict[str, bytes]:
    return s3.objects(prefix)


def assert_same_dataset_on_s3(s3: SeaweedS3, prefix: str, local: Path) -> dict[str, bytes]:
    """The S3 dataset's manifest lists the local build's shards and every shard object hashes to it."""
    objects = s3_objects(s3, prefix)
    manifest = json.loads(objects["manifest.json"])
    expected = [(s["url"], s["sha256"]) for s in read_manifest(local)["shards"]]
    assert [(s["url"], s["sha256"]) for s in manifest["shards"]] == expected
    shards = {name: data for name, data in objects.items() if name.startswith("shards/")}
    assert sorted(shards) == [url for url, _ in expected]  # nothing partial or extra under shards/
    for url, digest in expected:
        assert hashlib.sha256(shards[url]).hexdigest() == digest
    assert (local / "index.parquet").read_bytes() == objects["index.parquet"]
    return objects


def row_group_bytes(path: Path, columns: set[str]) -> int:
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema in columns)


def test_http_metadata_build_into_s3_is_byte_identical_and_reads_each_tile_once(majortom, built_from_metadata, http,
                                                                                s3_env):
    base, state = http
    result = run_shard("build", "--metadata", f"{base}/metadata.parquet", "--input", base,
                       "--output", s3_env.url("from-http"), *BUILD_ARGS)
    assert result.exit_code == 0, result.output
    assert_same_dataset_on_s3(s3_env, "from-http", built_from_metadata)
    files = sorted((majortom[0] / "images").glob("*.parquet"))
    tiles = sum(row_group_bytes(f, set(pq.ParquetFile(f).schema_arrow.names) - {"thumbnail"}) for f in files)
    gets = [get for get in state["gets"] if get[0].startswith("part_")]
    footer_gets = [get for get in gets if get[2] == get[3]]  # ranges that end at the end of the file
    served = sum(end - start for _, start, end, size in gets if end != size)
    units = json.loads(s3_objects(s3_env, "from-http")["build.json"])["units"]
    # every tile's chunks fetched once (+ the small thumbnail between the id and band columns) ...
    assert tiles <= served <= 1.1 * tiles, (served, tiles)
    assert len(gets) - len(footer_gets) == sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    # ... plus one footer sample per file for the whole build (the units share the cached footers)
    assert all(end - start == FOOTER_KB << 10 for _, start, end, _ in footer_gets)
    assert sorted(get[0] for get in footer_gets) == sorted(f.name for f in files), (footer_gets, units)


def test_metadata_filters_first_then_reads_only_the_selected_files_and_row_groups(majortom, http, tmp_path,
                                                                                  monkeypatch):
    base, state = http
    monkeypatch.setattr(remote, "FOOTER_BYTES", FOOTER_KB << 10)
    bbox = ("--bbox", "0,0,180,90")  # the fixture has one file per quadrant: only the north-east one is kept
    local = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "a"), *bbox)
    assert local.exit_code == 0, local.output
    kept = pq.read_table(tmp_path / "a" / "index.parquet").column("key").to_pylist()
    assert 0 < len(kept) < len(majortom[1])
    result = run_shard("build", "--metadata", f"{base}/metadata.parquet", "--input", base,
                       "--output", str(tmp_path / "b"), *bbox)
    assert result.exit_code == 0, result.output
    assert sorted(pq.read_table(tmp_path / "b" / "index.parquet").column("key").to_pylist()) == sorted(kept)
    read = {name for name, *_ in state["gets"] if name.startswith("part_")}
    assert len(read) == 1, read
    meta = pq.ParquetFile(majortom[0] / "images" / read.pop()).metadata
    row_group_gets = [g for g in state["gets"] if g[0].startswith("part_") and g[2] != g[3]]
    assert len(row_group_gets) <= meta.num_row_groups and len(row_group_gets) >= len(kept)


def test_s3_input_build_into_s3_is_byte_identical(majortom, built, s3_env):
    source = s3_env.upload_dir(majortom[0], "src")
    result = run_shard("build", "--input", source, "--output", s3_env.url("from-s3"), *BUILD_ARGS)
    assert result.exit_code == 0, result.output
    assert_same_dataset_on_s3(s3_env, "from-s3", built)
    again = run_shard("build", "--input", source, "--output", s3_env.url("from-s3"), *BUILD_ARGS)
    assert again.exit_code == 0, again.output  # resumed: every unit skipped, the same dataset
    assert_same_dataset_on_s3(s3_env, "from-s3", built)


def test_s3_output_refuses_foreign_objects_and_overwrite_starts_over(majortom, s3_env):
    s3_env.client().pipe_file(f"{s3_env.bucket}/mixed/notes.txt", b"mine")
    foreign = run_shard("build", "--input", str(majortom[0]), "--output", s3_env.url("mixed"))
    assert foreign.exit_code == 2 and "notes.txt" in foreign.output and "s3://" in foreign.output
    args = ("build", "--input", str(majortom[0]), "--output", s3_env.url("ow"), "--shard-size", "1")
    assert run_shard(*args, "--limit", "3").exit_code == 0
    refused = run_shard(*args, "--limit", "1")  # other arguments: refused, as for a directory
    assert refused.exit_code == 2 and f"{s3_env.url('ow')} holds a build made with other arguments" in refused.output
    replaced = run_shard(*args, "--limit", "1", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    objects = s3_objects(s3_env, "ow")
    manifest = json.loads(objects["manifest.json"])
    assert manifest["totals"]["samples"] == 1
    assert sorted(n for n in objects if n.startswith("shards/")) == [s["url"] for s in manifest["shards"]]


def test_flaky_http_still_gives_the_identical_build_and_reports_retries(built_from_metadata, http, tmp_path,
                                                                       monkeypatch):
    base, state = http
    state["fail_every"] = 4
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
    monkeypatch.setattr(remote, "FOOTER_BYTES", FOOTER_KB << 10)
    out = tmp_path / "ds"
    result = run_shard("build", "--metadata", f"{base}/metadata.parquet", "--input", base, "--output", str(out),
                       *BUILD_ARGS)
    assert result.exit_code == 0, result.output
    assert [s["sha256"] for s in read_manifest(out)["shards"]] == [
        s["sha256"] for s in read_manifest(built_from_metadata)["shards"]]
    reported = int(re.search(r"(\d+) remote retries", result.output).group(1))
    unit_retries = sum(json.loads(p.read_text())["retries"] for p in (out / "units").glob("*[0-9].json"))
    assert state["faults"] > 0 and 0 < reported == unit_retries <= state["faults"]


def test_unit_fails_when_retries_are_spent_and_a_rerun_completes_it(built_from_metadata, http, tmp_path,
                                                                    monkeypatch):
    base, state = http
    state["down_except_footers"] = True  # footers can be read, every row group read gets 503
    monkeypatch.setenv("PHILEO_REMOTE_RETRIES", "2")
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.001")
    monkeypatch.setattr(remote, "FOOTER_BYTES", FOOTER_KB << 10)
    args = ("build", "--metadata", f"{base}/metadata.parquet", "--input", base, "--output", str(tmp_path / "ds"),
            *BUILD_ARGS)
    failed = run_shard(*args)
    assert failed.exit_code == 1 and "RemoteUnavailable" in failed.output and "after 2 retries" in failed.output
    assert not (tmp_path / "ds" / "manifest.json").exists() and not list((tmp_path / "ds").glob("units/*.json"))
    state["down_except_footers"] = False
    rerun = run_shard(*args)
    assert rerun.exit_code == 0, rerun.output
    assert read_manifest(tmp_path / "ds")["shards"] == read_manifest(built_from_metadata)["shards"]


def test_http_parquet_list_input_matches_a_local_build_of_the_same_files(majortom, http, tmp_path):
    base, _ = http
    images = sorted((majortom[0] / "images").glob("*.parquet"))
    (tmp_path / "images").mkdir()
    for path in images:  # the local reference without metadata.parquet (cloud/nodata from pixels)
        (tmp_path / "images" / path.name).symlink_to(path)
    listing = tmp_path / "parts.json"
    listing.write_text(json.dumps([f"{base}/images/{p.name}" for p in images]))
    local = run_shard("build", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "a"), *BUILD_ARGS)
    assert local.exit_code == 0, local.output
    # a list file served over HTTP, with entries relative to it
    (majortom[0] / "parts.txt").write_text("".join(f"images/{p.name}\n" for p in images))
    try:
        remote_build = run_shard("build", "--input", f"{base}/parts.txt", "--output", str(tmp_path / "b"),
                                 *BUILD_ARGS)
    finally:
        (majortom[0] / "parts.txt").unlink()
    assert remote_build.exit_code == 0, remote_build.output
    digests = [[s["sha256"] for s in read_manifest(tmp_path / name)["shards"]] for name in ("a", "b")]
    assert digests[0] == digests[1] and len(digests[0]) >= 4


def test_http_directory_without_listing_is_a_one_line_error(http, tmp_path):
    base, _ = http
    result = run_shard("build", "--input", f"{base}/images/", "--output", str(tmp_path / "x"))
    assert result.exit_code == 2 and "HTTP has no listing" in result.output and base in result.output


def test_retries_are_bounded_and_permanent_errors_are_not_retried(monkeypatch):
    monkeypatch.setenv("PHILEO_REMOTE_RETRIES", "3")
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.001")
    calls = {"n": 0}

    def overloaded():
        calls["n"] += 1
        raise ConnectionResetError("reset by peer")

    before = remote.retry_count()
    with pytest.raises(RemoteUnavailable, match="after 3 retries"):
        with_retries("http://x/y", "GET", overloaded)
    assert calls["n"] == 4 and remote.retry_count() - before == 3
    with pytest.raises(FileNotFoundError):
        with_retries("http://x/y", "GET", lambda: (_ for _ in ()).throw(FileNotFoundError("gone")))
    assert not is_transient(FileNotFoundError()) and is_transient(TimeoutError())


def test_label_raster_over_http_equals_the_local_raster(majortom, tmp_path):
    """`--label water=http://...` is read by windows through GDAL's /vsicurl/ (Range requests)."""
    from phileo.schema import decode_sample
    from sharding.dataset.tarread import iter_tar_samples
    from tools.label_fixture import make_label_rasters

    water = make_label_rasters(tmp_path / "rasters", layers=("water",))["water"]
    region = sorted((water.parent / "water").glob("region_*.tif"))[0]
    with serve(region.parent) as (base, state):
        url = f"{base}/{region.name}"
        for name, raster in (("local", str(region)), ("remote", url)):
            # another process: GDAL may hold the GIL while it waits for this process's server thread
            result = subprocess.run([sys.executable, "-m", "sharding.cli", "build", "--input", str(majortom[0]),
                                     "--output", str(tmp_path / name), "--label", f"water={raster}", *BUILD_ARGS],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-2000:]
    assert state["ranged"] > 0  # windows, not a download of the whole raster

    def layers(dataset):
        return {raw.key: decode_sample(raw.key, raw.members).arrays["label_water"].tobytes()
                for shard in read_manifest(dataset)["shards"] for raw in iter_tar_samples(dataset / shard["url"])}

    local, remote_layers = layers(tmp_path / "local"), layers(tmp_path / "remote")
    assert local == remote_layers and len(local) == len(majortom[1])


def test_rate_limited_retries_wait_as_long_as_retry_after_says(monkeypatch):
    """The Hub answers 429 with Retry-After: the wait is at least that, never shorter than our backoff."""

    class RateLimited(Exception):
        status, headers = 429, {"Retry-After": "7"}

    slept = []
    monkeypatch.setattr(remote.time, "sleep", slept.append)
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.001")
    attempts = iter([RateLimited(), RateLimited(), None])

    def action():
        error = next(attempts)
        if error is not None:
            raise error
        return b"ok"

    assert with_retries("hf://datasets/x/y", "GET", action) == b"ok"
    assert slept == [7.0, 7.0]
    assert retry_after_s(ConnectionResetError()) == 0.0


def test_an_unknown_host_fails_at_once_in_the_build_as_in_the_trainer():
    """One policy (phileo/remote.py) for both stages: a host name that does not exist is not retried."""
    calls = []

    def action():
        calls.append(1)
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    with pytest.raises(urllib.error.URLError):
        with_retries("https://no-such-host.invalid/x.parquet", "HEAD", action)
    assert calls == [1]
    transient = urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert is_transient(transient) and training_remote.is_transient(transient)


@pytest.mark.slow
def test_build_into_s3_killed_mid_way_resumes_with_every_key_exactly_once(majortom, built, s3_env, tmp_path):
    prefix, out = "killed", s3_env.url("killed")
    command = [sys.executable, "-m", "sharding.cli", "build", "--input", str(majortom[0]), "--output", out,
               "--shard-size", "1", "--workers", "1"]
    env = os.environ | s3_env.env | {"PHILEO_STAGING_DIR": str(tmp_path / "staging")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    client, deadline = s3_env.client(), time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        client.invalidate_cache()
        listed = client.find(f"{s3_env.bucket}/{prefix}/units/")
        if any(re.search(r"/units/\d{6}\.json$", path) for path in listed):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the build finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial_objects = s3_objects(s3_env, prefix)
    assert "manifest.json" not in partial_objects and "build.json" in partial_objects
    done = [name for name in partial_objects if re.fullmatch(r"units/\d{6}\.json", name)]
    assert 1 <= len(done) < json.loads(partial_objects["build.json"])["units"]
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    objects = s3_objects(s3_env, prefix)
    manifest = json.loads(objects["manifest.json"])
    assert sorted(n for n in objects if n.startswith("shards/")) == sorted(s["url"] for s in manifest["shards"])
    for shard in manifest["shards"]:
        assert hashlib.sha256(objects[shard["url"]]).hexdigest() == shard["sha256"]
    for name, data in partial_objects.items():  # what the killed run had published was already complete
        assert not name.startswith("shards/") or objects[name] == data
    keys = pq.read_table(pa.BufferReader(objects["index.parquet"])).column("key").to_pylist()
    expected = pq.read_table(built / "index.parquet").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == manifest["totals"]["samples"] and sorted(keys) == sorted(expected)


def test_credentials_in_input_urls_are_never_written_nor_logged(majortom, built, http, tmp_path, caplog):
    base, _ = http
    images = sorted((majortom[0] / "images").glob("*.parquet"))
    secrets = ("s3cr3t-pw", "tok-XYZ123", "sig-ABC456")
    # relative entries read through the list's userinfo; one absolute presigned-style entry with its own token
    entries = [f"images/{p.name}" for p in images[1:]] + [f"{base}/images/{images[0].name}?X-Amz-Signature=sig-ABC456"]
    (majortom[0] / "parts.txt").write_text("".join(f"{entry}\n" for entry in entries))
    host = base.split("://", 1)[1]
    caplog.set_level("INFO")  # what the CLI logs (a library's DEBUG lines are theirs to guard)
    try:
        result = run_shard("build", "--input", f"http://user:s3cr3t-pw@{host}/parts.txt?token=tok-XYZ123",
                           "--output", str(tmp_path / "out"), *BUILD_ARGS)
        assert result.exit_code == 0, result.output
        again = run_shard("build", "--input", f"http://user:s3cr3t-pw@{host}/parts.txt?token=tok-XYZ123",
                          "--output", str(tmp_path / "out"), *BUILD_ARGS)  # a resume reads the list again
        assert again.exit_code == 0, again.output
    finally:
        (majortom[0] / "parts.txt").unlink()
    assert read_manifest(tmp_path / "out")["totals"]["samples"] == read_manifest(built)["totals"]["samples"]
    written = [path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()]
    for secret in secrets:
        assert not any(secret.encode() in data for data in written), secret
        leaked = [line for line in (result.output + again.output + caplog.text).splitlines() if secret in line]
        assert not leaked, leaked[:3]
    refused = run_shard("build", "--input", str(majortom[0]), "--output", "s3://AKIA:s3cr3t-pw@bucket/x")
    assert refused.exit_code == 2 and "AWS environment" in refused.output and "s3cr3t-pw" not in refused.output


def test_transient_errors_are_retried_and_never_lose_a_file(built_from_metadata, http, tmp_path, monkeypatch):
    base, state = http
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
    monkeypatch.setenv("PHILEO_REMOTE_RETRIES", "3")
    args = ("--metadata", f"{base}/metadata.parquet", "--input", base, *BUILD_ARGS)
    expected = read_manifest(built_from_metadata)["shards"]
    state["unavailable"] = 2  # the first requests of tile files meet 503s, then the server recovers
    result = run_shard("build", "--output", str(tmp_path / "a"), *args)
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "a")["shards"] == expected
    assert (tmp_path / "a" / "rejected.jsonl").read_text() == ""
    state["unavailable"] = 10**6  # down for good: every unit fails, nothing is rejected or recorded as done
    failed = run_shard("build", "--output", str(tmp_path / "b"), *args)
    assert failed.exit_code != 0 and "503" in failed.output and not (tmp_path / "b" / "manifest.json").exists()
    assert not list((tmp_path / "b" / "units").glob("*.json"))
    state["unavailable"] = 0  # back: the rerun builds every unit
    rerun = run_shard("build", "--output", str(tmp_path / "b"), *args)
    assert rerun.exit_code == 0, rerun.output
    assert read_manifest(tmp_path / "b")["shards"] == expected


def test_planning_from_metadata_opens_no_source_file_and_the_dry_run_plan_is_built(built_from_metadata, http,
                                                                                    tmp_path):
    base, state = http
    args = ("build", "--metadata", f"{base}/metadata.parquet", "--input", base, "--output", str(tmp_path / "ds"),
            *BUILD_ARGS)
    planned = run_shard(*args, "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "MajorTOM's mean tile" in planned.output and "same command without --dry-run" in planned.output
    assert [name for _, name in state["requests"]] == ["metadata.parquet"]  # no tile file was opened
    plan = (tmp_path / "ds" / "plan.parquet").read_bytes()
    where = ["source_file", "source_group"]  # URLs here, paths in the local build: the rest is the same plan
    assert pq.read_table(tmp_path / "ds" / "plan.parquet").drop_columns(where).equals(
        pq.read_table(built_from_metadata / "plan.parquet").drop_columns(where))
    result = run_shard(*args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ds" / "plan.parquet").read_bytes() == plan
    assert read_manifest(tmp_path / "ds")["shards"] == read_manifest(built_from_metadata)["shards"]


def test_a_second_build_into_an_s3_prefix_in_use_is_refused(majortom, s3_env):
    import socket
    import subprocess

    lock = f"{s3_env.bucket}/locked/.phileo-shard.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        s3_env.client().pipe_file(lock, json.dumps({"pid": holder.pid, "host": socket.gethostname()}).encode())
        refused = run_shard("build", "--input", str(majortom[0]), "--output", s3_env.url("locked"), *BUILD_ARGS)
        assert refused.exit_code == 2 and f"in use by pid {holder.pid}" in refused.output, refused.output
    finally:
        holder.kill()
        holder.wait()
    built = run_shard("build", "--input", str(majortom[0]), "--output", s3_env.url("locked"), *BUILD_ARGS)
    assert built.exit_code == 0, built.output  # the holder is gone: its lock is stale
    objects = s3_objects(s3_env, "locked")
    assert "manifest.json" in objects and ".phileo-shard.lock" not in objects
