"""`phileo-train plan` at MajorTOM's full size: a generated manifest of 23,000 shards of ~98 tiles.

Runs the real command in a fresh process (the trainer's start-up plans with the same code) and
reports its wall time and peak RSS, for 512 ranks x 8 workers, K=16, batch 16. Then, with a
generated index.parquet of every sample (row groups of 65,536 rows, as `finalize` writes them),
measures what one rank's loader does at the start of an epoch (`rank_pieces`: its workers' crops
and the byte ranges of their partial shards, from the index row groups that can hold them),
against reading the index's shard, offset and bytes columns whole, each in a fresh process.

    python tools/bench_plan.py [--shards 23000] [--world-size 512] [--workers 8] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.docs_section import report  # noqa: E402

SECTION = "## Epoch plan at full size (tools/bench_plan.py)"
ROWS_PER_GROUP = 65_536  # as sharding/build/manifest.py writes index.parquet
BEFORE = (56_368, 52_480, 60.8)  # dropped, repeated, resume MB: whole-shard dealing + a `done` key list (2026-12-02)

RANK_LOOKUP = """
import json, sys, time
from training.data.epoch import plan_epoch
from training.data.pieces import rank_pieces
from training.data.shards import resolve_shards
import pyarrow, pyarrow.compute, pyarrow.parquet as pq
world, workers = int(sys.argv[2]), int(sys.argv[3])
plan = plan_epoch(resolve_shards(sys.argv[1]), world, workers, 16, 16, 0, 0)
real = pq.ParquetFile.read_row_groups
groups = []
pq.ParquetFile.read_row_groups = lambda self, g, **kw: groups.extend(g) or real(self, g, **kw)
begun = time.perf_counter()
pieces = rank_pieces(plan, 0)
spans = sum(p.span is not None for worker in pieces for p in worker)
meta = pq.ParquetFile(plan.shards[0].index).metadata
read = sum(meta.row_group(g).column(c).total_compressed_size for g in groups for c in (1, 2, 3))
result = {"seconds": time.perf_counter() - begun, "groups": len(groups), "spans": spans, "bytes": read,
          "arrow": pyarrow.default_memory_pool().max_memory() / 1e6}
history = plan.position_after(plan.steps // 2 + 3).segments  # killed mid-epoch, mid-group of the worker mixing
begun = time.perf_counter()
resumed = plan_epoch(plan.shards, world // 2, workers, 16, 16, 0, 0, history=history)
crops = sum(len(resumed.crop_ids(0, worker)) for worker in range(workers))
result |= {"resume_seconds": time.perf_counter() - begun, "resume_crops": crops}
print(json.dumps(result))
"""
WHOLE_INDEX = """
import json, sys, time
import pyarrow, pyarrow.parquet as pq
begun = time.perf_counter()
table = pq.read_table(sys.argv[1], columns=["shard", "offset", "bytes"])
seconds = time.perf_counter() - begun
meta = pq.ParquetFile(sys.argv[1]).metadata
read = sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups) for c in (1, 2, 3))
print(json.dumps({"seconds": seconds, "rows": table.num_rows, "groups": meta.num_row_groups, "bytes": read,
                  "arrow": pyarrow.default_memory_pool().max_memory() / 1e6}))
"""


def write_manifest(path: Path, shards: int, seed: int = 0) -> int:
    """A manifest of `shards` entries of 90..106 tiles (MajorTOM's 2.25M tiles in 23k shards); returns tiles."""
    samples = np.random.default_rng(seed).integers(90, 107, shards)
    entries = [{"url": f"shards/{unit:06d}-0000.tar", "samples": int(count)} for unit, count in enumerate(samples)]
    path.write_text(json.dumps({"schema": "phileo-shard/1", "shards": entries}))
    return int(samples.sum())


def write_index(path: Path, manifest: Path, seed: int = 0) -> int:
    """An index.parquet of the manifest's shards: MajorTOM-like keys, shard, offset, bytes (5-8 MB samples, as
    MajorTOM tiles); returns its size. Only these four of the eleven columns: the lookup reads three."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = json.loads(manifest.read_text())["shards"]
    counts = np.array([s["samples"] for s in shards])
    names = np.repeat(np.array([s["url"] for s in shards], dtype=object), counts)
    sizes = np.random.default_rng(seed).integers(5_000_000 // 512, 8_000_000 // 512, counts.sum()) * 512
    ends = np.cumsum(sizes)
    offsets = ends - sizes - np.repeat(ends[np.cumsum(counts) - counts] - sizes[np.cumsum(counts) - counts], counts)
    keys = [f"{i % 997:03d}U_{i // 997 % 3000}R_2023{i % 12 + 1:02d}{i % 28 + 1:02d}T1033{i % 60:02d}"
            for i in range(len(sizes))]
    table = pa.table({"key": pa.array(keys), "shard": pa.array(names), "offset": pa.array(offsets, pa.int64()),
                      "bytes": pa.array(sizes, pa.int64())})
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)
    return path.stat().st_size


def run_json(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=23_000)
    parser.add_argument("--world-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        manifest = Path(scratch) / "manifest.json"
        tiles = write_manifest(manifest, args.shards)
        command = [sys.executable, "-m", "training.cli", "plan", "--shards", str(manifest), "--world-size",
                   str(args.world_size), "--num-workers", str(args.workers), "--batch-size", "16",
                   "--crops-per-tile", "16"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        index_bytes = write_index(Path(scratch) / "index.parquet", manifest)
        lookup = run_json(RANK_LOOKUP, str(manifest), str(args.world_size), str(args.workers))
        whole = run_json(WHOLE_INDEX, str(Path(scratch) / "index.parquet"))
    report_lines = done.stdout.strip().splitlines()
    dropped, repeated = (int(n) for n in re.search(r"(\d+) crops dropped, (\d+) repeated", done.stdout).groups())
    state = int(re.search(r"resume state: (\d+) bytes", done.stdout).group(1))
    lines = [SECTION, "", f"Command: `python tools/bench_plan.py --shards {args.shards} --world-size "
             f"{args.world_size} --workers {args.workers}` ({datetime.date.today().isoformat()}).", "",
             f"A generated manifest of {args.shards} shards, {tiles} tiles; `phileo-train plan` for {args.world_size} "
             f"ranks x {args.workers} workers, K=16, batch 16, in a fresh process (Python start-up and imports "
             "included).", "", "| measure | value | target |", "|---|---|---|",
             f"| wall time | {wall:.1f} s | <= 60 s |", f"| peak RSS | {peak_mb:.0f} MB | <= 1024 MB |", "",
             "Its report:", "", "```", *report_lines, "```", "",
             "Dealing whole shards (the planner before crop-granularity dealing, 2026-12-02, same command) against "
             "now, per epoch:", "", "| | whole shards per worker | crops dealt in ranges |", "|---|---|---|",
             f"| crops dropped | {BEFORE[0]} | {dropped} |", f"| crops repeated | {BEFORE[1]} | {repeated} |",
             f"| resume state per checkpoint | up to {BEFORE[2]} MB (every finished tile key) | {state} bytes |", "",
             f"One rank's start of an epoch (rank 0 of {args.world_size}, {args.workers} workers) against a generated "
             f"index.parquet of {whole['rows']} rows in {whole['groups']} row groups "
             f"({index_bytes / 1e6:.0f} MB), each in a fresh process:", "",
             "| | wall | row groups read | column chunks read | Arrow memory, peak |", "|---|---|---|---|---|",
             f"| `rank_pieces`: crops of {args.workers} workers + byte ranges of their {lookup['spans']} partial "
             f"shards | {lookup['seconds']:.2f} s | {lookup['groups']} | {lookup['bytes'] / 1e6:.1f} MB | "
             f"{lookup['arrow']:.1f} MB |",
             f"| reading shard, offset, bytes of the whole index | {whole['seconds']:.2f} s | {whole['groups']} | "
             f"{whole['bytes'] / 1e6:.1f} MB | {whole['arrow']:.1f} MB |", "",
             "A rank's shards are scattered over the index (the epoch order is shuffled), so each partial shard "
             "costs about one row group; column chunks are what a remote index read transfers.", "",
             "Resuming that epoch from a checkpoint taken halfway (half the micro-batches + 3) on "
             f"{args.world_size // 2} ranks: rank 0 replays the shuffle of the earlier workers its ranges overlap "
             f"and gets its {lookup['resume_crops']} crops in {lookup['resume_seconds']:.2f} s."]
    report(SECTION, lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
