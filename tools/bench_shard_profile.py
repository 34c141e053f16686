"""The parts of tools/bench_shard.py that look inside a build: its process tree (peak RSS, threads), a spawn
worker's start-up CPU, its CPU per tile at the margin, the lower bound the format sets, a CPU profile by
cost, and a Blosc2 level sweep."""

from __future__ import annotations

import cProfile
import hashlib
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blosc2
import numpy as np
import xxhash
from rasterio.errors import RasterioError

from phileo.bands import CLOUD_MASK, RESOLUTION_GROUPS
from phileo.schema import CLOUD, DEFAULT_CLEVEL, block_shape, decode_array, encode_array
from sharding.errors import RowError
from sharding.sources.majortom import BAND_COLUMNS, decode_bands

CLEVELS, EXTRA_LEVELS = (1, 3, 5, 7, 9), (1, 3)
MB = 1e6
ROOT = Path(__file__).resolve().parents[1]
# The CPU one spawn pool worker spends before its first job: interpreter start, the imports of
# sharding.build.distributor (unit, writer, sources: numpy, pyarrow, blosc2, rasterio) and the
# initializer, exactly as the build's pool starts it.
STARTUP = r"""
import multiprocessing, resource
from concurrent.futures import ProcessPoolExecutor
from sharding.build.distributor import _init_worker, worker_thread_env
if __name__ == "__main__":
    with worker_thread_env(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_init_worker, initargs=(None,)) as pool:
        pool.submit(int).result()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(usage.ru_utime + usage.ru_stime)
"""
# (label, file suffix, function): cumulative CPU of the build's costs; "~" is a C function.
COSTS = (
    ("parquet row-group read (pyarrow, incl. the bytes' copy)", "majortom.py", "iter_parquet_rows"),
    ("GeoTIFF decode (rasterio/GDAL)", "majortom.py", "_read_geotiff"),
    ("Blosc2 ZSTD encode", "schema.py", "encode_array"),
    ("sha256 of shards as written", "~", "<method 'update' of '_hashlib.HASH' objects>"),
    ("xxh3 member checksums", "~", "<built-in method xxhash._xxhash.xxh3_64_hexdigest>"),
    ("shard writes (page cache)", "~", "<method 'write' of '_io.BufferedWriter' objects>"),
    ("fsync of shards", "~", "<built-in method posix.fsync>"),
    ("tar headers (tarfile)", "tarfile.py", "tobuf"),
    ("corners/bounds lon-lat (PROJ)", "geo.py", "corners_lonlat_from_transform"),
    *(("cloud / nodata fractions", "majortom.py", f) for f in ("cloud_cover_percent", "nodata_fraction")),
    ("band histogram", "unit.py", "sample_band_histogram"),
    ("band checks (shape, CRS, grid)", "majortom.py", "_check_band"),
    ("schema validation", "schema.py", "validate_sample"),
    ("plan (catalog listing)", "driver.py", "make_plan"),
    ("unit files (index, histogram npz)", "unit_files.py", "write_unit_files"),
    ("finalize (manifest, index.parquet)", "manifest.py", "finalize"),
)


def worker_startup_cpu(repeat: int) -> float:
    """Least CPU seconds of `repeat` starts of one spawn pool worker (STARTUP)."""
    runs = [subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, cwd=ROOT, check=True)
            for _ in range(repeat)]
    return min(float(run.stdout.strip().splitlines()[-1]) for run in runs)


def margin(run: dict, one: dict) -> float:
    """CPU s per tile at the margin: (CPU of the N-tile build - CPU of the 1-tile build) / (N - 1).

    A build process pays some CPU once, whatever its size: first-use set-up (pyarrow imports pandas on
    its first array when pandas is installed, GDAL registers its drivers, PROJ opens its database). The
    floor runs warm in the benchmark's process, so the per-tile comparison takes the build at the margin
    too; a real build pays the set-up once per worker process, over thousands of tiles."""
    return (run["cpu"] - one["cpu"]) / (run["written"] - one["written"])


def marginal_rows(runs: list[dict], ones: list[dict], floor: float, target: float) -> list[str]:
    """Rows: the 1-tile build, the margin of the least-CPU runs and of each round (`runs`, `ones`: the N-tile
    and 1-tile builds of each round, each with its round's floor); `floor`: the floor's least CPU per tile."""
    least, least_one = min(runs, key=lambda b: b["cpu"]), min(ones, key=lambda b: b["cpu"])
    per_tile = margin(least, least_one)
    rounds = [margin(run, one) / run["floor"] for run, one in zip(runs, ones)]
    each = ", ".join(f"{ratio:.2f}x" for ratio in rounds)
    return [f"| build --workers 1: CPU of a 1-tile build (set-up paid once per build process, + 1 tile) | "
            f"{least_one['cpu']:.3f} s (set-up ~{least_one['cpu'] - per_tile:.2f} s) | |",
            "| build --workers 1: CPU s/tile at the margin, (CPU(N tiles) - CPU(1 tile)) / (N - 1), "
            f"least-CPU runs | {per_tile:.4f} | **{per_tile / floor:.2f}x** (target <= {target}x) |",
            "| build --workers 1 at the margin / floor, each round (floor measured just before the builds) | "
            f"{each} (median {statistics.median(rounds):.2f}x) | |"]


def _hwm_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a live process in MB; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(x.split()[1]) * 1024 / MB for x in status if x.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


def poll_tree(proc: subprocess.Popen, interval: float = 0.05) -> dict[int, tuple[float, int, bool]]:
    """pid -> (VmHWM MB, most threads seen, is a pool worker) for the descendants of `proc` (needs psutil)."""
    try:
        import psutil
    except ModuleNotFoundError:
        proc.wait()
        return {}
    peaks: dict[int, tuple[float, int, bool]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in root.children(recursive=True):
                worker = "spawn_main" in " ".join(p.cmdline())
                mb, threads, _ = peaks.get(p.pid, (0.0, 0, False))
                peaks[p.pid] = (max(_hwm_mb(p.pid), mb), max(p.num_threads(), threads), worker)
        except psutil.Error:  # a process ended between listing and reading: next round
            pass
        time.sleep(interval)
    return peaks


PER_UNIT_OR_BUILD = ("plan (catalog listing)", "unit files (index, histogram npz)",
                     "finalize (manifest, index.parquet)")


def profile_build(input_path: Path, output: Path, tiles: int, shard_size: int, clevel: int,
                  floor: float) -> list[str]:
    """cProfile (CPU-time clock) an in-process --workers 1 build of `tiles` tiles: a Markdown table by cost.

    `floor`: the floor's CPU s per tile, for the per-tile work's ratio."""
    from sharding.build.driver import BuildArgs, build
    from sharding.build.plan import Filters

    args = BuildArgs(str(input_path), str(output), Filters(limit=tiles), shard_size, clevel=clevel)
    build(args, workers=1, overwrite=True)  # warm: first-use set-up (GDAL drivers, PROJ database) is not per tile
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    summary = build(args, workers=1, overwrite=True)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    cum: dict[str, float] = {}
    for (file, _, name), (_, _, _, cumtime, _) in stats.items():
        for label, suffix, func in COSTS:
            if name == func and file.endswith(suffix):
                cum[label] = cum.get(label, 0.0) + cumtime
    total = max(sum(v[3] for k, v in stats.items() if k[2] == "build" and k[0].endswith("driver.py")), 1e-9)
    n = max(summary.written, 1)
    cum["everything else (Python glue, json, copies, logging)"] = total - sum(cum.values())
    per_tile = (total - sum(cum.get(label, 0.0) for label in PER_UNIT_OR_BUILD)) / n
    note = (f"Per-tile work (all but plan, unit files and finalize, paid once per build or per unit; a unit of a "
            f"real build is ~1 GB of shards, ~150 tiles, here {shard_size / 1e6:.0f} MB): {per_tile:.4f} CPU s/tile, "
            f"**{per_tile / floor:.2f}x** the floor's least CPU per tile in this run (profiler overhead included).")
    return [f"CPU profile (cProfile on the process-time clock, profiler overhead included) of an in-process "
            f"`build()` of {summary.written} tiles, --workers 1, after one warm-up build ({total:.2f} CPU s, "
            f"{total / n:.3f} s/tile):", "",
            "| cost | CPU s/tile | share of build |", "|---|---|---|",
            *(f"| {label} | {sec / n:.4f} | {sec / total:.1%} |" for label, sec in
              sorted(cum.items(), key=lambda kv: (kv[0].startswith("everything else"), -kv[1]))), "", note]


def clevel_sweep(kept: list[tuple[dict, int]], repeats: int = 2) -> list[dict]:
    """Encode/decode the kept tiles' arrays per variant, 1 Blosc2 thread; MB/s of uncompressed bytes per CPU s.

    Variants: `encode_array` (ZSTD + SHUFFLE, the schema's) at CLEVELS, plus SHUFFLE + BYTEDELTA at
    EXTRA_LEVELS (same ZSTD codec; the cframe is self-describing, `decode_array` reads it unchanged).
    """
    raw, tiff, rows = sum(a.nbytes for arrays, _ in kept for a in arrays.values()), sum(t for _, t in kept), []
    threads = blosc2.nthreads
    blosc2.set_nthreads(1)
    variants = [(c, None) for c in CLEVELS] + [(c, [blosc2.Filter.SHUFFLE, blosc2.Filter.BYTEDELTA])
                                               for c in EXTRA_LEVELS]
    for clevel, filters in variants:
        cparams = filters and blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=clevel, filters=filters, nthreads=1)
        enc_s, dec_s = [], []
        while len(enc_s) < repeats and sum(enc_s) < 3.0:  # one repeat only for the slow high levels
            started = time.process_time()
            frames = [encode_array(a, clevel, block_shape(member, a.shape)) if not filters else
                      blosc2.asarray(a, cparams=cparams, **_layout(member, a)).to_cframe()
                      for arrays, _ in kept for member, a in arrays.items()]
            enc_s.append(time.process_time() - started)
        for _ in range(repeats):
            started = time.process_time()
            for frame in frames:
                decode_array(frame)
            dec_s.append(time.process_time() - started)
        size = sum(len(f) for f in frames)
        rows.append({"clevel": clevel, "filters": "SHUFFLE+BYTEDELTA" if filters else "SHUFFLE",
                     "enc_mbs": raw / MB / max(min(enc_s), 1e-9), "dec_mbs": raw / MB / max(min(dec_s), 1e-9),
                     "vs_tiff": size / tiff, "vs_raw": size / raw})
    blosc2.set_nthreads(threads)
    return rows


def kept_members(kept: list[dict]) -> list[tuple[dict, int]]:
    """(member arrays as the build makes them, GeoTIFF bytes) of the kept rows, for the sweep."""
    out = []
    for columns in kept:
        try:
            arrays, _, _ = decode_bands(columns)
        except RowError:
            continue
        out.append((arrays, sum(len(columns.get(name) or b"") for name in BAND_COLUMNS)))
    return out


REQUIRED_STEPS = {"read": "parquet read of the rows (pyarrow; part of the floor)",
                  "decode": "GeoTIFF decode (rasterio; part of the floor)",
                  "encode": "Blosc2 ZSTD-1 + SHUFFLE encode of every member (phileo/schema.py `encode_array`)",
                  "xxh3": "xxh3 of every member (meta.json checksums)",
                  "sha256": "sha256 of the shard bytes (manifest.json)",
                  "write": "write to the page cache (no fsync)"}


def required_pass(rows: Iterator[dict], decode: Callable[[dict], list], clevel: int) -> dict[str, float]:
    """CPU s per tile of what the format requires of any build, each step timed apart in one streamed pass
    over `rows` (column dicts; reading them is the "read" step): the floor (`decode`: the floor's decode,
    one array per BAND_COLUMNS entry), then Blosc2-encode every member as the build lays it out, xxh3
    every member (meta.json), sha256 the shard bytes (manifest), write them to the page cache."""
    cpu, tiles, digest, clock = dict.fromkeys(REQUIRED_STEPS, 0.0), 0, hashlib.sha256(), time.process_time
    with tempfile.TemporaryFile() as sink:
        while True:
            started = clock()
            columns = next(rows, None)
            cpu["read"] += clock() - started
            if columns is None:
                break
            started = clock()
            try:
                bands = dict(zip(BAND_COLUMNS, decode(columns)))
            except RasterioError:  # the floor skips such rows, and the build rejects them
                continue
            cpu["decode"] += clock() - started
            frames = _encode_members(bands, clevel, cpu)
            for step, work in (("xxh3", xxhash.xxh3_64_hexdigest), ("sha256", digest.update), ("write", sink.write)):
                started = clock()
                for frame in frames:
                    work(frame)
                cpu[step] += clock() - started
            sink.seek(0)
            tiles += 1
    return {step: sec / max(tiles, 1) for step, sec in cpu.items()}


def _encode_members(bands: dict, clevel: int, cpu: dict[str, float]) -> list[bytes]:
    """The tile's members as the build stacks them (not timed), then encoded (timed, into cpu["encode"])."""
    members = {member: np.stack([bands[band] for band in names]) for member, (names, _) in RESOLUTION_GROUPS.items()}
    members[CLOUD] = bands[CLOUD_MASK]
    started = time.process_time()
    frames = [encode_array(a, clevel, block_shape(member, a.shape)) for member, a in members.items()]
    cpu["encode"] += time.process_time() - started
    return frames


def required_table(passes: list[dict[str, float]]) -> list[str]:
    """The lower bound of any build in this format, floor + encode + hashes + write, against the same pass's
    floor: the pass with the least CPU, and the ratio of every pass."""
    def ratio(cpu: dict[str, float]) -> float:
        return sum(cpu.values()) / (cpu["read"] + cpu["decode"])

    cpu = min(passes, key=lambda p: sum(p.values()))
    floor = cpu["read"] + cpu["decode"]
    lines = ["| step | CPU s/tile | vs the pass's floor |", "|---|---|---|"]
    for step, label in REQUIRED_STEPS.items():
        lines.append(f"| {label} | {cpu[step]:.4f} | {cpu[step] / floor:.3f}x |")
        if step == "decode":
            lines.append(f"| floor (read + decode) in this pass | {floor:.4f} | 1.000x |")
    each = ", ".join(f"{ratio(p):.2f}x" for p in passes)
    return lines + [f"| **lower bound**: floor + encode + xxh3 + sha256 + write | {sum(cpu.values()):.4f} | "
                    f"**{ratio(cpu):.2f}x** |",
                    f"| lower bound / floor, each pass | {each} (median "
                    f"{statistics.median(ratio(p) for p in passes):.2f}x) | |"]


def _layout(member: str, array) -> dict:
    """The build's chunk/block layout for a member (phileo/schema.py `block_shape`)."""
    blocks = block_shape(member, array.shape)
    return {} if blocks is None else {"chunks": array.shape, "blocks": blocks}


def sweep_table(sweep: list[dict], base: dict) -> list[str]:
    tiff_mbs = base["raw_bytes"] / MB / base["cpu"]
    lines = ["| Blosc2 clevel | zstd level | filters | encode MB/s per CPU s | decode MB/s per CPU s | bytes vs "
             "source GeoTIFF | bytes vs raw |", "|---|---|---|---|---|---|---|",
             f"| GeoTIFF (source) | deflate | predictor 2 | - | {tiff_mbs:.0f} (rasterio, incl. parquet read) | "
             f"1.000 | {base['tiff_bytes'] / base['raw_bytes']:.3f} |"]
    for r in sweep:
        mark = " (default)" if r["clevel"] == DEFAULT_CLEVEL and r["filters"] == "SHUFFLE" else ""
        zstd = 2 * r["clevel"] - 1 if r["clevel"] < 8 else {8: 20, 9: 22}[r["clevel"]]  # c-blosc2's mapping
        lines.append(f"| {r['clevel']}{mark} | {zstd} | {r['filters']} | {r['enc_mbs']:.0f} | {r['dec_mbs']:.0f} | "
                     f"{r['vs_tiff']:.3f} | {r['vs_raw']:.3f} |")
    return lines
