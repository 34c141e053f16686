"""Shared fixtures: small generated MajorTOM datasets and a CLI runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sharding.cli import main as shard_main
from tools.majortom_fixture import make_majortom_dataset


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread (two spin against each other, up to 20x
    slower). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def majortom(tmp_path_factory) -> tuple[Path, list[dict]]:
    """4 parquet files (one per quadrant N/S x E/W) x 3 rows of 120 px tiles + metadata.parquet; read-only."""
    root = tmp_path_factory.mktemp("majortom")
    rows = make_majortom_dataset(root, num_files=4, rows_per_file=3)
    return root, rows


@pytest.fixture(scope="session")
def built(majortom, tmp_path_factory) -> Path:
    """The `majortom` fixture built with small shards (several units), read-only."""
    out = tmp_path_factory.mktemp("built") / "ds"
    result = run_shard("build", "--input", str(majortom[0]), "--output", str(out), "--shard-size", "300KB",
                       "--mix-files", "2")
    assert result.exit_code == 0, result.output
    return out


def run_shard(*args: str):
    """Run `phileo-shard ARGS` in-process; returns click's Result (exit_code, output)."""
    return CliRunner().invoke(shard_main, list(args), catch_exceptions=False)


def read_manifest(dataset: Path) -> dict:
    return json.loads((dataset / "manifest.json").read_text())
