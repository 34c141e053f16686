"""verify, inspect, coverage, subset and split on remote datasets: one built into S3 by the real build
(SeaweedFS, tools/s3_server.py), and a built directory served over HTTP with Range support.

Each tool must give what it gives on the local copy, verify must read each remote shard once, and
damage, missing manifests, refusals and bad URLs must come out as on a local dataset: clear, one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phileo.urls import redact
from sharding.dataset.verify import verify_dataset
from sharding.dataset.verify_rows import SeenKeys
from tests.conftest import read_manifest, run_shard
from tests.range_server import serve
from tests.s3_server import S3ServerError, SeaweedS3

BUILD_ARGS = ("--shard-size", "300KB", "--mix-files", "2")  # as the `built` fixture


@pytest.fixture
def http(built):
    """(base URL, state) of a server over the `built` dataset; point state["root"] elsewhere to serve a copy."""
    with serve(built) as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    try:
        with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server, pytest.MonkeyPatch.context() as patch:
            for name, value in server.env.items():
                patch.setenv(name, value)
            patch.setenv("PHILEO_STAGING_DIR", str(tmp_path_factory.mktemp("staging")))
            patch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
            yield server
    except S3ServerError as error:  # pragma: no cover (environment without weed)
        pytest.fail(f"SeaweedFS did not start: {error}")


@pytest.fixture(scope="module")
def s3_built(s3, majortom):
    """The `built` dataset, built by `phileo-shard build --output s3://...` itself."""
    result = run_shard("build", "--input", str(majortom[0]), "--output", s3.url("built"), *BUILD_ARGS)
    assert result.exit_code == 0, result.output
    return s3.url("built")


@pytest.fixture(params=["s3", "http"])
def remote_built(request, built):
    """The URL of the `built` dataset on S3 (built there) or over HTTP (the directory served)."""
    if request.param == "s3":
        return request.getfixturevalue("s3_built")
    return request.getfixturevalue("http")[0]


def publish(kind: str, dataset: Path, request) -> str:
    """`dataset` (a local directory) at a URL of `kind`: uploaded to S3, or served over HTTP."""
    if kind == "s3":
        return request.getfixturevalue("s3").upload_dir(dataset, f"copy-{request.node.name}-{dataset.name}")
    base, state = request.getfixturevalue("http")
    state["root"] = str(dataset.parent)
    return f"{base}/{dataset.name}"


def dataset_bytes(dataset: Path) -> dict[str, bytes]:
    """The files of a subset/split output that must not depend on where the source was read from."""
    names = ["index.parquet", *(shard["url"] for shard in read_manifest(dataset)["shards"])]
    return {name: (dataset / name).read_bytes() for name in names}


def test_each_tool_gives_on_a_remote_dataset_what_it_gives_locally(remote_built, built, tmp_path):
    for args in (("verify",), ("verify", "--no-pixels")):
        remote, local = run_shard(*args, remote_built), run_shard(*args, str(built))
        assert remote.exit_code == 0 and "ok: 12 samples verified" in remote.output, remote.output
        summary = [line for line in remote.output.splitlines() if line.startswith("ok:")]
        assert summary == [line.replace(str(built), remote_built) for line in local.output.splitlines()
                           if line.startswith("ok:")]
    inspected = run_shard("inspect", remote_built, "--max-samples", "3")
    assert inspected.exit_code == 0 and inspected.output == run_shard("inspect", str(built), "--max-samples",
                                                                       "3").output != ""
    shard = read_manifest(built)["shards"][1]["url"]
    one = run_shard("inspect", f"{remote_built}/{shard}", "--max-samples", "1")
    assert one.exit_code == 0 and one.output == run_shard("inspect", str(built / shard), "--max-samples", "1").output
    for name, source in (("remote", remote_built), ("local", str(built))):
        assert run_shard("coverage", source, "--out", str(tmp_path / name / "map.png")).exit_code == 0
        out = tmp_path / name
        for command in (("subset", "--where", "centre_lat > 0", "--output", str(out / "subset")),
                        ("split", "--block-km", "2000", "--buffer-km", "1", "--val-fraction", "0.3",
                         "--output-train", str(out / "train"), "--output-val", str(out / "val"))):
            result = run_shard(command[0], source, *command[1:])
            assert result.exit_code == 0, result.output
    remote_counts, local_counts = (json.loads((tmp_path / name / "map.json").read_text())
                                   for name in ("remote", "local"))
    assert remote_counts.pop("dataset") == remote_built and local_counts.pop("dataset") == str(built.resolve())
    assert remote_counts == local_counts
    for output in ("subset", "train", "val"):
        assert dataset_bytes(tmp_path / "remote" / output) == dataset_bytes(tmp_path / "local" / output)
        origin = read_manifest(tmp_path / "remote" / output)["derived_from"]
        assert origin["dataset"] == remote_built
        assert origin["manifest_sha256"] == read_manifest(tmp_path / "local" / output)["derived_from"][
            "manifest_sha256"]
        assert run_shard("verify", str(tmp_path / "remote" / output)).exit_code == 0


def test_verify_reads_each_remote_shard_once(http, built):
    base, state = http
    for args in (("verify",), ("verify", "--no-pixels")):
        state["served"].clear()
        result = run_shard(*args, base)
        assert result.exit_code == 0, result.output
        shards = read_manifest(built)["shards"]
        assert {url: state["served"][url] for url in (s["url"] for s in shards)} == \
            {s["url"]: s["bytes"] for s in shards}  # every byte of every shard, once
        assert state["served"]["manifest.json"] == (built / "manifest.json").stat().st_size
        index = (built / "index.parquet").stat().st_size
        assert state["served"]["index.parquet"] <= 2 * index  # footer, then the four columns verify reads


def _flip_a_byte(dataset: Path) -> None:
    shard = dataset / read_manifest(dataset)["shards"][1]["url"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _truncate(dataset: Path) -> None:
    shard = dataset / read_manifest(dataset)["shards"][0]["url"]
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2 + 100])


def _shift_an_offset(dataset: Path) -> None:
    index = pq.read_table(dataset / "index.parquet")
    offsets = index.column("offset").to_pylist()
    offsets[3] += 512
    index = index.set_column(index.schema.get_field_index("offset"), "offset", pa.array(offsets, pa.int64()))
    pq.write_table(index, dataset / "index.parquet")


def _edit_manifest(dataset: Path, field: str, change) -> None:
    manifest = read_manifest(dataset)
    manifest["shards"][0][field] = change(manifest["shards"][0][field])
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def _rename_sample(data: bytes, old: str, new: str) -> bytes:
    """The tar bytes with sample `old`'s members renamed to `new` (same header sizes, so the same offsets)."""
    out = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.name.startswith(old + "."):
                member.name = new + member.name[len(old):]
                out[member.offset:member.offset + 512] = member.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return bytes(out)


def _duplicate_a_key(dataset: Path) -> None:
    """Shard 1's first sample takes the key of shard 0's first; manifest checksums and index keys follow,
    so the duplicate is the only problem."""
    manifest = read_manifest(dataset)
    index = pq.read_table(dataset / "index.parquet")
    keys, shards = index.column("key").to_pylist(), index.column("shard").to_pylist()
    first, second = manifest["shards"][0]["url"], manifest["shards"][1]["url"]
    original, row = keys[shards.index(first)], shards.index(second)
    path = dataset / second
    path.write_bytes(_rename_sample(path.read_bytes(), keys[row], original))
    keys[row] = original
    pq.write_table(index.set_column(0, "key", pa.array(keys)), dataset / "index.parquet")
    manifest["shards"][1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dataset / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "flipped byte": (_flip_a_byte, "sha256 differs from the manifest"),
    "truncated shard": (_truncate, "unreadable tar after"),
    "index offset": (_shift_an_offset, "index.parquet row 3 "),
    "manifest sha256": (lambda d: _edit_manifest(d, "sha256", lambda _: "0" * 64), "sha256 differs"),
    "sample count": (lambda d: _edit_manifest(d, "samples", lambda n: n + 1), "samples, manifest says"),
    "duplicate key": (_duplicate_a_key, "also in shards/"),
    "missing shard": (lambda d: (d / read_manifest(d)["shards"][1]["url"]).unlink(), "-0000.tar: missing"),
    "index not parquet": (lambda d: (d / "index.parquet").write_bytes(b"no" * 600), "index.parquet: unreadable"),
}


@pytest.mark.parametrize("kind", ["s3", "http"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_finds_damage_remotely_as_it_does_locally(built, tmp_path, request, kind, damage):
    change, expected = DAMAGE[damage]
    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    change(dataset)
    url = publish(kind, dataset, request)
    for pixels in (True, False):
        local, _ = verify_dataset(str(dataset), pixels=pixels)
        remote, _ = verify_dataset(url, pixels=pixels)
        assert list(remote) == list(local) and any(expected in problem for problem in local), list(local)
    result = run_shard("verify", "--no-pixels", url)
    assert result.exit_code == 1 and f"error: {local[0]}" in result.output.splitlines()[-1]


def test_a_missing_manifest_a_refusal_and_bad_urls_are_one_line_errors(http, s3, tmp_path, monkeypatch):
    base, _ = http
    monkeypatch.setenv("PHILEO_REMOTE_RETRIES", "1")
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
    host = base.split("://", 1)[1]
    cases = [(f"{base}/nothing-here", 2, "no manifest.json"), (s3.url("no-such-prefix"), 2, "no manifest.json"),
             (f"{base}/forbidden/ds", 2, "HTTP 403"),
             (f"http://user:s3cr3t-pw@{host}/forbidden/ds?token=tok-XYZ123", 2, "HTTP 403"),
             (f"http://user:s3cr3t-pw@{host}/forbidden/ds", 2, "HTTP 403"),
             ("http://user:s3cr3t-pw@127.0.0.1:9/ds", 1, "rerun the same command"),
             ("ftp://example.org/ds", 2, "ftp:// datasets are not read"), ("s3:///prefix", 2, "no host or bucket"),
             ("http://127.0.0.1:9/ds", 1, "rerun the same command")]  # nothing listens on the discard port
    for url, code, message in cases:
        for command in (["verify", url], ["verify", "--no-pixels", url], ["inspect", url], ["coverage", url, "--out",
                        str(tmp_path / "m.png")], ["subset", url, "--output", str(tmp_path / "s")],
                        ["split", url, "--output-train", str(tmp_path / "a"), "--output-val", str(tmp_path / "b")]):
            result = run_shard(*command)
            errors = [line for line in result.output.splitlines() if line.startswith("error:")]
            assert result.exit_code == code and len(errors) == 1 and message in errors[0], (command, result.output)
            assert "Traceback" not in result.output and "s3cr3t" not in result.output and "tok-XYZ" not in \
                result.output
            assert redact(url) in errors[0]
    assert not (tmp_path / "s").exists()


def test_remote_outputs_are_refused_and_s3_shards_outside_the_manifest_found(s3_built, s3, tmp_path):
    for command in (["subset", s3_built, "--output", s3.url("elsewhere")],
                    ["split", s3_built, "--output-train", str(tmp_path / "a"), "--output-val", s3.url("val")]):
        refused = run_shard(*command)
        assert refused.exit_code == 2 and "outputs are local directories" in refused.output, refused.output
    client = s3.client()
    extra = f"{s3.bucket}/built/shards/999999-0000.tar"
    client.pipe_file(extra, b"")
    try:
        result = run_shard("verify", "--no-pixels", s3_built)
        assert result.exit_code == 1 and "shards/999999-0000.tar: not in the manifest" in result.output
    finally:
        client.rm_file(extra)


def test_a_remote_manifest_url_never_leaves_the_dataset(built, http, tmp_path):
    base, state = http
    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    _edit_manifest(dataset, "url", lambda _: "../../outside.tar")
    state["root"] = str(tmp_path)
    for command in (["verify"], ["verify", "--no-pixels"], ["inspect"]):
        result = run_shard(*command, f"{base}/ds")
        assert result.exit_code == 2 and "shards[0]" in result.output and "leaves the dataset root" in result.output
    assert not [name for name in state["served"] if "outside" in name]


def test_seen_keys_name_the_first_shard_of_a_duplicate_across_merged_runs():
    seen = SeenKeys()
    for shard in range(300):  # runs of 1, 2, 4... keys merge as they come
        assert seen.add_shard([f"k{shard}-{n}" for n in range(shard % 5 + 1)], shard) == []
    assert len(seen.runs) <= 12 and seen.distinct == sum(shard % 5 + 1 for shard in range(300))
    assert seen.add_shard(["k7-1", "new", "k299-0"], 300) == [("k7-1", 7), ("k299-0", 299)]
    assert seen.distinct == sum(shard % 5 + 1 for shard in range(300)) + 1
