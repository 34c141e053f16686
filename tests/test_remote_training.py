"""Streaming from object storage: a real S3 server (SeaweedFS on loopback) and an HTTP server that injects faults."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sharding.dataset.tarread import iter_tar_samples
from tests.s3_server import SeaweedS3
from tests.test_pretrain import all_keys, audit, pretrain_command, recorded, train_in_process, uneven  # noqa: F401
from training.data import remote
from training.data.loader import BadDataPolicy, read_tiles
from training.data.shards import ShardSpecError, open_shard, resolve_shards

FAST_RETRIES = {"PHILEO_REMOTE_BACKOFF_S": "0.01"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """SeaweedFS on loopback with one bucket."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The AWS variables of `s3` for in-process clients, per test only: with AWS keys in the environment,
    rasterio (used by the shard builder of other fixtures) makes a boto3 session per GeoTIFF read."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3


@pytest.fixture(scope="module")
def s3_uneven(s3, uneven) -> str:  # noqa: F811
    return s3.upload_dir(uneven, "uneven")


@pytest.fixture(autouse=True)
def fresh_stats():
    remote.STATS.reset()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_s3_manifest_and_brace_pattern_resolve_like_the_local_dataset(s3_env, built):
    prefix = s3_env.upload_dir(built, "built")
    local = resolve_shards(str(built / "manifest.json"))
    from_s3 = resolve_shards(f"{prefix}/manifest.json")
    assert [(s.url.replace(prefix, str(built)), s.samples) for s in from_s3] == [(s.url, s.samples) for s in local]
    assert all(s.url.startswith(f"{prefix}/shards/") for s in from_s3)
    # a brace pattern has no manifest: counts come from the index.parquet next to shards/
    names = sorted(Path(s.url).name for s in local)
    first, last = names[0].split("-")[0], names[-1].split("-")[0]
    assert resolve_shards(f"{prefix}/shards/{{{first}..{last}}}-0000.tar") == from_s3


def test_remote_brace_pattern_without_index_is_a_clear_error(s3_env, s3_uneven):
    with pytest.raises(ShardSpecError, match=r"sample counts of remote shards are unknown .*index\.parquet"):
        resolve_shards(f"{s3_uneven}/shards/part-{{00..06}}.tar")


def test_s3_stream_reads_in_bounded_blocks_and_resumes_at_the_offset(s3_env, s3_uneven, uneven, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PHILEO_REMOTE_BLOCK_MB", str(64 / 1024))  # 64 KiB blocks: many ranged GETs per shard
    monkeypatch.setattr(remote, "BUFFER", 8192)
    expected = (uneven / "shards" / "part-06.tar").read_bytes()
    opened, real_open = [], remote.open_s3_at

    def flaky_open(url: str, offset: int, end: int | None = None):
        handle, size = real_open(url, offset, end)
        opened.append((offset, handle))
        if len(opened) == 1:  # the first connection resets after 100 kB
            handle.read = _fail_after(handle.read, 100_000, ConnectionResetError("Connection reset by peer"))
        return handle, size

    monkeypatch.setattr(remote, "open_s3_at", flaky_open)
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
    chunks, peak_cache = [], 0
    with open_shard(f"{s3_uneven}/shards/part-06.tar") as stream:
        while chunk := stream.read(10240):
            chunks.append(chunk)
            peak_cache = max(peak_cache, len(opened[-1][1].cache.cache))
    assert sha256(b"".join(chunks)) == sha256(expected)
    assert len(expected) > 500_000 and peak_cache <= 2 * 65536 + 8192  # streamed: never the whole shard in memory
    assert [offset for offset, _ in opened][1:] == [100_000]  # reopened exactly where the reset happened
    assert (remote.STATS.retries, remote.STATS.resumed) == (1, 1)


def _fail_after(read, limit: int, error: Exception):
    consumed = 0

    def read_then_fail(size: int = -1) -> bytes:
        nonlocal consumed
        if consumed >= limit:
            raise error
        data = read(min(size, limit - consumed) if size >= 0 else limit - consumed)
        consumed += len(data)
        return data

    return read_then_fail


def test_a_shard_split_between_workers_is_read_by_byte_ranges_from_s3(s3_env, built):
    """Two workers share a shard (and a tile of it); each reads its byte range of the S3 object, found in the
    index.parquet next to the manifest, and the batches equal those of the local dataset bit for bit."""
    import torch

    from training.data.epoch import plan_epoch
    from training.data.loader import StreamOptions, make_loader
    from training.data.pieces import rank_pieces

    prefix = s3_env.upload_dir(built, "ranged")
    local = resolve_shards(str(built / "manifest.json"))
    shard = (built / "shards" / Path(local[0].url).name).read_bytes()
    with open_shard(f"{prefix}/shards/{Path(local[0].url).name}", 1000, 5000) as stream:
        assert stream.read() == shard[1000:5000]  # a ranged read ends at its end
    options = StreamOptions(crops_per_tile=3, crop_size=32, batch_size=5)
    plans = [plan_epoch(resolve_shards(spec), 1, 2, 5, 3, 0, 0, shuffle_buffer=5)
             for spec in (f"{prefix}/manifest.json", str(built / "manifest.json"))]
    remote_pieces, local_pieces = (rank_pieces(plan, 0) for plan in plans)
    assert [[(p.tiles, p.span) for p in worker] for worker in remote_pieces] == \
        [[(p.tiles, p.span) for p in worker] for worker in local_pieces]
    assert any(p.span and p.span[0] > 0 for worker in remote_pieces for p in worker)
    assert remote_pieces[0][-1].url == remote_pieces[1][0].url and remote_pieces[0][-1].url.startswith("s3://")
    from_s3, from_disk = (list(make_loader(plan, 0, options, 2)) for plan in plans)
    assert len(from_s3) == len(from_disk) == plans[0].steps
    for a, b in zip(from_s3, from_disk, strict=True):
        assert (a["keys"], a["crop_index"]) == (b["keys"], b["crop_index"])
        assert torch.equal(a["s2_10m"], b["s2_10m"]) and torch.equal(a["s2_20m"], b["s2_20m"])


def test_missing_s3_shard_is_skipped_at_once_and_counted(s3_env, s3_uneven):
    policy = BadDataPolicy(max_bad_fraction=0.0)
    assert list(read_tiles(f"{s3_uneven}/shards/part-99.tar", policy)) == []
    assert policy.bad == 1 and remote.STATS.retries == 0 and remote.STATS.failed == 1
    with pytest.raises(RuntimeError, match=r"bad shards: s3://.*/shards/part-99\.tar"):
        policy.check(planned=3)


@pytest.mark.slow
def test_torchrun_pretraining_streams_every_tile_exactly_once_from_s3(s3, s3_uneven, uneven, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    command = pretrain_command(uneven, run, 2, "--epochs", "1", "--crops-per-tile", "1", "--num-workers", "1")
    command[command.index("--shards") + 1] = f"{s3_uneven}/manifest.json"
    environment = os.environ | s3.env | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    counts, per_rank, (epoch,) = audit(run)
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert (epoch["dropped_crops"], epoch["repeated_crops"]) == (0, 0)
    assert counts == Counter((key, 0) for key in all_keys(uneven))  # 28 tiles x 1 crop, each once over both ranks
    assert s3.secret_key not in result.stdout + result.stderr  # credentials never logged


class FaultyFiles(BaseHTTPRequestHandler):
    """GET with Range support; injects 500/429 on every `fail_every`-th request, drops one body mid-way."""

    def __init__(self, *args, state: dict, **kwargs):
        self.state = state
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        state, path = self.state, self.path.split("?")[0]
        with state["lock"]:
            state["requests"][path] += 1
            number = sum(state["requests"].values())
        file = Path(state["root"]) / path.lstrip("/")
        if not file.is_file():
            return self.send_error(404)
        if path in state["always_fail"] or (state["fail_every"] and number % state["fail_every"] == 0):
            status = 503 if path in state["always_fail"] else (500, 429)[number // state["fail_every"] % 2]
            state["injected"][status] += 1
            return self.send_error(status)
        data = file.read_bytes()
        start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if path == state["drop_once"] and not start and not state["injected"]["drop"]:
            state["injected"]["drop"] += 1
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the body ends early: a reset mid-transfer
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture
def faulty_http(uneven):  # noqa: F811
    """(base URL, state) of a server of the `uneven` dataset; tests set the faults in `state`."""
    state = {"root": uneven, "lock": threading.Lock(), "requests": Counter(), "injected": Counter(),
             "fail_every": 0, "always_fail": set(), "drop_once": None}
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FaultyFiles, state=state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_http_resume_after_a_dropped_body_is_byte_exact(faulty_http, uneven, monkeypatch):  # noqa: F811
    base, state = faulty_http
    monkeypatch.setattr(remote, "BUFFER", 65536)
    state.update(drop_once="/shards/part-06.tar", fail_every=2)
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
    with open_shard(f"{base}/shards/part-06.tar") as stream:
        data = b"".join(iter(lambda: stream.read(10240), b""))
    assert sha256(data) == sha256((uneven / "shards" / "part-06.tar").read_bytes())
    assert state["injected"]["drop"] == 1 and remote.STATS.resumed >= 1
    assert remote.STATS.retries == sum(state["injected"].values())


def test_http_faults_are_retried_and_every_tile_streams_exactly_once(faulty_http, uneven, tmp_path,  # noqa: F811
                                                                     monkeypatch, caplog):
    base, state = faulty_http
    state.update(fail_every=3, drop_once="/shards/part-05.tar")
    for name, value in FAST_RETRIES.items():
        monkeypatch.setenv(name, value)
    caplog.set_level("INFO", logger="training.data.remote")
    run = tmp_path / "run"
    result = train_in_process("--shards", f"{base}/manifest.json", "--out", str(run), "--model", "geoaware-unet-tiny",
                              "--crops-per-tile", "1", "--batch-size", "4", "--num-workers", "0", "--no-amp",
                              "--epochs", "1", "--record-keys", str(run / "keys"))
    assert result.exit_code == 0, result.output
    assert sorted(key for key, _ in recorded(run / "keys" / "rank0.txt")) == sorted(all_keys(uneven))
    injected = sum(state["injected"].values())
    assert state["injected"][500] and state["injected"][429] and state["injected"]["drop"] == 1
    assert remote.STATS.retries == injected and remote.STATS.failed == 0 and remote.STATS.resumed >= 1
    assert len(re.findall(r"; retry \d/6 in ", caplog.text)) == injected
    assert re.search(r"shards/part-05\.tar: \d+ bytes read with [12] retries", caplog.text)


def test_shard_that_keeps_failing_is_skipped_counted_and_fails_a_strict_run(faulty_http, uneven, tmp_path,  # noqa: F811
                                                                             monkeypatch, caplog):
    base, state = faulty_http
    state["always_fail"] = {"/shards/part-03.tar"}
    monkeypatch.setenv("PHILEO_REMOTE_RETRIES", "2")
    monkeypatch.setenv("PHILEO_REMOTE_BACKOFF_S", "0.01")
    caplog.set_level("WARNING")
    run = tmp_path / "lenient"
    common = ["--shards", f"{base}/manifest.json", "--model", "geoaware-unet-tiny", "--crops-per-tile", "1",
              "--batch-size", "4", "--num-workers", "0", "--no-amp", "--epochs", "1"]
    result = train_in_process(*common, "--out", str(run), "--max-bad-fraction", "0.5",
                              "--record-keys", str(run / "keys"))
    assert result.exit_code == 0, result.output
    lost = {s.key for s in iter_tar_samples(uneven / "shards" / "part-03.tar")}
    assert {key for key, _ in recorded(run / "keys" / "rank0.txt")} == set(all_keys(uneven)) - lost
    assert re.search(r"skipping bad data in http://\S+/shards/part-03\.tar \(1 so far\)", caplog.text)
    assert "after 2 retries" in caplog.text and remote.STATS.failed >= 1
    assert state["requests"]["/shards/part-03.tar"] % 3 == 0  # each pass: 1 try + 2 retries, then skipped
    strict = train_in_process(*common, "--out", str(tmp_path / "strict"), "--max-bad-fraction", "0")
    assert strict.exit_code == 1, strict.output
    assert re.search(r"> --max-bad-fraction 0\.0\); bad shards: http://\S+/part-03\.tar", strict.output)


def test_unreadable_s3_manifest_is_a_one_line_error_without_secrets(s3_env, tmp_path, monkeypatch):
    common = ["--out", str(tmp_path / "run"), "--model", "geoaware-unet-tiny", "--num-workers", "0"]
    missing = s3_env.url("nowhere/manifest.json")
    result = train_in_process("--shards", missing, *common)
    assert result.exit_code == 2 and remote.STATS.retries == 0  # a missing object is not retried
    assert f"error: --shards {missing}: not a readable phileo-shard manifest ({missing}: open failed" in result.output
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    result = train_in_process("--shards", s3_env.url("uneven/manifest.json"), *common)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "not-the-secret" not in result.output and s3_env.secret_key not in result.output


def test_s3_harness_failure_reports_the_log_tail(tmp_path, monkeypatch):
    import tools.s3_server as harness

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = harness.free_ports(len(harness.PORT_NAMES) - 1)
        monkeypatch.setattr(harness, "free_ports", lambda count: [taken, *ports])  # the master port is in use
        with pytest.raises(harness.S3ServerError, match=r"(?s)exited with code .*log tail:\n.*address already in use"):
            with SeaweedS3(tmp_path, timeout=15):
                pass


def test_unknown_host_is_not_retried_but_a_dns_failure_is():
    import urllib.error

    from training.data.remote import is_transient

    assert not is_transient(urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known")))
    assert is_transient(urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure")))
    assert is_transient(urllib.error.URLError(ConnectionRefusedError()))
