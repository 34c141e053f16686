"""Static multi-node builds (SLURM and the like): `--num-nodes K --node-rank I`.

Every node computes the same plan (a pure function of the inputs and arguments), takes its
deterministic share of the units, builds them, and writes `nodes/node-I.json` when all of
them are complete. No node writes the dataset files: `phileo-shard merge` does, once every
node has reported. Concurrent first runs on a shared file system publish the plan files
with create-if-absent (hard link of a private temp file): the first node's copy wins and
the others check that theirs is identical.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sharding.build.plan import SavedPlan
from sharding.build.writer import atomic_write
from sharding.errors import InputError
from sharding.layout import NODES_DIR, PLAN, TMP_SUFFIX, node_report_path, unit_stats_path

log = logging.getLogger(__name__)

NODE_SCHEMA = "phileo-shard-node/1"


@dataclass(frozen=True)
class NodeShare:
    """This node's place in a static partition of the units."""

    num_nodes: int
    node_rank: int

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise InputError(f"--num-nodes {self.num_nodes}: expected at least 1")
        if not 0 <= self.node_rank < self.num_nodes:
            raise InputError(f"--node-rank {self.node_rank}: expected 0..{self.num_nodes - 1} "
                             f"for --num-nodes {self.num_nodes}")

    def units(self, plan: SavedPlan) -> list[int]:
        return assign_nodes(plan, self.num_nodes)[self.node_rank]

    def select(self, pending: list[int], plan: SavedPlan) -> list[int]:
        mine = set(self.units(plan))
        return [unit for unit in pending if unit in mine]


def assign_nodes(plan: SavedPlan, num_nodes: int) -> list[list[int]]:
    """Units per node, balanced by estimated bytes (a row without an estimate weighs 1; see `assign_sizes`)."""
    return assign_sizes(plan.unit_bytes(floor=1), num_nodes)


def plan_unit_sizes(output: Path) -> np.ndarray:
    """What `assign_nodes` weighs, from the saved plan's `unit` and `est_bytes` columns alone."""
    return SavedPlan(pq.read_table(output / PLAN, columns=["unit", "est_bytes"])).unit_bytes(floor=1)


def assign_sizes(sizes: np.ndarray, num_nodes: int) -> list[list[int]]:
    """Units per node from their sizes: largest first to the least loaded node (ties: lower unit, lower node)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    loads = [(0, node) for node in range(num_nodes)]  # a heap: the least loaded node, ties by rank
    shares: list[list[int]] = [[] for _ in range(num_nodes)]
    for unit in np.lexsort((np.arange(len(sizes)), -sizes)):
        load, node = heapq.heappop(loads)
        shares[node].append(int(unit))
        heapq.heappush(loads, (load + int(sizes[unit]), node))
    return [sorted(share) for share in shares]


def publish_shared(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` unless another node already did; then the existing file must be identical."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    write(tmp)
    try:
        os.link(tmp, path)  # atomic create-if-absent, also on NFS/Lustre
    except FileExistsError:
        if path.read_bytes() != tmp.read_bytes():
            tmp.unlink()
            raise InputError(f"--output {path.parent}: holds a {path.name} that differs from this node's plan; "
                             "every node must run the same command on the same input") from None
        log.info("%s already written by another node (identical)", path.name)
    tmp.unlink()


def finish_node(output: Path, share: NodeShare, plan: SavedPlan) -> dict:
    """Write `nodes/node-I.json` (this node's units and their totals) from their stats files; returns it."""
    mine = share.units(plan)
    stats = [json.loads(unit_stats_path(output, unit).read_text()) for unit in mine]
    report = {"schema": NODE_SCHEMA, "num_nodes": share.num_nodes, "node_rank": share.node_rank,
              "planned_units": len(plan), "units": mine,
              "totals": {"samples": sum(s["written"] for s in stats),
                         "shards": sum(len(s["shards"]) for s in stats),
                         "bytes": sum(s["bytes_out"] for s in stats), "bytes_in": sum(s["bytes_in"] for s in stats),
                         "rejected": sum(len(s["rejected"]) for s in stats),
                         "filtered": sum(s["filtered"] for s in stats)}}
    (output / NODES_DIR).mkdir(exist_ok=True)
    atomic_write(node_report_path(output, share.node_rank), lambda p: p.write_text(json.dumps(report, indent=1)))
    log.info("node %d of %d: %d units complete; run `phileo-shard merge %s` once every node has finished",
             share.node_rank, share.num_nodes, len(mine), output)
    return report


def distributed_kwargs(options: dict, overwrite: bool) -> dict:
    """`build()` keywords from the CLI's --executor, --ray-address, --num-nodes and --node-rank."""
    executor, address = options.pop("executor"), options.pop("ray_address")
    num_nodes, rank = options.pop("num_nodes"), options.pop("node_rank")
    if address and executor != "ray":
        raise InputError(f"--ray-address {address}: only used with --executor ray")
    if rank is not None and num_nodes is None:
        raise InputError(f"--node-rank {rank}: needs --num-nodes")
    node = None
    if num_nodes is not None:
        node = NodeShare(num_nodes, 0 if rank is None else rank)
        if overwrite:
            raise InputError("--overwrite: not with --num-nodes (one node would delete the others' work); "
                             "empty --output first")
    return {"executor": executor, "ray_address": address, "node": node}
