"""finalize, `phileo-shard merge` of 64 nodes and `phileo-shard verify --no-pixels` at MajorTOM's full size.

Generates what a 64-node build leaves (tools/bench_finalize.py's unit files, here with real shards):
23,000 units of one tiny shard of 98 samples each (one small member per sample: tar headers, offsets
and sha256 all true, members never decoded by --no-pixels), a plan.parquet of 2.25M rows with the
build's columns, build.json and the 64 node reports. Then, each in a fresh process, measured with its
own peak RSS (VmHWM): `finalize` alone, `phileo-shard merge` (checks every unit, then the same
finalize) and `phileo-shard verify --no-pixels`. The same run measures the bookkeeping the two
commands did before (every planned row as a dict for the node shares; every key in a dict and every
index row as a Python tuple for verify) as the baseline. Several `--units` sizes show whether memory
grows with the rows.

    python tools/bench_verify.py [--units 2300,23000] [--tiles-per-unit 98] [--nodes 64] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from sharding.build.nodes import assign_sizes  # noqa: E402
from sharding.build.unit_files import index_schema  # noqa: E402
from tools.docs_section import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Finalize, merge and verify at full size (tools/bench_verify.py)"
MEMBER = b'{"bench": true}'  # every sample's one member: its header, data and padding are 1 KiB
EST_BYTES = 7_000_000
FINALIZE = ("import sys; from pathlib import Path; from sharding.build.manifest import finalize; "
            "finalize(Path(sys.argv[1]), {'source': 'majortom', 'args': {}}, int(sys.argv[2]), [], 0)")
BEFORE_MERGE = ("import sys; from pathlib import Path; from sharding.build.driver import load_units; "
                "from sharding.build.nodes import assign_nodes; assign_nodes(load_units(Path(sys.argv[1])), 64)")
BEFORE_VERIFY = ("import sys, pyarrow.parquet as pq; from pathlib import Path; "
                 "rows = pq.read_table(Path(sys.argv[1]) / 'index.parquet', columns=['key', 'shard', 'offset', "
                 "'bytes']).to_pylist(); locations = {r['key']: (r['shard'], r['offset'], r['bytes']) for r in rows}")


def unit_keys(unit: int, tiles: int) -> list[str]:
    return [f"{unit % 1000}U_{unit // 1000}R_2020{unit % 12 + 1:02d}01T1000{n:02d}" for n in range(tiles)]


def shard_bytes(keys: list[str]) -> tuple[bytes, list[int], list[int]]:
    """A tar of one small member per key, as ShardWriter writes it; (bytes, offsets, sizes) of the samples."""
    parts, offsets, sizes, offset = [], [], [], 0
    padding = bytes(-len(MEMBER) % tarfile.BLOCKSIZE)
    for key in keys:
        info = tarfile.TarInfo(f"{key}.meta.json")
        info.size, info.mtime, info.mode = len(MEMBER), 1_600_000_000, 0o444
        block = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + MEMBER + padding
        parts.append(block)
        offsets.append(offset)
        sizes.append(len(block))
        offset += len(block)
    parts.append(bytes(2 * tarfile.BLOCKSIZE))
    parts.append(bytes(-(offset + 2 * tarfile.BLOCKSIZE) % tarfile.RECORDSIZE))
    return b"".join(parts), offsets, sizes


def write_unit(output: Path, unit: int, tiles: int, rng: np.random.Generator) -> None:
    """The unit's shard, its index rows and sparse histogram, then its stats file (last, as a build)."""
    keys, url = unit_keys(unit, tiles), f"shards/{unit:06d}-0000.tar"
    data, offsets, sizes = shard_bytes(keys)
    (output / url).write_bytes(data)
    rows = {"key": keys, "shard": [url] * tiles, "offset": offsets, "bytes": sizes, "grid_cell": [k[:9] for k in keys],
            "centre_lat": rng.uniform(-80, 80, tiles), "centre_lon": rng.uniform(-180, 180, tiles),
            "timestamp": ["2020-01-01T10:00:00Z"] * tiles, "cloud_cover": rng.uniform(0, 100, tiles),
            "nodata": [0.0] * tiles, "product_id": [f"S2A_MSIL2A_{k}" for k in keys]}
    pq.write_table(pa.table(rows, schema=index_schema()), output / "units" / f"{unit:06d}.index.parquet")
    values = np.arange(4_000) // 12 + 1 + unit % 1000
    np.savez_compressed(output / "units" / f"{unit:06d}.hist.npz", rows=(np.arange(4_000) % 12).astype(np.uint8),
                        values=values.astype(np.uint16), counts=np.ones(4_000, np.int64))
    entry = {"url": url, "samples": tiles, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "bbox_lonlat": [-10.0, 40.0, -9.0, 41.0], "time_range": ["2020-01-01T10:00:00Z"] * 2,
             "distinct_1deg_cells": 12, "cloud_cover_histogram": [tiles] + [0] * 9}
    stats = {"unit": unit, "planned": tiles, "written": tiles, "rejected": [], "filtered": 0,
             "bytes_in": tiles * EST_BYTES, "bytes_out": len(data), "shards": [entry], "retries": 0}
    (output / "units" / f"{unit:06d}.json").write_text(json.dumps(stats))


def write_plan(output: Path, units: int, tiles: int, nodes: int) -> None:
    """plan.parquet (the build's columns), plan_rejected.jsonl, build.json and every node's report."""
    keys = [key for unit in range(units) for key in unit_keys(unit, tiles)]
    rows = len(keys)
    plan = pa.table({"source_file": pa.array([f"images/part_{n // 500:05d}.parquet" for n in range(rows)]),
                     "source_group": pa.array([f"images/part_{n // 500:05d}.parquet" for n in range(rows)]),
                     "source_row": np.arange(rows) % 500, "key": keys, "product_id": [f"S2A_{k}" for k in keys],
                     "grid_cell": [k[:9] for k in keys], "timestamp": pa.array(["2020-01-01T10:00:00Z"] * rows),
                     "cloud_cover": np.zeros(rows), "nodata": np.zeros(rows), "centre_lat": np.zeros(rows),
                     "centre_lon": np.zeros(rows), "est_bytes": np.full(rows, EST_BYTES),
                     "unit": np.repeat(np.arange(units), tiles)})
    pq.write_table(plan, output / "plan.parquet")
    (output / "plan_rejected.jsonl").write_text("")
    info = {"schema": "phileo-shard/1", "source": "majortom", "layout": "parquet", "tool_version": "bench",
            "args": {}, "units": units, "planned_tiles": rows, "filtered_at_plan": 0, "filtered_by": {},
            "planned_source_bytes": rows * EST_BYTES}
    (output / "build.json").write_text(json.dumps(info))
    (output / "nodes").mkdir()
    for rank, share in enumerate(assign_sizes(np.full(units, tiles * EST_BYTES), nodes)):
        report_ = {"schema": "phileo-shard-node/1", "num_nodes": nodes, "node_rank": rank, "planned_units": units,
                   "units": share, "totals": {}}
        (output / "nodes" / f"node-{rank}.json").write_text(json.dumps(report_))


# Runs a module or a code string, then writes its own peak RSS (VmHWM) where BENCH_HWM says. Not the child's
# rusage: Linux folds the forked copy of this (large) generator process into ru_maxrss at exec.
WRAPPER = ("import atexit, os, runpy, sys\n"
           "def peak():\n"
           "    with open('/proc/self/status') as status, open(os.environ['BENCH_HWM'], 'w') as out:\n"
           "        out.write(next(line for line in status if line.startswith('VmHWM')).split()[1])\n"
           "atexit.register(peak)\n"
           "mode, target = sys.argv[1], sys.argv[2]\n"
           "sys.argv = sys.argv[2:]\n"
           "runpy.run_module(target, run_name='__main__') if mode == 'module' else exec(target)\n")


def measure(mode: str, target: str, *args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a fresh process running `target` (a module or code) with `args`."""
    with tempfile.NamedTemporaryFile(suffix=".hwm") as hwm:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", WRAPPER, mode, target, *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"PYTHONPATH": str(ROOT), "BENCH_HWM": hwm.name})
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{target[:60]} {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}")
        return wall, int(Path(hwm.name).read_text()) / 1024


def run_size(units: int, tiles: int, nodes: int) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch)
        (output / "units").mkdir()
        (output / "shards").mkdir()
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        for unit in range(units):
            write_unit(output, unit, tiles, rng)
        write_plan(output, units, tiles, nodes)
        print(f"{units} units generated in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        figures = {"finalize": measure("code", FINALIZE, str(output), str(units))}
        for name in ("manifest.json", "index.parquet", "rejected.jsonl"):
            (output / name).unlink()
        figures["merge"] = measure("module", "sharding.cli", "merge", str(output))
        figures["verify --no-pixels"] = measure("module", "sharding.cli", "verify", "--no-pixels", str(output))
        figures["before: merge's plan rows as dicts (load_units + assign_nodes)"] = measure(
            "code", BEFORE_MERGE, str(output))
        figures["before: verify's key dict + index rows as Python objects"] = measure("code", BEFORE_VERIFY,
                                                                                       str(output))
        figures["shard bytes"] = (sum(p.stat().st_size for p in (output / "shards").iterdir()) / 1e6, 0.0)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", default="2300,23000", help="comma-separated unit counts (one shard each)")
    parser.add_argument("--tiles-per-unit", type=int, default=98)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.units.split(",")]
    results = {units: run_size(units, args.tiles_per_unit, args.nodes) for units in sizes}
    header = " | ".join(f"{units} units, {units * args.tiles_per_unit} rows" for units in sizes)
    lines = [SECTION, "", f"Command: `python tools/bench_verify.py --units {args.units} --tiles-per-unit "
             f"{args.tiles_per_unit} --nodes {args.nodes}` ({datetime.date.today().isoformat()}).", "",
             f"Generated {args.nodes}-node build outputs: units of one shard of {args.tiles_per_unit} samples (1 KiB "
             "each: real tar headers, offsets and sha256), a plan.parquet with the build's columns, node reports. "
             "Each command runs in a fresh process; peak RSS is that process's own VmHWM. The two `before` rows "
             "are what merge and verify held per row before this change, measured in the same run.", "",
             f"| command (wall s / peak RSS MB) | {header} |", "|---|" + "---|" * len(sizes)]
    for name in results[sizes[0]]:
        if name == "shard bytes":
            lines.append("| shards on disk | " + " | ".join(f"{results[u][name][0]:.0f} MB" for u in sizes) + " |")
            continue
        cells = [f"{results[u][name][0]:.1f} s / {results[u][name][1]:.0f} MB" for u in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(sizes) > 1:
        first, last = results[sizes[0]], results[sizes[-1]]
        growth = {name: last[name][1] - first[name][1] for name in first if name != "shard bytes"}
        new = [growth[name] for name in ("finalize", "merge", "verify --no-pixels")]
        before = [value for name, value in growth.items() if name.startswith("before")]
        lines += ["", f"From {sizes[0]} to {sizes[-1]} units the peaks of finalize, merge and verify grow by "
                  f"{new[0]:.0f}, {new[1]:.0f} and {new[2]:.0f} MB: the manifest's shard entries (dicts in every "
                  "command that reads or writes the manifest) and, in verify, 12 bytes a key (its 64-bit hash and "
                  f"shard number); the per-row structures of before grew by {before[0]:.0f} and {before[1]:.0f} MB. "
                  "Wall times are from a 2-core machine shared with other jobs."]
    report(SECTION, lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
