"""Finalize at MajorTOM's full size: 23,000 generated units (one shard of ~98 tiles each) -> index, manifest.

Writes the unit files a build leaves (units/NNNNNN.json, .index.parquet, .hist.npz), then runs
`sharding.build.manifest.finalize` on them in a fresh process and reports its wall time and peak RSS,
the size of index.parquet and manifest.json, and how long `json.loads` of that manifest takes.

    python tools/bench_finalize.py [--units 23000] [--tiles-per-unit 98] [--write-docs]
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
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from sharding.build.unit_files import index_schema  # noqa: E402
from tools.docs_section import report  # noqa: E402

SECTION = "## Finalize at full size (tools/bench_finalize.py)"
FINALIZE = ("import json, sys; from pathlib import Path; from sharding.build.manifest import finalize; "
            "out = Path(sys.argv[1]); finalize(out, {'source': 'majortom', 'args': {}}, int(sys.argv[2]), [], 0)")


def write_units(output: Path, units: int, tiles: int, seed: int = 0) -> None:
    """Unit files as a build writes them: stats last, the index rows and a sparse histogram of each unit."""
    rng = np.random.default_rng(seed)
    (output / "units").mkdir(parents=True)
    for unit in range(units):
        shard = f"shards/{unit:06d}-0000.tar"
        keys = [f"{unit % 1000}U_{unit // 1000}R_2020{unit % 12 + 1:02d}01T1000{n:02d}" for n in range(tiles)]
        rows = {"key": keys, "shard": [shard] * tiles, "offset": list(range(0, tiles * 6_500_000, 6_500_000)),
                "bytes": [6_500_000] * tiles, "grid_cell": [k[:9] for k in keys],
                "centre_lat": rng.uniform(-80, 80, tiles).tolist(),
                "centre_lon": rng.uniform(-180, 180, tiles).tolist(),
                "timestamp": ["2020-01-01T10:00:00Z"] * tiles, "cloud_cover": rng.uniform(0, 100, tiles).tolist(),
                "nodata": [0.0] * tiles, "product_id": [f"S2A_MSIL2A_{k}" for k in keys]}
        pq.write_table(pa.table(rows, schema=index_schema()), output / "units" / f"{unit:06d}.index.parquet")
        values = np.arange(4_000) // 12 + 1 + unit % 1000  # distinct (band, DN) pairs, as in a real unit
        np.savez_compressed(output / "units" / f"{unit:06d}.hist.npz", rows=(np.arange(4_000) % 12).astype(np.uint8),
                            values=values.astype(np.uint16), counts=np.ones(4_000, np.int64))
        entry = {"url": shard, "samples": tiles, "bytes": tiles * 6_500_000, "sha256": "0" * 64,
                 "bbox_lonlat": [-10.0, 40.0, -9.0, 41.0], "time_range": ["2020-01-01T10:00:00Z"] * 2,
                 "distinct_1deg_cells": 12, "cloud_cover_histogram": [tiles] + [0] * 9}
        stats = {"unit": unit, "planned": tiles, "written": tiles, "rejected": [], "filtered": 0,
                 "bytes_in": tiles * 7_000_000, "bytes_out": tiles * 6_500_000, "shards": [entry], "retries": 0}
        (output / "units" / f"{unit:06d}.json").write_text(json.dumps(stats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=23_000)
    parser.add_argument("--tiles-per-unit", type=int, default=98)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch)
        write_units(output, args.units, args.tiles_per_unit)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FINALIZE, str(output), str(args.units)], check=True,
                       cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        manifest = (output / "manifest.json").read_bytes()
        loaded = time.perf_counter()
        shards = len(json.loads(manifest)["shards"])
        load_s = time.perf_counter() - loaded
        index = pq.ParquetFile(output / "index.parquet").metadata
        index_mb = (output / "index.parquet").stat().st_size / 1e6
    lines = [SECTION, "", f"Command: `python tools/bench_finalize.py --units {args.units} --tiles-per-unit "
             f"{args.tiles_per_unit}` ({datetime.date.today().isoformat()}).", "",
             f"{args.units} generated units of one shard of {args.tiles_per_unit} tiles each ({index.num_rows} index "
             "rows); `finalize` in a fresh process streams the unit files into index.parquet and rejected.jsonl and "
             "writes manifest.json last.", "", "| measure | value |", "|---|---|",
             f"| finalize wall time | {wall:.0f} s |", f"| finalize peak RSS | {peak_mb:.0f} MB |",
             f"| index.parquet | {index.num_rows} rows, {index.num_row_groups} row groups, {index_mb:.0f} MB |",
             f"| manifest.json | {shards} shard entries, {len(manifest) / 1e6:.1f} MB, `json.loads` {load_s:.2f} s |"]
    report(SECTION, lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
