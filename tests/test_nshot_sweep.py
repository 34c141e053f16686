"""`phileo-train nshot-sweep` over several models, both modes, n-shot and split-ratio datasets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from phileo.models import build
from tests.test_phileo_bench_build import SMALL
from tools.phileo_bench_fixture import make_phileo_bench_dataset
from training.config import ConfigError
from training.finetune.sweep import Init, parse_inits, sweep_runs

MODELS = ("geoaware-unet-tiny", "phileo-vit-tiny")


def test_random_inits_run_once_in_full_and_inits_bind_to_models(tmp_path):
    checkpoint = tmp_path / "a.pt"
    checkpoint.write_bytes(b"")
    inits = parse_inits(("random", f"phileo-vit-tiny:vit={checkpoint}"), MODELS)
    assert inits == [Init("random", None), Init("vit", str(checkpoint), "phileo-vit-tiny")]
    runs = sweep_runs(MODELS, ("frozen", "full"), inits)
    assert [(r.model, r.init.name, r.mode) for r in runs] == [
        ("geoaware-unet-tiny", "random", "full"), ("phileo-vit-tiny", "random", "full"),
        ("phileo-vit-tiny", "vit", "frozen"), ("phileo-vit-tiny", "vit", "full")]
    assert runs[-1].directory("OUT", "n50") == str(Path("OUT/phileo-vit-tiny/vit-full/n50"))
    with pytest.raises(ConfigError, match="no --init applies to it"):
        sweep_runs(MODELS, ("full",), inits[1:])
    with pytest.raises(ConfigError, match="used twice"):
        parse_inits((f"x={checkpoint}", f"phileo-vit-tiny:x={checkpoint}"), MODELS)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    make_phileo_bench_dataset(root / "raw", **SMALL)  # 3 buckets, 2 files of 3 train patches each
    result = subprocess.run([sys.executable, "-m", "sharding.cli", "build", "--source", "phileo-bench", "--input",
                             str(root / "raw"), "--output", str(root / "data"), "--task", "roads", "--n-shot", "2",
                             "--split-ratio", "0.5"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def pretrain_checkpoint(path: Path, model: str) -> None:
    """A stand-in pretraining checkpoint of this project (the ckpt-*.pt layout) for `model`."""
    torch.manual_seed(7)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": build(model).state_dict(), "step": 1}, path)


@pytest.mark.slow
def test_sweep_over_models_modes_n_and_p_writes_one_row_per_run_and_the_curves(data, tmp_path):
    checkpoint = tmp_path / "vit" / "checkpoints" / "ckpt-000000001.pt"
    pretrain_checkpoint(checkpoint, "phileo-vit-tiny")
    command = [sys.executable, "-m", "training.cli", "nshot-sweep", "--task", "roads", "--data", str(data / "data"),
               "--model", MODELS[0], "--model", MODELS[1], "--init", f"{MODELS[0]}:random",
               "--init", f"{MODELS[1]}:{checkpoint}", "--mode", "frozen", "--mode", "full", "--n-shot", "2",
               "--split-ratio", "0.5", "--output", str(tmp_path / "sweep"), "--epochs", "1", "--warmup-epochs", "0",
               "--num-workers", "0", "--batch-size", "4", "--no-amp", "--previews", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep" / "results.csv") as file:
        rows = list(csv.DictReader(file))
    runs = [(MODELS[0], "random", "full"), (MODELS[1], "vit", "frozen"), (MODELS[1], "vit", "full")]
    assert [(r["model"], r["init"], r["mode"], r["n"], r["p"]) for r in rows] == [
        (*run, n, p) for run in runs for n, p in (("2", ""), ("", "0.5"))]  # frozen: pretrained inits only
    assert all(float(r["rmse"]) >= 0 for r in rows)
    assert {(r["n"], r["train_patches"]) for r in rows} == {("2", "6"), ("", "9")}  # 3 buckets: 2 each, 1 file each
    for row in rows:
        run = json.loads((tmp_path / "sweep" / row["run_dir"] / "metrics.json").read_text())
        assert (run["model"], run["mode"], run["init"]) == \
               (row["model"], row["mode"], None if row["init"] == "random" else str(checkpoint))
    assert (tmp_path / "sweep" / MODELS[1] / "vit-frozen" / "p0.5" / "metrics.json").is_file()
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert f"| {MODELS[1]} vit-frozen |" in table and "| p=0.5 |" in table and "| n=2 |" in table
    for figure in ("nshot_rmse.png", "split_rmse.png"):
        assert Image.open(tmp_path / "sweep" / figure).size[0] > 100


def test_missing_datasets_are_one_line_errors_before_any_run(data, tmp_path):
    command = [sys.executable, "-m", "training.cli", "nshot-sweep", "--task", "roads", "--data", str(data / "data"),
               "--model", MODELS[0], "--split-ratio", "0.1", "--output", str(tmp_path / "sweep")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "roads-p0.1/train/manifest.json is missing" in result.stderr and "--split-ratio 0.1" in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_classification_sweep_reads_its_dense_tasks_datasets(data):
    """roads-classification labels are computed from the roads labels: its n-shot set is DATA/roads-n{n}."""
    from training.finetune.sweep import sweep_datasets

    train, val, test = sweep_datasets(str(data / "data"), "roads-classification", "n", 2)
    assert (train, val, test) == (str(data / "data" / "roads-n2" / "train"), str(data / "data" / "roads-n2" / "val"),
                                  str(data / "data" / "test"))
    with pytest.raises(ConfigError, match="--task buildings --n-shot 2"):
        sweep_datasets(str(data / "data"), "buildings-classification", "n", 2)
