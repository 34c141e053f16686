"""`phileo-train bench-data`: times the real data pipeline on a built dataset; bad input is a one-line error."""

import pytest
from click.testing import CliRunner

from training.cli import main


def run_bench(*args: str):
    return CliRunner().invoke(main, ["bench-data", *args])


def test_bench_data_ends_with_crops_per_second(built):
    # 120 px fixture tiles: 64 px crops; one worker so the DataLoader worker path is exercised too.
    result = run_bench("--shards", str(built), "--crops-per-tile", "4", "--num-workers", "1", "--batch-size", "4",
                       "--seconds", "1", "--crop-size", "64")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    name, value = lines[-1].split(": ")
    assert name == "crops/s" and float(value) > 0
    assert any(line.startswith("batch diversity:") for line in lines)


@pytest.mark.parametrize(("flags", "message"), [
    (["--shards", "{tmp}/missing-{{0..1}}.tar"], "--shards"),
    (["--shards", "{built}", "--batch-size", "999"], "192 crops in an epoch: less than 1 batch(es) of 999"),
    (["--shards", "{built}", "--seconds", "0"], "--seconds 0.0: expected a positive number"),
])
def test_bench_data_bad_input_is_a_one_line_error(built, tmp_path, flags, message):
    result = run_bench(*(flag.format(tmp=tmp_path, built=built) for flag in flags), "--crop-size", "64")
    assert result.exit_code == 2, result.output
    error = result.stderr.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1
