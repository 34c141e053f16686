"""`phileo-train plan` at MajorTOM's full size: a generated manifest of 23,000 shards of ~98 tiles.

Runs the real command in a fresh process (the trainer's start-up plans with the same code) and
reports its wall time and peak RSS, for 512 ranks x 8 workers, K=16, batch 16.

    python tools/bench_plan.py [--shards 23000] [--world-size 512] [--workers 8] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
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


def write_manifest(path: Path, shards: int, seed: int = 0) -> int:
    """A manifest of `shards` entries of 90..106 tiles (MajorTOM's 2.25M tiles in 23k shards); returns tiles."""
    samples = np.random.default_rng(seed).integers(90, 107, shards)
    entries = [{"url": f"shards/{unit:06d}-0000.tar", "samples": int(count)} for unit, count in enumerate(samples)]
    path.write_text(json.dumps({"schema": "phileo-shard/1", "shards": entries}))
    return int(samples.sum())


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
    lines = [SECTION, "", f"Command: `python tools/bench_plan.py --shards {args.shards} --world-size "
             f"{args.world_size} --workers {args.workers}` ({datetime.date.today().isoformat()}).", "",
             f"A generated manifest of {args.shards} shards, {tiles} tiles; `phileo-train plan` for {args.world_size} "
             f"ranks x {args.workers} workers, K=16, batch 16, in a fresh process (Python start-up and imports "
             "included).", "", "| measure | value | target |", "|---|---|---|",
             f"| wall time | {wall:.1f} s | <= 60 s |", f"| peak RSS | {peak_mb:.0f} MB | <= 1024 MB |", "",
             "Its report:", "", "```", *done.stdout.strip().splitlines(), "```"]
    report(SECTION, lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
