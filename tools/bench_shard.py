"""Benchmark `phileo-shard build` against its floor: pure GeoTIFF decoding of the same rows.

One run: writes a MajorTOM-format fixture (or takes --input), decodes every band of every row with
rasterio in one process (the baseline), runs the real build in a subprocess (--workers 1, and N when
N > 1), compares shard with source bytes, records peak RSS per build process, sweeps the Blosc2 ZSTD
level and profiles a short build. Prints Markdown; --write-docs updates docs/benchmarks.md.

    python tools/bench_shard.py [--tiles 24] [--tile-size 1068] [--workers 1] [--write-docs]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blosc2

from phileo.schema import DEFAULT_CLEVEL, block_shape, decode_array, encode_array
from sharding.errors import RowError
from sharding.sources.majortom import BAND_COLUMNS, decode_bands, iter_parquet_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.docs_section import write_docs_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Shard build (tools/bench_shard.py)"
CLEVELS, EXTRA_LEVELS = (1, 3, 5, 7, 9), (1, 3)
MB = 1e6
# Runs the build in a fresh interpreter. Peak RSS = VmHWM of its own address space: ru_maxrss
# would inherit the benchmark's RSS at fork time, so it is not used.
CHILD = r"""
import json, resource, sys
from sharding.build.driver import BuildArgs, build
from sharding.build.plan import Filters
spec = json.loads(sys.argv[1])
args = BuildArgs(spec["input"], spec["output"], Filters(limit=spec["limit"]), spec["shard_size"],
                 clevel=spec["clevel"])
def cpu():
    return sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
cpu0 = cpu()
s = build(args, workers=spec["workers"], overwrite=True)
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"seconds": s.seconds, "cpu": cpu() - cpu0, "written": s.written, "rejected": s.rejected,
                  "shards": s.shards, "bytes_out": s.bytes_out, "failed": len(s.failed_units),
                  "main_mb": int(hwm[0]) * 1024 / 1e6 if hwm else 0.0}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=24, help="tiles to generate (or to take from --input)")
    parser.add_argument("--tile-size", type=int, default=1068, help="fixture tile size in 10 m pixels")
    parser.add_argument("--files", type=int, default=3, help="fixture parquet files")
    parser.add_argument("--workers", type=int, default=1, help="also build with this many workers when > 1")
    parser.add_argument("--input", type=Path, help="real MajorTOM dir (images/*.parquet) or one .parquet file")
    parser.add_argument("--shard-size", type=int, default=0, help="bytes; 0: a quarter of the source (>= 4 units)")
    parser.add_argument("--clevel", type=int, default=DEFAULT_CLEVEL, help="ZSTD level of the timed builds")
    parser.add_argument("--repeat", type=int, default=2, help="runs of the baseline and of each build (best kept)")
    parser.add_argument("--sweep-tiles", type=int, default=3, help="tiles used by the clevel sweep")
    parser.add_argument("--profile", type=int, default=6, metavar="N", help="cProfile a build of N tiles (0: skip)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
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


def baseline_decode(files: list[Path], limit: int, keep: int) -> dict:
    """The floor: read + rasterio-decode every band, one process. Keeps `keep` tiles for the sweep."""
    taken = plan_rows(files, limit)
    tiles, bad, tiff_bytes, raw_bytes, kept = 0, 0, 0, 0, []
    started, cpu = time.perf_counter(), time.process_time()
    for file, count, _ in taken:
        for _, columns in iter_parquet_rows(str(file), list(range(count)), False):
            tile_tiff = sum(len(columns.get(name) or b"") for name in BAND_COLUMNS)
            try:
                arrays, _, _ = decode_bands(columns)
            except RowError:  # real data: the build rejects such rows too
                bad += 1
                continue
            tiles, tiff_bytes, raw_bytes = tiles + 1, tiff_bytes + tile_tiff, raw_bytes + sum(
                a.nbytes for a in arrays.values())
            if len(kept) < keep:
                kept.append((arrays, tile_tiff))
    print(f"baseline: {tiles} tiles decoded in {time.perf_counter() - started:.1f} s"
          + (f", {bad} bad row(s) skipped" if bad else ""), flush=True)
    return {"tiles": tiles, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "tiff_bytes": tiff_bytes, "raw_bytes": raw_bytes, "kept": kept,
            "parquet_bytes": sum(f.stat().st_size for f, _, _ in taken),
            "files_whole": all(count == rows for _, count, rows in taken)}


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
    print(f"build --workers {workers}: {result['written']} tiles in {result['shards']} shards, "
          f"{result['seconds']:.1f} s (wall {wall:.1f} s)", flush=True)
    workers_mb = sorted((mb for pid, (mb, worker) in peaks.items() if worker and pid != proc.pid), reverse=True)
    return result | {"wall": wall, "workers": workers, "workers_mb": workers_mb}


def _hwm_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a live process in MB; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(x.split()[1]) * 1024 / MB for x in status if x.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


def poll_rss(proc: subprocess.Popen, interval: float = 0.05) -> dict[int, tuple[float, bool]]:
    """pid -> (last VmHWM seen in MB, is a pool worker) for the descendants of `proc` (needs psutil)."""
    try:
        import psutil
    except ModuleNotFoundError:
        proc.wait()
        return {}
    peaks: dict[int, tuple[float, bool]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in root.children(recursive=True):
                worker = "spawn_main" in " ".join(p.cmdline())
                peaks[p.pid] = (max(_hwm_mb(p.pid), peaks.get(p.pid, (0.0, False))[0]), worker)
        except psutil.Error:  # a process ended between listing and reading: next round
            pass
        time.sleep(interval)
    return peaks


def clevel_sweep(kept: list[tuple[dict, int]], repeats: int = 2) -> list[dict]:
    """Encode/decode the kept tiles' arrays per variant, 1 Blosc2 thread; MB/s of uncompressed bytes.

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
            started = time.perf_counter()
            frames = [encode_array(a, clevel, block_shape(member, a.shape)) if not filters else
                      blosc2.asarray(a, cparams=cparams, **_layout(member, a)).to_cframe()
                      for arrays, _ in kept for member, a in arrays.items()]
            enc_s.append(time.perf_counter() - started)
        for _ in range(repeats):
            started = time.perf_counter()
            for frame in frames:
                decode_array(frame)
            dec_s.append(time.perf_counter() - started)
        size = sum(len(f) for f in frames)
        rows.append({"clevel": clevel, "filters": "SHUFFLE+BYTEDELTA" if filters else "SHUFFLE",
                     "enc_mbs": raw / MB / min(enc_s), "dec_mbs": raw / MB / min(dec_s), "vs_tiff": size / tiff,
                     "vs_raw": size / raw})
    blosc2.set_nthreads(threads)
    return rows


def _layout(member: str, array) -> dict:
    """The build's chunk/block layout for a member (phileo/schema.py `block_shape`)."""
    blocks = block_shape(member, array.shape)
    return {} if blocks is None else {"chunks": array.shape, "blocks": blocks}


# (label, file suffix, function): cumulative profile time of the build's main costs.
COSTS = (
    ("parquet row-group read (pyarrow)", "majortom.py", "iter_parquet_rows"),
    ("GeoTIFF decode (rasterio/GDAL)", "majortom.py", "_read_geotiff"),
    ("band checks + np.stack", "majortom.py", "decode_bands"),
    ("corners/bounds lon-lat (PROJ)", "geo.py", "corners_lonlat_from_transform"),
    *(("cloud / nodata fractions", "majortom.py", f) for f in ("cloud_cover_percent", "nodata_fraction")),
    ("band histogram", "unit.py", "sample_band_histogram"),
    ("schema validation", "schema.py", "validate_sample"),
    ("Blosc2 ZSTD encode", "schema.py", "encode_array"),
    ("tar headers (tarfile)", "tarfile.py", "tobuf"),
    ("fsync of shards", "~", "<built-in method posix.fsync>"),
    ("shard writes + sha256 as written", "writer.py", "_write"),
    ("plan (catalog listing)", "driver.py", "make_plan"),
    ("unit files (index, histogram npz)", "unit.py", "_write_unit_files"),
    ("finalize (manifest, index.parquet)", "manifest.py", "finalize"),
)


def profile_build(input_path: Path, output: Path, tiles: int, shard_size: int, clevel: int) -> list[str]:
    """cProfile an in-process --workers 1 build of `tiles` tiles; a Markdown table of where time goes."""
    from sharding.build.driver import BuildArgs, build
    from sharding.build.plan import Filters

    args = BuildArgs(str(input_path), str(output), Filters(limit=tiles), shard_size, clevel=clevel)
    profiler = cProfile.Profile()
    profiler.enable()
    summary = build(args, workers=1, overwrite=True)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    cum: dict[str, float] = {}
    for (file, _, name), (_, _, _, cumtime, _) in stats.items():
        for label, suffix, func in COSTS:
            if name == func and file.endswith(suffix):
                cum[label] = cum.get(label, 0.0) + cumtime
    cum["band checks + np.stack"] = cum.get("band checks + np.stack", 0.0) - cum.get(
        "GeoTIFF decode (rasterio/GDAL)", 0.0)
    total = max(sum(v[3] for k, v in stats.items() if k[2] == "build" and k[0].endswith("build.py")), 1e-9)
    n = max(summary.written, 1)
    cum["everything else"] = total - sum(cum.values())
    return [f"cProfile of an in-process `build()` of {summary.written} tiles, --workers 1 ({total:.2f} s, "
            f"{total / n:.3f} s/tile; profiler overhead included):", "",
            "| cost | s/tile | share of build |", "|---|---|---|",
            *(f"| {label} | {sec / n:.3f} | {sec / total:.0%} |" for label, sec in
              sorted(cum.items(), key=lambda kv: (kv[0] == "everything else", -kv[1])))]


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo.splitlines() if x.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, {mem:.0f} GiB RAM, load {load}"


def results_table(base: dict, builds: list[dict]) -> list[str]:
    tiles, one = base["tiles"], builds[0]
    decode_rate, rate = tiles / base["seconds"], one["written"] / one["seconds"]
    lines = ["| measure | value | vs baseline / target |", "|---|---|---|",
             f"| tiles (rows decoded / written by the build) | {tiles} / {one['written']} | |",
             f"| baseline: pyarrow read + rasterio decode, 1 process | {decode_rate:.2f} tiles/s "
             f"({base['raw_bytes'] / MB / base['seconds']:.0f} MB/s of pixels) | 1.00 |",
             f"| build --workers 1 (`build()` time, 1 core) | {rate:.2f} tiles/s per core | "
             f"**{rate / decode_rate:.2f}** (target >= 0.80) |",
             f"| build --workers 1, process wall incl. start-up | {one['written'] / one['wall']:.2f} tiles/s | "
             f"{one['written'] / one['wall'] / decode_rate:.2f} |",
             f"| CPU s per tile (user+sys, all threads): baseline / build --workers 1 | {base['cpu'] / tiles:.3f}"
             f" / {one['cpu'] / one['written']:.3f} | {base['cpu'] / tiles / (one['cpu'] / one['written']):.2f} |"]
    src = base["parquet_bytes"] / tiles if base["files_whole"] else base["tiff_bytes"] / tiles
    src_name = "source parquet" if base["files_whole"] else "source band GeoTIFF"
    lines += [f"| shard bytes / tile | {one['bytes_out'] / one['written'] / MB:.2f} MB | "
              f"**{one['bytes_out'] / one['written'] / src:.3f}** of {src_name} (target <= 1.0) |",
              f"| {src_name} bytes / tile | {src / MB:.2f} MB | 1.000 |",
              f"| band GeoTIFF bytes / tile (13 columns) | {base['tiff_bytes'] / tiles / MB:.2f} MB | "
              f"shards: {one['bytes_out'] / base['tiff_bytes']:.3f} |"]
    return lines + [row for b in builds for row in rss_rows(b, decode_rate)]


def rss_rows(b: dict, decode_rate: float) -> list[str]:
    name = f"build --workers {b['workers']}"
    if b["workers"] == 1:
        return [f"| {name}: peak RSS (VmHWM) of the build process | {b['main_mb']:.0f} MB | |"]
    polled = ", ".join(f"{mb:.0f}" for mb in b["workers_mb"]) or "n/a (needs psutil)"
    rate = b["written"] / b["seconds"]
    return [f"| {name} (`build()` time) | {rate:.2f} tiles/s, {rate / b['workers']:.2f} per core | "
            f"{rate / decode_rate:.2f} (x{b['workers']} cores) |",
            f"| {name}: peak RSS (VmHWM) per pool worker | {polled} MB | |",
            f"| {name}: peak RSS of the parent (plan, pool, finalize) | {b['main_mb']:.0f} MB | |"]


def sweep_table(sweep: list[dict], base: dict) -> list[str]:
    tiff_mbs = base["raw_bytes"] / MB / base["seconds"]
    lines = ["| Blosc2 clevel | zstd level | filters | encode MB/s | decode MB/s | bytes vs source GeoTIFF "
             "| bytes vs raw |", "|---|---|---|---|---|---|---|",
             f"| GeoTIFF (source) | deflate | predictor 2 | - | {tiff_mbs:.0f} (rasterio, incl. parquet read) | "
             f"1.000 | {base['tiff_bytes'] / base['raw_bytes']:.3f} |"]
    for r in sweep:
        mark = " (default)" if r["clevel"] == DEFAULT_CLEVEL and r["filters"] == "SHUFFLE" else ""
        zstd = 2 * r["clevel"] - 1 if r["clevel"] < 8 else {8: 20, 9: 22}[r["clevel"]]  # c-blosc2's mapping
        lines.append(f"| {r['clevel']}{mark} | {zstd} | {r['filters']} | {r['enc_mbs']:.0f} | {r['dec_mbs']:.0f} | "
                     f"{r['vs_tiff']:.3f} | {r['vs_raw']:.3f} |")
    return lines


def docs_section(args: argparse.Namespace, base: dict, tables: list[str], synthetic: bool) -> str:
    command = "python tools/bench_shard.py " + " ".join(sys.argv[1:])
    note = ("Source: synthetic MajorTOM-format fixture (tools/majortom_fixture.py: smooth plane waves + 2% "
            "Gaussian noise per band, real grids/CRSs/GeoTIFF encoding). **Synthetic pixels compress "
            "differently from real Sentinel-2 L2A**: byte ratios here are not the real ones (real tiles are "
            "expected to store 10-15% smaller than their GeoTIFFs); speeds relative to the baseline transfer better, "
            "since both sides decode/encode the same arrays.") if synthetic else \
        f"Source: real MajorTOM parquet files under `{args.input}`."
    return "\n".join([
        SECTION, "", f"Command: `{command}`", "",
        f"Machine: {machine()}; Python {sys.version.split()[0]}. Date: {datetime.date.today().isoformat()}.", "",
        note, "",
        "Baseline (the floor) = the same rows read with pyarrow (one row group at a time) and every band "
        f"decoded with rasterio (`decode_bands`), one process, no writing. Best of {args.repeat} runs each. "
        "Build rates use the time `sharding.build.driver.build` reports (plan + convert + finalize), in a fresh "
        "subprocess; the CPU-time row counts every thread of the build (the strict per-core figure). "
        f"Shard size {base['shard_size'] / MB:.0f} MB"
        + ("" if args.shard_size else " (a quarter of the source, so the build has several units)") + ".", "",
        *tables, ""])


def measure(args: argparse.Namespace, work: Path) -> tuple[dict, list[dict], list[dict], list[str]]:
    input_path = args.input or make_fixture(work / "input", args.tiles, args.files, args.tile_size)
    files = source_files(input_path)
    runs = [baseline_decode(files, args.tiles, args.sweep_tiles if i == 0 else 0) for i in range(args.repeat)]
    base = runs[0] | {key: min(run[key] for run in runs) for key in ("seconds", "cpu")}
    shard_size = base["shard_size"] = args.shard_size or max(1, base["tiff_bytes"] // 4)
    builds = [min((run_build(input_path, work / f"out-w{workers}", workers, base["tiles"], shard_size, args.clevel)
                   for _ in range(args.repeat)), key=lambda b: b["seconds"]) for workers in sorted({1, args.workers})]
    sweep = clevel_sweep(base.pop("kept"))
    profile = profile_build(input_path, work / "out-profile", min(args.profile, base["tiles"]), shard_size,
                            args.clevel) if args.profile else []
    return base, builds, sweep, profile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.tiles, args.workers, args.repeat) < 1:
        raise SystemExit("error: --tiles, --workers and --repeat must be >= 1")
    tmp = tempfile.mkdtemp(prefix="bench_shard-")
    print(f"work directory: {tmp}", flush=True)
    try:
        base, builds, sweep, profile = measure(args, Path(tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    tables = [*results_table(base, builds), "",
              f"Blosc2 ZSTD level sweep on {min(args.sweep_tiles, base['tiles'])} decoded tiles (all members; "
              "MB/s of uncompressed array bytes, 1 Blosc2 thread, best of 2):", "", *sweep_table(sweep, base)]
    if profile:
        tables += ["", *profile]
    print("\n" + "\n".join(tables))
    if args.write_docs:
        write_docs_section(SECTION, docs_section(args, base, tables, synthetic=args.input is None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
