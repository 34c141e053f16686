"""Benchmark `phileo-shard build` against its floor: pure GeoTIFF decoding of the same rows.

One run: (1) writes a MajorTOM-format fixture (or takes --input with real Core-S2L2A parquet
files), (2) decodes every band of every row with rasterio in one process (the baseline),
(3) runs the real build in a subprocess (--workers 1, and --workers N when N > 1) and times
it, (4) compares shard bytes with source bytes, (5) records peak RSS per build process and
(6) sweeps the Blosc2 ZSTD level on a few decoded tiles. Prints Markdown tables; with
--write-docs it replaces the "## Shard build (tools/bench_shard.py)" section of
docs/benchmarks.md.

    python tools/bench_shard.py [--tiles 24] [--tile-size 1068] [--workers 1] [--write-docs]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phileo.schema import DEFAULT_CLEVEL, decode_array, encode_array
from sharding.sources.majortom import BAND_COLUMNS, decode_bands, iter_parquet_rows

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Shard build (tools/bench_shard.py)"
DOCS_HEADER = ("# Benchmarks\n\nMeasured figures of the tools in tools/, each section written by the tool "
               "named in its heading. Rerun the command shown to refresh a section.\n")
CLEVELS = (1, 3, 5, 7, 9)
MB = 1e6
# Runs the build in a fresh interpreter so its peak RSS is its own (ru_maxrss never goes down).
CHILD = r"""
import json, resource, sys, time
from sharding.build import BuildArgs, build
from sharding.plan import Filters
spec = json.loads(sys.argv[1])
args = BuildArgs(spec["input"], spec["output"], Filters(limit=spec["limit"]), spec["shard_size"],
                 clevel=spec["clevel"])
summary = build(args, workers=spec["workers"], overwrite=True)
print(json.dumps({"seconds": summary.seconds, "written": summary.written, "rejected": summary.rejected,
                  "shards": summary.shards, "bytes_out": summary.bytes_out, "bytes_in": summary.bytes_in,
                  "failed": len(summary.failed_units),
                  "rss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rss_children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=24, help="tiles to generate (or to take from --input)")
    parser.add_argument("--tile-size", type=int, default=1068, help="fixture tile size in 10 m pixels")
    parser.add_argument("--files", type=int, default=3, help="fixture parquet files")
    parser.add_argument("--workers", type=int, default=1, help="also build with this many workers when > 1")
    parser.add_argument("--input", type=Path, help="real MajorTOM dir (images/*.parquet) or one .parquet file")
    parser.add_argument("--shard-size", type=int, default=0,
                        help="shard size in bytes; 0 = a quarter of the source bytes, so --workers 2 gets work")
    parser.add_argument("--clevel", type=int, default=DEFAULT_CLEVEL, help="ZSTD level of the timed builds")
    parser.add_argument("--sweep-tiles", type=int, default=3, help="tiles used by the clevel sweep")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also cProfile an in-process build of the first N tiles and print the top costs")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def make_fixture(out: Path, tiles: int, files: int, tile_size: int) -> Path:
    """Real-format fixture: `files` parquet files, one row per row group."""
    sys.path.insert(0, str(ROOT))
    from tools.majortom_fixture import make_majortom_dataset

    files = max(1, min(files, tiles))
    rows = max(1, tiles // files)
    started = time.perf_counter()
    make_majortom_dataset(out, num_files=files, rows_per_file=rows, rows_per_row_group=1, tile_size=tile_size)
    print(f"fixture: {files * rows} tiles of {tile_size}px in {files} files, "
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


def iter_rows(files: list[Path], limit: int):
    """(file, columns) of the first `limit` rows in source order, as the build plans them."""
    import pyarrow.parquet as pq

    left = limit
    for file in files:
        count = min(pq.ParquetFile(file).metadata.num_rows, left)
        if count <= 0:
            return
        for _, columns in iter_parquet_rows(str(file), list(range(count)), False):
            yield file, columns
        left -= count


def baseline_decode(files: list[Path], limit: int, keep: int) -> dict:
    """The floor: read + rasterio-decode every band, one process. Keeps `keep` tiles for the sweep."""
    tiles, tiff_bytes, raw_bytes, kept = 0, 0, 0, []
    started = time.perf_counter()
    for _, columns in iter_rows(files, limit):
        arrays, _, _ = decode_bands(columns)
        tiles += 1
        tiff_bytes += sum(len(columns[name]) for name in BAND_COLUMNS)
        raw_bytes += sum(a.nbytes for a in arrays.values())
        if len(kept) < keep:
            kept.append((arrays, sum(len(columns[name]) for name in BAND_COLUMNS)))
    seconds = time.perf_counter() - started
    touched = [f for f, _ in iter_rows_files(files, tiles)]
    return {"tiles": tiles, "seconds": seconds, "tiff_bytes": tiff_bytes, "raw_bytes": raw_bytes,
            "parquet_bytes": sum(f.stat().st_size for f in touched), "files_whole": _whole(files, tiles),
            "kept": kept}


def iter_rows_files(files: list[Path], limit: int):
    """(file, rows taken) for the first `limit` rows; footers only."""
    import pyarrow.parquet as pq

    left = limit
    for file in files:
        count = min(pq.ParquetFile(file).metadata.num_rows, left)
        if count > 0:
            yield file, count
        left -= count


def _whole(files: list[Path], limit: int) -> bool:
    import pyarrow.parquet as pq

    return all(pq.ParquetFile(f).metadata.num_rows == n for f, n in iter_rows_files(files, limit))


def run_build(input_path: Path, output: Path, workers: int, limit: int, shard_size: int, clevel: int) -> dict:
    """Build in a subprocess; poll the process tree for peak RSS per pid (psutil, when installed)."""
    spec = {"input": str(input_path), "output": str(output), "workers": workers, "limit": limit,
            "shard_size": shard_size, "clevel": clevel}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peaks = poll_rss(proc)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: build --workers {workers} failed (rc {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if result["failed"] or result["written"] == 0:
        raise SystemExit(f"error: build --workers {workers} wrote {result['written']} tiles, "
                         f"{result['failed']} unit(s) failed:\n{err[-4000:]}")
    worker_peaks = [mb for pid, (mb, is_worker) in peaks.items() if is_worker and pid != proc.pid]
    main_peak = peaks.get(proc.pid, (0.0, False))[0]
    return result | {"wall": wall, "workers": workers, "polled_main_mb": main_peak,
                     "polled_worker_mb": sorted(worker_peaks, reverse=True)}


def poll_rss(proc: subprocess.Popen, interval: float = 0.05) -> dict[int, tuple[float, bool]]:
    """pid -> (peak RSS MB seen, is a pool worker) for the process and its descendants."""
    try:
        import psutil
    except ModuleNotFoundError:
        proc.wait()
        return {}
    peaks: dict[int, tuple[float, bool]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in family:
            try:
                rss = p.memory_info().rss / MB
                worker = p.pid == proc.pid or "spawn_main" in " ".join(p.cmdline())
            except psutil.Error:
                continue
            peaks[p.pid] = (max(rss, peaks.get(p.pid, (0.0, False))[0]), worker)
        time.sleep(interval)
    return peaks


def clevel_sweep(kept: list[tuple[dict, int]], repeats: int = 2) -> list[dict]:
    """Encode/decode the kept tiles' arrays at each level; MB/s of uncompressed array bytes."""
    raw = sum(a.nbytes for arrays, _ in kept for a in arrays.values())
    tiff = sum(t for _, t in kept)
    rows = []
    for clevel in CLEVELS:
        enc_s, dec_s, size = [], [], 0
        for _ in range(repeats):
            started = time.perf_counter()
            frames = [encode_array(a, clevel) for arrays, _ in kept for a in arrays.values()]
            enc_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            for frame in frames:
                decode_array(frame)
            dec_s.append(time.perf_counter() - started)
            size = sum(len(f) for f in frames)
        rows.append({"clevel": clevel, "enc_mbs": raw / MB / min(enc_s), "dec_mbs": raw / MB / min(dec_s),
                     "bytes": size, "vs_tiff": size / tiff, "vs_raw": size / raw})
    return rows


def profile_build(input_path: Path, output: Path, tiles: int, shard_size: int, clevel: int) -> str:
    """cProfile an in-process --workers 1 build of `tiles` tiles; the top functions by own time."""
    import io

    from sharding.build import BuildArgs, build
    from sharding.plan import Filters

    args = BuildArgs(str(input_path), str(output), Filters(limit=tiles), shard_size, clevel=clevel)
    profiler = cProfile.Profile()
    profiler.enable()
    build(args, workers=1, overwrite=True)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(14)
    stats.sort_stats("cumulative").print_stats(r"sharding|phileo", 14)
    return text.getvalue()


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, {mem:.0f} GiB RAM"


def results_table(base: dict, builds: list[dict]) -> list[str]:
    tiles = base["tiles"]
    decode_rate = tiles / base["seconds"]
    one = builds[0]
    rate = one["written"] / one["seconds"]
    lines = ["| measure | value | vs baseline / target |", "|---|---|---|",
             f"| tiles (rows decoded / written by the build) | {tiles} / {one['written']} | |",
             f"| baseline: pyarrow read + rasterio decode, 1 process | {decode_rate:.2f} tiles/s "
             f"({base['raw_bytes'] / MB / base['seconds']:.0f} MB/s of pixels) | 1.00 |",
             f"| build --workers 1 (`build()` time, 1 core) | {rate:.2f} tiles/s per core | "
             f"**{rate / decode_rate:.2f}** (target >= 0.80) |",
             f"| build --workers 1, process wall incl. start-up | {one['written'] / one['wall']:.2f} tiles/s | "
             f"{one['written'] / one['wall'] / decode_rate:.2f} |"]
    src = base["parquet_bytes"] / tiles if base["files_whole"] else base["tiff_bytes"] / tiles
    src_name = "source parquet" if base["files_whole"] else "source band GeoTIFF"
    lines += [f"| shard bytes / tile | {one['bytes_out'] / one['written'] / MB:.2f} MB | "
              f"**{one['bytes_out'] / one['written'] / src:.3f}** of {src_name} (target <= 1.0) |",
              f"| {src_name} bytes / tile | {src / MB:.2f} MB | 1.000 |",
              f"| band GeoTIFF bytes / tile (13 columns) | {base['tiff_bytes'] / tiles / MB:.2f} MB | "
              f"shards: {one['bytes_out'] / base['tiff_bytes']:.3f} |"]
    for b in builds:
        lines += rss_rows(b, decode_rate)
    return lines


def rss_rows(b: dict, decode_rate: float) -> list[str]:
    name = f"build --workers {b['workers']}"
    if b["workers"] == 1:
        return [f"| {name}: peak RSS of the build process | {b['rss_self_kb'] / 1024:.0f} MB | |"]
    polled = ", ".join(f"{mb:.0f}" for mb in b["polled_worker_mb"]) or "n/a (no psutil)"
    rate = b["written"] / b["seconds"]
    return [f"| {name} (`build()` time) | {rate:.2f} tiles/s, {rate / b['workers']:.2f} per core | "
            f"{rate / decode_rate:.2f} (x{b['workers']} cores) |",
            f"| {name}: peak RSS per worker (getrusage max / polled each) | "
            f"{b['rss_children_kb'] / 1024:.0f} MB / {polled} MB | |",
            f"| {name}: peak RSS of the parent (pool owner) | {b['rss_self_kb'] / 1024:.0f} MB | |"]


def sweep_table(sweep: list[dict], base: dict) -> list[str]:
    tiff_mbs = base["raw_bytes"] / MB / base["seconds"]
    lines = ["| ZSTD clevel (+SHUFFLE) | encode MB/s | decode MB/s | bytes vs source GeoTIFF | bytes vs raw |",
             "|---|---|---|---|---|",
             f"| GeoTIFF deflate+predictor (source) | - | {tiff_mbs:.0f} (incl. parquet read) | 1.000 | "
             f"{base['tiff_bytes'] / base['raw_bytes']:.3f} |"]
    for r in sweep:
        mark = " (default)" if r["clevel"] == DEFAULT_CLEVEL else ""
        lines.append(f"| {r['clevel']}{mark} | {r['enc_mbs']:.0f} | {r['dec_mbs']:.0f} | {r['vs_tiff']:.3f} | "
                     f"{r['vs_raw']:.3f} |")
    return lines


def docs_section(args: argparse.Namespace, base: dict, tables: list[str], synthetic: bool) -> str:
    command = "python tools/bench_shard.py " + " ".join(sys.argv[1:])
    note = ("Source: synthetic MajorTOM-format fixture (tools/majortom_fixture.py: smooth plane waves + 2% "
            "Gaussian noise per band, real grids/CRSs/GeoTIFF encoding). **Synthetic pixels compress "
            "differently from real Sentinel-2 L2A**: byte ratios here are not the real ones (DESIGN.md quotes "
            "10-15% smaller than the GeoTIFFs on real tiles); speeds relative to the baseline transfer better, "
            "since both sides decode/encode the same arrays.") if synthetic else \
        f"Source: real MajorTOM parquet files under `{args.input}`."
    return "\n".join([
        SECTION, "", f"Command: `{command}`", "",
        f"Machine: {machine()}; Python {sys.version.split()[0]}. Date: {datetime.date.today().isoformat()}.", "",
        note, "",
        "Baseline (the floor) = the same rows read with pyarrow (one row group at a time) and every band "
        "decoded with rasterio (`decode_bands`), one process, no writing. Build rates use the time "
        "`sharding.build.build` reports (plan + convert + finalize), in a fresh subprocess.", "",
        *tables, ""])


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.is_file() else DOCS_HEADER
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text.rstrip("\n") + "\n")
    print(f"wrote {DOCS}")


def measure(args: argparse.Namespace, work: Path) -> tuple[dict, list[dict], list[dict]]:
    input_path = args.input or make_fixture(work / "input", args.tiles, args.files, args.tile_size)
    files = source_files(input_path)
    base = baseline_decode(files, args.tiles, args.sweep_tiles)
    print(f"baseline: {base['tiles']} tiles decoded in {base['seconds']:.1f} s", flush=True)
    shard_size = args.shard_size or max(1, base["tiff_bytes"] // 4)
    builds = []
    for workers in sorted({1, args.workers}):
        b = run_build(input_path, work / f"out-w{workers}", workers, base["tiles"], shard_size, args.clevel)
        print(f"build --workers {workers}: {b['written']} tiles in {b['shards']} shards, "
              f"{b['seconds']:.1f} s (wall {b['wall']:.1f} s)", flush=True)
        builds.append(b)
    sweep = clevel_sweep(base.pop("kept"))
    if args.profile:
        print(profile_build(input_path, work / "out-profile", args.profile, shard_size, args.clevel))
    return base, builds, sweep


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiles < 1 or args.workers < 1:
        raise SystemExit("error: --tiles and --workers must be >= 1")
    tmp = tempfile.mkdtemp(prefix="bench_shard-")
    try:
        base, builds, sweep = measure(args, Path(tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    tables = [*results_table(base, builds), "",
              f"Blosc2 ZSTD level sweep on {min(args.sweep_tiles, base['tiles'])} decoded tiles (all members; "
              "MB/s of uncompressed array bytes, one core, best of 2):", "", *sweep_table(sweep, base)]
    print("\n" + "\n".join(tables))
    if args.write_docs:
        write_docs(docs_section(args, base, tables, synthetic=args.input is None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
