"""Benchmark `phileo-shard build` against its floor: pure GeoTIFF decoding of the same rows, in CPU time.

One run: writes a MajorTOM-format fixture (synthetic pixels, tools/majortom_fixture.py, or real
Sentinel-2 L2A pixels, tools/real_s2_fixture.py: --pixels real) or takes --input (a MajorTOM
directory, e.g. one that tools/real_s2_fixture.py wrote), decodes every band of every row with
rasterio in one process (the floor), then runs the real build in fresh subprocesses with --workers 1
and N, interleaved, and measures the CPU time of every process of each build, the CPU a spawn
worker spends starting (interpreter and imports), tiles/s, shard against source bytes and peak RSS
per process; it also sweeps the Blosc2 ZSTD level and profiles a short build by cost. CPU time, not
wall time, is the measure: on a shared machine wall time depends on the other jobs (the load
average is recorded with each build). Prints Markdown; --write-docs updates docs/benchmarks.md.

    python tools/bench_shard.py [--tiles 24] [--tile-size 1068] [--pixels real] [--workers 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import rasterio
from rasterio.io import MemoryFile
from rasterio.session import DummySession

from phileo.schema import DEFAULT_CLEVEL
from sharding.sources.majortom import BAND_COLUMNS, iter_parquet_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.bench_shard_profile import (  # noqa: E402
    clevel_sweep,
    kept_members,
    marginal_rows,
    poll_tree,
    profile_build,
    required_pass,
    required_table,
    sweep_table,
    worker_startup_cpu,
)
from tools.docs_section import write_docs_section  # noqa: E402
from tools.real_s2_fixture import FIXTURE_JSON  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTIONS = {"synthetic": "## Shard build (tools/bench_shard.py)",
            "real": "## Shard build on real pixels (tools/bench_shard.py --pixels real)"}
MB = 1e6
TARGET_CPU_RATIO = 1.6  # build CPU per tile against the floor's
# Runs the build in a fresh interpreter, the build's modules imported before the clock starts (a
# spawn worker's imports are measured on their own: STARTUP). CPU = this process + its reaped
# children (the pool workers). Peak RSS = VmHWM of its own address space: ru_maxrss would inherit
# the benchmark's RSS at fork time, so it is not used.
CHILD = r"""
import json, os, resource, sys
import sharding.build.distributor, sharding.build.unit
from sharding.build.driver import BuildArgs, build
from sharding.build.plan import Filters
spec = json.loads(sys.argv[1])
args = BuildArgs(spec["input"], spec["output"], Filters(limit=spec["limit"]), spec["shard_size"],
                 clevel=spec["clevel"])
def cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
self0, kids0, load0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
s = build(args, workers=spec["workers"], overwrite=True)
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"seconds": s.seconds, "cpu_self": cpu(resource.RUSAGE_SELF) - self0,
                  "cpu_workers": cpu(resource.RUSAGE_CHILDREN) - kids0, "load": [load0, os.getloadavg()[0]],
                  "written": s.written, "rejected": s.rejected, "shards": s.shards, "bytes_out": s.bytes_out,
                  "failed": len(s.failed_units), "main_mb": int(hwm[0]) * 1024 / 1e6 if hwm else 0.0}))
"""
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=24, help="tiles to generate (or to take from --input)")
    parser.add_argument("--tile-size", type=int, default=1068, help="fixture tile size in 10 m pixels")
    parser.add_argument("--pixels", choices=("synthetic", "real"), default="synthetic",
                        help="fixture: tools/majortom_fixture.py or tools/real_s2_fixture.py (mosaic tiles)")
    parser.add_argument("--files", type=int, default=3, help="fixture parquet files")
    parser.add_argument("--workers", type=int, default=1, help="also build with this many workers when > 1")
    parser.add_argument("--input", type=Path, help="MajorTOM dir (images/*.parquet) or one .parquet file; "
                        "a directory tools/real_s2_fixture.py wrote is recognised")
    parser.add_argument("--shard-size", type=int, default=0, help="bytes; 0: a quarter of the source (>= 4 units)")
    parser.add_argument("--clevel", type=int, default=DEFAULT_CLEVEL, help="ZSTD level of the timed builds")
    parser.add_argument("--repeat", type=int, default=2, help="runs of the floor and of each build (least CPU kept)")
    parser.add_argument("--sweep-tiles", type=int, default=3, help="tiles used by the clevel sweep")
    parser.add_argument("--profile", type=int, default=6, metavar="N", help="profile a build of N tiles (0: skip)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    return parser.parse_args(argv)


def make_fixture(out: Path, args: argparse.Namespace) -> Path:
    """Real-format fixture: `files` parquet files, one row per row group."""
    files = max(1, min(args.files, args.tiles))
    rows = max(1, args.tiles // files)
    started = time.perf_counter()
    if args.pixels == "real":
        from tools.real_s2_fixture import make_real_s2_dataset

        make_real_s2_dataset(out, num_files=files, rows_per_file=rows, tile_size=args.tile_size)
    else:
        from tools.majortom_fixture import make_majortom_dataset

        make_majortom_dataset(out, num_files=files, rows_per_file=rows, rows_per_row_group=1,
                              tile_size=args.tile_size)
    print(f"fixture: {files * rows} {args.pixels} tiles of {args.tile_size}px in {files} files, "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return out


def source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    images = path / "images" if (path / "images").is_dir() else path
    files = sorted(p for p in images.glob("*.parquet") if p.name != "metadata.parquet")
    if not files:
        raise SystemExit(f"error: no images/*.parquet or *.parquet under {path}")
    return files


def plan_rows(files: list[Path], limit: int) -> list[tuple[Path, int, int]]:
    """(file, rows taken, rows in file) for the first `limit` rows in source order (footers only)."""
    import pyarrow.parquet as pq

    taken, left = [], limit
    for file in files:
        rows = pq.ParquetFile(file).metadata.num_rows
        if left > 0:
            taken.append((file, min(rows, left), rows))
        left -= rows
    return taken


def decode_floor(columns: dict) -> list:
    """The least a build must do with a row: decode every band GeoTIFF (no checks, no stacking)."""
    with rasterio.Env(session=DummySession()):
        arrays = []
        for name in BAND_COLUMNS:
            with MemoryFile(columns[name]) as memfile, memfile.open() as dataset:
                arrays.append(dataset.read(1))
        return arrays


def floor_rows(taken: list[tuple[Path, int, int]]) -> Iterator[dict]:
    """The columns of the rows `plan_rows` took, read one row group at a time."""
    for file, count, _ in taken:
        for _, columns in iter_parquet_rows(str(file), list(range(count)), False):
            yield columns


def baseline_decode(files: list[Path], limit: int, keep: int) -> dict:
    """The floor: pyarrow read + rasterio decode of every band, one process. Keeps `keep` tiles for the sweep."""
    taken = plan_rows(files, limit)
    tiles, bad, tiff_bytes, raw_bytes, kept = 0, 0, 0, 0, []
    started, cpu = time.perf_counter(), time.process_time()
    for columns in floor_rows(taken):
        try:  # real data: the build rejects such rows too
            arrays = decode_floor(columns)
        except rasterio.errors.RasterioError:
            bad += 1
            continue
        tiles, raw_bytes = tiles + 1, raw_bytes + sum(a.nbytes for a in arrays)
        tiff_bytes += sum(len(columns.get(name) or b"") for name in BAND_COLUMNS)
        if len(kept) < keep:
            kept.append(columns)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - started
    print(f"floor: {tiles} tiles decoded in {cpu:.2f} CPU s ({wall:.1f} s wall)"
          + (f", {bad} bad row(s) skipped" if bad else ""), flush=True)
    return {"tiles": tiles, "seconds": wall, "cpu": cpu, "tiff_bytes": tiff_bytes, "raw_bytes": raw_bytes,
            "kept": kept, "parquet_bytes": sum(f.stat().st_size for f, _, _ in taken),
            "files_whole": all(count == rows for _, count, rows in taken)}


def run_build(input_path: Path, output: Path, workers: int, limit: int, shard_size: int, clevel: int) -> dict:
    """Build in a subprocess; poll the process tree for peak RSS and threads per pid (psutil, when installed)."""
    spec = {"input": str(input_path), "output": str(output), "workers": workers, "limit": limit,
            "shard_size": shard_size, "clevel": clevel}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peaks = poll_tree(proc)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: build --workers {workers} failed (rc {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if result["failed"] or result["written"] == 0:
        raise SystemExit(f"error: build --workers {workers} wrote {result['written']} tiles, "
                         f"{result['failed']} unit(s) failed:\n{err[-4000:]}")
    pool = [(mb, threads) for pid, (mb, threads, worker) in peaks.items() if worker and pid != proc.pid]
    cpu = result["cpu_self"] + result["cpu_workers"]
    print(f"build --workers {workers}: {result['written']} tiles in {result['shards']} shards, "
          f"{result['seconds']:.1f} s (wall {wall:.1f} s), {cpu:.2f} CPU s, load {result['load'][0]:.2f}", flush=True)
    return result | {"wall": wall, "workers": workers, "cpu": cpu, "spawned": len(pool) if peaks else workers,
                     "workers_mb": sorted((mb for mb, _ in pool), reverse=True),
                     "threads": max((threads for _, threads in pool), default=0)}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo.splitlines() if x.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, {mem:.0f} GiB RAM"


def _round_ratios(runs: list[dict]) -> str:
    return ", ".join(f"{run['cpu'] / run['written'] / run['floor']:.2f}x" for run in runs)


def _rates(runs: list[dict]) -> str:
    return ", ".join(f"{run['written'] / run['seconds']:.2f}" for run in runs)


def _load(b: dict) -> str:
    return f"load {b['load'][0]:.2f} -> {b['load'][1]:.2f}"


def results_table(base: dict, builds: dict[int, list[dict]], startup: float) -> list[str]:
    """Floor, CPU per tile of every build (least-CPU run of each), tiles/s, bytes, RSS."""
    tiles, one = base["tiles"], min(builds[1], key=lambda b: b["cpu"])
    floor = base["cpu"] / tiles
    one_cpu = one["cpu"] / one["written"]
    lines = ["| measure | value | vs floor / target |", "|---|---|---|",
             f"| tiles (rows decoded by the floor / written by the build) | {tiles} / {one['written']} | |",
             f"| floor: pyarrow read + rasterio decode of every band GeoTIFF, 1 process | {floor:.4f} CPU s/tile "
             f"({base['raw_bytes'] / MB / base['cpu']:.0f} MB of pixels per CPU s) | 1.00 |",
             f"| build --workers 1: CPU s/tile, whole `build()` (plan, units, finalize, once-per-process set-up) "
             f"| {one_cpu:.4f} | {one_cpu / floor:.2f}x |",
             "| build --workers 1 / floor, CPU per tile, each round (floor measured just before the build) | "
             f"{_round_ratios(builds[1])} | |",
             *marginal_rows(builds[1], base["ones"], floor, TARGET_CPU_RATIO),
             f"| build --workers 1: tiles/s (`build()` wall time; runs: "
             f"{_rates(builds[1])}) | "
             f"{one['written'] / one['seconds']:.2f} ({_load(one)}) | |"]
    for workers, runs in sorted(builds.items()):
        if workers > 1:
            lines += worker_rows(workers, runs, one, floor, startup)
    lines += bytes_rows(base, one)
    return lines + [row for workers, runs in sorted(builds.items())
                    for row in rss_rows(min(runs, key=lambda b: b["cpu"]))]


def worker_rows(workers: int, runs: list[dict], one: dict, floor: float, startup: float) -> list[str]:
    """CPU per tile with N workers, all processes and net of the workers' start-up, and tiles/s against 1 worker."""
    b = min(runs, key=lambda b: b["cpu"])
    every, net = b["cpu"] / b["written"], (b["cpu"] - b["spawned"] * startup) / b["written"]
    one_cpu, one_rate, rate = one["cpu"] / one["written"], one["written"] / one["seconds"], b["written"] / b["seconds"]
    return [f"| build --workers {workers}: CPU s/tile, all processes (parent {b['cpu_self']:.2f} s + workers "
            f"{b['cpu_workers']:.2f} s) | {every:.4f} | {every / floor:.2f}x |",
            f"| spawn pool worker start-up: interpreter + imports, CPU s per worker (x {b['spawned']} workers) | "
            f"{startup:.2f} | |",
            f"| build --workers {workers}: CPU s/tile net of the workers' start-up | {net:.4f} | "
            f"**{net / one_cpu:.2f}x** of --workers 1's |",
            f"| build --workers {workers}: tiles/s (`build()` wall time; runs: "
            f"{_rates(runs)}) | {rate:.2f} ({_load(b)}) | "
            f"{rate / one_rate:.2f}x of --workers 1's (wall: not comparable on a shared machine) |",
            f"| build --workers {workers}: threads per pool worker (most seen) | {b['threads'] or 'n/a'} | |"]


def bytes_rows(base: dict, one: dict) -> list[str]:
    tiles = base["tiles"]
    src = base["parquet_bytes"] / tiles if base["files_whole"] else base["tiff_bytes"] / tiles
    src_name = "source parquet" if base["files_whole"] else "source band GeoTIFF"
    return [f"| shard bytes / tile | {one['bytes_out'] / one['written'] / MB:.2f} MB | "
            f"**{one['bytes_out'] / one['written'] / src:.3f}** of {src_name} (target <= 1.0) |",
            f"| {src_name} bytes / tile | {src / MB:.2f} MB | 1.000 |",
            f"| band GeoTIFF bytes / tile (13 columns) | {base['tiff_bytes'] / tiles / MB:.2f} MB | "
            f"shards: {one['bytes_out'] / base['tiff_bytes']:.3f} |"]


def rss_rows(b: dict) -> list[str]:
    name = f"build --workers {b['workers']}"
    if b["workers"] == 1:
        return [f"| {name}: peak RSS (VmHWM) of the build process | {b['main_mb']:.0f} MB | |"]
    polled = ", ".join(f"{mb:.0f}" for mb in b["workers_mb"]) or "n/a (needs psutil)"
    return [f"| {name}: peak RSS (VmHWM) per pool worker | {polled} MB | |",
            f"| {name}: peak RSS of the parent (plan, pool, finalize) | {b['main_mb']:.0f} MB | |"]


def source_note(args: argparse.Namespace) -> str:
    if args.input is None and args.pixels == "synthetic":
        return ("Source: synthetic MajorTOM-format fixture (tools/majortom_fixture.py: smooth plane waves + 2% "
                "Gaussian noise per band, real grids/CRSs/GeoTIFF encoding). Synthetic pixels compress "
                "differently from real Sentinel-2 L2A (real byte ratios: the real-pixel and codec sections); "
                "CPU ratios to the floor transfer better, since both sides decode the same GeoTIFFs.")
    if args.input is None:
        return ("Source: real Sentinel-2 L2A pixels (tools/real_s2_fixture.py: 3 BigEarthNet patches, "
                f"tests/data/README.md) as {args.tile_size} px `mosaic` tiles of 120 px patches, flipped so "
                "that no sub-patch repeats its neighbour's bytes; byte ratios carry an edge every 120 px "
                "(codec section).")
    made = args.input / FIXTURE_JSON
    if made.is_file():
        info = json.loads(made.read_text())
        return (f"Source: `{args.input}`, written by {info['fixture']} ({info['pixels']}; {info['tiles']} tiles "
                f"of {info['tile_size']} px, fill {info['fill']}).")
    return f"Source: MajorTOM parquet files under `{args.input}` ({args.pixels} pixels)."


def workers_note(builds: dict[int, list[dict]], startup: float) -> str:
    """What the --workers N rows say, in this run's numbers."""
    one = min(builds[1], key=lambda b: b["cpu"])
    workers, runs = max(builds.items())
    b = min(runs, key=lambda b: b["cpu"])
    one_cpu, net = one["cpu"] / one["written"], (b["cpu"] - b["spawned"] * startup) / b["written"]
    rate = (b["written"] / b["seconds"]) / (one["written"] / one["seconds"])
    return (f"Reading the --workers {workers} rows: each spawn worker first spends {startup:.2f} CPU s starting "
            f"(interpreter and imports), the work of {startup / one_cpu:.0f} tiles; here that is "
            f"{b['spawned'] * startup / b['cpu']:.0%} of the build's CPU, once per worker per build (a unit "
            "of a real build is ~1 GB of shards, ~150 tiles). Net of it a tile costs "
            f"{net / one_cpu:.2f}x its CPU with 1 worker: the work per tile does not grow with workers. "
            f"Wall clock: {rate:.2f}x the tiles/s of 1 worker, on {len(os.sched_getaffinity(0))} cores that "
            f"other jobs kept busy (load {b['load'][0]:.1f}): not a measure of scaling. Each worker runs "
            f"at most {b['threads'] or 'n/a'} threads (one per library, sharding/build/distributor.py "
            "WORKER_THREAD_ENV; besides the main thread: the progress queue's feeder, pyarrow's pool and its "
            "jemalloc background thread; 7 before the pinning).")


def docs_section(args: argparse.Namespace, base: dict, tables: list[str], load: str) -> str:
    command = "python tools/bench_shard.py " + " ".join(sys.argv[1:])
    return "\n".join([
        SECTIONS[args.pixels], "", f"Command: `{command}`", "",
        f"Machine: {machine()}, shared with other jobs: load average {load}; Python {sys.version.split()[0]}. "
        f"Date: {datetime.date.today().isoformat()}.", "", source_note(args), "",
        "Floor = the same rows read with pyarrow (one row group at a time) and every band GeoTIFF decoded "
        "with rasterio, each into its own array, in the benchmark's process: no checks, no stacking, no "
        "writing. Each build runs in a fresh subprocess with its modules imported before the clock starts; "
        "its CPU time is user + system of every thread of the build process and of its pool workers "
        "(plan, units, finalize). A spawn pool worker's own start-up (interpreter, imports) is measured "
        "apart, paid once per worker per build. Builds with 1 and N workers run interleaved, "
        f"{args.repeat} times each; the run with the least CPU is shown, with its `build()` wall time and "
        "the load average around it. Each round also builds 1 tile in a fresh process: what a build process "
        "pays once (first-use set-up), which a real build pays once per worker over thousands of tiles. The "
        "per-tile target is judged at the margin, (CPU(N tiles) - CPU(1 tile)) / (N - 1), as the floor "
        "runs warm. CPU time is the measure: wall time on this shared machine depends "
        f"on the other jobs. Shard size {base['shard_size'] / MB:.0f} MB"
        + ("" if args.shard_size else " (a quarter of the source, so the build has several units)") + ".", "",
        *tables, ""])


def measure(args: argparse.Namespace, work: Path) -> tuple[dict, dict[int, list[dict]], float, list, list[str]]:
    input_path = args.input or make_fixture(work / "input", args)
    files = source_files(input_path)
    builds: dict[int, list[dict]] = {workers: [] for workers in sorted({1, args.workers})}
    floors, ones, passes, shard_size = [], [], [], args.shard_size
    for round_number in range(args.repeat):  # floor and builds interleaved: they see the same spells of load
        floors.append(baseline_decode(files, args.tiles, args.sweep_tiles if round_number == 0 else 0))
        shard_size = shard_size or max(1, floors[0]["tiff_bytes"] // 4)
        for workers, done in builds.items():
            done.append(run_build(input_path, work / f"out-w{workers}", workers, floors[0]["tiles"], shard_size,
                                  args.clevel) | {"floor": floors[-1]["cpu"] / floors[-1]["tiles"]})
        ones.append(run_build(input_path, work / "out-one", 1, 1, shard_size, args.clevel))
        passes.append(required_pass(floor_rows(plan_rows(files, args.tiles)), decode_floor, args.clevel))
    base = floors[0] | {key: min(run[key] for run in floors) for key in ("seconds", "cpu")}
    base["shard_size"], base["ones"], base["passes"] = shard_size, ones, passes
    startup = worker_startup_cpu(args.repeat) if args.workers > 1 else 0.0
    sweep = clevel_sweep(kept_members(base.pop("kept")))
    profile = profile_build(input_path, work / "out-profile", min(args.profile, base["tiles"]), shard_size,
                            args.clevel, base["cpu"] / base["tiles"]) if args.profile else []
    return base, builds, startup, sweep, profile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.tiles, args.workers, args.repeat) < 1:
        raise SystemExit("error: --tiles, --workers and --repeat must be >= 1")
    made = args.input / FIXTURE_JSON if args.input else None
    if made is not None and made.is_file() and json.loads(made.read_text())["pixels"].startswith("real"):
        args.pixels = "real"  # a tools/real_s2_fixture.py directory: the real-pixel section
    tmp = tempfile.mkdtemp(prefix="bench_shard-")
    print(f"work directory: {tmp}", flush=True)
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        base, builds, startup, sweep, profile = measure(args, Path(tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    load = f"{load_before} before, {', '.join(f'{x:.2f}' for x in os.getloadavg())} after (1, 5, 15 min)"
    tables = [*results_table(base, builds, startup), "",
              f"Blosc2 ZSTD level sweep on {min(args.sweep_tiles, base['tiles'])} decoded tiles (all members; "
              "MB/s of uncompressed array bytes per CPU s, 1 Blosc2 thread, best of 2):", "",
              *sweep_table(sweep, base)]
    tables += ["", "What the format requires of any build, per tile: one pass over the same rows each round, "
               "each step timed apart, against the floor (read + decode) of the same pass:", "",
               *required_table(base["passes"])]
    if args.workers > 1:
        tables += ["", workers_note(builds, startup)]
    if profile:
        tables += ["", *profile]
    print("\n" + "\n".join(tables))
    if args.write_docs:
        write_docs_section(SECTIONS[args.pixels], docs_section(args, base, tables, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
