"""Benchmark streaming shards from S3-compatible object storage against local disk, in one run.

Generates MajorTOM-format tiles, builds a dataset, starts SeaweedFS on loopback
(tools/s3_server.py), uploads the dataset, then measures on the same shards, local vs s3://:
(r) raw stream: every shard read end to end through `training.data.shards.open_shard` (the
    training loader's opener: resumable, read-ahead), one stream at a time, MB/s;
(l) the training loader (`phileo-train bench-data` machinery, training.bench_data.run_bench)
    with 0 and N DataLoader workers: crops/s, tiles/s and MB/s of shard bytes.
Best of --repeat interleaved rounds; reported as s3 / local ratios. Prints Markdown;
--write-docs writes the "Remote streaming" section of docs/benchmarks.md (only that section).

    python tools/bench_remote.py [--tiles 16] [--workers 2] [--seconds 6] [--repeat 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.docs_section import write_docs_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from tools.s3_server import SeaweedS3  # noqa: E402
from training.bench_data import BenchResult, run_bench  # noqa: E402
from training.config import BenchConfig, DataConfig  # noqa: E402
from training.data import remote  # noqa: E402
from training.data.shards import open_shard, resolve_shards  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Remote streaming (tools/bench_remote.py)"
MB = 1e6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16, help="tiles to generate (a multiple of 4)")
    parser.add_argument("--tile-size", type=int, default=1068, help="fixture tile size in 10 m pixels")
    parser.add_argument("--workers", type=int, default=2, help="N: DataLoader workers of the N-worker runs")
    parser.add_argument("--crops-per-tile", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="wall time of every loader measurement")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--block-mb", type=float, default=16.0, help="read-ahead (PHILEO_REMOTE_BLOCK_MB)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    return parser.parse_args(argv)


def make_dataset(work: Path, tiles: int, tile_size: int, workers: int) -> Path:
    from sharding.build.driver import BuildArgs, build
    from tools.majortom_fixture import make_majortom_dataset

    started = time.perf_counter()
    make_majortom_dataset(work / "parquet", num_files=tiles // 4, rows_per_file=4, tile_size=tile_size, seed=0)
    source = sum(p.stat().st_size for p in (work / "parquet" / "images").glob("*.parquet"))
    summary = build(BuildArgs(str(work / "parquet"), str(work / "ds"), shard_size=max(1, source // 4)),
                    workers=max(1, workers), overwrite=True)
    print(f"data: {tiles} tiles of {tile_size} px, {summary.shards} shards, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return work / "ds"


def stream_rate(manifest: str, server: psutil.Process | None = None) -> tuple[float, float | None]:
    """(MB/s of reading every shard end to end through the training opener, one stream at a time;
    CPU seconds the S3 server spent per GB served, when `server` is given)."""
    shards = resolve_shards(manifest)
    cpu = sum(server.cpu_times()[:2]) if server else 0.0
    started, total = time.perf_counter(), 0
    for shard in shards:
        with open_shard(shard.url) as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    rate = total / MB / (time.perf_counter() - started)
    return rate, (sum(server.cpu_times()[:2]) - cpu) / (total / 1e9) if server else None


def loader(manifest: str, args: argparse.Namespace, workers: int, seed: int) -> BenchResult:
    data = DataConfig(shards=manifest, crops_per_tile=args.crops_per_tile, batch_size=args.batch_size,
                      num_workers=workers)
    return run_bench(BenchConfig(data, args.seconds, seed))


def measure(args: argparse.Namespace, sources: dict[str, str], server: psutil.Process) -> dict:
    """Interleaved rounds; the best of each measurement (the machine may be shared)."""
    best: dict = {}
    for round_ in range(args.repeat):
        now: dict = {}
        for where, manifest in sources.items():
            now[("stream", where)], cpu_per_gb = stream_rate(manifest, server if where == "s3" else None)
            if cpu_per_gb is not None:
                best["server_cpu_s_per_gb"] = min(best.get("server_cpu_s_per_gb", cpu_per_gb), cpu_per_gb)
            for workers in (0, args.workers):
                now[("loader", where, workers)] = loader(manifest, args, workers, round_)
        for name, value in now.items():
            rate = getattr(value, "crops_per_s", value)  # stream: MB/s
            if rate > getattr(best.get(name), "crops_per_s", best.get(name, -1)):
                best[name] = value
        print(f"round {round_ + 1}: " + ", ".join(
            f"{'/'.join(map(str, name))}={getattr(v, 'crops_per_s', v):.1f}" for name, v in now.items()), flush=True)
    return best


def tables(best: dict, args: argparse.Namespace, bytes_per_tile: float) -> list[str]:
    stream_local, stream_s3 = best[("stream", "local")], best[("stream", "s3")]
    rows = ["| measurement | local disk | loopback S3 (SeaweedFS) | S3 / local |", "|---|---|---|---|",
            f"| (r) raw shard stream, MB/s (1 stream) | {stream_local:.0f} | {stream_s3:.0f} | "
            f"**{stream_s3 / stream_local:.2f}x** |"]
    for workers in (0, args.workers):
        local, s3 = best[("loader", "local", workers)], best[("loader", "s3", workers)]
        for label, unit in (("crops/s", 1.0), ("MB/s of shards", bytes_per_tile / MB / args.crops_per_tile)):
            rows.append(f"| (l) loader, {workers} workers, {label} | {local.crops_per_s * unit:.1f} | "
                        f"{s3.crops_per_s * unit:.1f} | **{s3.crops_per_s / local.crops_per_s:.2f}x** |")
        rows.append(f"| (l) loader, {workers} workers, first batch s | {local.first_batch_s:.2f} | "
                    f"{s3.first_batch_s:.2f} | |")
    return rows


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo.splitlines() if x.startswith("model name")), "?")
    return f"nproc {len(os.sched_getaffinity(0))}, {model}; Python {sys.version.split()[0]}"


def docs_section(args: argparse.Namespace, rows: list[str], loads: list[str], info: dict) -> str:
    command = "python tools/bench_remote.py " + " ".join(sys.argv[1:])
    return "\n".join([
        SECTION, "", f"Command: `{command}`", "",
        f"Machine: {machine()}; SeaweedFS {info['weed']} (`weed server` master + volume + filer + S3 gateway on "
        f"127.0.0.1, same machine). Load average before / after: {loads[0]} / {loads[1]}. "
        f"Date: {datetime.date.today().isoformat()}.", "",
        f"Data: {args.tiles} synthetic MajorTOM-format tiles of {args.tile_size} px in {info['shards']} shards, "
        f"{info['bytes'] / MB:.0f} MB ({info['bytes_per_tile'] / MB:.2f} MB per tile), uploaded to the bucket; "
        f"`--shards` is the local manifest.json vs `s3://.../manifest.json`. Loader: K={args.crops_per_tile} "
        f"crops of 128 px per tile, batch {args.batch_size}, {args.seconds:g} s per measurement (worker start-up "
        f"and epoch restarts included), best of {args.repeat} interleaved rounds. S3 reads: s3fs, "
        f"{args.block_mb:g} MB read-ahead (one ranged GET per block), retry + resume layer of training/data/remote.py "
        f"({info['retries']} retries during the run). Loader MB/s = tiles/s x local shard bytes per tile.", "",
        *rows, "",
        "Notes: loopback only (no network latency or bandwidth limit), and the S3 server shares the cores "
        "with the loader, so the S3 column pays the server's CPU (HTTP, checksums, volume reads: "
        f"{info['server_cpu_s_per_gb']:.1f} CPU s per GB served in (r)) as well as the client's (s3fs/aiohttp); on "
        "a real object store that CPU is elsewhere and latency/bandwidth dominate instead. Local shards sit in "
        "the page cache. Reads are synchronous: a loader process waits for each read-ahead block, then decodes, "
        "so transfer time adds to decode time instead of overlapping it. Every epoch restarts the DataLoader "
        f"workers and reopens the shards (s3fs client, HEAD, first block); with {args.tiles} tiles an epoch lasts "
        "about a second, so that start-up ('first batch s') weighs far more here than in real epochs. "
        "The remote build's footer read is one 2 MB GET per file (sized for Core-S2L2A's 1-1.5 MB footers); the "
        "fixture's files hold 4 tiles each, so that is ~0.5 MB per tile here, against a few kB per tile for "
        "Core-S2L2A files of hundreds of tiles. The "
        "machine is shared (see the load): compare figures within this run only.", ""])


def remote_build_bytes(parquet_prefix: str, tmp: Path, tiles: int) -> dict:
    """Build from s3:// parquet in this process, counting every byte fetched (footers, row groups, listing)."""
    from sharding.build import driver as build_module
    from sharding.sources import remote as remote_source
    from sharding.sources import remote_catalog

    fetched = {"bytes": 0, "requests": 0}
    originals = {name: getattr(remote_source, name) for name in ("read_range", "read_bytes")}

    def counting(function):
        def wrapper(*a, **k):
            data = function(*a, **k)
            fetched["bytes"], fetched["requests"] = fetched["bytes"] + len(data), fetched["requests"] + 1
            return data
        return wrapper

    patched = [(module, name) for module in (remote_source, remote_catalog) for name in originals
               if hasattr(module, name)]
    for module, name in patched:
        setattr(module, name, counting(originals[name]))
    try:
        started = time.perf_counter()
        summary = build_module.build(build_module.BuildArgs(parquet_prefix, str(tmp / "from-s3")), workers=1)
        seconds = time.perf_counter() - started
    finally:
        for module, name in patched:
            setattr(module, name, originals[name])
    assert summary.written == tiles, f"remote build wrote {summary.written} of {tiles} tiles"
    return fetched | {"seconds": seconds}


def run(args: argparse.Namespace, tmp: Path) -> tuple[list[str], dict]:
    dataset = make_dataset(tmp, args.tiles, args.tile_size, args.workers)
    manifest = json.loads((dataset / "manifest.json").read_text())
    total = sum(s["bytes"] for s in manifest["shards"])
    info = {"shards": len(manifest["shards"]), "bytes": total,
            "bytes_per_tile": total / sum(s["samples"] for s in manifest["shards"])}
    with SeaweedS3(tmp / "seaweed", volume_size_mb=1024) as s3:
        os.environ.update(s3.env | {"PHILEO_REMOTE_BLOCK_MB": str(args.block_mb)})  # DataLoader workers inherit
        started = time.perf_counter()
        prefix = s3.upload_dir(dataset, "ds")
        print(f"uploaded to {prefix} in {time.perf_counter() - started:.1f} s", flush=True)
        remote.STATS.reset()
        best = measure(args, {"local": str(dataset / "manifest.json"), "s3": f"{prefix}/manifest.json"},
                       psutil.Process(s3.process.pid))
        info["retries"], info["server_cpu_s_per_gb"] = remote.STATS.retries, best["server_cpu_s_per_gb"]
        parquet_bytes = sum(p.stat().st_size for p in (tmp / "parquet" / "images").glob("*.parquet"))
        info["build"] = remote_build_bytes(s3.upload_dir(tmp / "parquet", "raw"), tmp, args.tiles)
        info["build"]["parquet_bytes_per_tile"] = parquet_bytes / args.tiles
        info["build"]["fetched_per_tile"] = info["build"]["bytes"] / args.tiles
    version = subprocess.run(["weed", "version"], capture_output=True, text=True).stdout
    info["weed"] = next(iter(re.findall(r"\b\d+\.\d+\b", version)), "?")
    build = info["build"]
    rows = tables(best, args, info["bytes_per_tile"]) + [
        "", "| remote build (s3:// parquet -> local shards, 1 worker) | value |", "|---|---|",
        f"| source parquet bytes per tile | {build['parquet_bytes_per_tile'] / MB:.3f} MB |",
        f"| bytes fetched per tile (footers + row groups + listing) | {build['fetched_per_tile'] / MB:.3f} MB "
        f"(**{build['fetched_per_tile'] / build['parquet_bytes_per_tile']:.2f}x** the tile) |",
        f"| GET/HEAD requests per tile | {build['requests'] / args.tiles:.1f} |",
        f"| build time | {build['seconds']:.1f} s |"]
    return rows, info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiles % 4 or min(args.tiles, args.workers, args.repeat) < 1 or args.seconds <= 0:
        raise SystemExit("error: --tiles must be a positive multiple of 4; --workers, --repeat, --seconds positive")
    tmp = Path(tempfile.mkdtemp(prefix="bench_remote-"))
    print(f"work directory: {tmp}", flush=True)
    loads = [", ".join(f"{x:.2f}" for x in os.getloadavg())]
    try:
        rows, info = run(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    loads.append(", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("\n" + "\n".join(rows))
    if args.write_docs:
        write_docs_section(SECTION, docs_section(args, rows, loads, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
