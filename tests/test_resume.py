"""Determinism, parallelism, resume after SIGKILL, and verify catching damage."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import read_manifest, run_shard
from tools.majortom_fixture import make_majortom_dataset


def shard_digests(dataset):
    return [(s["url"], s["samples"], s["sha256"]) for s in read_manifest(dataset)["shards"]]


def test_parallel_build_equals_serial(majortom, tmp_path):
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), "--shard-size", "200KB",
                           "--workers", workers)
        assert result.exit_code == 0, result.output
        outputs.append(out)
    assert len(shard_digests(outputs[0])) >= 4
    assert shard_digests(outputs[0]) == shard_digests(outputs[1])
    assert pq.read_table(outputs[0] / "index.parquet").equals(pq.read_table(outputs[1] / "index.parquet"))


def test_rerun_with_other_arguments_is_refused_and_overwrite_starts_over(majortom, tmp_path):
    out = tmp_path / "ds"
    args = ["build", "--input", str(majortom[0]), "--output", str(out)]
    assert run_shard(*args).exit_code == 0
    before = shard_digests(out)
    again = run_shard(*args)  # same arguments: everything complete, nothing rewritten
    assert again.exit_code == 0 and shard_digests(out) == before
    refused = run_shard(*args, "--max-cloud", "50")
    assert refused.exit_code == 2
    assert "other arguments (filters differ)" in refused.output and "--overwrite" in refused.output
    replaced = run_shard(*args, "--max-cloud", "50", "--overwrite")
    assert replaced.exit_code == 0
    assert read_manifest(out)["totals"]["samples"] < 12
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    foreign = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "foreign"))
    assert foreign.exit_code == 2 and "notes.txt" in foreign.output


def start_build(source, out, workers):
    command = [sys.executable, "-m", "sharding.cli", "build", "--input", str(source), "--output", str(out),
               "--shard-size", "1", "--workers", str(workers)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_after_units(process, out, units_done, timeout=120):
    """SIGKILL the whole build (workers too) once `units_done` units have their stats file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        done = len(list((out / "units").glob("*.json"))) if (out / "units").is_dir() else 0
        if done >= units_done:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the build finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_resume_after_sigkill_gives_every_row_exactly_once(tmp_path, workers):
    records = make_majortom_dataset(tmp_path / "src", num_files=4, rows_per_file=6, tile_size=240)
    out = tmp_path / "ds"
    for units_done in (1, 5):
        kill_after_units(start_build(tmp_path / "src", out, workers), out, units_done)
        assert not (out / "manifest.json").exists()
        for shard in (out / "shards").glob("*.tar"):  # complete shards only under final names
            with open(shard, "rb") as file:
                file.seek(-1024, os.SEEK_END)
                assert file.read() == bytes(1024)
    finished = start_build(tmp_path / "src", out, workers)
    assert finished.wait(timeout=300) == 0
    keys = pq.read_table(out / "index.parquet", columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(r["key"] for r in records)  # exactly once
    assert not list(out.rglob("*.tmp"))
    assert run_shard("verify", str(out)).exit_code == 0
    fresh = tmp_path / "fresh"
    uninterrupted = run_shard("build", "--input", str(tmp_path / "src"), "--output", str(fresh), "--shard-size", "1")
    assert uninterrupted.exit_code == 0
    assert shard_digests(fresh) == shard_digests(out)  # resumed == uninterrupted, byte for byte


def test_verify_passes_then_catches_flipped_byte_and_missing_shard(built, tmp_path):
    ok = run_shard("verify", str(built))
    assert ok.exit_code == 0 and "ok: 12 samples verified" in ok.output
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shard = copy / read_manifest(copy)["shards"][1]["url"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    flipped = run_shard("verify", str(copy))
    assert flipped.exit_code == 1 and f"{shard.relative_to(copy)}: sha256 differs" in flipped.output
    shard.unlink()
    missing = run_shard("verify", str(copy))
    assert missing.exit_code == 1 and f"{shard.relative_to(copy)}: missing" in missing.output


def test_verify_catches_index_pointing_at_the_wrong_place(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    index = pq.read_table(copy / "index.parquet").to_pylist()
    index[3]["offset"] += 512
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(index), copy / "index.parquet")
    result = run_shard("verify", str(copy))
    assert result.exit_code == 1 and "index.parquet row 3" in result.output


def test_inspect_prints_summaries_and_writes_preview(built, tmp_path):
    shard = built / read_manifest(built)["shards"][0]["url"]
    preview = tmp_path / "preview.png"
    result = run_shard("inspect", str(shard), "--preview", str(preview))
    assert result.exit_code == 0, result.output
    assert "cloud" in result.output and "B04 " in result.output and "EPSG:32" in result.output
    from PIL import Image

    image = Image.open(preview)
    assert image.size[0] >= 120 and image.mode == "RGB"
    bad = run_shard("inspect", str(tmp_path / "nope.tar"))
    assert bad.exit_code == 2 and "expected a dataset directory or a .tar shard" in bad.output


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_is_reported_once_per_tile_from_workers(majortom, tmp_path, workers):
    from sharding.build.distributor import run_local
    from sharding.build.driver import BuildArgs, load_units, make_plan, prepare_output
    from sharding.build.unit import UnitOptions

    args = BuildArgs(str(majortom[0]), str(tmp_path / "ds"), shard_size=300_000)
    prepare_output(args, overwrite=False)
    make_plan(args)
    plan = load_units(tmp_path / "ds")
    units = [(unit, plan.rows(unit)) for unit in range(len(plan))]
    calls = []
    options = UnitOptions(args.output, "parquet", args.shard_size, args.filters)
    results = list(run_local(units, options, workers, lambda bytes_in, bytes_out: calls.append(bytes_out)))
    assert len(units) > 1 and not [r for r in results if "error" in r]
    assert len(calls) == 12 and all(size > 0 for size in calls)


def _worker_threads(name, progress=None):
    """(environment, Blosc2 threads) a pool worker started with: a job for run_jobs."""
    import blosc2

    return {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GDAL_NUM_THREADS")}, \
        blosc2.nthreads, name


def test_pool_workers_start_with_one_thread_per_library_and_the_parent_keeps_its_environment(monkeypatch):
    from sharding.build.distributor import WORKER_THREAD_ENV, run_jobs

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("GDAL_NUM_THREADS", "3")  # the user's value is kept
    before = dict(os.environ)
    results = dict(run_jobs(_worker_threads, [("a",), ("b",)], 2, lambda *event: None))
    assert sorted(name for _, _, name in results.values()) == ["a", "b"]
    for environment, blosc_threads, _ in results.values():
        assert environment == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "GDAL_NUM_THREADS": "3"}
        assert blosc_threads == 1
    assert dict(os.environ) == before and set(WORKER_THREAD_ENV) >= set(environment)


def test_a_build_refuses_blosc_variables_that_would_change_the_shard_bytes(majortom, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOSC_NTHREADS", "1")  # even 1: c-blosc2 then writes other bytes
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "ds"))
    assert result.exit_code == 2 and "BLOSC_NTHREADS is set" in result.output
    assert not (tmp_path / "ds" / "shards").exists()
