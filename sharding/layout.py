"""The file names of a built dataset, in one place (docs/format.md describes each file).

Every command that writes or reads a dataset directory (build, merge, the PhilEO Bench
build, subset, verify...) takes its names from here, so the layout is spelled once.
"""

from __future__ import annotations

import os
from pathlib import Path

from phileo.schema import INDEX, MANIFEST, SHARDS_DIR  # what a reader opens: part of the shard contract

BUILD_INFO = "build.json"  # the build's arguments; written once the plan is complete
PLAN = "plan.parquet"  # MajorTOM-family plan: one row per kept source row, with its unit
PLAN_REJECTED = "plan_rejected.jsonl"  # rows the plan rejected (bad metadata, unreadable files)
PHILEO_BENCH_PLAN = "plan.json"  # the PhilEO Bench build's plan (datasets, units, n-shot selections)
REJECTED = "rejected.jsonl"
UNITS_DIR = "units"  # per-unit resume state: NNNNNN.json (written last), .index.parquet, .hist.npz
NODES_DIR = "nodes"  # multi-node builds: node-I.json per finished node
FOOTERS = "footers"  # remote parquet footers fetched once per build, shared by the plan and every unit
TMP_SUFFIX = ".tmp"  # temp files renamed into place; an interrupted run's leftovers carry it
# MANIFEST is written last: its presence marks a complete dataset

# what a MajorTOM-family build owns in its output directory (anything else there is refused)
BUILD_OWNED = frozenset({BUILD_INFO, PLAN, PLAN_REJECTED, MANIFEST, INDEX, REJECTED, SHARDS_DIR, UNITS_DIR,
                         NODES_DIR, FOOTERS})
PLAN_FILES = (PLAN, PLAN_REJECTED, BUILD_INFO)  # published in this order: build.json last
FINAL_FILES = (INDEX, REJECTED, MANIFEST)  # published in this order: manifest.json last


def temp_name(name: str) -> str:
    """`name.<pid>.tmp`: a temp file of this process, which no other process writing beside it can clobber."""
    return f"{name}.{os.getpid()}{TMP_SUFFIX}"


def unit_temp_files(output: Path, unit: int) -> list[Path]:
    """Temp files of `unit` left by any earlier process (its shards and unit files): temp names carry
    the writer's pid, so a rerun's own writes never replace them; the unit's next run removes them."""
    return [*(output / SHARDS_DIR).glob(f"{unit:06d}-*.tar*{TMP_SUFFIX}"),
            *(output / UNITS_DIR).glob(f"{unit:06d}.*{TMP_SUFFIX}")]


def unit_file(unit: int, suffix: str = "json") -> str:
    """`units/NNNNNN.<suffix>` relative to the dataset root (suffix json, index.parquet or hist.npz)."""
    return f"{UNITS_DIR}/{unit:06d}.{suffix}"


def shard_url(name: str) -> str:
    """A shard's URL as manifests and indexes record it: relative to the dataset root."""
    return f"{SHARDS_DIR}/{name}"


def unit_stats_path(output: Path, unit: int) -> Path:
    """The unit's stats file: written last, its presence marks the unit done."""
    return output / unit_file(unit)


def shard_name(unit: int, number: int) -> str:
    """`NNNNNN-SSSS.tar`: the unit's shards in order, so names never collide between units."""
    return f"{unit:06d}-{number:04d}.tar"


def node_report_path(output: Path, rank: int) -> Path:
    return output / NODES_DIR / f"node-{rank}.json"


__all__ = ["BUILD_INFO", "BUILD_OWNED", "FINAL_FILES", "FOOTERS", "INDEX", "MANIFEST", "NODES_DIR",
           "PHILEO_BENCH_PLAN", "PLAN", "PLAN_FILES", "PLAN_REJECTED", "REJECTED", "SHARDS_DIR", "TMP_SUFFIX",
           "UNITS_DIR", "node_report_path", "shard_name", "shard_url", "temp_name", "unit_file", "unit_stats_path",
           "unit_temp_files"]
