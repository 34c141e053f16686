"""Distributed builds: Ray executor (same bytes, survives a dead worker) and --num-nodes + merge."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from sharding.build.nodes import publish_shared
from sharding.build.ray_executor import DIE_ONCE_ENV
from sharding.dataset.tarread import iter_tar_samples
from sharding.errors import InputError
from tests.conftest import read_manifest, run_shard

BUILT_ARGS = ("--shard-size", "300KB", "--mix-files", "2")  # as the `built` fixture
DIE_UNIT = 1


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the module; `phileo-shard build --executor ray` in-process reuses it."""
    ray = pytest.importorskip("ray")
    marker_dir = tmp_path_factory.mktemp("ray") / "die-once"
    os.environ[DIE_ONCE_ENV] = f"{DIE_UNIT}:{marker_dir}"  # workers inherit it; armed once marker_dir exists
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield marker_dir
    ray.shutdown()
    os.environ.pop(DIE_ONCE_ENV)


def dataset_files(dataset):
    """{relative path: bytes} of what a finished dataset publishes (manifest, index, rejected, shards)."""
    names = ["manifest.json", "index.parquet", "rejected.jsonl",
             *(shard["url"] for shard in read_manifest(dataset)["shards"])]
    return {name: (dataset / name).read_bytes() for name in names}


def keys_of(dataset):
    return [raw.key for shard in read_manifest(dataset)["shards"] for raw in iter_tar_samples(dataset / shard["url"])]


@pytest.mark.slow
def test_ray_build_equals_local_build(majortom, built, ray_cluster, tmp_path):
    out = tmp_path / "ray"
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), *BUILT_ARGS,
                       "--executor", "ray", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert len(read_manifest(out)["shards"]) >= 3
    assert dataset_files(out) == dataset_files(built)
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(built / "index.parquet"))


@pytest.mark.slow
def test_ray_build_survives_a_worker_dying_mid_unit(majortom, built, ray_cluster, tmp_path):
    ray_cluster.mkdir()  # arm the hook: the first attempt of unit DIE_UNIT exits after its first tile
    try:
        out = tmp_path / "ray-died"
        result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), *BUILT_ARGS,
                           "--executor", "ray")
    finally:
        died = (ray_cluster / f"died-{DIE_UNIT}").exists()
        shutil.rmtree(ray_cluster)
    assert died, "the worker was never killed: the test proved nothing"
    assert result.exit_code == 0, result.output
    keys = keys_of(out)
    assert sorted(keys) == sorted(record["key"] for record in majortom[1])  # every key exactly once
    assert dataset_files(out) == dataset_files(built)
    assert not list(out.glob("shards/*.tmp"))


def test_ray_flags_are_checked(majortom, tmp_path):
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "x"),
                       "--ray-address", "127.0.0.1:6379")
    assert result.exit_code == 2 and "--ray-address" in result.output and "--executor ray" in result.output
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(tmp_path / "x"),
                       "--num-nodes", "3", "--node-rank", "3")
    assert result.exit_code == 2 and "--node-rank 3: expected 0..2" in result.output


def node_build(source, out, rank):
    command = [sys.executable, "-m", "sharding.cli", "build", "--input", str(source), "--output", str(out),
               *BUILT_ARGS, "--num-nodes", "3", "--node-rank", str(rank)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def one_line_error(result):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: merge"), result.output
    return errors[0]


@pytest.mark.slow
def test_three_nodes_then_merge_equals_single_node_build(majortom, built, tmp_path):
    out = tmp_path / "nodes"
    nodes = [node_build(majortom[0], out, rank) for rank in (0, 2)]  # node 1 not yet: started at once,
    for node in nodes:  # they plan concurrently on the same directory
        assert node.wait(timeout=120) == 0, node.stdout.read()
    assert not (out / "manifest.json").exists()
    reports = [json.loads((out / "nodes" / f"node-{rank}.json").read_text()) for rank in (0, 2)]
    missing = sorted(set(range(json.loads((out / "build.json").read_text())["units"]))
                     - {unit for report in reports for unit in report["units"]})
    assert missing, "node 1 got no units: the test would prove nothing"
    error = one_line_error(run_shard("merge", str(out)))
    assert f"unit(s) {', '.join(f'{u:06d}' for u in missing)} missing" in error and "--node-rank 1" in error
    assert not (out / "manifest.json").exists()

    result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), *BUILT_ARGS,
                       "--num-nodes", "3", "--node-rank", "1")
    assert result.exit_code == 0, result.output
    assert not (out / "manifest.json").exists()
    merged = run_shard("merge", str(out))
    assert merged.exit_code == 0, merged.output
    assert dataset_files(out) == dataset_files(built)
    assert (out / "plan.parquet").read_bytes() == (built / "plan.parquet").read_bytes()


@pytest.mark.slow
def test_merge_refuses_duplicated_units(majortom, built, tmp_path):
    out = tmp_path / "dup"
    shutil.copytree(built, out)  # a finished single-node build: merge accepts it as it is
    (out / "manifest.json").unlink()
    assert run_shard("merge", str(out)).exit_code == 0
    assert dataset_files(out) == dataset_files(built)

    shutil.copy(out / "units" / "000002.json", out / "units" / "000002-again.json")
    assert "unit(s) 000002 have more than one stats file" in one_line_error(run_shard("merge", str(out)))
    (out / "units" / "000002-again.json").unlink()

    num_units = json.loads((out / "build.json").read_text())["units"]
    assert num_units >= 3
    (out / "nodes").mkdir()
    for rank, units in enumerate([[0, 1], list(range(1, num_units))]):
        report = {"num_nodes": 2, "node_rank": rank, "units": units}
        (out / "nodes" / f"node-{rank}.json").write_text(json.dumps(report))
    assert "unit(s) 000001 reported by more than one node" in one_line_error(run_shard("merge", str(out)))


def test_plan_files_from_concurrent_nodes_must_be_identical(tmp_path):
    path = tmp_path / "plan.parquet"
    publish_shared(path, lambda p: p.write_bytes(b"plan"))
    publish_shared(path, lambda p: p.write_bytes(b"plan"))  # the same plan from another node: accepted
    with pytest.raises(InputError, match="differs from this node's plan"):
        publish_shared(path, lambda p: p.write_bytes(b"other"))
    assert path.read_bytes() == b"plan" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.parquet"]


@pytest.mark.slow
def test_ray_unit_failure_is_reported_not_raised(ray_cluster, tmp_path):
    from sharding.build.plan import Filters
    from sharding.build.ray_executor import run_ray
    from sharding.build.unit import UnitOptions

    (tmp_path / "shards").mkdir()
    (tmp_path / "units").mkdir()
    options = UnitOptions(str(tmp_path), "parquet", 1000, Filters())
    broken = [{"source_file": "missing.parquet"}]  # no source_row: a KeyError, not retried
    results = list(run_ray([(0, broken), (1, [])], options, 2, lambda *_: None))
    by_unit = {result["unit"]: result for result in results}
    assert sorted(by_unit) == [0, 1]
    assert by_unit[0]["error"].startswith("KeyError") and "source_row" in by_unit[0]["error"]
    assert "error" not in by_unit[1] and by_unit[1]["written"] == 0


def test_merge_weighs_units_from_the_plan_columns_as_the_nodes_do(built):
    """merge reads only the plan's unit and est_bytes columns; the node shares must be the nodes' own."""
    from sharding.build.driver import load_units
    from sharding.build.nodes import assign_nodes, assign_sizes, plan_unit_sizes

    plan = load_units(built)
    sizes = plan_unit_sizes(built)
    assert sizes.tolist() == [sum(row.get("est_bytes") or 1 for row in plan.rows(unit)) for unit in range(len(plan))]
    for nodes in (1, 2, 3, 64):
        assert assign_sizes(sizes, nodes) == assign_nodes(plan, nodes)
