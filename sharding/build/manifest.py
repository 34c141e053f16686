"""Assemble the dataset files from completed units: index.parquet, rejected.jsonl, manifest.json last."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phileo import __version__
from phileo.bands import ALL_BANDS
from phileo.schema import SCHEMA_VERSION
from sharding.build.unit_files import add_histogram, index_schema, new_histogram
from sharding.build.writer import atomic_write
from sharding.errors import InputError
from sharding.layout import INDEX, MANIFEST, REJECTED, temp_name, unit_file, unit_stats_path


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


ROWS_PER_GROUP = 65_536  # index rows buffered into one parquet row group


def _assemble(output: Path, num_units: int, schema: pa.Schema, plan_rejected: list[dict], index_path: Path,
              rejected_path: Path) -> tuple[list[dict], Counter, np.ndarray]:
    """Stream every unit's index rows and rejects into the two files; (shard entries, totals, histogram)."""
    shards, totals, histogram, pending, pending_rows = [], Counter(), new_histogram(), [], 0
    with pq.ParquetWriter(index_path, schema) as index, open(rejected_path, "w") as rejected:
        rejected.writelines(json.dumps(row) + "\n" for row in plan_rejected)
        for unit in range(num_units):
            stats = json.loads(unit_stats_path(output, unit).read_text())
            rejected.writelines(json.dumps(row) + "\n" for row in stats["rejected"])
            totals.update(bytes_in=stats["bytes_in"], filtered=stats["filtered"], rejected=len(stats["rejected"]))
            shards += stats["shards"]
            pending.append(pq.read_table(output / unit_file(unit, "index.parquet")))
            pending_rows += pending[-1].num_rows
            if pending_rows >= ROWS_PER_GROUP:
                index.write_table(pa.concat_tables(pending))
                pending, pending_rows = [], 0
            add_histogram(histogram, output / unit_file(unit, "hist.npz"))
        if pending:
            index.write_table(pa.concat_tables(pending))
    return shards, totals, histogram


def finalize(output: Path, build_info: dict, num_units: int, plan_rejected: list[dict], filtered_at_plan: int,
             schema: pa.Schema | None = None, describe: dict | None = None, selection: dict | None = None,
             refuse_empty: bool = False) -> dict:
    """Write index, rejected list and manifest (last) from every unit's files; returns the manifest.

    One finalizer for every build: `schema` is the index schema (default: `index_schema()`),
    `describe` adds keys after `build_args` (a PhilEO Bench dataset's name and split), `selection`
    records an n-shot selection. `refuse_empty`: units that wrote no sample at all are an InputError,
    and nothing is written.
    """
    index_tmp, rejected_tmp = output / temp_name(INDEX), output / temp_name(REJECTED)
    try:  # one pass over the units, streamed: no unit's rows are held once written
        shards, totals, histogram = _assemble(output, num_units, schema or index_schema(), plan_rejected,
                                              index_tmp, rejected_tmp)
        if refuse_empty and not any(shard["samples"] for shard in shards):
            raise InputError(f"--output {output}: every planned tile was rejected or filtered after decoding (see "
                             "units/*.json); no dataset written (--allow-empty writes an empty one)")
    except BaseException:
        index_tmp.unlink(missing_ok=True)
        rejected_tmp.unlink(missing_ok=True)
        raise
    os.replace(index_tmp, output / INDEX)
    os.replace(rejected_tmp, output / REJECTED)
    shards.sort(key=lambda shard: shard["url"])
    manifest = {
        "schema": SCHEMA_VERSION, "source": build_info["source"], "tool_version": __version__,
        "build_args": build_info["args"], **(describe or {}), "shards": shards,
        "totals": {"samples": sum(s["samples"] for s in shards), "shards": len(shards),
                   "bytes": sum(s["bytes"] for s in shards), "bytes_in": totals["bytes_in"],
                   "rejected": totals["rejected"] + len(plan_rejected),
                   "filtered": filtered_at_plan + totals["filtered"]},
        "band_stats": band_statistics(histogram),
    }
    if selection is not None:
        manifest["selection"] = selection
    atomic_write(output / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest
