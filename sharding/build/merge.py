"""`phileo-shard merge OUTPUT`: check a multi-node build, then finalize it like a single-node build.

Refuses (one line, naming the units) when a planned unit has no stats file, when a unit has
more than one, when a stats file is not in the plan, or when the node reports disagree with
each other or with the plan's node assignment. Then writes index.parquet, rejected.jsonl
and manifest.json (last) with the same code as `build`, so the bytes are the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from sharding.build.driver import BuildSummary
from sharding.build.manifest import finalize
from sharding.build.nodes import assign_sizes, plan_unit_sizes
from sharding.build.output_dir import remove_temp_files
from sharding.build.output_lock import output_lock
from sharding.errors import InputError
from sharding.layout import BUILD_INFO, NODES_DIR, PLAN_REJECTED, UNITS_DIR, unit_stats_path

log = logging.getLogger(__name__)

SHOWN = 8  # units named in an error before "and N more"


def _names(units: list[int]) -> str:
    shown = ", ".join(f"{unit:06d}" for unit in units[:SHOWN])
    return shown + (f" and {len(units) - SHOWN} more" if len(units) > SHOWN else "")


def _stats_files(output: Path) -> dict[int, list[str]]:
    """unit -> names of the stats files that claim it (by file name and by content)."""
    claims: dict[int, list[str]] = {}
    for path in sorted((output / UNITS_DIR).glob("*.json")):
        try:
            unit = json.loads(path.read_text())["unit"]
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"merge {output}: unreadable stats file {path.name} ({error})") from error
        claims.setdefault(unit, []).append(path.name)  # a copy under another name is a duplicate
    return claims


def _node_reports(output: Path) -> list[dict]:
    reports = []
    for path in sorted((output / NODES_DIR).glob("node-*.json")) if (output / NODES_DIR).is_dir() else []:
        try:
            reports.append(json.loads(path.read_text()) | {"file": path.name})
        except ValueError as error:
            raise InputError(f"merge {output}: unreadable node report {path.name} ({error})") from error
    return reports


def check_complete(output: Path, sizes: Sequence[int]) -> None:
    """Raise InputError (one line) unless every planned unit has exactly one stats file and reports agree.

    `sizes`: the estimated bytes of each planned unit (nodes.py `plan_unit_sizes`), which fix the node shares.
    """
    claims = _stats_files(output)
    stray = sorted(unit for unit in claims if not 0 <= unit < len(sizes))
    if stray:
        raise InputError(f"merge {output}: stats for unit(s) {_names(stray)} not in the plan of {len(sizes)} units")
    duplicated = sorted(unit for unit, files in claims.items() if len(files) > 1)
    if duplicated:
        raise InputError(f"merge {output}: unit(s) {_names(duplicated)} have more than one stats file "
                         f"({', '.join(claims[duplicated[0]])})")
    reports = _node_reports(output)
    owners: dict[int, list[str]] = {}
    for report in reports:
        for unit in report["units"]:
            owners.setdefault(unit, []).append(report["file"])
    twice = sorted(unit for unit, files in owners.items() if len(files) > 1)
    if twice:
        raise InputError(f"merge {output}: unit(s) {_names(twice)} reported by more than one node "
                         f"({', '.join(owners[twice[0]])})")
    missing = [unit for unit in range(len(sizes)) if not unit_stats_path(output, unit).is_file()]
    if missing:
        raise InputError(f"merge {output}: unit(s) {_names(missing)} missing (no stats file)"
                         + _who(reports, missing, sizes))
    _check_reports(output, reports, sizes)


def _who(reports: list[dict], missing: list[int], sizes: Sequence[int]) -> str:
    """`; they belong to node(s) ...` when the node count is known from the reports."""
    counts = {report["num_nodes"] for report in reports}
    if len(counts) != 1:
        return ""
    shares = assign_sizes(sizes, counts.pop())
    absent = set(missing)
    nodes = sorted({rank for rank, share in enumerate(shares) for unit in share if unit in absent})
    return f"; rerun the build of --node-rank {', '.join(map(str, nodes))}"


def _check_reports(output: Path, reports: list[dict], sizes: Sequence[int]) -> None:
    if not reports:
        return  # a plain (single-node) build: the stats files are the whole story
    counts = sorted({report["num_nodes"] for report in reports})
    if len(counts) > 1:
        raise InputError(f"merge {output}: node reports disagree on --num-nodes ({', '.join(map(str, counts))}); "
                         f"remove {NODES_DIR}/ reports of the abandoned run")
    shares = assign_sizes(sizes, counts[0])
    ranks = {report["node_rank"] for report in reports}
    absent = [rank for rank in range(counts[0]) if rank not in ranks]
    if absent:
        raise InputError(f"merge {output}: node(s) {', '.join(map(str, absent))} of {counts[0]} have not reported "
                         f"(unit(s) {_names([u for rank in absent for u in shares[rank]])})")
    for report in reports:
        if report["units"] != shares[report["node_rank"]]:
            raise InputError(f"merge {output}: {report['file']} lists units other than node "
                             f"{report['node_rank']}'s share of this plan")


def merge(output: str) -> BuildSummary:
    """Check and finalize a multi-node build in `output`; returns the build summary."""
    out = Path(output)
    if not (out / BUILD_INFO).is_file():
        raise InputError(f"merge {output}: no {BUILD_INFO}; run `phileo-shard build ... --node-rank I` first")
    with output_lock(out, flag="merge"):
        return _merge(out)


def _merge(out: Path) -> BuildSummary:
    output = str(out)
    remove_temp_files(out)  # of a killed merge: every node has finished, this process holds the lock
    info = json.loads((out / BUILD_INFO).read_text())
    units = plan_unit_sizes(out)  # columnar: the plan's rows are never Python objects here
    if len(units) != info["units"]:
        raise InputError(f"merge {output}: plan lists {len(units)} units, {BUILD_INFO} {info['units']}")
    check_complete(out, units)
    plan_rejected = [json.loads(line) for line in (out / PLAN_REJECTED).read_text().splitlines()]
    manifest = finalize(out, info, len(units), plan_rejected, info["filtered_at_plan"])
    totals = manifest["totals"]
    log.info("merged %d units into %s", len(units), out)
    return BuildSummary().take_totals(totals)
