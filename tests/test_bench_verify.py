"""tools/bench_verify.py at a tiny size: its generated 64-node output merges and verifies clean."""

from __future__ import annotations

from tools.bench_verify import run_size


def test_generated_node_outputs_merge_and_verify_without_a_problem():
    figures = run_size(units=12, tiles=5, nodes=4)  # exits with the stderr of any command that fails
    assert {"finalize", "merge", "verify --no-pixels"} <= set(figures)
    assert all(wall > 0 and peak_mb > 0 for name, (wall, peak_mb) in figures.items() if name != "shard bytes")
