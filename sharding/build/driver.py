"""`phileo-shard build`: plan (or load the saved plan), run pending units, finalize.

Output layout: build.json (the arguments; written when the plan is complete), plan.parquet,
plan_rejected.jsonl, units/ (per-unit stats, index rows, histograms), shards/*.tar and,
once every unit is done, index.parquet, rejected.jsonl and manifest.json (last).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from phileo import __version__
from phileo.schema import DEFAULT_CLEVEL, SCHEMA_VERSION
from sharding.build.distributor import run_local
from sharding.build.fasttom import FastTomRules
from sharding.build.labels import LabelSpec, check_label_rasters, validate_label_specs
from sharding.build.manifest import finalize
from sharding.build.nodes import NodeShare, assign_nodes, finish_node, publish_shared
from sharding.build.output_dir import open_build_output, remove_temp_files
from sharding.build.output_lock import output_lock
from sharding.build.plan import Filters, PendingUnits, SavedPlan, assign_units, select_rows
from sharding.build.ray_executor import run_ray
from sharding.build.remote_output import RemoteOutput
from sharding.build.unit import UnitOptions
from sharding.build.writer import atomic_write, check_codec_environment
from sharding.errors import InputError
from sharding.layout import (
    BUILD_INFO,
    BUILD_OWNED,
    FOOTERS,
    PLAN,
    PLAN_REJECTED,
    SHARDS_DIR,
    UNITS_DIR,
    unit_stats_path,
)
from sharding.sources.geotiff_catalog import list_geotiff_folders
from sharding.sources.majortom_catalog import parquet_files
from sharding.sources.remote import credentials, is_remote, set_footer_cache
from sharding.sources.remote_catalog import list_source, remote_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildArgs:
    """The arguments that define a dataset: a rerun must repeat them exactly to resume."""

    input: str
    output: str
    filters: Filters = field(default_factory=Filters)
    shard_size: int = 1_000_000_000
    mix_groups: int = 16
    seed: int = 0
    clevel: int = DEFAULT_CLEVEL
    thumbnails: bool = False
    labels: tuple[LabelSpec, ...] = ()
    fasttom: FastTomRules | None = None  # --source fasttom: one quadrant per tile, FastTOM's rules
    tile_source: str = "majortom"  # or "geotiff": per-sample folders of GeoTIFFs
    metadata: str | None = None  # --metadata: plan from a metadata.parquet (path or URL)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # callers may pass a list; keep it hashable
        validate_label_specs(self.labels)
        if self.shard_size < 1:
            raise InputError(f"--shard-size {self.shard_size}: expected a positive number of bytes")
        if self.mix_groups < 1:
            raise InputError(f"--mix-files {self.mix_groups}: expected at least 1")
        if not 0 <= self.clevel <= 9:
            raise InputError(f"--clevel {self.clevel}: expected 0..9")

    def defining(self) -> dict:
        """JSON of what the dataset depends on (not where it is written)."""
        args = asdict(self)
        args.pop("output")
        args["input"] = self.input if not self.input or is_remote(self.input) else str(Path(self.input).resolve())
        if args["metadata"] is None:  # absent without --metadata: build.json of earlier builds still match
            args.pop("metadata")
        filters = args["filters"]
        if filters["grid_cells"] is not None:
            filters["grid_cells"] = sorted(filters["grid_cells"])
        if filters["bbox"] is not None:
            filters["bbox"] = list(filters["bbox"])
        args.pop("labels")
        if args["fasttom"] is None:  # absent for majortom: build.json of earlier builds still match
            args.pop("fasttom")
        if args["tile_source"] == "majortom":
            args.pop("tile_source")
        if self.labels:  # absent without labels: build.json of builds before --label still match
            args["labels"] = [spec.defining() for spec in sorted(self.labels, key=lambda spec: spec.name)]
        return args


@dataclass
class BuildSummary:
    written: int = 0
    rejected: int = 0
    filtered: int = 0
    shards: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    failed_units: list[dict] = field(default_factory=list)
    retries: int = 0  # remote reads retried in this run

    def take_totals(self, totals: dict) -> BuildSummary:
        """The counts of a finished dataset (a manifest's or a node report's `totals`)."""
        self.written, self.shards, self.bytes_out = totals["samples"], totals["shards"], totals["bytes"]
        self.rejected, self.filtered, self.bytes_in = totals["rejected"], totals["filtered"], totals["bytes_in"]
        return self

    def line(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        return (f"wrote {self.written} tiles in {self.shards} shards ({self.bytes_out / 1e6:.1f} MB from "
                f"{self.bytes_in / 1e6:.1f} MB of GeoTIFF), rejected {self.rejected}, filtered {self.filtered}, "
                f"in {self.seconds:.1f} s ({rate:.2f} tiles/s)" + (f", {self.retries} remote retries"
                                                                    if self.retries else ""))


@dataclass
class PlanSummary:
    """What `--dry-run` reports: the saved plan, and each node's share with --num-nodes."""

    output: Path
    info: dict
    plan: SavedPlan
    node: NodeShare | None = None
    failed_units: list[dict] = field(default_factory=list)
    rejected: int = 0

    def line(self) -> str:
        info, plan = self.info, self.plan
        dropped = ", ".join(f"{name} {count}" for name, count in info.get("filtered_by", {}).items()) or "none"
        with open(self.output / PLAN_REJECTED) as file:
            rejected = sum(1 for _ in file)
        lines = [f"plan: {info['planned_tiles']} tiles in {len(plan)} units (shards), ~"
                 f"{info.get('planned_source_bytes', 0) / 1e9:.2f} GB of source (tile sizes: "
                 f"{info.get('tile_bytes', 'parquet footers')}); dropped by the filters: "
                 f"{info['filtered_at_plan']} ({dropped}); rejected: {rejected} (plan_rejected.jsonl)"]
        if self.node is not None:
            sizes = plan.unit_bytes()
            for rank, share in enumerate(assign_nodes(plan, self.node.num_nodes)):
                lines.append(f"node {rank}: {len(share)} units, {plan.tiles(share)} tiles, "
                             f"~{sizes[share].sum() / 1e9:.2f} GB")
        lines.append(f"saved in {self.output}: the same command without --dry-run builds it")
        return "\n".join(lines)


def prepare_output(args: BuildArgs, overwrite: bool) -> dict | None:
    """Create/clean the output; return the saved build info when resuming, else None."""
    output = Path(args.output)
    info = open_build_output(output, lambda name: name in BUILD_OWNED, overwrite, args.defining())
    (output / SHARDS_DIR).mkdir(exist_ok=True)
    (output / UNITS_DIR).mkdir(exist_ok=True)
    return info


def make_plan(args: BuildArgs, write: Callable = atomic_write, allow_empty: bool = False) -> dict:
    """List, filter and cut the input into units; saves the plan (with `write`), build.json last.

    A plan of no tile is an InputError saying why (nothing is saved, so a rerun plans again),
    unless `allow_empty`."""
    output = Path(args.output)
    set_footer_cache(output / FOOTERS)
    if args.tile_source == "geotiff":
        catalog = list_geotiff_folders(args.input)
    else:
        catalog = list_source(args.input, args.metadata)
    kept, duplicates, dropped = select_rows(catalog, args.filters)
    filtered = sum(dropped.values())
    if not len(kept) and not allow_empty:
        raise InputError(_nothing_to_build(args, catalog, duplicates, filtered))
    table = assign_units(catalog, kept, args.shard_size, args.mix_groups, args.seed)  # empties the catalog
    units = int(table.column("unit")[-1].as_py()) + 1 if table.num_rows else 0
    write(output / PLAN, lambda p: pq.write_table(table, p))
    rejected = catalog.rejected + duplicates
    write(output / PLAN_REJECTED, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rejected)))
    source = "fasttom" if args.fasttom else args.tile_source
    info = {"schema": SCHEMA_VERSION, "source": source, "layout": catalog.layout, "tool_version": __version__,
            "args": args.defining(), "units": units, "planned_tiles": table.num_rows,
            "filtered_at_plan": filtered, "filtered_by": dict(sorted(dropped.items())),
            "planned_source_bytes": int(pc.sum(table.column("est_bytes")).as_py() or 0),
            "tile_bytes": catalog.tile_bytes}
    write(output / BUILD_INFO, lambda p: p.write_text(json.dumps(info, indent=1)))
    log.info("planned %d tiles in %d units (%d rejected, %d filtered)", table.num_rows, units,
             len(rejected), filtered)
    return info


def _warn_unplanned_files(args: BuildArgs, output: Path) -> None:
    """A resume builds the saved plan: say so when the local input gained files since it was made."""
    if args.tile_source != "majortom" or args.metadata or not args.input or is_remote(args.input):
        return
    source = Path(args.input)
    if not source.is_dir():
        return
    planned_at = (output / BUILD_INFO).stat().st_mtime
    newer = [path for path in parquet_files(source) if path.stat().st_mtime > planned_at]
    if newer:
        log.warning("%d parquet file(s) under --input changed or appeared after this build was planned (first: "
                    "%s) and are not part of it; build them into another --output, or add --overwrite to plan "
                    "again", len(newer), newer[0])


def _nothing_to_build(args: BuildArgs, catalog, duplicates: list[dict], filtered: int) -> str:
    listed = len(catalog)
    where = f"--input {args.input}" if args.input else f"--metadata {args.metadata}"
    if not listed:
        first = catalog.rejected[0] if catalog.rejected else None
        detail = f"; first: {first['file']}: {first['reason']}" if first else ""
        return (f"{where}: no readable tile ({len(catalog.rejected)} rows or files rejected{detail}); "
                "nothing to build (--allow-empty writes an empty dataset)")
    return (f"{where}: the filters keep none of the {listed} listed tiles ({filtered} filtered, "
            f"{len(duplicates)} duplicates); nothing to build (--allow-empty writes an empty dataset)")


def load_units(output: Path, columns: list[str] | None = None) -> SavedPlan:
    """The saved plan (only `columns` and `unit` when given: enough to count and balance units)."""
    return SavedPlan(pq.read_table(output / PLAN, columns=None if columns is None else ["unit", *columns]))


def build(args: BuildArgs, workers: int = 1, overwrite: bool = False, executor: str = "local",
          ray_address: str | None = None, node: NodeShare | None = None, sink=None,
          allow_empty: bool = False, dry_run: bool = False) -> BuildSummary | PlanSummary:
    """Build (or resume) a dataset, or only `node`'s share of it; returns the summary. Raises InputError.

    The output's lock (build/output_lock.py; one per node of a multi-node build) is held throughout.
    A build that would give no tile is an InputError unless `allow_empty`. `dry_run` plans (or loads
    the saved plan) and stops: the same command without it continues from that plan."""
    check_label_rasters(args.labels)  # bad arguments fail before the output is touched
    check_codec_environment()
    with output_lock(Path(args.output), node_rank=node.node_rank if node else None):
        return _build(args, workers, overwrite, executor, ray_address, node, sink, allow_empty, dry_run)


def _build(args: BuildArgs, workers: int, overwrite: bool, executor: str, ray_address: str | None,
           node: NodeShare | None, sink, allow_empty: bool, dry_run: bool = False) -> BuildSummary | PlanSummary:
    started = time.monotonic()
    output = Path(args.output)
    info = prepare_output(args, overwrite)
    if node is None:  # nodes of a multi-node build share this directory: one may be publishing the plan
        remove_temp_files(output)
    if info:
        _warn_unplanned_files(args, output)
        if args.input and is_remote(args.input) and args.input.endswith((".txt", ".json")):
            remote_files(args.input)  # its entries' credentials, kept in memory only, for the units to read
    else:
        info = make_plan(args, publish_shared if node else atomic_write, allow_empty)
    if sink is not None:  # --output s3://: output is its staging directory (sharding/build/remote_output.py)
        sink.publish_plan()
    plan = load_units(output)
    if dry_run:
        return PlanSummary(output, info, plan, node)
    pending = [unit for unit in range(len(plan)) if not unit_stats_path(output, unit).is_file()]
    pending = PendingUnits(plan, node.select(pending, plan) if node else pending)
    options = UnitOptions(str(output), info["layout"], args.shard_size, args.filters, args.clevel, args.thumbnails,
                          args.labels, args.fasttom, sink=sink.url if sink is not None else None,
                          credentials=credentials())
    summary = BuildSummary()
    log.info("%d of %d units to build (%d already complete)", len(pending), len(plan), len(plan) - len(pending))
    runner = run_local if executor == "local" else partial(run_ray, address=ray_address)
    _run_with_progress(pending, options, workers, summary, started, runner)
    if node and not summary.failed_units:
        summary.take_totals(finish_node(output, node, plan)["totals"])
    elif not summary.failed_units:
        plan_rejected = [json.loads(line) for line in (output / PLAN_REJECTED).read_text().splitlines()]
        manifest = finalize(output, info, len(plan), plan_rejected, info["filtered_at_plan"],
                            refuse_empty=not allow_empty)
        if sink is not None:
            sink.publish_final()
        summary.take_totals(manifest["totals"])
    summary.seconds = time.monotonic() - started
    return summary


def _run_with_progress(pending: PendingUnits, options: UnitOptions, workers: int, summary: BuildSummary,
                       started: float, runner: Callable = run_local) -> None:
    total_tiles = pending.tiles()
    moved = {"in": 0, "out": 0}
    with tqdm(total=total_tiles, unit="tile", desc="build", dynamic_ncols=True) as bar:

        def on_tile(bytes_in: int, bytes_out: int) -> None:
            moved["in"] += bytes_in
            moved["out"] += bytes_out
            megabytes_per_s = 1e-6 / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"in {moved['in'] * megabytes_per_s:.1f} MB/s, "
                                f"out {moved['out'] * megabytes_per_s:.1f} MB/s", refresh=False)
            bar.update(1)

        for result in runner(pending, options, workers, on_tile):
            summary.retries += result.get("retries", 0)
            if "error" in result:
                log.error("unit %d failed: %s\n%s", result["unit"], result["error"], result["traceback"])
                summary.failed_units.append(result)
            else:  # what this run finished (the totals of a finalized build replace these)
                summary.written += result["written"]
                summary.shards += len(result["shards"])
                summary.bytes_out += result["bytes_out"]
                summary.bytes_in += result["bytes_in"]
                summary.rejected += len(result["rejected"])
                summary.filtered += result["filtered"]
    if summary.failed_units:
        log.error("%d unit(s) failed; rerun the same command to retry them", len(summary.failed_units))


def build_to_remote(args, workers: int = 1, overwrite: bool = False, **build_kwargs):
    """`phileo-shard build` with --output s3://...: stage locally, publish as units complete."""
    output = RemoteOutput(args.output)
    output.acquire()
    try:
        return _build_to_remote(output, args, workers, overwrite, **build_kwargs)
    finally:
        output.release()


def _build_to_remote(output: RemoteOutput, args, workers: int, overwrite: bool, **build_kwargs):
    staging = output.prepare(overwrite, BUILD_OWNED)
    try:
        summary = build(replace(args, output=str(staging)), workers=workers, overwrite=overwrite, sink=output,
                            **build_kwargs)
    except InputError as error:  # name the prefix the user gave, not the staging directory
        raise InputError(str(error).replace(str(staging), output.url)) from error
    finally:  # what is done is published; a rerun rebuilds its own staging from the prefix
        shutil.rmtree(staging, ignore_errors=True)
    return summary
