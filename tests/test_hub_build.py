"""`phileo-shard build` over hf:// through the real huggingface_hub client, against tools/hub_server.py.

The MajorTOM fixture is served as the dataset repo Major-TOM/Core-S2L2A on 127.0.0.1; the CLI runs in
a subprocess whose HF_ENDPOINT points there (read when huggingface_hub is imported) and whose proxy
variables send every other host to the server, which refuses and counts it: no test reaches
huggingface.co. Each build must give the local build's shards and index byte for byte, and the
HF_TOKEN it sends must never be written or logged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import read_manifest, run_shard
from tools.hub_server import HubServer

REPO = "Major-TOM/Core-S2L2A"  # the fixture's metadata.parquet names this repo's files
HF_URL = f"hf://datasets/{REPO}"
BUILD_ARGS = ("--shard-size", "300KB", "--mix-files", "2")  # as the `built` fixture
FOOTER_KB = 64  # fixture files are ~320 kB: a smaller footer sample, so row groups are fetched by range
TOKEN = "hf_SeCrEtTokenForTests0123456789"


@pytest.fixture(scope="module")
def hub_server(majortom):
    with HubServer(majortom[0], REPO, page_size=2) as hub:  # 2 entries a page: images/ takes 2 tree pages
        yield hub


@pytest.fixture
def hub(hub_server):
    hub_server.clear_faults()
    hub_server.reset_stats()
    return hub_server


def hf_build(hub: HubServer, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`phileo-shard build --output out ARGS` in a subprocess that talks to `hub` with HF_TOKEN set; checks that
    it asked for no other host and that the token is in none of its output and none of its files."""
    environment = os.environ | hub.env | {
        "HF_TOKEN": TOKEN, "HF_HOME": str(out.parent / "hf-home"), "PHILEO_REMOTE_BACKOFF_S": "0.01",
        "PHILEO_REMOTE_FOOTER_KB": str(FOOTER_KB), **env}
    result = subprocess.run([sys.executable, "-m", "sharding.cli", "build", "--output", str(out), *args],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert hub.stats()["foreign"] == []
    assert TOKEN not in result.stdout + result.stderr
    for path in [p for p in out.rglob("*") if p.is_file()] if out.exists() else []:
        assert TOKEN.encode() not in path.read_bytes(), path
    return result


def assert_same_build(out: Path, local: Path) -> None:
    """Shards (names and bytes) and index.parquet byte for byte."""
    shards = [(s["url"], s["sha256"]) for s in read_manifest(out)["shards"]]
    assert shards == [(s["url"], s["sha256"]) for s in read_manifest(local)["shards"]] and len(shards) >= 4
    assert (out / "index.parquet").read_bytes() == (local / "index.parquet").read_bytes()


def parquet_sizes(majortom) -> dict[str, int]:
    return {f"images/{p.name}": p.stat().st_size for p in (majortom[0] / "images").glob("*.parquet")}


def test_hf_input_is_listed_and_read_by_ranges_into_the_local_bytes(majortom, built, hub, tmp_path):
    result = hf_build(hub, tmp_path / "ds", "--input", HF_URL, *BUILD_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_build(tmp_path / "ds", built)
    stats, sizes = hub.stats(), parquet_sizes(majortom)
    trees = [entry for entry in stats["log"] if entry[1] == "api" and entry[2] == "images"]
    assert len(trees) >= 2  # the listing followed the Link header to the second page
    reads = [entry for entry in stats["log"] if entry[1] == "cdn" and entry[2] in sizes]
    assert reads and all(rng is not None and status == 206 for _, _, _, rng, status in reads)  # never a whole file
    for path, size in sizes.items():  # each file: its footer sample once, then the row groups' column chunks
        assert 0 < stats["bytes"][path] <= size + (FOOTER_KB << 10), path
    tiles = read_manifest(tmp_path / "ds")["totals"]["samples"]
    assert sum(stats["bytes"][p] for p in sizes) / tiles <= 1.25 * sum(sizes.values()) / len(majortom[1])
    assert stats["authorization"][f"Bearer {TOKEN}"] > 0  # the token was in play (and sent to the endpoint only)


def test_hf_metadata_plans_from_the_repo_without_touching_huggingface_co(majortom, hub, tmp_path):
    """metadata.parquet's parquet_url values are https://huggingface.co/... download URLs: they are read as
    hf:// files of the same repo, at HF_ENDPOINT, never over plain HTTP to huggingface.co."""
    local = run_shard("build", "--metadata", str(majortom[0] / "metadata.parquet"), "--input", str(majortom[0]),
                      "--output", str(tmp_path / "local"), *BUILD_ARGS)  # the same plan (estimated tile sizes)
    assert local.exit_code == 0, local.output
    result = hf_build(hub, tmp_path / "ds", "--metadata", f"{HF_URL}/metadata.parquet", *BUILD_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_build(tmp_path / "ds", tmp_path / "local")
    stats = hub.stats()
    assert stats["bytes"]["metadata.parquet"] == (majortom[0] / "metadata.parquet").stat().st_size
    assert not [entry for entry in stats["log"] if entry[2] in parquet_sizes(majortom) and entry[3] is None]


def test_hf_metadata_filters_read_only_files_with_kept_rows(majortom, hub, tmp_path):
    table = pq.read_table(majortom[0] / "metadata.parquet", columns=["centre_lon", "parquet_url"]).to_pylist()
    kept_files = {row["parquet_url"].split("/resolve/main/")[1] for row in table if row["centre_lon"] > 0}
    filters = ("--bbox", "0,-90,180,90", *BUILD_ARGS)  # the eastern quadrants' files only
    local = run_shard("build", "--metadata", str(majortom[0] / "metadata.parquet"), "--input", str(majortom[0]),
                      "--output", str(tmp_path / "local"), *filters)
    assert local.exit_code == 0, local.output
    result = hf_build(hub, tmp_path / "ds", "--metadata", f"{HF_URL}/metadata.parquet", *filters)
    assert result.returncode == 0, result.stderr[-3000:]
    local_shards = [(s["url"], s["sha256"]) for s in read_manifest(tmp_path / "local")["shards"]]
    assert [(s["url"], s["sha256"]) for s in read_manifest(tmp_path / "ds")["shards"]] == local_shards
    assert (tmp_path / "ds" / "index.parquet").read_bytes() == (tmp_path / "local" / "index.parquet").read_bytes()
    read = {path for path, count in hub.stats()["bytes"].items() if count and path.startswith("images/")}
    assert read == kept_files and len(kept_files) < len(parquet_sizes(majortom))


def test_hf_rate_limit_is_retried_once_after_retry_after(built, hub, tmp_path):
    path = "images/part_00002.parquet"
    hub.fail(path, 429, times=1, retry_after=1)
    result = hf_build(hub, tmp_path / "ds", "--input", HF_URL, *BUILD_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_build(tmp_path / "ds", built)
    assert hub.stats()["faults"][path] == 1
    retries = [line for line in result.stderr.splitlines() if "429" in line or "retry" in line.lower()]
    assert len(retries) == 1, retries  # our retry's line only: huggingface_hub did not retry (nor log) it too
    waited = re.search(rf"{HF_URL}/{path}: GET bytes \d+-\d+ failed \(HfHubHTTPError\); retry 1/\d+ in ([\d.]+) s",
                       retries[0])
    assert waited and float(waited.group(1)) >= 1.0, retries  # Retry-After honoured, not our 0.01 s backoff


def test_hf_persistent_5xx_fails_with_one_line_naming_the_url(hub, tmp_path):
    path = "images/part_00003.parquet"
    hub.fail(path, 503, times=None)
    result = hf_build(hub, tmp_path / "ds", "--input", HF_URL, *BUILD_ARGS, PHILEO_REMOTE_RETRIES="2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {HF_URL}/{path}: GET bytes"), result.stderr[-2000:]
    assert "after 2 retries" in errors[0] and "503" in errors[0] and "rerun the same command" in errors[0]
    assert hub.stats()["faults"][path] == 3  # one try and 2 retries: no retry loop nested in ours
    assert not (tmp_path / "ds" / "build.json").exists()
    hub.clear_faults()
    rerun = hf_build(hub, tmp_path / "ds", "--input", HF_URL, *BUILD_ARGS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def test_hf_missing_repo_is_a_one_line_input_error(hub, tmp_path):
    result = hf_build(hub, tmp_path / "ds", "--input", "hf://datasets/Major-TOM/No-Such-Repo")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --input hf://datasets/Major-TOM/No-Such-Repo")


def test_hf_offline_mode_is_a_one_line_error_not_retries(hub, tmp_path):
    result = hf_build(hub, tmp_path / "ds", "--input", HF_URL, HF_HUB_OFFLINE="1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "HF_HUB_OFFLINE is set" in result.stderr.strip().splitlines()[-1] and "retry" not in result.stderr
    assert sum(hub.stats()["requests"].values()) == 0


def test_hub_server_answers_as_huggingface_hub_expects(majortom, hub):
    """The server against the installed client, in process with an explicit endpoint: listing with
    pagination, info, ranged reads through the CDN redirect, HEAD metadata, the Hub's error codes."""
    from huggingface_hub import HfFileSystem, get_hf_file_metadata, hf_hub_url

    fs = HfFileSystem(endpoint=hub.endpoint, token=False, skip_instance_cache=True)
    assert fs.glob(f"{HF_URL}/images/*.parquet") == [f"datasets/{REPO}/images/{p}" for p in sorted(
        path.name for path in (majortom[0] / "images").glob("*.parquet"))]
    local = majortom[0] / "images" / "part_00001.parquet"
    assert fs.size(f"{HF_URL}/images/part_00001.parquet") == local.stat().st_size
    with fs.open(f"{HF_URL}/images/part_00001.parquet", "rb", cache_type="none") as remote_file:
        remote_file.seek(1000)
        assert remote_file.read(5000) == local.read_bytes()[1000:6000]
    url = hf_hub_url(REPO, "images/part_00001.parquet", repo_type="dataset", endpoint=hub.endpoint)
    metadata = get_hf_file_metadata(url, token=False)
    assert (metadata.commit_hash, metadata.size) == (hub.sha, local.stat().st_size)
    assert metadata.location.startswith(hub.origin("cdn"))  # another origin, as the Hub's CDN
    assert fs.info(f"hf://datasets/{REPO}@{hub.sha}/metadata.parquet")["type"] == "file"
    for missing in (f"{HF_URL}/images/nope.parquet", f"{HF_URL}@v9/metadata.parquet", "hf://datasets/a/b/x"):
        with pytest.raises(FileNotFoundError):
            fs.info(missing)


def test_dataset_tools_read_a_dataset_on_the_hub(built, tmp_path):
    """verify (with and without pixels) and inspect take an hf:// dataset; verify reads each shard once."""
    manifest = read_manifest(built)
    with HubServer(built, "org/shards") as server:
        environment = os.environ | server.env | {"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home")}
        outputs = []
        for args in (["verify", "--no-pixels"], ["verify"], ["inspect", "--max-samples", "2"]):
            server.reset_stats()
            result = subprocess.run([sys.executable, "-m", "sharding.cli", *args, "hf://datasets/org/shards"],
                                    env=environment, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            assert TOKEN not in result.stdout + result.stderr
            outputs.append(result.stdout)
            if args[0] == "verify":
                served = server.stats()["bytes"]
                assert {s["url"]: served.get(s["url"]) for s in manifest["shards"]} == {
                    s["url"]: s["bytes"] for s in manifest["shards"]}
        assert server.stats()["foreign"] == []
    assert all(f"ok: {manifest['totals']['samples']} samples verified" in out for out in outputs[:2])
    assert outputs[2].count("cloud") >= 2
