"""Assemble the dataset files from completed units: index.parquet, rejected.jsonl, manifest.json last."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phileo import __version__
from phileo.bands import ALL_BANDS
from phileo.schema import SCHEMA_VERSION
from sharding.build.unit_files import index_schema, new_histogram, read_histogram
from sharding.build.writer import atomic_write
from sharding.layout import INDEX, MANIFEST, REJECTED, unit_file, unit_stats_path


def band_statistics(histogram: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean, std and 1st/99th percentiles per band from a (bands, 65536) histogram of sampled pixels.

    Digital number 0 is Sentinel-2 no-data and is left out so it does not bias normalisation.
    """
    values = np.arange(histogram.shape[1], dtype=np.float64)
    stats = {}
    for band, counts in zip(ALL_BANDS, histogram):
        counts = counts.astype(np.float64)
        counts[0] = 0
        total = counts.sum()
        if total == 0:
            continue
        mean = float((values * counts).sum() / total)
        std = float(np.sqrt(((values - mean) ** 2 * counts).sum() / total))
        cumulative = np.cumsum(counts) / total
        p1, p99 = (int(np.searchsorted(cumulative, q)) for q in (0.01, 0.99))
        stats[band] = {"mean": mean, "std": std, "p1": p1, "p99": p99, "pixels": int(total)}
    return stats


def finalize(output: Path, build_info: dict, num_units: int, plan_rejected: list[dict], filtered_at_plan: int,
             schema: pa.Schema | None = None, describe: dict | None = None, selection: dict | None = None) -> dict:
    """Write index, rejected list and manifest (last) from every unit's files; returns the manifest.

    One finalizer for every build: `schema` is the index schema (default: `index_schema()`),
    `describe` adds keys after `build_args` (a PhilEO Bench dataset's name and split), `selection`
    records an n-shot selection.
    """
    stats = [json.loads(unit_stats_path(output, unit).read_text()) for unit in range(num_units)]
    tables = [pq.read_table(output / unit_file(unit, "index.parquet")) for unit in range(num_units)]
    index = pa.concat_tables(tables) if tables else (schema or index_schema()).empty_table()
    atomic_write(output / INDEX, lambda p: pq.write_table(index, p))
    rejected = plan_rejected + [row for unit in stats for row in unit["rejected"]]
    atomic_write(output / REJECTED, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rejected)))
    histogram = new_histogram()
    for unit in range(num_units):
        histogram += read_histogram(output / unit_file(unit, "hist.npz"))
    shards = sorted((shard for unit in stats for shard in unit["shards"]), key=lambda s: s["url"])
    manifest = {
        "schema": SCHEMA_VERSION, "source": build_info["source"], "tool_version": __version__,
        "build_args": build_info["args"], **(describe or {}), "shards": shards,
        "totals": {"samples": sum(s["samples"] for s in shards), "shards": len(shards),
                   "bytes": sum(s["bytes"] for s in shards), "bytes_in": sum(u["bytes_in"] for u in stats),
                   "rejected": len(rejected),
                   "filtered": filtered_at_plan + sum(u["filtered"] for u in stats)},
        "band_stats": band_statistics(histogram),
    }
    if selection is not None:
        manifest["selection"] = selection
    atomic_write(output / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest
